"""The canonical encoding, hashing and scanning of the audit chain (services/audit/.../_chain)."""

from __future__ import annotations

import dataclasses
import json
import struct
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mhv_audit import (
    GENESIS_HASH,
    ChainScanner,
    NewEvent,
    StoredRow,
    canonical_json,
    encode_record,
    jcs_number,
    link,
    row_hash,
)
from mhv_audit._chain import _jcs
from tests.harness import Deployment

# RFC 8785 Appendix B's IEEE 754 samples, with the strings ECMAScript (node) writes for them.
JCS_NUMBERS = [
    ("0000000000000000", "0"),
    ("8000000000000000", "0"),
    ("0000000000000001", "5e-324"),
    ("8000000000000001", "-5e-324"),
    ("7fefffffffffffff", "1.7976931348623157e+308"),
    ("ffefffffffffffff", "-1.7976931348623157e+308"),
    ("4340000000000000", "9007199254740992"),
    ("c340000000000000", "-9007199254740992"),
    ("4430000000000000", "295147905179352830000"),
    ("44b52d02c7e14af5", "9.999999999999997e+22"),
    ("44b52d02c7e14af6", "1e+23"),
    ("44b52d02c7e14af7", "1.0000000000000001e+23"),
    ("444b1ae4d6e2ef4e", "999999999999999700000"),
    ("444b1ae4d6e2ef4f", "999999999999999900000"),
    ("444b1ae4d6e2ef50", "1e+21"),
    ("3eb0c6f7a0b5ed8c", "9.999999999999997e-7"),
    ("3eb0c6f7a0b5ed8d", "0.000001"),
    ("41b3de4355555553", "333333333.3333332"),
    ("41b3de4355555554", "333333333.33333325"),
    ("41b3de4355555555", "333333333.3333333"),
    ("41b3de4355555556", "333333333.3333334"),
    ("41b3de4355555557", "333333333.33333343"),
    ("becbf647612f3696", "-0.0000033333333333333333"),
    ("43143ff3c1cb0959", "1424953923781206.2"),
]


@pytest.mark.parametrize(("bits", "expected"), JCS_NUMBERS)
def test_numbers_are_written_as_ecmascript_does(bits: str, expected: str) -> None:
    value = struct.unpack(">d", bytes.fromhex(bits))[0]
    assert jcs_number(value) == expected
    # The fast path (C codec) and the exact encoder agree on every sample.
    assert canonical_json(json.dumps([value])) == f"[{expected}]"


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_numbers_are_refused(value: float) -> None:
    with pytest.raises(ValueError, match="finite"):
        jcs_number(value)


def test_canonical_json_sorts_by_utf16_and_escapes_minimally() -> None:
    text = json.dumps(
        {
            "b": 1.0,
            "a": [1e-5, 1e21, -0.0, 2**60, '\u2028\x01"\\\x7f'],
            "\ue000": 1,
            "\U0001f600": 2,
        }
    )
    # U+1F600 is D83D DE00 in UTF-16, so it sorts before U+E000 (code points say otherwise).
    assert canonical_json(text) == (
        '{"a":[0.00001,1e+21,0,1152921504606847000,"\u2028\\u0001\\"\\\\\x7f"],'
        '"b":1,"\U0001f600":2,"\ue000":1}'
    )


@pytest.mark.parametrize("ensure_ascii", [True, False], ids=["escaped", "raw"])
@pytest.mark.parametrize(
    ("value", "written"), [(None, "null"), ("x", '"x"'), (2.5, "2.5")], ids=["null", "str", "num"]
)
def test_keys_beyond_the_bmp_sort_by_utf16_on_every_path(
    ensure_ascii: bool, value: Any, written: str
) -> None:
    # Whether the astral key arrives raw or as a \ud800\udc00 escape, and whichever path the
    # values select, U+10000 (D800 DC00 in UTF-16) sorts before U+E000.
    text = json.dumps({"\ue000": value, "\U00010000": value}, ensure_ascii=ensure_ascii)
    assert canonical_json(text) == f'{{"\U00010000":{written},"\ue000":{written}}}'


