"""PII and secret scrubbing: realistic positives and negatives per kind, Luhn, settings, the
cleaning report and prepared data (placeholders before the tokenizer, cache keys)."""

import dataclasses
import json
import re

import pytest

from research.data import DataConfig, clean_documents, prepare_data, read_split
from research.data import scrub as scrub_lib
from research.data.scrub import Scrubber, luhn_valid
from research.errors import UserError

SCRUB = Scrubber()

POSITIVES = [
    # email
    ("Write to jane.doe+news@example.co.uk today.", "Write to <EMAIL> today.", "email"),
    ("mailto:bob_smith@mail.example.org", "mailto:<EMAIL>", "email"),
    ("(contact: A.Lovelace@analytical-engine.io)", "(contact: <EMAIL>)", "email"),
    # phone: international, North American, national with a trunk 0
    ("Call +1 (555) 123-4567 now.", "Call <PHONE> now.", "phone"),
    ("Office: +44 20 7946 0958.", "Office: <PHONE>.", "phone"),
    ("Paris +33 1 23 45 67 89, Berlin +49 30 1234567", "Paris <PHONE>, Berlin <PHONE>", "phone"),
    ("Call (555) 234-5678 or 555.234.5678.", "Call <PHONE> or <PHONE>.", "phone"),
    ("Toll free 1-800-555-0199.", "Toll free <PHONE>.", "phone"),
    ("Ring 020 7946 0958 or 07700 900123.", "Ring <PHONE> or <PHONE>.", "phone"),
    ("Tél : 01 23 45 67 89 ; Fax (030) 1234567", "Tél : <PHONE> ; Fax <PHONE>", "phone"),
    # ip (also inside a URL)
    ("The server at 192.168.1.20 is down.", "The server at <IP> is down.", "ip"),
    ("GET http://10.20.30.40:8080/health", "GET http://<IP>:8080/health", "ip"),
    ("IPv6 2001:db8:85a3::8a2e:370:7334 ok", "IPv6 <IP> ok", "ip"),
    ("from fe80::1ff:fe23:4567:890a and ::ffff:192.0.2.128", "from <IP> and <IP>", "ip"),
    # card: Luhn-valid test numbers of several networks and groupings
    ("Visa 4111 1111 1111 1111, exp 12/27", "Visa <CARD>, exp 12/27", "card"),
    ("mc=5555-5555-5555-4444;", "mc=<CARD>;", "card"),
    ("Amex 3782 822463 10005 or 6011111111111117.", "Amex <CARD> or <CARD>.", "card"),
    # secret
    ("aws key AKIAIOSFODNN7EXAMPLE here", "aws key <SECRET> here", "secret"),
    ("GITHUB_TOKEN=ghp_a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8", "GITHUB_TOKEN=<SECRET>", "secret"),
    ("OPENAI_API_KEY=sk-proj-abc123DEF456ghi789JKL012", "OPENAI_API_KEY=<SECRET>", "secret"),
    ("slack xoxb-1234567890-abcdefghij and", "slack <SECRET> and", "secret"),
    ("key=AIzaSyA1234567890abcdefghijklmnopqrstuv", "key=<SECRET>", "secret"),
    ("Authorization: Bearer abcDEF123456ghiJKL789", "Authorization: Bearer <SECRET>", "secret"),
    ("api_key = 'f00b4r1234567890'", "api_key = '<SECRET>'", "secret"),
    ('{"password": "hunter2isbad"}', '{"password": "<SECRET>"}', "secret"),
    (
        "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA1234\nabcd==\n"
        "-----END RSA PRIVATE KEY-----\nafter",
        "<SECRET>\nafter",
        "secret",
    ),
]

