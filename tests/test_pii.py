"""The built-in ``pii_detector``: exact spans per entity, look-alikes rejected, validators,
settings, and precision/recall on the labelled fixture (so a regression fails here)."""

from __future__ import annotations

import itertools

import pluggy
import pytest

from checkstream import hookspecs
from checkstream.plugins import pii
from checkstream.plugins.eval_pii import evaluate, load_fixture
from checkstream.plugins.pii import ENTITIES, PiiDetector, create
from checkstream.plugins.pii_patterns import (
    card_issuer_valid,
    card_valid,
    iban_valid,
    luhn_valid,
    ssn_valid,
)
from checkstream.types import Classification, Classifier, Span

DETECTOR = PiiDetector("pii")


def spans_for(text: str, *found: tuple[str, str]) -> tuple[Span, ...]:
    """Spans for each (label, value), located left to right in ``text``."""
    spans = []
    at = 0
    for label, value in found:
        start = text.index(value, at)
        at = start + len(value)
        spans.append(Span(start, at, label))
    return tuple(spans)


RSA_KEY = "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEAfake\n-----END RSA PRIVATE KEY-----"

POSITIVES: list[tuple[str, list[tuple[str, str]]]] = [
    # EMAIL
    ("Send it to alice@example.com.", [("EMAIL", "alice@example.com")]),
    ("cc bob.smith+tag@mail.example.org, thanks", [("EMAIL", "bob.smith+tag@mail.example.org")]),
    ("<carol_j@example.co.uk>", [("EMAIL", "carol_j@example.co.uk")]),
    ("...dave@example.com", [("EMAIL", "dave@example.com")]),
    # PHONE
    ("Call +44 20 7946 0958 today", [("PHONE", "+44 20 7946 0958")]),
    ("Berlin +49 30 123456.", [("PHONE", "+49 30 123456")]),
    ("Ring (415) 555-2671 now", [("PHONE", "(415) 555-2671")]),
    ("Ring 415-555-2671 now", [("PHONE", "415-555-2671")]),
    ("Ring 415.555.2671 now", [("PHONE", "415.555.2671")]),
    ("Ring 415 555 2671 now", [("PHONE", "415 555 2671")]),
    ("Ring +1 415 555 2671 now", [("PHONE", "+1 415 555 2671")]),
    ("Ring +1 415 555 2671 24 hours a day", [("PHONE", "+1 415 555 2671")]),
    ("Ring +1 (415) 555-2671", [("PHONE", "+1 (415) 555-2671")]),
    ("Toll free 1-800-555-0199.", [("PHONE", "1-800-555-0199")]),
    ("Tel +44 (0)20 7946 0321", [("PHONE", "+44 (0)20 7946 0321")]),
    ("Call (415)-555-0123 now", [("PHONE", "(415)-555-0123")]),
    # extensions belong to the number
    ("Ring (415) 555-2671 x123 now", [("PHONE", "(415) 555-2671 x123")]),
    ("Ring 415-555-2671x88.", [("PHONE", "415-555-2671x88")]),
    ("Ring 212-555-0198 ext. 12 today", [("PHONE", "212-555-0198 ext. 12")]),
    ("Ring +44 20 7946 0958, extension 331", [("PHONE", "+44 20 7946 0958, extension 331")]),
    # national formats without '+'
    ("London 020 7946 0958 or", [("PHONE", "020 7946 0958")]),
    ("Mobile 07700 900123.", [("PHONE", "07700 900123")]),
    ("Büro (030) 1234567", [("PHONE", "(030) 1234567")]),
    ("Handy 0151 23456789", [("PHONE", "0151 23456789")]),
    ("Appelez le 01 42 68 53 00.", [("PHONE", "01 42 68 53 00")]),
    ("Portable 06.12.34.56.78", [("PHONE", "06.12.34.56.78")]),
    ("Tokyo 03-1234-5678", [("PHONE", "03-1234-5678")]),
    ("Seoul 010-1234-5678", [("PHONE", "010-1234-5678")]),
    ("Sydney (02) 9876 5432", [("PHONE", "(02) 9876 5432")]),
    ("Mumbai 98765 43210", [("PHONE", "98765 43210")]),
    ("Beijing 138 0013 8000", [("PHONE", "138 0013 8000")]),
    ("Madrid 612 34 56 78", [("PHONE", "612 34 56 78")]),
    ("Roma 347 123 4567", [("PHONE", "347 123 4567")]),
    ("CDMX 55 1234 5678", [("PHONE", "55 1234 5678")]),
    ("São Paulo (11) 91234-5678", [("PHONE", "(11) 91234-5678")]),
    ("Moskva 8 (495) 123-45-67", [("PHONE", "8 (495) 123-45-67")]),
    # CREDIT_CARD
    ("Card 4111 1111 1111 1111 exp 12/29", [("CREDIT_CARD", "4111 1111 1111 1111")]),
    ("Card 5555-5555-5555-4444.", [("CREDIT_CARD", "5555-5555-5555-4444")]),
    ("Card 2223003122003222", [("CREDIT_CARD", "2223003122003222")]),
    ("Amex 3782 822463 10005", [("CREDIT_CARD", "3782 822463 10005")]),
    ("Amex 371449635398431", [("CREDIT_CARD", "371449635398431")]),
    ("Discover 6011 1111 1111 1117", [("CREDIT_CARD", "6011 1111 1111 1117")]),
    ("Discover 6445644564456445", [("CREDIT_CARD", "6445644564456445")]),
    ("Visa13 4222222222222", [("CREDIT_CARD", "4222222222222")]),
    ("JCB 3530 1113 3330 0000", [("CREDIT_CARD", "3530 1113 3330 0000")]),
    ("Diners 3056 930902 5904", [("CREDIT_CARD", "3056 930902 5904")]),
    ("Maestro 6759-6498-2643-8453", [("CREDIT_CARD", "6759-6498-2643-8453")]),
    ("Maestro 6799 9901 0000 0000 019", [("CREDIT_CARD", "6799 9901 0000 0000 019")]),
    ("UnionPay 6212345678901265", [("CREDIT_CARD", "6212345678901265")]),
    ("Card 4111 1111 1111 1111 2029", [("CREDIT_CARD", "4111 1111 1111 1111")]),
    # IBAN
    ("Pay GB82 WEST 1234 5698 7654 32.", [("IBAN", "GB82 WEST 1234 5698 7654 32")]),
    ("Pay DE89 3704 0044 0532 0130 00 now", [("IBAN", "DE89 3704 0044 0532 0130 00")]),
    ("Pay DE89370400440532013000", [("IBAN", "DE89370400440532013000")]),
    ("Pay NL91 ABNA 0417 1643 00 ASAP", [("IBAN", "NL91 ABNA 0417 1643 00")]),
    ("AT61 1904 3002 3457 3201 FROM BANK", [("IBAN", "AT61 1904 3002 3457 3201")]),
    # US_SSN
    ("SSN 123-45-6789.", [("US_SSN", "123-45-6789")]),
    ("ssn=899-99-9998&x=1", [("US_SSN", "899-99-9998")]),
    # IP_ADDRESS
    ("from 192.168.1.20.", [("IP_ADDRESS", "192.168.1.20")]),
    ("listen 10.0.0.5:8080", [("IP_ADDRESS", "10.0.0.5")]),
    ("host 2001:db8::1 down", [("IP_ADDRESS", "2001:db8::1")]),
    ("[2001:db8:0:1::42]:443", [("IP_ADDRESS", "2001:db8:0:1::42")]),
    (
        "full 2001:0db8:85a3:0000:0000:8a2e:0370:7334.",
        [
            ("IP_ADDRESS", "2001:0db8:85a3:0000:0000:8a2e:0370:7334"),
        ],
    ),
    ("mapped ::ffff:192.0.2.128 seen", [("IP_ADDRESS", "::ffff:192.0.2.128")]),
    ("loopback ::1", [("IP_ADDRESS", "::1")]),
    # SECRET
    (
        "key sk-proj-Xq7Lm2Np9Rt4Vw8Yz3Bc6Df1Gh5Jk0EXAMPLE.",
        [
            ("SECRET", "sk-proj-Xq7Lm2Np9Rt4Vw8Yz3Bc6Df1Gh5Jk0EXAMPLE"),
        ],
    ),
    (
        "KEY=sk-ant-api03-T3stK3yN0tR3alAbCdEfGhIjKlMnOpQrStUv-EXAMPLE0AA",
        [
            ("SECRET", "sk-ant-api03-T3stK3yN0tR3alAbCdEfGhIjKlMnOpQrStUv-EXAMPLE0AA"),
        ],
    ),
    ("id AKIAIOSFODNN7EXAMPLE,", [("SECRET", "AKIAIOSFODNN7EXAMPLE")]),
    ("id ASIAIOSFODNN7EXAMPLE", [("SECRET", "ASIAIOSFODNN7EXAMPLE")]),
    (
        "t=ghp_16C7e42F292c6912E7710c838347Ae178B4a",
        [
            ("SECRET", "ghp_16C7e42F292c6912E7710c838347Ae178B4a"),
        ],
    ),
    (
        "xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOp ok",
        [
            ("SECRET", "xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOp"),
        ],
    ),
    (
        f"k:\n{RSA_KEY}\nok",
        [("SECRET", RSA_KEY)],
    ),
    (  # cut off before its END line: the base64 lines are the secret, the prose is not
        "-----BEGIN PRIVATE KEY-----\n" + "A1b2" * 16 + "\nThanks for looking",
        [("SECRET", "-----BEGIN PRIVATE KEY-----\n" + "A1b2" * 16)],
    ),
]