def test_canonical_json_ignores_formatting_and_key_order() -> None:
    assert canonical_json('{ "z" : [ 1 , 2.50 ], "a":{"y":null,"x":true} }') == (
        '{"a":{"x":true,"y":null},"z":[1,2.5]}'
    )


def test_canonical_json_refuses_what_is_not_json() -> None:
    # Lone surrogates, escaped or raw, in values and keys: JSON parsers may accept them, but
    # no UTF-8 text (and no RFC 8785 form) can hold them.
    surrogates = ('{"a": "\\ud800"}', '{"\\udc00": 1}', '["x\\udbff"]', '{"a": "\ud800"}')
    for text in ("NaN", '{"a": Infinity}', "{", '{"a": 1e400}', *surrogates):
        with pytest.raises(ValueError):  # noqa: PT011 - json's own error types vary
            canonical_json(text)


GOLDEN_EVENT = NewEvent(
    event_id="0b7e5a4c-3f0e-4c1a-9a57-3d7c1e2f4a10",
    task_id=42,
    event_type="task_created",
    user_id="5f1d7c2e-8a3b-4e6f-9c0d-1b2a3c4d5e6f",
    details=canonical_json(
        json.dumps(
            {
                "title": "Fix the flaky test",
                "priority": "high",
                "description": "[REDACTED (24 characters)]",
            }
        )
    ),
    occur_us=1735787045123456,
    request_id="req-7f3a",
    trace_id="4bf92f3577b34da6a3ce929d0e0e4736",
)
# docs/security/audit-logging.md shows this same row; the bytes and the hash must not change
# without a new encoding version.
GOLDEN_ENCODING = (
    '{"created_at":"1735787045200000","details":{"description":"[REDACTED (24 characters)]",'
    '"priority":"high","title":"Fix the flaky test"},'
    '"event_id":"0b7e5a4c-3f0e-4c1a-9a57-3d7c1e2f4a10","event_type":"task_created","id":"1",'
    '"occur_time":"1735787045123456",'
    '"prev_hash":"0000000000000000000000000000000000000000000000000000000000000000",'
    '"request_id":"req-7f3a","task_id":"42","trace_id":"4bf92f3577b34da6a3ce929d0e0e4736",'
    '"user_id":"5f1d7c2e-8a3b-4e6f-9c0d-1b2a3c4d5e6f"}'
)
GOLDEN_HASH = "4e798335bc58c269207715c33fedfb9bc70aeae1af1f48c54bba8b1fda745740"


def test_golden_row_encoding_and_hash() -> None:
    (row,) = link([GOLDEN_EVENT], head_id=0, head_hash=GENESIS_HASH, created_us=1735787045200000)
    encoded = encode_record(
        row_id=row.id,
        created_us=row.created_us,
        details=GOLDEN_EVENT.details,
        event_id=GOLDEN_EVENT.event_id,
        event_type=GOLDEN_EVENT.event_type,
        occur_us=GOLDEN_EVENT.occur_us,
        prev_hash=row.prev_hash,
        request_id=GOLDEN_EVENT.request_id,
        task_id=GOLDEN_EVENT.task_id,
        trace_id=GOLDEN_EVENT.trace_id,
        user_id=GOLDEN_EVENT.user_id,
    )
    assert encoded.decode() == GOLDEN_ENCODING
    assert row.hash.hex() == GOLDEN_HASH
    assert (row.id, row.prev_hash) == (1, GENESIS_HASH)


def _stored(rows: list[Any]) -> list[tuple[Any, ...]]:
    """ChainedEvents as the store returns them for verification (StoredRow's columns)."""
    return [
        (
            r.id,
            r.event.event_id,
            r.event.task_id,
            r.event.event_type,
            r.event.user_id,
            r.event.details,
            r.event.occur_us,
            r.created_us,
            r.event.request_id,
            r.event.trace_id,
            r.prev_hash,
            r.hash,
            r.event.subject_kind,
            r.event.subject_id,
            True,  # the jsonb column equals the hashed text
        )
        for r in rows
    ]


