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
from typing import Annotated

from pydantic import Field, field_validator, model_validator

from semroute.dispatch.pii import PII_KINDS, PiiDetector
from semroute.errors import ConfigError
from semroute.types import Message
from semroute.yamlfile import StrictModel, line_of, read_yaml, validate


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


class _RuleModel(StrictModel):
    name: str = Field(min_length=1)
    route: str = Field(min_length=1)
    targets: list[Annotated[str, Field(min_length=1)]] = Field(min_length=1)
    pattern: str | None = None
    keywords: list[Annotated[str, Field(min_length=1)]] | None = Field(None, min_length=1)
    min_chars: int | None = Field(None, ge=0)
    max_chars: int | None = Field(None, ge=0)
    require_local: bool = False

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            if not value:
                raise ValueError("must be a non-empty regular expression string")
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"invalid regular expression: {exc}") from None
        return value

    @model_validator(mode="after")
    def _has_a_condition(self) -> _RuleModel:
        if self.pattern is None and self.keywords is None and (
            self.min_chars is None and self.max_chars is None
        ):
            raise ValueError("needs at least one of pattern, keywords, min_chars, max_chars")
        return self


class _PiiModel(StrictModel):
    enabled: bool = True
    kinds: list[str] | None = None

    @field_validator("kinds")
    @classmethod
    def _known(cls, value: list[str] | None) -> list[str] | None:
        unknown = [k for k in value or () if k not in PII_KINDS]
        if unknown:
            raise ValueError(
                f"unknown kind(s) {', '.join(unknown)} (known: {', '.join(PII_KINDS)})"
            )
        return value


class _RulesFile(StrictModel):
    rules: list[_RuleModel] = Field(default_factory=list)
    pii: _PiiModel = _PiiModel()

    @model_validator(mode="after")
    def _unique_names(self) -> _RulesFile:
        seen: set[str] = set()
        for i, rule in enumerate(self.rules):
            if rule.name in seen:
                raise ValueError(f"rules[{i}].name: duplicate rule name {rule.name!r}")
            seen.add(rule.name)
        return self


def _load(path: Path) -> RuleEngine:
    data, node = read_yaml(path, "rules file")
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{path}:1: top level must be a mapping with `rules:` and/or `pii:`")
    checked = validate(data, node, _RulesFile, path, "rules file")
    rules = []
    for i, r in enumerate(checked.rules):
        keywords = None
        if r.keywords is not None:
            alternatives = "|".join(re.escape(k) for k in r.keywords)
            keywords = re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)
        rules.append(Rule(
            name=r.name,
            route=r.route,
            targets=tuple(r.targets),
            pattern=re.compile(r.pattern) if r.pattern is not None else None,
            keywords=keywords,
            min_chars=r.min_chars,
            max_chars=r.max_chars,
            require_local=r.require_local,
            source=f"{path}:{line_of(node, ['rules', i])}",
        ))
    pii = PiiDetector(checked.pii.kinds) if checked.pii.enabled else None
    return RuleEngine(rules, pii)