@pytest.mark.parametrize(("text", "found"), POSITIVES)
def test_each_entity_is_found_with_exact_spans(text: str, found: list[tuple[str, str]]) -> None:
    spans = DETECTOR.find(text)
    assert spans == spans_for(text, *found)
    assert [text[s.start : s.end] for s in spans] == [value for _, value in found]


NEGATIVES = [
    # cards: Luhn failures, unknown issuers, wrong length or grouping, ISBNs
    "Order #4111111111111112 shipped.",
    "Order 1234 5678 9012 3456.",
    "Ref 1234567890123452 (Luhn-valid, no issuer).",
    "Amex-prefixed 16 digits 3400 0000 0000 0009",
    "Mixed separators 4111 1111-1111 1111",
    "ISBN 978-3-16-148410-0 and 9780306406157",
    "Digits run on: 41111111111111111111",
    # phones
    "Serial 4155552671120 and ref 12415-555-2671 and 415-555-26710",
    "Placeholder 123-456-7890 and (015) 555-0132",
    "Mixed 415-555.2671",
    "Short +1 555 0100, math 2+2=4, temperature +25.5",
    "Lottery numbers 04 12 23 35 41 and 04 15 23 42 08 16",
    "Dates 01.02.2024 and 01-02-2024 10:30, scores 0 1 2 3 4",
    "Order 0049-22871-3 and membership 00123 45678",
    # IBAN
    "Bad check digits GB83 WEST 1234 5698 7654 32",
    "Unknown country XY12 3456 7890 1234 5678",
    "Too short GB82 WEST 1234",
    "Glued XGB82WEST12345698765432",
    # SSN
    "000-12-3456 666-12-3456 900-12-3456 123-00-4567 123-45-0000",
    "Longer 1123-45-6789 and 123-45-67890",
    # IP
    "999.999.999.999 and 256.1.1.1",
    "Version 1.2.3 and 1.2.3.4.5 and OID 1.3.6.1.4.1.311",
    "version 1.2.3.4 and v1.2.3.4 and build 10.0.19041.1",
    "Leading zeros 01.02.03.04",
    "Times 12:30:45 and 23:59:59.999, ratio 16:9",
    "std::vector and Foo::Bar::baz() and a bare :: here",
    "MAC 00:1A:2B:3C:4D:5E",
    # secrets
    "Use sk-learn; the task-runner; sk-this-is-not-a-real-key-123456789",
    "Placeholder sk-xxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
    "AKIA prefix, AKIA123, ASIAPACIFICSALESTEAM",
    "ghp_short and xoxb-nope",
    "-----BEGIN PUBLIC KEY-----\nMIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8A\n-----END PUBLIC KEY-----",
    # everything else that looks numeric
    "UUID 123e4567-e89b-12d3-a456-426614174000",
    "commit 9fceb02d0ae598e95dc970b74767f19372d61af8",
    "Dates 2024-01-15, 15/01/2024, 2024-01-15T10:30:00Z, epoch 1700000000123",
    "Prices $1,299.99, €4.111,11, 1 234 567,89 €",
    "Emails without a domain: user@localhost, @alice, @types/node",
]