def _chain(count: int, *, users_every: int = 0) -> list[tuple[Any, ...]]:
    """`count` chained rows; with `users_every`, every such row is about a user, not a task."""

    def is_user(n: int) -> bool:
        return bool(users_every) and n % users_every == 0

    events = [
        NewEvent(
            event_id=f"00000000-0000-4000-8000-{n:012d}",
            task_id=0 if is_user(n) else 1 + n % 3,
            subject_kind="user" if is_user(n) else "task",
            subject_id=f"7c0d1b2a-3c4d-4e6f-9a57-{n:012d}" if is_user(n) else "",
            event_type="user_deactivated" if is_user(n) else "task_updated",
            user_id="5f1d7c2e-8a3b-4e6f-9c0d-1b2a3c4d5e6f",
            details=canonical_json(json.dumps({"n": n, "changes": {"title": ["a", f"b{n}"]}})),
            occur_us=1_700_000_000_000_000 + n,
            request_id=f"req-{n}",
            trace_id="",
        )
        for n in range(count)
    ]
    first = link(events[:4], head_id=0, head_hash=GENESIS_HASH, created_us=1_700_000_000_100_000)
    rest = link(
        events[4:], head_id=first[-1].id, head_hash=first[-1].hash, created_us=1_700_000_001_000_000
    )
    return _stored(first + rest)


def test_scanner_accepts_a_linked_chain_across_chunks() -> None:
    rows = _chain(10)
    scanner = ChainScanner(expected_id=1, expected_prev=GENESIS_HASH, head_id=10)
    assert scanner.feed(rows[:3]) is None
    assert scanner.feed(rows[3:]) is None
    assert scanner.rows_checked == 10
    assert scanner.last is not None and StoredRow.of(scanner.last).id == 10
    for row in rows:
        assert row_hash(StoredRow.of(row)) == row[11]


@pytest.mark.parametrize(
    ("change", "bad_index"),
    [
        (lambda rows: rows.__setitem__(4, (*rows[4][:2], 99, *rows[4][3:])), 4),
        (lambda rows: rows.__setitem__(6, (*rows[6][:5], '{"n":6}', *rows[6][6:])), 6),
        (lambda rows: rows.pop(5), 5),
        (lambda rows: rows.insert(2, rows.pop(3)), 2),
    ],
    ids=["task-id-changed", "details-changed", "row-deleted", "rows-swapped"],
)
def test_scanner_stops_at_the_first_row_out_of_place(change: Any, bad_index: int) -> None:
    rows = _chain(10)
    change(rows)
    scanner = ChainScanner(expected_id=1, expected_prev=GENESIS_HASH, head_id=10)
    assert scanner.feed(rows) == bad_index
    assert scanner.rows_checked == bad_index


def _with(row: tuple[Any, ...], **columns: Any) -> tuple[Any, ...]:
    fields = StoredRow.__dataclass_fields__
    values = dict(zip(fields, row, strict=True))
    values.update(columns)
    return tuple(values.values())


@pytest.mark.parametrize(
    "columns",
    [
        {"subject_id": "7c0d1b2a-3c4d-4e6f-9a57-999999999999"},
        {"subject_kind": "delivery"},
        {"subject_kind": "task", "subject_id": "", "task_id": 1},
    ],
    ids=["subject-id-changed", "subject-kind-changed", "made-a-task-row"],
)
def test_the_hash_covers_a_rows_subject(columns: dict[str, Any]) -> None:
    rows = _chain(10, users_every=3)
    assert ChainScanner(expected_id=1, expected_prev=GENESIS_HASH, head_id=10).feed(rows) is None
    rows[3] = _with(rows[3], **columns)
    scanner = ChainScanner(expected_id=1, expected_prev=GENESIS_HASH, head_id=10)
    assert scanner.feed(rows) == 3