NEGATIVES = [
    "In 1599 the Globe opened; on 23 April 1616 he died, aged 52.",
    "Dates: 2024-01-15, 15/01/2024, 01.02.2024, 12/31/1999, on 05/06/2024 10 people came.",
    "Times: 10:30, 10:30:45, 2024-01-15T10:30:45Z, 9:00 am; ratio 16:9.",
    "Version 1.2.3, v2.10.4, Python 3.11.4, release 10.0.19041.1, version 1.2.3.4.",
    "Section 1.2.3.4 applies; chapter 12, verse 34; pages 123-456; 1990-2000.",
    "ISBN 978-3-16-148410-0, ISBN 0-306-40615-2, ISBN-13: 9780306406157.",
    "Prices: $1,234.56, €99.99, 1,000,000 people; pi is 3.14159.",
    "The population grew from 8,336,817 to 8,804,190 in 2020.",
    "The years 2023 2024 2025 2026 and 1999 2000 2001 2002.",
    "sha256 3f79bb7b435b05321651daefd374cdc681dc06faa65e374e38337b88ca046dea, commit 9fceb02.",
    "UUID 123e4567-e89b-12d3-a456-426614174000; epoch 1700000000000 ms.",
    "See https://example.com/path?id=12345678&x=1 and http://127.0.0.1:8000/v1.",
    "Netmask 255.255.255.0 on 0.0.0.0; loopback ::1.",
    "std::vector<int> a; a::b; Foo::bar(); MAC 00:1a:2b:3c:4d:5e.",
    "Order 1234567890123 shipped; tracking 7489 2345 1234 5678; score 555-1234.",
    "Visa 4111 1111 1111 1112 fails the check digit.",
    "The secret: silence. A token: something-very-long. Password = correcthorsebattery.",
    "Coordinates 51.5074, -0.1278; temperatures 0.25 0.5 0.75; lines 10 20 30 40 50.",
    "A desk-lamp-with-a-very-long-hyphenated-name and task-sk-abcdefghijklmnopqrstuvwx.",
    "math: 2+2=4, x+12345678; ref 0.12.3.4567; to be, or not to be.",
]


@pytest.mark.parametrize("text, expected, kind", POSITIVES)
def test_positives_become_typed_placeholders(text, expected, kind):
    scrubbed, counts = SCRUB.scrub(text)
    assert scrubbed == expected
    assert set(counts) == {kind} and counts[kind] == expected.count(f"<{kind.upper()}>")


@pytest.mark.parametrize("text", NEGATIVES)
def test_negatives_stay(text):
    assert SCRUB.scrub(text) == (text, {})


def test_luhn_by_hand():
    # 4539 1488 0343 6467: doubling every second digit from the right gives 80, a multiple
    # of 10; changing the last digit breaks it.
    assert luhn_valid("4539148803436467") and not luhn_valid("4539148803436468")
    assert SCRUB("card 4539 1488 0343 6467.") == "card <CARD>."
    assert SCRUB("card 4539 1488 0343 6468.") == "card 4539 1488 0343 6468."


def test_kinds_off_and_extra_patterns():
    text = "mail a@b.org, ip 8.8.8.8, badge EMP-123456"
    only_email = Scrubber(kinds=("email",))
    assert only_email(text) == "mail <EMAIL>, ip 8.8.8.8, badge EMP-123456"
    assert not Scrubber(kinds=()).active and Scrubber(kinds=())(text) == text
    extra = Scrubber(kinds=("ip",), patterns={"employee_id": r"EMP-\d{6}"})
    assert extra.scrub(text) == (
        "mail a@b.org, ip <IP>, badge <EMPLOYEE_ID>",
        {"ip": 1, "employee_id": 1},
    )
    keys = Scrubber(kinds=(), literals=("server-key-1",))
    assert keys.scrub("Bearer server-key-1 x") == ("Bearer <SECRET> x", {"secret": 1})


