"""Each check of the backup verification finds the damage it is there for.

The checks run here on a seeded database of the suite's cluster (no restore needed): clean,
each passes; with one defect planted, exactly its check fails and says where. Page checksums
and amcheck get a private cluster whose index file is overwritten on disk.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from mhv_cli import anchors
from mhv_cli.main import main
from mhv_cli.marks import Mark, count_rows, tables
from mhv_cli.pgcluster import PrivateCluster, contrib_bin_dir, free_port
from mhv_cli.verify import (
    check_anchors,
    check_audit_chain,
    check_foreign_keys,
    check_indexes,
    check_outbox_audit,
    check_page_checksums,
    check_row_counts,
)
from tests.harness import Cluster
from tests.seed import scratch_database


@pytest.fixture
async def seeded(cluster: Cluster) -> AsyncIterator[str]:
    async with scratch_database(cluster.admin_url, "mhvverify", seed=True) as (url, _roles):
        yield url


async def _mark(conn: asyncpg.Connection) -> Mark:
    row = await conn.fetchrow("SELECT last_id, encode(last_hash, 'hex') AS h FROM audit.chain_head")
    assert row is not None
    return Mark(
        backup_id="20260101T000000",
        restore_point="mhv-mark-20260101T000000",
        taken_at=dt.datetime.now(dt.UTC).isoformat(),
        lsn="0/0",
        counts=await count_rows(conn, await tables(conn)),
        audit_head_id=int(row["last_id"]),
        audit_head_hash=str(row["h"]),
    )


async def test_clean_database_passes_and_each_planted_defect_is_found(
    seeded: str, tmp_path: Path
) -> None:
    conn = await asyncpg.connect(seeded)
    try:
        mark = await _mark(conn)
        anchor_file = tmp_path / "anchors.jsonl"
        await anchors.record(seeded, anchor_file)
        clean = {
            "row_counts": await check_row_counts(conn, mark),
            "foreign_keys": await check_foreign_keys(conn),
            "audit_chain": await check_audit_chain(seeded, mark),
            "anchors": await check_anchors(conn, anchor_file, mark),
            "outbox_audit": await check_outbox_audit(conn),
        }
        assert {name: c.ok for name, c in clean.items()} == dict.fromkeys(clean, True)
        assert clean["foreign_keys"].detail["foreign_keys"] >= 3
        assert clean["audit_chain"].detail["rows_checked"] == 4
        # Pending: a task's and a user's event in the task outbox, a retry in the gateway's.
        assert clean["outbox_audit"].detail == {"delivered": 4, "pending": 3, "lost": 0}

        # A count that differs from the source at backup time.
        fewer = dataclasses.replace(mark, counts={**mark.counts, "task.tasks": 4})
        counts = await check_row_counts(conn, fewer)
        assert not counts.ok
        assert counts.detail["mismatches"] == {"task.tasks": {"expected": 4, "restored": 5}}

        # An anchor whose row now carries another hash; one past the head, recorded before.
        forged = anchors.Anchor(mark.taken_at, 2, "ab" * 32)
        beyond = anchors.Anchor(mark.taken_at, 99, "cd" * 32)
        bad_file = tmp_path / "forged.jsonl"
        for anchor in (*anchors.load(anchor_file), forged, beyond):
            anchors.append(bad_file, anchor)
        contradicted = await check_anchors(conn, bad_file, mark)
        assert not contradicted.ok
        assert contradicted.detail["mismatched"] == [2]
        assert contradicted.detail["missing_rows_anchored_at"] == [99]
        # No anchors at all is a failure too: the check would prove nothing.
        assert not (await check_anchors(conn, tmp_path / "none.jsonl", mark)).ok

        # Damage only a superuser could do: triggers and foreign keys off.
        async with conn.transaction():
            await conn.execute("SET LOCAL session_replication_role = replica")
            await conn.execute(
                "INSERT INTO task.tasks (title, repository, created_by) VALUES ('orphan', 'demo',"
                " $1)",
                uuid.uuid4(),
            )
            await conn.execute(
                'UPDATE audit.task_audit_log SET details_canonical = \'{"title":"forged"}\''
                " WHERE id = 3"
            )
            for outbox in ("task.outbox", "webhook.outbox"):
                await conn.execute(
                    f"UPDATE {outbox} SET delivered_at = now() WHERE delivered_at IS NULL"
                )
        keys = await check_foreign_keys(conn)
        assert not keys.ok
        assert keys.detail["orphan_rows"] == {"tasks_created_by_fkey": 1}
        chain = await check_audit_chain(seeded, mark)
        assert not chain.ok
        assert chain.detail["first_break"]["row_id"] == 3
        assert chain.detail["first_break"]["kind"] == "modified"
        outbox = await check_outbox_audit(conn)
        assert not outbox.ok
        assert outbox.detail["lost"] == 3  # marked delivered in both outboxes, never recorded
    finally:
        await conn.close()


async def test_corrupted_index_page_is_found_by_checksums_and_amcheck(tmp_path: Path) -> None:
    cluster = PrivateCluster(tmp_path / "pg", free_port(), bin_dir=contrib_bin_dir())
    await asyncio.to_thread(cluster.start)
    try:
        conn = await asyncpg.connect(cluster.url())
        try:
            await conn.execute(
                "CREATE TABLE t (id bigint PRIMARY KEY, v text);"
                "INSERT INTO t SELECT i, md5(i::text) FROM generate_series(1, 20000) i;"
                "CHECKPOINT"
            )
            index_file = await conn.fetchval("SELECT pg_relation_filepath('t_pkey')")
        finally:
            await conn.close()
        password = cluster.password_file.read_text().strip()
        healthy = await check_indexes(cluster, "postgres", password)
        assert healthy.ok, healthy.detail
        assert healthy.detail["btree_indexes_checked"] == 0  # no index of the service schemas
        await asyncio.to_thread(cluster.stop)
        assert check_page_checksums(cluster).ok

        # Overwrite the middle of a leaf page of the index, as a failing disk would.
        path = cluster.data_dir / index_file
        with path.open("r+b") as f:
            f.seek(8192 * 3 + 4000)
            f.write(b"\xde\xad\xbe\xef" * 64)
        damaged = check_page_checksums(cluster)
        assert not damaged.ok
        assert damaged.detail["bad_checksums"] >= 1
        await asyncio.to_thread(cluster.start)
        found = await check_indexes(cluster, "postgres", password)
        assert not found.ok
        assert any("t_pkey" in line for line in found.detail["corruption"]), found.detail
    finally:
        await asyncio.to_thread(cluster.stop, mode="immediate")


def test_mhv_audit_anchor_and_verify(
    seeded: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in [k for k in os.environ if k.startswith("MHV_")]:
        monkeypatch.delenv(name)
    anchors_file = tmp_path / "anchors.jsonl"
    target = ["--database-url", seeded, "--file", str(anchors_file)]

    def mhv(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main([*args, *target])
        out, err = capsys.readouterr()
        return code, out, err

    code, out, err = mhv("audit", "anchor")
    assert code == 0, err
    (anchor,) = anchors.load(anchors_file)
    assert anchor.head_id == 4
    assert out.strip().endswith(f"head 4 {anchor.head_hash}")
    code, out, err = mhv("audit", "verify")
    assert code == 0, err
    report = json.loads(out)
    assert report["ok"] and report["rows_checked"] == 4 and report["anchors_checked"] == 1

    async def tamper() -> None:
        # The last row's hash and the head rewritten: the anchor no longer matches.
        conn = await asyncpg.connect(seeded)
        try:
            async with conn.transaction():
                await conn.execute("SET LOCAL session_replication_role = replica")
                await conn.execute(
                    "UPDATE audit.task_audit_log SET hash = sha256(hash) WHERE id = 4;"
                    "UPDATE audit.chain_head SET last_hash = (SELECT hash"
                    " FROM audit.task_audit_log WHERE id = 4)"
                )
        finally:
            await conn.close()

    asyncio.run(tamper())
    code, out, err = mhv("audit", "verify")
    assert code == 1
    assert "[MHV-400]" in err
    report = json.loads(out)
    assert [a["head_id"] for a in report["anchors_mismatched"]] == [4]
    assert report["first_break"]["row_id"] == 4
    # A broken chain gets no anchor: anchoring it would bless the tampering.
    code, out, err = mhv("audit", "anchor")
    assert code == 1
    assert "[MHV-400]" in err and "no anchor recorded" in err
    assert len(anchors.load(anchors_file)) == 1