def test_a_task_row_encodes_without_subject_members() -> None:
    """Rows stored before subjects existed keep their hashes: no members for a task row."""
    (task_row,) = link([GOLDEN_EVENT], head_id=0, head_hash=GENESIS_HASH, created_us=1)
    user_event = dataclasses.replace(
        GOLDEN_EVENT,
        task_id=0,
        event_type="user_created",
        subject_kind="user",
        subject_id="7c0d1b2a-3c4d-4e6f-9a57-3d7c1e2f4a10",
    )
    (user_row,) = link([user_event], head_id=0, head_hash=GENESIS_HASH, created_us=1)
    stored = StoredRow.of(_stored([user_row])[0])
    encoded = encode_record(
        row_id=1,
        created_us=1,
        details=user_event.details,
        event_id=user_event.event_id,
        event_type=user_event.event_type,
        occur_us=user_event.occur_us,
        prev_hash=GENESIS_HASH,
        request_id=user_event.request_id,
        task_id=0,
        trace_id=user_event.trace_id,
        user_id=user_event.user_id,
        subject_kind="user",
        subject_id=user_event.subject_id,
    ).decode()
    assert (
        '"request_id":"req-7f3a","subject_id":"7c0d1b2a-3c4d-4e6f-9a57-3d7c1e2f4a10",'
        '"subject_kind":"user","task_id":"0",'
    ) in encoded
    assert row_hash(stored) == user_row.hash != task_row.hash
    assert b"subject" not in encode_record(
        row_id=1,
        created_us=1,
        details=GOLDEN_EVENT.details,
        event_id=GOLDEN_EVENT.event_id,
        event_type=GOLDEN_EVENT.event_type,
        occur_us=GOLDEN_EVENT.occur_us,
        prev_hash=GENESIS_HASH,
        request_id=GOLDEN_EVENT.request_id,
        task_id=GOLDEN_EVENT.task_id,
        trace_id=GOLDEN_EVENT.trace_id,
        user_id=GOLDEN_EVENT.user_id,
    )


def test_scanner_refuses_a_row_whose_jsonb_differs_from_its_hashed_text() -> None:
    rows = _chain(10)
    rows[6] = (*rows[6][:-1], False)
    scanner = ChainScanner(expected_id=1, expected_prev=GENESIS_HASH, head_id=10)
    assert scanner.feed(rows) == 6


def test_scanner_refuses_rows_past_the_head() -> None:
    rows = _chain(10)
    scanner = ChainScanner(expected_id=1, expected_prev=GENESIS_HASH, head_id=8)
    assert scanner.feed(rows) == 8


def test_row_hash_under_another_id_differs() -> None:
    row = StoredRow.of(_chain(3)[1])
    assert row_hash(row) == row.hash
    assert row_hash(row, as_id=3) != row.hash


# Strings the service accepts (no NUL: jsonb cannot hold it, so the service refuses it).
_chars = st.characters(exclude_characters="\x00", exclude_categories=("Cs",))
_text = st.text(alphabet=_chars)
# Values a google.protobuf.Struct can carry: doubles, strings, booleans, null, lists, objects.
_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.integers(min_value=-(2**53), max_value=2**53).map(float)
    | _text,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_text, children, max_size=4),
    max_leaves=12,
)
_details = st.dictionaries(st.text(alphabet=_chars, max_size=8), _json_values, max_size=5)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=_details)
def test_canonical_json_is_idempotent_and_order_blind(value: dict[str, Any]) -> None:
    once = canonical_json(json.dumps(value))
    # The fast paths (orjson; normalised numbers) agree with the plain reference encoder.
    assert once == _jcs(json.loads(json.dumps(value)))
    assert canonical_json(once) == once
    reordered = dict(reversed(list(value.items())))
    assert canonical_json(json.dumps(reordered, indent=2, ensure_ascii=True)) == once
    # Same values, read as the doubles JSON numbers are.
    assert json.loads(once, parse_int=float) == json.loads(json.dumps(value), parse_int=float)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.lists(_details, max_size=8))
async def test_canonical_form_survives_postgresql_jsonb(
    deployment: Deployment, batch: list[dict[str, Any]]
) -> None:
    # What the service stores (canonical text into jsonb) must canonicalise back to the very
    # same text when read, whatever jsonb does to key order, spacing and number formatting.
    texts = [canonical_json(json.dumps(value)) for value in batch]
    conn = await asyncpg.connect(deployment.admin_url)
    try:
        back = await conn.fetchval(
            "SELECT coalesce(array_agg(t::jsonb::text ORDER BY n), '{}')"
            " FROM unnest($1::text[]) WITH ORDINALITY AS u(t, n)",
            texts,
        )
    finally:
        await conn.close()
    assert [canonical_json(text) for text in back] == texts