@pytest.mark.parametrize("text", NEGATIVES)
def test_look_alikes_are_not_pii(text: str) -> None:
    assert DETECTOR.find(text) == ()


def test_overlaps_resolve_to_the_longest_most_specific_span() -> None:
    # A card is not also a phone; "+1 415 ..." is one phone, not a phone inside a phone.
    text = "card 4111-1111-1111-1111, phone +1 415-555-2671, iban DE89 3704 0044 0532 0130 00"
    assert DETECTOR.find(text) == spans_for(
        text,
        ("CREDIT_CARD", "4111-1111-1111-1111"),
        ("PHONE", "+1 415-555-2671"),
        ("IBAN", "DE89 3704 0044 0532 0130 00"),
    )


def test_spans_are_in_order_and_disjoint_with_many_entities() -> None:
    text = (
        "jo@example.com 123-45-6789 4242424242424242 10.1.2.3 (415) 555-0100 "
        "GB82WEST12345698765432 AKIAIOSFODNN7EXAMPLE fe80::1 jo2@example.com"
    )
    spans = DETECTOR.find(text)
    assert [s.label for s in spans] == [
        "EMAIL", "US_SSN", "CREDIT_CARD", "IP_ADDRESS", "PHONE", "IBAN", "SECRET",
        "IP_ADDRESS", "EMAIL",
    ]  # fmt: skip
    assert all(a.end <= b.start for a, b in itertools.pairwise(spans))


