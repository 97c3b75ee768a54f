"""Writes ``bench/heldout/pii.jsonl``: templated held-out texts for ``pii_detector`` (CLI tool).

Run ``python -m bench.heldout.make_pii``; deterministic (seeded). Labels: 1 = the text holds
personal data the detector should find, 0 = digit-heavy text without any (order numbers,
dates, versions, prices, ...). ``source`` names the entity or the kind of clean text, so
``checkstream classifiers eval --classifier pii_detector bench/heldout/pii.jsonl`` reports
recall per card brand and phone format and false positives per kind of digits. The
templates and numbers are written for this file only (not the unit tests' fixtures).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).with_name("pii.jsonl")
rng = random.Random(20261207)


def luhn_complete(prefix: str, length: int) -> str:
    body = prefix + "".join(str(rng.randrange(10)) for _ in range(length - len(prefix) - 1))
    total = 0
    for i, ch in enumerate(reversed(body)):
        d = int(ch)
        if i % 2 == 0:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return body + str((10 - total % 10) % 10)


def grouped(number: str, style: str) -> str:
    if style == "plain":
        return number
    sep = " " if style == "space" else "-"
    if len(number) == 15:
        return sep.join([number[:4], number[4:10], number[10:]])
    if len(number) == 14 and rng.random() < 0.5:
        return sep.join([number[:4], number[4:10], number[10:]])
    return sep.join(number[i : i + 4] for i in range(0, len(number), 4))


BRANDS = {
    "visa": (["4"], [16]),
    "mastercard": (["51", "53", "55", "2221", "2720"], [16]),
    "amex": (["34", "37"], [15]),
    "discover": (["6011", "65"], [16]),
    "jcb": (["3528", "3530", "3566", "3589"], [16]),
    "diners": (["300", "305", "36", "38"], [14]),
    "maestro": (["5018", "5020", "6304", "6759", "6761"], [16, 19]),
    "unionpay": (["62", "6212", "6250"], [16, 19]),
}
CARD_TEMPLATES = [
    "Please charge my card {x}, expiry 09/27.",
    "card number: {x}",
    "I paid with {x} yesterday but the order never arrived.",
    "Can you check why {x} was declined?",
    "My {b} card {x} was stolen, what do I do?",
    "Billing: {x} (CVV on file)",
]

PHONES = {
    "intl": [
        "+44 20 7946 0958",
        "+49 30 12345678",
        "+33 1 42 68 53 00",
        "+81 3-1234-5678",
        "+91 98765 43210",
        "+86 138 0013 8000",
        "+55 11 91234-5678",
        "+61 2 9876 5432",
        "+34 612 34 56 78",
        "+7 495 123-45-67",
        "+39 06 1234 5678",
        "+82 10-1234-5678",
    ],
    "nanp": [
        "(415) 555-2671",
        "212-555-0198",
        "646.555.0142",
        "1-800-555-0199",
        "+1 312 555 0110",
        "(617) 555-0123",
    ],
    "extension": [
        "(415) 555-2671 x123",
        "212-555-0198 ext. 12",
        "+1 646 555 0142 x4567",
        "1-800-555-0199 extension 204",
        "+44 20 7946 0958 ext 331",
        "(617) 555-0123x88",
        "312.555.0110 ext.7",
    ],
    "uk": ["020 7946 0958", "07700 900123", "0161 496 0742", "(020) 7946 0018", "0117 496 0123"],
    "de": ["030 12345678", "0151 23456789", "089 1234567", "(030) 1234567", "0171 2345678"],
    "fr": ["01 42 68 53 00", "06 12 34 56 78", "04.91.23.45.67", "07 81 22 33 44"],
    "it": ["06 1234 5678", "347 123 4567", "02 8765 4321", "333 765 4321"],
    "es": ["612 34 56 78", "91 123 45 67", "655 43 21 09"],
    "jp": ["03-1234-5678", "090-1234-5678", "06-6123-4567", "080-9876-5432"],
    "kr": ["010-1234-5678", "02-123-4567", "031-987-6543"],
    "au": ["0412 345 678", "(02) 9876 5432", "03 9123 4567"],
    "in": ["98765 43210", "091234 56789", "022 2345 6789", "87654-32109"],
    "cn": ["138 0013 8000", "139-1234-5678", "010-12345678"],
    "br": ["(11) 91234-5678", "(21) 2345-6789", "(31) 98765-4321"],
    "mx": ["55 1234 5678", "33 9876 5432"],
    "ru": ["8 (495) 123-45-67", "8 912 345-67-89"],
    "nl": ["020-1234567", "06-12345678", "010 123 4567"],
}
PHONE_TEMPLATES = [
    "Call me on {x} after six.",
    "You can reach our office at {x}.",
    "My number is {x}, text me when you land.",
    "Tel: {x}",
    "Ring {x} to rebook the appointment.",
    "Contact the landlord ({x}) about the heater.",
]

OTHER = {
    "email": ["jane.doe@example.org", "m.rossi+orders@posteo.de", "li.wei@corp.example.cn"],
    "iban": [
        "GB33BUKB20201555555555",
        "DE89 3704 0044 0532 0130 00",
        "FR14 2004 1010 0505 0001 3M02 606",
        "NL91ABNA0417164300",
    ],
    "ssn": ["123-45-6789", "219-09-9999", "078-05-1121"],
}
OTHER_TEMPLATES = ["Send it to {x} please.", "Account details: {x}", "For the form: {x}."]

NEGATIVES = {
    "order": [
        "Order #100234587 has shipped.",
        "Your order 4471-9920-33 is on its way.",
        "Reference 20240115-0042 for your claim.",
        "Ticket 88231 was closed.",
        "Invoice INV-2024-000123 is due.",
        "Tracking: 1Z999AA10123456784",
        "Case number 2024-CV-00981",
        "PO 4500012345 approved",
        "Booking ref 7731 4420 19",
        "SKU 0049-22871-3",
        "Order no. 112-4567890-1234567 (Amazon)",
        "Membership ID 00123 45678",
    ],
    "date": [
        "Meeting on 2024-01-15 at 10:30.",
        "Born 15.01.1990 in Lyon.",
        "Due 01/15/2024, paid 02/03/2024.",
        "From 2019-03-01 to 2021-12-31.",
        "Timestamp 2024-03-15 14:30:00.123",
        "Posted 12 Mar 2024, 09:41",
        "Q3 2023 vs Q3 2024",
        "05.06.2023 - 07.06.2023",
    ],
    "version": [
        "Upgrade to v1.2.3 before 2.0.0-rc1.",
        "Windows 10.0.19045.3693 build",
        "numpy 1.26.4, pandas 2.2.1, python 3.11.8",
        "Chrome 122.0.6261.94",
        "kernel 6.5.0-21-generic",
        "Released 2023.10.1 and 2024.1.0",
    ],
    "price": [
        "It costs $1,299.99 or 1.299,00 EUR.",
        "Revenue grew to 12 345 678 EUR.",
        "Total: 2 450,00 EUR incl. VAT",
        "Budget 1,250,000 USD for 2025",
        "Price 3 999 kr, was 4 499 kr",
        "Salary 45 000 - 55 000 GBP",
    ],
    "numbers": [
        "Population 8,336,817 (2022 census).",
        "ISBN 978-0-13-468599-1",
        "Coordinates 51.5074, -0.1278",
        "Score 3-1 after 90+4 minutes.",
        "Lottery numbers 04 12 23 35 41",
        "Pages 112-145 and 201-233",
        "Room 1204, floor 12, building 3",
        "Serial 3C4F-99A2-77B1",
        "Flight LH 2041 departs 07:55, gate B12",
        "Temperature 21.5 to 23.8 C",
        "ZIP 94103-1234",
        "Part numbers 1000-2000-3000",
        "Resolution 1920x1080 at 144 Hz",
        "The answer is 42, not 4 2 or 0.42.",
        "Steps: 1000 2000 3000 4000",
        "UUID 123e4567-e89b-12d3-a456-426614174000",
        "Hash 9f86d081884c7d659a2feaa0",
        "Years 1914-1918 and 1939-1945",
        "Lat 40.7128 long -74.0060",
        "Account balance 0.00",
        "Call at 10 am on 12/05",
        "Phone model iPhone 15 Pro Max",
    ],
}
NEGATIVE_TEMPLATES = ["{x}", "FYI: {x}", "{x} Let me know if anything is unclear."]


def digits(n: int) -> str:
    return "".join(str(rng.randrange(10)) for _ in range(n))


def generated_negatives() -> list[tuple[str, str]]:
    """Digit-heavy clean texts in bulk: random instances of the kinds above."""
    out = []
    for _ in range(60):
        y, m, d = rng.randrange(1990, 2030), rng.randrange(1, 13), rng.randrange(1, 29)
        h, mi = rng.randrange(24), rng.randrange(60)
        out.append(
            (
                "date",
                rng.choice(
                    [
                        f"The contract runs from {y}-{m:02d}-{d:02d} to {y + 1}-{m:02d}-{d:02d}.",
                        f"Termin am {d:02d}.{m:02d}.{y} um {h:02d}:{mi:02d} Uhr.",
                        f"Rendez-vous le {d:02d}/{m:02d}/{y} à {h:02d}h{mi:02d}.",
                        f"Logged at {y}-{m:02d}-{d:02d} {h:02d}:{mi:02d}:{rng.randrange(60):02d}",
                        f"{d:02d} {m:02d} {y} {h:02d} {mi:02d}",
                    ]
                ),
            )
        )
    for _ in range(60):
        out.append(
            (
                "order",
                rng.choice(
                    [
                        f"Order #{digits(rng.randrange(6, 13))} has shipped.",
                        f"Your reference is {digits(4)}-{digits(4)}-{digits(4)}.",
                        f"Ticket {digits(3)} {digits(3)} {digits(3)} was escalated.",
                        f"Invoice {rng.randrange(2019, 2026)}-{digits(6)} paid.",
                        f"Customer ID {digits(rng.randrange(8, 12))}, account {digits(8)}",
                        f"Item {digits(3)}.{digits(3)}.{digits(2)} out of stock",
                        f"Parcel 0{digits(2)} {digits(3)} {digits(4)} {digits(2)} is late.",
                    ]
                ),
            )
        )
    for _ in range(50):
        out.append(
            (
                "price",
                rng.choice(
                    [
                        f"Total {rng.randrange(1, 999)},{digits(3)}.{digits(2)} USD",
                        f"Preis {rng.randrange(1, 99)}.{digits(3)},{digits(2)} EUR",
                        f"Prix {rng.randrange(1, 999)} {digits(3)} {digits(3)} EUR",
                        f"Revenue {rng.randrange(10, 99)} {digits(3)} {digits(3)} and costs "
                        f"{rng.randrange(1, 9)} {digits(3)} {digits(3)}",
                    ]
                ),
            )
        )
    for _ in range(50):
        a, b, c = rng.randrange(20), rng.randrange(40), rng.randrange(200)
        out.append(
            (
                "version",
                rng.choice(
                    [
                        f"Bump to {a}.{b}.{c} (was {a}.{b}.{max(0, c - 1)})",
                        f"Build {a}.{b}.{c}.{digits(4)} is live.",
                        f"requires libfoo >= {a}.{b}, < {a + 1}.0",
                        f"Firmware {a:02d}.{b:02d}.{c:03d} released",
                    ]
                ),
            )
        )
    for _ in range(60):
        out.append(
            (
                "numbers",
                rng.choice(
                    [
                        f"Scores: {' '.join(str(rng.randrange(100)) for _ in range(6))}",
                        f"Lat {rng.uniform(-90, 90):.4f}, lon {rng.uniform(-180, 180):.4f}",
                        f"Table row: {digits(2)} | {digits(3)} | {digits(4)} | {digits(2)}",
                        f"Measurements {digits(3)}.{digits(1)} {digits(3)}.{digits(1)} "
                        f"{digits(3)}.{digits(1)} mm",
                        f"The year {rng.randrange(1800, 2100)} had "
                        f"{rng.randrange(1000, 99999)} births.",
                        f"Matrix [[{digits(2)}, {digits(2)}], [{digits(2)}, {digits(2)}]]",
                        f"Port {rng.randrange(1024, 65535)} and PID {rng.randrange(100, 99999)}",
                    ]
                ),
            )
        )
    return out


def main() -> None:
    rows = []
    for brand, (prefixes, lengths) in BRANDS.items():
        for i in range(12):
            number = luhn_complete(rng.choice(prefixes), rng.choice(lengths))
            style = ["plain", "space", "dash"][i % 3]
            text = CARD_TEMPLATES[i % len(CARD_TEMPLATES)].format(
                x=grouped(number, style), b=brand.upper()
            )
            rows.append({"text": text, "label": 1, "source": f"card_{brand}"})
    for kind, numbers in PHONES.items():
        for i, number in enumerate(numbers):
            for j in range(2):
                template = PHONE_TEMPLATES[(i * 2 + j) % len(PHONE_TEMPLATES)]
                rows.append(
                    {"text": template.format(x=number), "label": 1, "source": f"phone_{kind}"}
                )
    for kind, values in OTHER.items():
        for i, value in enumerate(values):
            for template in OTHER_TEMPLATES[: 2 + i % 2]:
                rows.append({"text": template.format(x=value), "label": 1, "source": kind})
    for kind, texts in NEGATIVES.items():
        for i, text in enumerate(texts):
            for template in NEGATIVE_TEMPLATES[: 1 + i % 3]:
                rows.append(
                    {"text": template.format(x=text), "label": 0, "source": f"clean_{kind}"}
                )
    for kind, text in generated_negatives():
        rows.append({"text": text, "label": 0, "source": f"clean_{kind}"})
    OUT.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"{OUT}: {len(rows)} rows")


if __name__ == "__main__":
    main()
