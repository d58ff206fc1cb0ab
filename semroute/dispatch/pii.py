"""Detect personal data in prompts so they stay on local backends.

Each detector is a regular expression for candidates plus, where the format has one, a checksum
that rejects look-alikes (Luhn for card numbers, ISO 7064 mod-97 for IBANs). Findings carry the
kind and the span, never the matched text, so they are safe to log.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class PiiFinding:
    kind: str
    start: int
    end: int


def luhn_valid(digits: str) -> bool:
    """The Luhn checksum used by payment card numbers (``digits``: only 0-9)."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def iban_valid(iban: str) -> bool:
    """ISO 13616 IBAN check: country letters, 2 check digits, mod-97 of the rearranged number
    equals 1. ``iban`` without spaces, any case."""
    s = iban.upper()
    if not (15 <= len(s) <= 34 and s[:2].isalpha() and s[2:4].isdigit() and s.isalnum()):
        return False
    rearranged = s[4:] + s[:4]
    number = "".join(str(int(ch, 36)) for ch in rearranged)
    return int(number) % 97 == 1


def _digits(text: str) -> str:
    return "".join(ch for ch in text if ch.isdigit())


_EMAIL = re.compile(
    r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"
)
# 13-19 digits, optionally grouped by single spaces or dashes.
_CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d])")
_IBAN = re.compile(r"(?<![A-Za-z0-9])[A-Za-z]{2}\d{2}(?:[ ]?[A-Za-z0-9]){11,30}(?![A-Za-z0-9])")
# International (+CC ...) or grouped national numbers: needs separators or a +, so plain numbers
# such as years, amounts or ids do not count.
_PHONE = re.compile(
    r"(?<![\w+])(?:\+\d{1,3}[\s.-]?(?:\(\d{1,4}\)[\s.-]?)?\d{1,4}(?:[\s.-]?\d{2,4}){1,4}"
    r"|\(\d{2,4}\)[\s.-]?\d{3,4}[\s.-]?\d{3,4}"
    r"|\d{3}[.-]\d{3}[.-]\d{4})(?![\w])"
)
_SSN = re.compile(r"(?<![\d-])(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?![\d-])")
_CREDENTIAL = re.compile(
    r"(?<![\w-])(?:sk-[A-Za-z0-9_-]{20,}|AKIA[0-9A-Z]{16}|gh[pousr]_[A-Za-z0-9]{30,}"
    r"|xox[baprs]-[A-Za-z0-9-]{10,})"
)


# A validator returns the end of the valid span (it may shorten the match) or None.
Validator = Callable[[re.Match[str]], int | None]


def _check_card(m: re.Match[str]) -> int | None:
    return m.end() if luhn_valid(_digits(m.group())) else None


def _check_iban(m: re.Match[str]) -> int | None:
    # The pattern may swallow a following word ("... 0130 00 for"): drop trailing
    # space-separated groups until the checksum holds.
    text = m.group()
    while True:
        if iban_valid(text.replace(" ", "")):
            return m.start() + len(text)
        cut = text.rfind(" ")
        if cut <= 4:
            return None
        text = text[:cut]


def _check_phone(m: re.Match[str]) -> int | None:
    return m.end() if 9 <= len(_digits(m.group())) <= 15 else None


# kind -> (pattern, validator). Order matters: earlier kinds claim their spans first, so a card
# number is not also reported as a phone number.
_DETECTORS: dict[str, tuple[re.Pattern[str], Validator | None]] = {
    "email": (_EMAIL, None),
    "credential": (_CREDENTIAL, None),
    "iban": (_IBAN, _check_iban),
    "card": (_CARD, _check_card),
    "ssn": (_SSN, None),
    "phone": (_PHONE, _check_phone),
}
PII_KINDS: tuple[str, ...] = tuple(_DETECTORS)


class PiiDetector:
    """Finds personal data of the given kinds (default: all of ``PII_KINDS``)."""

    def __init__(self, kinds: Iterable[str] | None = None) -> None:
        chosen = tuple(PII_KINDS if kinds is None else kinds)
        unknown = [k for k in chosen if k not in _DETECTORS]
        if unknown:
            raise ValueError(f"unknown PII kind(s) {unknown}; known: {', '.join(PII_KINDS)}")
        self.kinds = tuple(k for k in PII_KINDS if k in chosen)

    def find(self, text: str) -> list[PiiFinding]:
        """Every finding in ``text``, non-overlapping, in text order."""
        taken: list[tuple[int, int]] = []
        found: list[PiiFinding] = []
        for kind in self.kinds:
            pattern, check = _DETECTORS[kind]
            for m in pattern.finditer(text):
                s, e = m.span()
                if check is not None:
                    end = check(m)
                    if end is None:
                        continue
                    e = end
                if any(s < te and ts < e for ts, te in taken):
                    continue
                taken.append((s, e))
                found.append(PiiFinding(kind, s, e))
        return sorted(found, key=lambda f: f.start)

    def kinds_in(self, texts: Iterable[str]) -> tuple[str, ...]:
        """The kinds found anywhere in ``texts`` (sorted, each once)."""
        kinds: set[str] = set()
        for text in texts:
            kinds.update(f.kind for f in self.find(text))
        return tuple(sorted(kinds))


def redact(text: str, findings: Iterable[PiiFinding]) -> str:
    """``text`` with each finding replaced by ``[KIND]`` (for logs and demos)."""
    out: list[str] = []
    pos = 0
    for f in sorted(findings, key=lambda f: f.start):
        out.append(text[pos : f.start])
        out.append(f"[{f.kind.upper()}]")
        pos = f.end
    out.append(text[pos:])
    return "".join(out)