def test_classify_scores_one_per_text() -> None:
    texts = ["nothing here", "mail alice@example.com", ""]
    results = DETECTOR.classify(texts)
    assert results == [
        Classification(0.0),
        Classification(1.0, spans_for(texts[1], ("EMAIL", "alice@example.com"))),
        Classification(0.0),
    ]


# --- validators ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "number", ["4111111111111111", "5555555555554444", "378282246310005", "79927398713", "0"]
)
def test_luhn_accepts_valid_numbers(number: str) -> None:
    assert luhn_valid(number)


@pytest.mark.parametrize(
    "number", ["4111111111111112", "79927398710", "", "4111 1111 1111 1111", "٤١١١"]
)
def test_luhn_rejects_invalid_or_non_digit_input(number: str) -> None:
    assert not luhn_valid(number)


@pytest.mark.parametrize(
    ("number", "valid"),
    [
        ("4111111111111111", True),  # Visa 16
        ("4222222222222", True),  # Visa 13
        ("4917610000000000003", True),  # Visa 19
        ("5105105105105100", True),  # Mastercard 51
        ("2223003122003222", True),  # Mastercard 2-series
        ("2721000000000004", False),  # just past the 2-series range
        ("378282246310005", True),  # Amex 37
        ("341111111111111", True),  # Amex 34
        ("3411111111111111", False),  # Amex prefix, 16 digits
        ("6011111111111117", True),  # Discover 6011
        ("6500000000000002", True),  # Discover 65
        ("6445644564456445", True),  # Discover 644-649
        ("6431111111111111", False),  # 643 is not Discover
        ("3566002020360505", True),  # JCB
        ("3530111333300000", True),  # JCB 3530
        ("3590111333300007", False),  # Luhn-valid, just past JCB's 3528-3589, not another issuer
        ("30569309025904", True),  # Diners Club 305, 14 digits
        ("38520000023237", True),  # Diners Club 38
        ("36227206271667", True),  # Diners Club 36
        ("6759649826438453", True),  # Maestro 6759
        ("6799990100000000019", True),  # Maestro, 19 digits
        ("5018000000000009", True),  # Maestro 5018
        ("6212345678901265", True),  # UnionPay 62
        ("2200000000000004", True),  # Mir
        ("36227206271668", False),  # Diners shape, Luhn fails
        ("1234567890123452", False),  # Luhn-valid, no issuer
    ],
)
def test_card_validation_needs_issuer_length_and_luhn(number: str, valid: bool) -> None:
    assert card_valid(number) is valid
    if valid:
        assert card_issuer_valid(number)


