"""The rule and PII pre-filter that runs before the embedding router (hybrid routing).

A rules file (``dispatcher.rules_file``)::

    pii:
      enabled: true                  # default; false turns detection off
      kinds: [email, phone, card, iban, ssn, credential]   # default: all
    rules:                           # first match wins, in file order
      - name: code-fence
        pattern: "```|\\bdef \\w+\\("      # Python regex, searched in the last user message
        route: code
        targets: [local-large, gpt-4o]   # the fallback chain to use, in order
      - name: legal
        keywords: [contract, lawsuit]    # any of these whole words, case-insensitive
        route: sensitive
        targets: [local-large]
        require_local: true              # also keep this request on local backends
      - name: long-input
        min_chars: 6000                  # prompt length; max_chars works the same way
        route: summarize
        targets: [gpt-4o-mini, local-large]

A rule's conditions (pattern, keywords, min_chars, max_chars) must all hold; it needs at least
one. PII found in *any* message (all of them are sent upstream) forces ``require_local``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from semroute.errors import ConfigError
from semroute.pii import PII_KINDS, PiiDetector
from semroute.types import Message


@dataclass(frozen=True)
class Rule:
    name: str
    route: str
    targets: tuple[str, ...]
    pattern: re.Pattern[str] | None = None
    keywords: re.Pattern[str] | None = None
    min_chars: int | None = None
    max_chars: int | None = None
    require_local: bool = False
    source: str = ""  # file:line

    def matches(self, text: str) -> bool:
        n = len(text)
        if self.min_chars is not None and n < self.min_chars:
            return False
        if self.max_chars is not None and n > self.max_chars:
            return False
        if self.keywords is not None and not self.keywords.search(text):
            return False
        return self.pattern is None or bool(self.pattern.search(text))

    def describe(self) -> str:
        parts = []
        if self.pattern is not None:
            parts.append("pattern")
        if self.keywords is not None:
            parts.append("keyword")
        if self.min_chars is not None:
            parts.append(f">= {self.min_chars} chars")
        if self.max_chars is not None:
            parts.append(f"<= {self.max_chars} chars")
        return f"rule {self.name!r} ({', '.join(parts)})"


@dataclass(frozen=True)
class Prefilter:
    """What the pre-filter decided for one request."""

    rule: Rule | None  # the first matching rule, if any
    pii_kinds: tuple[str, ...]  # kinds of personal data found (empty: none)

    @property
    def require_local(self) -> bool:
        return bool(self.pii_kinds) or (self.rule is not None and self.rule.require_local)


class RuleEngine:
    """Rules in order plus a PII detector (None: detection off)."""

    def __init__(self, rules: Sequence[Rule] = (), pii: PiiDetector | None = None) -> None:
        self.rules = tuple(rules)
        self.pii = pii

    @classmethod
    def default(cls) -> RuleEngine:
        """No rules, PII detection on for every kind (what runs without a rules file)."""
        return cls((), PiiDetector())

    @classmethod
    def load(cls, path: Path) -> RuleEngine:
        """Read a rules file. ConfigError lists every problem as ``file:line: field: reason``."""
        return _load(path)

    def evaluate(self, messages: Sequence[Message]) -> Prefilter:
        """Rules see the last user message; PII detection sees every message."""
        text = next((m.content for m in reversed(messages) if m.role == "user"), "")
        rule = next((r for r in self.rules if r.matches(text)), None)
        kinds = self.pii.kinds_in(m.content for m in messages) if self.pii is not None else ()
        return Prefilter(rule, kinds)

    def targets(self) -> set[str]:
        """Every target any rule names (checked against the backends at start-up)."""
        return {t for r in self.rules for t in r.targets}


_RULE_KEYS = {
    "name",
    "pattern",
    "keywords",
    "min_chars",
    "max_chars",
    "route",
    "targets",
    "require_local",
}


def _load(path: Path) -> RuleEngine:
    try:
        text = path.read_text()
        node = yaml.compose(text)
        raw = yaml.safe_load(text)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read rules file: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}:1: top level must be a mapping with `rules:` and/or `pii:`")
    problems: list[str] = []
    for key in sorted(set(raw) - {"rules", "pii"}):
        problems.append(f"{path}:{_line(node, key)}: {key}: unknown section (allowed: pii, rules)")
    pii = _pii(raw.get("pii", {}), f"{path}:{_line(node, 'pii')}", problems)
    rules: list[Rule] = []
    items = raw.get("rules", []) or []
    if not isinstance(items, list):
        problems.append(f"{path}:{_line(node, 'rules')}: rules: must be a list")
        items = []
    item_nodes = _child(node, "rules")
    names: set[str] = set()
    for i, item in enumerate(items):
        line = (
            item_nodes.value[i].start_mark.line + 1
            if isinstance(item_nodes, yaml.SequenceNode)
            else 1
        )
        where = f"{path}:{line}: rules[{i}]"
        rule = _rule(item, where, f"{path}:{line}", problems)
        if rule is not None:
            if rule.name in names:
                problems.append(f"{where}.name: duplicate rule name {rule.name!r}")
            names.add(rule.name)
            rules.append(rule)
    if problems:
        raise ConfigError(f"{path}: invalid rules file:\n  " + "\n  ".join(problems))
    return RuleEngine(rules, pii)


def _rule(item: Any, where: str, source: str, problems: list[str]) -> Rule | None:
    if not isinstance(item, dict):
        problems.append(f"{where}: expected a mapping")
        return None
    before = len(problems)
    for key in sorted(set(item) - _RULE_KEYS):
        problems.append(f"{where}.{key}: unknown field (allowed: {', '.join(sorted(_RULE_KEYS))})")
    name = item.get("name")
    if not isinstance(name, str) or not name:
        problems.append(f"{where}.name: required, a non-empty string")
    route = item.get("route")
    if not isinstance(route, str) or not route:
        problems.append(f"{where}.route: required, a non-empty string")
    targets = item.get("targets")
    if (
        not isinstance(targets, list)
        or not targets
        or not all(isinstance(t, str) and t for t in targets)
    ):
        problems.append(f"{where}.targets: required, a non-empty list of target names")
        targets = []
    pattern = None
    if "pattern" in item:
        if not isinstance(item["pattern"], str) or not item["pattern"]:
            problems.append(f"{where}.pattern: must be a non-empty regular expression string")
        else:
            try:
                pattern = re.compile(item["pattern"])
            except re.error as exc:
                problems.append(f"{where}.pattern: invalid regular expression: {exc}")
    keywords = None
    if "keywords" in item:
        kw = item["keywords"]
        if not isinstance(kw, list) or not kw or not all(isinstance(k, str) and k for k in kw):
            problems.append(f"{where}.keywords: must be a non-empty list of strings")
        else:
            alternatives = "|".join(re.escape(k) for k in kw)
            keywords = re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)
    lengths: dict[str, int | None] = {}
    for key in ("min_chars", "max_chars"):
        value = item.get(key)
        if value is not None and (
            not isinstance(value, int) or isinstance(value, bool) or value < 0
        ):
            problems.append(f"{where}.{key}: must be an integer >= 0, got {value!r}")
            value = None
        lengths[key] = value
    require_local = item.get("require_local", False)
    if not isinstance(require_local, bool):
        problems.append(f"{where}.require_local: must be true or false")
        require_local = False
    if (
        pattern is None
        and keywords is None
        and lengths["min_chars"] is None
        and lengths["max_chars"] is None
        and len(problems) == before
    ):
        problems.append(f"{where}: needs at least one of pattern, keywords, min_chars, max_chars")
    if len(problems) != before:
        return None
    return Rule(
        name=str(name),
        route=str(route),
        targets=tuple(targets),
        pattern=pattern,
        keywords=keywords,
        min_chars=lengths["min_chars"],
        max_chars=lengths["max_chars"],
        require_local=require_local,
        source=source,
    )


def _pii(raw: Any, where: str, problems: list[str]) -> PiiDetector | None:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        problems.append(f"{where}: pii: must be a mapping with enabled and/or kinds")
        return PiiDetector()
    for key in sorted(set(raw) - {"enabled", "kinds"}):
        problems.append(f"{where}: pii.{key}: unknown field (allowed: enabled, kinds)")
    enabled = raw.get("enabled", True)
    if not isinstance(enabled, bool):
        problems.append(f"{where}: pii.enabled: must be true or false")
        enabled = True
    kinds = raw.get("kinds")
    if kinds is not None:
        if not isinstance(kinds, list) or not all(isinstance(k, str) for k in kinds):
            problems.append(f"{where}: pii.kinds: must be a list of {', '.join(PII_KINDS)}")
            kinds = None
        else:
            unknown = [k for k in kinds if k not in PII_KINDS]
            if unknown:
                problems.append(
                    f"{where}: pii.kinds: unknown kind(s) {', '.join(unknown)} "
                    f"(known: {', '.join(PII_KINDS)})"
                )
                kinds = None
    return PiiDetector(kinds) if enabled else None


def _child(node: Any, key: str) -> Any:
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            if getattr(k, "value", None) == key:
                return v
    return None


def _line(node: Any, key: str) -> int:
    if isinstance(node, yaml.MappingNode):
        for k, _ in node.value:
            if getattr(k, "value", None) == key:
                return int(k.start_mark.line) + 1
    return 1