@pytest.mark.parametrize(
    "fields, fragment",
    [
        ({"scrub_patterns": {"bad": "[a-"}}, "data.scrub_patterns['bad']='[a-' is not a valid"),
        ({"scrub_patterns": {"email": "x"}}, "data.scrub_patterns: the name 'email'"),
        ({"scrub_patterns": {"empty": "a*"}}, "matches the empty string"),
        ({"scrub_kinds": ("mail",)}, "data.scrub_kinds=('mail',) names unknown kinds"),
    ],
)
def test_bad_settings_are_user_errors_naming_the_field(fields, fragment):
    with pytest.raises(UserError, match=re.escape(fragment)):
        DataConfig(**fields)


def test_scrub_settings_are_in_the_cache_key():
    config = DataConfig()
    assert config.scrub_kinds == scrub_lib.KINDS and config.scrubber() is not None
    assert (
        DataConfig(scrub_kinds=("secret", "email")).key()
        == DataConfig(scrub_kinds=["email", "secret"]).key()
    )
    for change in ({"scrub_kinds": ()}, {"scrub_kinds": ("email",)},
                   {"scrub_patterns": {"id": "ID-[0-9]+"}}):  # fmt: skip
        assert dataclasses.replace(config, **change).key() != config.key(), change
    assert DataConfig(scrub_kinds=()).scrubber() is None
    # Scrubbing off keys data as before scrubbing existed (DataConfig().key() at commit
    # d9210e5), so data prepared then, and runs resuming on it, keep their cache.
    assert DataConfig(scrub_kinds=()).key() == "120b95382467f5df"


def test_cleaning_report_counts_scrubbed_kinds():
    documents = [
        "Mail jane@example.com or call +44 20 7946 0958 about the order.",
        "Card 4111 1111 1111 1111 and key AKIAIOSFODNN7EXAMPLE, mail bob@example.org.",
        "Nothing private here, only the year 1623 and 36 plays.",
        "Mail jane@example.com or call +44 20 7946 0958 about the order.",  # duplicate
    ]
    kept, report = clean_documents(documents, min_chars=20, scrubber=Scrubber())
    assert kept[0] == "Mail <EMAIL> or call <PHONE> about the order."
    assert report.scrubbed == {"email": 2, "phone": 1, "card": 1, "secret": 1}
    assert report.documents_scrubbed == 2 and report.removed_duplicates == 1
    assert "scrubbed 2 documents (1 card, 2 email, 1 phone, 1 secret)" in str(report)
    assert clean_documents(documents, min_chars=20)[1].scrubbed == {}


def test_prepared_data_holds_placeholders_and_scrub_settings_change_the_directory(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for index in range(12):
        (corpus / f"doc{index}.txt").write_text(
            f"Letter {index}. Write to clerk{index}@example.com or ring 020 7946 09{index:02d}; "
            "the rest is ordinary prose about the weather and the harvest."
        )
    config = DataConfig(
        sources=(str(corpus),), vocab_size=300, min_chars=20, num_shards=1,
        validation_fraction=0.2, test_fraction=0.0, cache_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    prepared = prepare_data(config, log=lambda line: None)
    assert prepared.manifest["clean"]["scrubbed"] == {"email": 12, "phone": 12}
    assert prepared.manifest["config"]["scrub_kinds"] == list(scrub_lib.KINDS)
    tokenizer = prepared.tokenizer
    train = [tokenizer.decode(ids[:-1]) for ids in read_split(prepared.directory, "train")]
    with open(prepared.text_path("validation"), encoding="utf-8") as f:
        validation = [json.loads(line)["text"] for line in f]
    for text in train + validation:
        assert "<EMAIL>" in text and "<PHONE>" in text and "@" not in text
    assert "example" not in tokenizer.hf_tokenizer.get_vocab()
    unscrubbed = prepare_data(
        dataclasses.replace(config, scrub_kinds=()), log=lambda line: None
    )  # A new cache directory: the cached scrubbed data is not reused.
    assert unscrubbed.directory != prepared.directory
    assert unscrubbed.manifest["clean"]["scrubbed"] == {}