@pytest.mark.parametrize(
    "iban",
    ["GB82WEST12345698765432", "DE89370400440532013000", "FR1420041010050500013M02606",
     "NL91ABNA0417164300", "NO9386011117947", "IT60X0542811101000000123456"],
)  # fmt: skip
def test_iban_accepts_valid_ibans(iban: str) -> None:
    assert iban_valid(iban)


@pytest.mark.parametrize(
    "iban",
    [
        "GB83WEST12345698765432",  # wrong check digits
        "GB82WEST1234569876543",  # one character short for GB
        "DE8937040044053201300",  # one short for DE
        "XX82WEST12345698765432",  # unknown country
        "gb82west12345698765432",  # lower case
        "GB82 WEST 1234 5698 7654 32",  # spaces are the finder's business
        "GBAAWEST12345698765432",  # check digits not digits
    ],
)
def test_iban_rejects_invalid_ibans(iban: str) -> None:
    assert not iban_valid(iban)


@pytest.mark.parametrize("ssn", ["123-45-6789", "001-01-0001", "665-99-9999", "899-12-3456"])
def test_ssn_accepts_issuable_numbers(ssn: str) -> None:
    assert ssn_valid(ssn)
    assert ssn_valid(ssn.replace("-", ""))


@pytest.mark.parametrize(
    "ssn",
    ["000-12-3456", "666-12-3456", "900-12-3456", "999-12-3456", "123-00-4567", "123-45-0000",
     "123-45-678", "abc-de-fghi"],
)  # fmt: skip
def test_ssn_rejects_never_issued_numbers(ssn: str) -> None:
    assert not ssn_valid(ssn)


# --- settings and registration ------------------------------------------------------------


def test_no_settings_enables_every_entity() -> None:
    detector = create("pii", {})
    assert detector.name == "pii"
    assert detector.entities == ENTITIES
    assert isinstance(detector, Classifier)
    assert detector.produces_spans and detector.inline


def test_entities_restrict_what_is_found() -> None:
    detector = create("mail_only", {"entities": ["EMAIL", "SECRET"]})
    text = "alice@example.com 4111111111111111 AKIAIOSFODNN7EXAMPLE"
    assert detector.find(text) == spans_for(
        text, ("EMAIL", "alice@example.com"), ("SECRET", "AKIAIOSFODNN7EXAMPLE")
    )
    assert create("ibans", {"entities": ["IBAN"]}).find("GB82WEST12345698765432 a@b.com") == (
        Span(0, 22, "IBAN"),
    )


def test_unknown_entities_are_named() -> None:
    with pytest.raises(ValueError, match="unknown entities CREDITCARD, PASSPORT"):
        create("pii", {"entities": ["EMAIL", "PASSPORT", "CREDITCARD"]})


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"threshold": 0.5}, "unknown settings threshold"),
        ({"entities": ["EMAIL"], "mode": "x", "lang": "en"}, "unknown settings lang, mode"),
        ({"entities": "EMAIL"}, "entities must be a list"),
        ({"entities": [1]}, "entities must be a list"),
        ({"entities": []}, "entities is empty"),
    ],
)
def test_bad_settings_raise_value_error(settings: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        create("pii", settings)


def test_the_module_is_a_checkstream_plugin() -> None:
    manager = pluggy.PluginManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs)
    manager.register(pii, name="pii")
    (offered,) = manager.hook.checkstream_classifier_types()
    assert offered == {"pii_detector": create}


# --- the labelled fixture -----------------------------------------------------------------

EXAMPLES = load_fixture()


def test_fixture_is_large_enough_with_hard_negatives() -> None:
    assert len(EXAMPLES) >= 200
    assert sum(1 for e in EXAMPLES if not e.labels) >= 80
    assert {label for e in EXAMPLES for label in e.labels} == set(ENTITIES)


def test_fixture_precision_and_recall() -> None:
    report = evaluate(DETECTOR, EXAMPLES)
    assert report.overall.precision >= 0.97, report.mistakes
    assert report.overall.recall >= 0.95, report.mistakes


def test_fixture_spans_are_trimmed_ordered_and_disjoint() -> None:
    for example in EXAMPLES:
        spans = DETECTOR.find(example.text)
        for span in spans:
            value = example.text[span.start : span.end]
            assert value and value == value.strip(), (example.line, value)
        assert all(a.end <= b.start for a, b in itertools.pairwise(spans))
