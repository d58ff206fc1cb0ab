"""PII detection: each kind is found, checksums reject look-alikes, ordinary numbers pass."""

from __future__ import annotations

import pytest

from semroute.dispatch.pii import PII_KINDS, PiiDetector, iban_valid, luhn_valid, redact


@pytest.fixture(scope="module")
def detector() -> PiiDetector:
    return PiiDetector()


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("write to jane.doe+news@example.co.uk today", "email"),
        ("my card is 4111 1111 1111 1111, expires 12/27", "card"),
        ("card 5500-0000-0000-0004 please", "card"),
        ("amex 378282246310005", "card"),
        ("IBAN DE89 3704 0044 0532 0130 00 for the transfer", "iban"),
        ("send it to GB82WEST12345698765432", "iban"),
        ("call me at +44 20 7946 0958", "phone"),
        ("my number is (415) 555-2671", "phone"),
        ("text 415-555-2671 after six", "phone"),
        ("ssn 123-45-6789", "ssn"),
        ("the key is sk-abcdefghijklmnopqrstuvwxyz123456", "credential"),
        ("AWS AKIAIOSFODNN7EXAMPLE leaked", "credential"),
    ],
)
def test_finds_each_kind(detector: PiiDetector, text: str, kind: str) -> None:
    """Typical written forms of each kind are detected as that kind."""
    assert kind in {f.kind for f in detector.find(text)}


@pytest.mark.parametrize(
    "text",
    [
        "card 4111 1111 1111 1112 fails Luhn",  # one digit off
        "IBAN DE88 3704 0044 0532 0130 00 with a wrong check digit",
        "In 2024 we sold 1500000 units for 3.5 million dollars",
        "order 12345678 shipped; version 1.2.3; port 50051",
        "what is 12 * 34 + 56?",
        "ssn 000-12-3456 is not valid",
        "Write a Python function that sorts a list",
    ],
)
def test_ignores_look_alikes_and_plain_numbers(detector: PiiDetector, text: str) -> None:
    """Checksums and format rules keep ordinary prompts from being treated as sensitive."""
    assert detector.find(text) == []


def test_checksums() -> None:
    """Luhn and IBAN mod-97 accept valid numbers and reject altered ones."""
    assert luhn_valid("4111111111111111")
    assert not luhn_valid("4111111111111121")
    assert iban_valid("GB82WEST12345698765432")
    assert iban_valid("fr1420041010050500013m02606")
    assert not iban_valid("GB82WEST12345698765433")
    assert not iban_valid("GB82")


def test_card_is_not_also_reported_as_phone(detector: PiiDetector) -> None:
    """Overlapping detectors report a span once, as the more specific kind."""
    findings = detector.find("pay with 4111-1111-1111-1111")
    assert [f.kind for f in findings] == ["card"]


def test_findings_carry_spans_not_text_and_redact(detector: PiiDetector) -> None:
    """Findings give kind and span only; redact replaces each span by its kind."""
    text = "mail bob@example.com or call +1 415 555 2671"
    findings = detector.find(text)
    assert [f.kind for f in findings] == ["email", "phone"]
    assert text[findings[0].start : findings[0].end] == "bob@example.com"
    assert redact(text, findings) == "mail [EMAIL] or call [PHONE]"


def test_kinds_can_be_restricted() -> None:
    """A detector limited to some kinds ignores the others; unknown kinds are refused."""
    only_email = PiiDetector(["email"])
    assert only_email.kinds_in(["4111 1111 1111 1111", "x@y.org"]) == ("email",)
    with pytest.raises(ValueError, match="unknown PII kind"):
        PiiDetector(["email", "passport"])
    assert set(PII_KINDS) >= {"email", "phone", "card", "iban"}
