"""Tampering by a superuser is found by VerifyAuditChain, at the right row, with the right kind.

Each test appends ten events through the service, then changes the table as a superuser with
every trigger switched off (what the append-only triggers cannot stop), and asks the service
to verify. A forger who knows the encoding recomputes hashes where that would help them.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc import aio

from mahavishnu.audit.v1 import audit_pb2, audit_pb2_grpc
from mhv_audit import StoredRow, encode_record, row_hash
from mhv_audit._store import ROW_COLUMNS
from mhv_common.auth import Role
from mhv_common.timestamps import from_micros
from tests.audit.support import (
    PrivateAudit,
    as_role,
    event,
    events,
    metric,
    private_audit,
    random_task_id,
    record,
    rpc_error,
    stub,
    verify,
)
from tests.conftest import Services
from tests.harness import Cluster, Keys, task_users_env
from tests.loglines import log_records, matches

ROWS = 10
MODIFIED = audit_pb2.BREAK_KIND_MODIFIED
MISSING = audit_pb2.BREAK_KIND_MISSING
REORDERED = audit_pb2.BREAK_KIND_REORDERED
INSERTED = audit_pb2.BREAK_KIND_INSERTED
SHIFT = 1_000_000  # moves ids out of the way: the primary key is checked row by row
# The columns the hash covers, in the store's order up to the hash (the subject columns follow).
_FIELDS = [f.name for f in dataclasses.fields(StoredRow)][:12]


@pytest.fixture(scope="module")
async def audit(
    cluster: Cluster, keys: Keys, services: Services, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[PrivateAudit]:
    async with private_audit(
        cluster,
        keys,
        Path(tmp_path_factory.mktemp("tamper")),
        task_users=task_users_env(services.task.target, services.ca_file),
    ) as running:
        yield running


@pytest.fixture
async def client(audit: PrivateAudit) -> AsyncIterator[audit_pb2_grpc.AuditServiceStub]:
    await audit.reset()
    async with aio.insecure_channel(audit.target) as channel:
        yield stub(channel)


async def _fill(client: audit_pb2_grpc.AuditServiceStub, keys: Keys) -> None:
    task_id = random_task_id()
    batch = events(task_id, ROWS)
    await record(client, keys, batch[:4])
    await record(client, keys, batch[4:])
    clean = await verify(client, keys)
    assert clean.ok and clean.rows_checked == ROWS


async def _row(audit: PrivateAudit, row_id: int) -> StoredRow:
    found = await audit.admin.fetchrow(
        f"SELECT {ROW_COLUMNS} FROM audit.task_audit_log WHERE id = $1",
        row_id,
    )
    assert found is not None
    return StoredRow.of(found)


def _forged_hash(row: StoredRow, **changes: Any) -> bytes:
    """The hash a forger computes for a row with `changes`, by the documented encoding."""
    values = {name: getattr(row, name) for name in _FIELDS}
    values.update(changes)
    return hashlib.sha256(
        encode_record(
            row_id=values["id"],
            created_us=values["created_us"],
            details=values["details"],
            event_id=values["event_id"],
            event_type=values["event_type"],
            occur_us=values["occur_us"],
            prev_hash=values["prev_hash"],
            request_id=values["request_id"],
            task_id=values["task_id"],
            trace_id=values["trace_id"],
            user_id=values["user_id"],
        )
    ).digest()


_INSERT = (
    "INSERT INTO audit.task_audit_log (id, event_id, task_id, event_type, user_id,"
    " details_canonical, occur_time, created_at, request_id, trace_id, prev_hash, hash)"
    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"
)


async def _forge(audit: PrivateAudit, at: int, after: StoredRow, *, good_hash: bool) -> None:
    """Insert a made-up row at id `at`, linked to `after`."""
    model = await _row(audit, after.id)
    forged = StoredRow(
        id=at,
        event_id="00000000-0000-4000-8000-00000000f00d",
        task_id=model.task_id,
        event_type="task_completed",
        user_id=model.user_id,
        details='{"quality_gate_passed":true}',
        occur_us=model.occur_us,
        created_us=model.created_us,
        request_id="",
        trace_id="",
        prev_hash=after.hash,
        hash=b"\x00" * 32,
    )
    digest = _forged_hash(forged) if good_hash else hashlib.sha256(b"forged").digest()
    values = [getattr(forged, name) for name in _FIELDS][:-1]
    values[6:8] = [from_micros(forged.occur_us), from_micros(forged.created_us)]
    await audit.tamper((_INSERT, [*values, digest]))


async def _expect_break(
    client: audit_pb2_grpc.AuditServiceStub, keys: Keys, row_id: int, kind: int, **bounds: int
) -> audit_pb2.VerifyAuditChainResponse:
    result = await verify(client, keys, **bounds)
    assert not result.ok
    assert (result.first_break.row_id, result.first_break.kind) == (row_id, kind), (
        result.first_break
    )
    return result


async def test_an_untouched_chain_verifies(
    client: audit_pb2_grpc.AuditServiceStub, keys: Keys, audit: PrivateAudit
) -> None:
    await _fill(client, keys)
    result = await verify(client, keys)
    last = await _row(audit, ROWS)
    assert (result.ok, result.rows_checked, result.head_id) == (True, ROWS, ROWS)
    assert result.head_hash == last.hash.hex()
    assert not result.HasField("first_break")


async def test_update_of_a_row_is_modified_at_that_row(
    client: audit_pb2_grpc.AuditServiceStub, keys: Keys, audit: PrivateAudit
) -> None:
    await _fill(client, keys)
    await audit.tamper(
        'UPDATE audit.task_audit_log SET details_canonical = \'{"title":"no"}\' WHERE id = 4'
    )
    result = await _expect_break(client, keys, 4, MODIFIED)
    assert result.rows_checked == 3


async def test_queryable_details_changed_apart_from_the_hashed_text_are_modified(
    client: audit_pb2_grpc.AuditServiceStub, keys: Keys, audit: PrivateAudit
) -> None:
    await _fill(client, keys)
    # Only a superuser can detach the generated jsonb column from the hashed text.
    await audit.tamper(
        "ALTER TABLE audit.task_audit_log ALTER COLUMN details DROP EXPRESSION",
        'UPDATE audit.task_audit_log SET details = \'{"title": "no"}\' WHERE id = 6',
    )
    try:
        result = await _expect_break(client, keys, 6, MODIFIED)
        assert "jsonb" in result.first_break.detail
    finally:
        # Put the column back as the migration made it, for the tests that follow.
        await audit.tamper(
            "ALTER TABLE audit.task_audit_log DROP COLUMN details",
            "ALTER TABLE audit.task_audit_log ADD COLUMN details jsonb NOT NULL"
            " GENERATED ALWAYS AS (details_canonical::jsonb) STORED",
        )


async def test_update_of_the_last_row_is_modified(
    client: audit_pb2_grpc.AuditServiceStub, keys: Keys, audit: PrivateAudit
) -> None:
    await _fill(client, keys)
    await audit.tamper(
        f"UPDATE audit.task_audit_log SET user_id = gen_random_uuid() WHERE id = {ROWS}"
    )
    await _expect_break(client, keys, ROWS, MODIFIED)


async def test_update_with_a_recomputed_hash_is_modified_at_that_row(
    client: audit_pb2_grpc.AuditServiceStub, keys: Keys, audit: PrivateAudit
) -> None:
    await _fill(client, keys)
    row = await _row(audit, 4)
    details = '{"title":"nothing happened"}'
    await audit.tamper(
        (
            "UPDATE audit.task_audit_log SET details_canonical = $1, hash = $2 WHERE id = 4",
            [details, _forged_hash(row, details=details)],
        )
    )
    await _expect_break(client, keys, 4, MODIFIED)


async def test_rewrite_of_the_last_row_with_its_hash_is_modified(
    client: audit_pb2_grpc.AuditServiceStub, keys: Keys, audit: PrivateAudit
) -> None:
    await _fill(client, keys)
    row = await _row(audit, ROWS)
    await audit.tamper(
        (
            "UPDATE audit.task_audit_log SET event_type = 'task_cancelled', hash = $1"
            f" WHERE id = {ROWS}",
            [_forged_hash(row, event_type="task_cancelled")],
        )
    )
    await _expect_break(client, keys, ROWS, MODIFIED)


@pytest.mark.parametrize(
    ("deleted", "first_missing"),
    [("id = 4", 4), ("id BETWEEN 4 AND 6", 4), ("id = 1", 1), (f"id >= {ROWS - 1}", ROWS - 1)],
    ids=["one-row", "three-rows", "first-row", "tail"],
)
async def test_delete_is_missing_at_the_first_deleted_row(
    client: audit_pb2_grpc.AuditServiceStub,
    keys: Keys,
    audit: PrivateAudit,
    deleted: str,
    first_missing: int,
) -> None:
    await _fill(client, keys)
    await audit.tamper(f"DELETE FROM audit.task_audit_log WHERE {deleted}")
    await _expect_break(client, keys, first_missing, MISSING)


async def test_delete_then_renumber_is_missing(
    client: audit_pb2_grpc.AuditServiceStub, keys: Keys, audit: PrivateAudit
) -> None:
    await _fill(client, keys)
    await audit.tamper(
        "DELETE FROM audit.task_audit_log WHERE id = 4",
        f"UPDATE audit.task_audit_log SET id = id + {SHIFT} WHERE id > 4",
        f"UPDATE audit.task_audit_log SET id = id - {SHIFT} - 1 WHERE id > {SHIFT}",
        f"UPDATE audit.chain_head SET last_id = {ROWS - 1}",
    )
    result = await _expect_break(client, keys, 4, MISSING)
    assert "renumbered" in result.first_break.detail


async def test_swapped_ids_are_reordered(
    client: audit_pb2_grpc.AuditServiceStub, keys: Keys, audit: PrivateAudit
) -> None:
    await _fill(client, keys)
    await audit.tamper(
        f"UPDATE audit.task_audit_log SET id = {SHIFT} WHERE id = 4",
        "UPDATE audit.task_audit_log SET id = 4 WHERE id = 5",
        f"UPDATE audit.task_audit_log SET id = 5 WHERE id = {SHIFT}",
    )
    await _expect_break(client, keys, 4, REORDERED)


async def test_rows_moved_far_apart_are_reordered(
    client: audit_pb2_grpc.AuditServiceStub, keys: Keys, audit: PrivateAudit
) -> None:
    await _fill(client, keys)
    await audit.tamper(
        f"UPDATE audit.task_audit_log SET id = {SHIFT} WHERE id = 3",
        "UPDATE audit.task_audit_log SET id = 3 WHERE id = 8",
        f"UPDATE audit.task_audit_log SET id = 8 WHERE id = {SHIFT}",
    )
    await _expect_break(client, keys, 3, REORDERED)


async def test_swapped_links_are_reordered(
    client: audit_pb2_grpc.AuditServiceStub, keys: Keys, audit: PrivateAudit
) -> None:
    await _fill(client, keys)
    four, five = await _row(audit, 4), await _row(audit, 5)
    await audit.tamper(
        ("UPDATE audit.task_audit_log SET prev_hash = $1 WHERE id = 4", [five.prev_hash]),
        ("UPDATE audit.task_audit_log SET prev_hash = $1 WHERE id = 5", [four.prev_hash]),
    )
    await _expect_break(client, keys, 4, REORDERED)


@pytest.mark.parametrize("good_hash", [True, False], ids=["hashed-by-the-forger", "bad-hash"])
async def test_a_forged_row_after_the_head_is_inserted(
    client: audit_pb2_grpc.AuditServiceStub, keys: Keys, audit: PrivateAudit, good_hash: bool
) -> None:
    await _fill(client, keys)
    await _forge(audit, ROWS + 1, await _row(audit, ROWS), good_hash=good_hash)
    await _expect_break(client, keys, ROWS + 1, INSERTED)


@pytest.mark.parametrize("good_hash", [True, False], ids=["hashed-by-the-forger", "bad-hash"])
async def test_a_forged_row_spliced_into_the_middle_is_inserted(
    client: audit_pb2_grpc.AuditServiceStub, keys: Keys, audit: PrivateAudit, good_hash: bool
) -> None:
    await _fill(client, keys)
    four = await _row(audit, 4)
    # Make room at id 5 (ids have no gaps) and splice a row in after row 4.
    await audit.tamper(
        f"UPDATE audit.task_audit_log SET id = id + {SHIFT} WHERE id > 4",
        f"UPDATE audit.task_audit_log SET id = id - {SHIFT} + 1 WHERE id > {SHIFT}",
        f"UPDATE audit.chain_head SET last_id = {ROWS + 1}",
    )
    await _forge(audit, 5, four, good_hash=good_hash)
    await _expect_break(client, keys, 5, INSERTED)


async def test_a_row_replaced_by_a_forgery_is_modified(
    client: audit_pb2_grpc.AuditServiceStub, keys: Keys, audit: PrivateAudit
) -> None:
    await _fill(client, keys)
    three = await _row(audit, 3)
    await audit.tamper("DELETE FROM audit.task_audit_log WHERE id = 4")
    await _forge(audit, 4, three, good_hash=True)
    await _expect_break(client, keys, 4, MODIFIED)


async def test_a_range_checks_only_its_rows(
    client: audit_pb2_grpc.AuditServiceStub, keys: Keys, audit: PrivateAudit
) -> None:
    await _fill(client, keys)
    await audit.tamper("UPDATE audit.task_audit_log SET task_id = 1 WHERE id = 8")
    before = await verify(client, keys, end_id=7)
    assert (before.ok, before.rows_checked, before.head_id) == (True, 7, 7)
    assert before.head_hash == (await _row(audit, 7)).hash.hex()
    after = await verify(client, keys, start_id=5, end_id=9)
    assert (after.first_break.row_id, after.first_break.kind) == (8, MODIFIED)
    assert after.rows_checked == 3


async def test_an_invalid_range_is_refused(
    client: audit_pb2_grpc.AuditServiceStub, keys: Keys
) -> None:
    error = await rpc_error(
        client.VerifyAuditChain(
            audit_pb2.VerifyAuditChainRequest(start_id=9, end_id=3),
            metadata=as_role(keys, Role.AUDITOR),
        )
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("[MHV-003]")


async def test_appends_stop_with_mhv400_when_a_forged_row_holds_the_next_id(
    client: audit_pb2_grpc.AuditServiceStub, keys: Keys, audit: PrivateAudit
) -> None:
    await _fill(client, keys)
    await _forge(audit, ROWS + 1, await _row(audit, ROWS), good_hash=True)
    task_id = random_task_id()
    error = await rpc_error(
        client.RecordEvents(
            audit_pb2.RecordEventsRequest(events=[event(task_id)]),
            metadata=as_role(keys, Role.SERVICE),
        )
    )
    assert error.code() == grpc.StatusCode.DATA_LOSS
    assert error.details().startswith("[MHV-400]")
    count = await audit.admin.fetchval("SELECT count(*) FROM audit.task_audit_log")
    assert count == ROWS + 1


async def test_appends_stop_with_mhv400_when_the_last_rows_were_deleted(
    client: audit_pb2_grpc.AuditServiceStub, keys: Keys, audit: PrivateAudit
) -> None:
    await _fill(client, keys)
    await audit.tamper(f"DELETE FROM audit.task_audit_log WHERE id >= {ROWS - 1}")
    error = await rpc_error(
        client.RecordEvents(
            audit_pb2.RecordEventsRequest(events=[event(random_task_id())]),
            metadata=as_role(keys, Role.SERVICE),
        )
    )
    assert error.code() == grpc.StatusCode.DATA_LOSS
    assert await audit.admin.fetchval("SELECT max(id) FROM audit.task_audit_log") == ROWS - 2


async def test_a_broken_chain_is_counted_and_logged_with_mhv400(
    client: audit_pb2_grpc.AuditServiceStub, keys: Keys, audit: PrivateAudit
) -> None:
    await _fill(client, keys)
    port = audit.process.metrics_port
    ok_before = await metric(port, "audit_chain_verifications_total", {"result": "ok"})
    broken_before = await metric(port, "audit_chain_verifications_total", {"result": "broken"})
    await verify(client, keys)
    await audit.tamper("DELETE FROM audit.task_audit_log WHERE id = 2")
    await _expect_break(client, keys, 2, MISSING)
    assert await metric(port, "audit_chain_verifications_total", {"result": "ok"}) == ok_before + 1
    assert (
        await metric(port, "audit_chain_verifications_total", {"result": "broken"})
        == broken_before + 1
    )
    lines = [r for r in log_records(audit.process.logs()) if r.get("msg") == "audit chain broken"]
    assert lines and matches(lines[-1], error_code="MHV-400", row_id=2), lines


def test_forger_hash_matches_the_service_hash() -> None:
    # The tests above rely on the forger's recomputation being exactly the service's.
    row = StoredRow(
        id=3,
        event_id="00000000-0000-4000-8000-000000000003",
        task_id=7,
        event_type="task_started",
        user_id="00000000-0000-4000-8000-0000000000aa",
        details='{"a":1,"b":2}',
        occur_us=1_735_689_600_000_000,
        created_us=1_735_689_601_000_000,
        request_id="r",
        trace_id="",
        prev_hash=b"\x07" * 32,
        hash=b"",
    )
    assert _forged_hash(row) == row_hash(row)
