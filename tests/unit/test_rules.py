"""Rules file loading and the pre-filter's decisions (rule match, PII -> require_local)."""

from __future__ import annotations

from pathlib import Path

import pytest

from semroute.dispatch.rules import RuleEngine
from semroute.errors import ConfigError
from semroute.types import Message

RULES = """\
pii:
  kinds: [email, card]
rules:
  - name: code-fence
    pattern: "```|\\\\bdef \\\\w+\\\\("
    route: code
    targets: [local-large, gpt-4o]
  - name: legal
    keywords: [contract, "non-disclosure"]
    route: sensitive
    targets: [local-large]
    require_local: true
  - name: long
    min_chars: 200
    route: summarize
    targets: [gpt-4o-mini, local-small]
  - name: tiny-hello
    keywords: [hello]
    max_chars: 20
    route: chitchat
    targets: [local-small]
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(text)
    return path


def _user(*texts: str) -> tuple[Message, ...]:
    return tuple(Message("user", t) for t in texts)


@pytest.fixture
def engine(tmp_path: Path) -> RuleEngine:
    return RuleEngine.load(_write(tmp_path, RULES))


def test_loads_rules_in_order_with_sources(engine: RuleEngine, tmp_path: Path) -> None:
    """Rules keep file order and remember file:line for messages."""
    assert [r.name for r in engine.rules] == ["code-fence", "legal", "long", "tiny-hello"]
    assert engine.rules[0].targets == ("local-large", "gpt-4o")
    assert engine.rules[1].source == f"{tmp_path / 'rules.yaml'}:8"
    assert engine.targets() == {"local-large", "gpt-4o", "gpt-4o-mini", "local-small"}


@pytest.mark.parametrize(
    ("text", "rule"),
    [
        ("```python\nprint(1)\n```", "code-fence"),
        ("please def foo(x): fix it", "code-fence"),
        ("Review this CONTRACT for me", "legal"),
        ("sign the non-disclosure agreement", "legal"),
        ("contractor rates in Berlin", None),  # keywords are whole words
        ("x" * 250, "long"),
        ("hello there", "tiny-hello"),
        ("hello, I would like a long essay on many things", None),  # too long for tiny-hello
        ("what is the capital of France?", None),
    ],
)
def test_first_matching_rule_wins(engine: RuleEngine, text: str, rule: str | None) -> None:
    """Each condition kind matches as documented; all conditions of a rule must hold."""
    pre = engine.evaluate(_user(text))
    assert (pre.rule.name if pre.rule else None) == rule


def test_rules_see_the_last_user_message_only(engine: RuleEngine) -> None:
    """An earlier turn matching a rule does not route the current one."""
    msgs = (Message("user", "review this contract"), Message("assistant", "ok"),
            Message("user", "thanks, what about tomorrow's weather?"))
    assert engine.evaluate(msgs).rule is None


def test_pii_anywhere_forces_local(engine: RuleEngine) -> None:
    """PII in any message (all are sent upstream) sets require_local, with the kinds."""
    msgs = (Message("system", "customer: ann@example.org"), Message("user", "draft a reply"))
    pre = engine.evaluate(msgs)
    assert pre.pii_kinds == ("email",)
    assert pre.require_local
    # phone numbers are not among this file's kinds
    assert not engine.evaluate(_user("call +44 20 7946 0958")).require_local


def test_rule_can_require_local(engine: RuleEngine) -> None:
    """A rule with require_local keeps the request local without any PII."""
    pre = engine.evaluate(_user("review this contract"))
    assert pre.pii_kinds == () and pre.require_local


def test_default_engine_detects_all_kinds_and_has_no_rules() -> None:
    """Without a rules file PII detection is on for every kind."""
    engine = RuleEngine.default()
    assert engine.rules == ()
    assert engine.evaluate(_user("iban GB82WEST12345698765432")).pii_kinds == ("iban",)


def test_pii_can_be_disabled(tmp_path: Path) -> None:
    """`pii: {enabled: false}` turns detection off explicitly."""
    engine = RuleEngine.load(_write(tmp_path, "pii: {enabled: false}\n"))
    assert engine.pii is None
    assert not engine.evaluate(_user("bob@example.com")).require_local


def test_every_problem_is_reported_with_file_line_and_field(tmp_path: Path) -> None:
    """A bad file lists each problem as file:line: rules[i].field: reason, not only the first;
    the line is the field's own (or the rule's, for a missing field or a whole-rule problem)."""
    path = _write(
        tmp_path,
        """\
pii:
  kinds: [email, passport]
rules:
  - name: a
    pattern: "(unclosed"
    route: code
    targets: [x]
  - name: b
    route: code
  - name: a
    keywords: [k]
    route: r
    targets: [x]
    colour: blue
  - name: c
    route: r
    targets: [x]
""",
    )
    with pytest.raises(ConfigError) as info:
        RuleEngine.load(path)
    msg = str(info.value)
    assert f"{path}:5: rules[0].pattern: invalid regular expression" in msg
    assert f"{path}:8: rules[1].targets: required" in msg
    assert f"{path}:14: rules[2].colour: unknown field" in msg
    assert f"{path}:15: rules[3]: needs at least one of pattern, keywords" in msg
    assert "pii.kinds: unknown kind(s) passport" in msg


def test_duplicate_names_and_bad_yaml(tmp_path: Path) -> None:
    """Duplicate rule names and unparsable YAML are refused with the file named."""
    dup = "rules:\n  - {name: a, keywords: [x], route: r, targets: [t]}\n" \
          "  - {name: a, keywords: [y], route: r, targets: [t]}\n"
    with pytest.raises(ConfigError, match=r"rules\[1\].name: duplicate rule name 'a'"):
        RuleEngine.load(_write(tmp_path, dup))
    with pytest.raises(ConfigError, match="invalid YAML"):
        RuleEngine.load(_write(tmp_path, "rules: [\n"))
    with pytest.raises(ConfigError, match="cannot read rules file"):
        RuleEngine.load(tmp_path / "missing.yaml")
