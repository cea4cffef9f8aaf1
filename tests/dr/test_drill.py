"""The small disaster-recovery drill, the backup verification, and the operators' commands.

`scripts/test-dr.py` runs once for the module, as an operator would run it, on a small
database (its figures are not asserted: they are the drill's output, not its test). What is
asserted is what the drill proves: no acknowledged write lost when the primary's disk is gone,
every deleted row brought back with nothing else changed, the restored audit chain whole, and
the backup passing verification. The kept repository then serves the `mhv backup` and
`mhv restore` commands, their progress display and their MHV-coded refusals.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mhv_cli.main import main
from mhv_cli.pgcluster import free_port
from tests.harness import ROOT, Cluster

# The drill runs once for the module (its fixture), longer than one test may take.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@dataclass
class Drill:
    """A finished drill: its JSON result and the folder it left."""

    result: dict[str, Any]
    root: Path

    @property
    def home(self) -> Path:
        return self.root / "backup"

    def scenario(self, name: str) -> dict[str, Any]:
        return dict(self.result["scenarios"][name])


@pytest.fixture(scope="module")
def drill(tmp_path_factory: pytest.TempPathFactory) -> Drill:
    root = tmp_path_factory.mktemp("dr")
    process = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "scripts" / "test-dr.py"),
            "--tasks",
            "300",
            "--load-seconds",
            "2",
            "--clients",
            "3",
            "--webhook-senders",
            "1",
            "--verify",
            "--root",
            str(root / "site"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=540)
    finally:
        if process.poll() is None:
            # SIGTERM: the drill stops its services, receiver and PostgreSQL before it exits.
            process.terminate()
            process.communicate(timeout=60)
    result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    assert result.stdout.strip(), result.stderr[-5000:]
    output = json.loads(result.stdout)
    assert result.returncode == (0 if output["ok"] else 1)
    return Drill(output, root / "site")


@dataclass
class Ran:
    """The outcome of one `mhv` command."""

    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def mhv(
    drill: Drill, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> Callable[..., Ran]:
    """Run `mhv` in this process (its whole command line code, without a process start)."""

    def run(*args: str, home: Path | None = None) -> Ran:
        for name in [k for k in os.environ if k.startswith("MHV_")]:
            monkeypatch.delenv(name)
        monkeypatch.setenv("MHV_BACKUP_HOME", str(home or drill.home))
        monkeypatch.setenv("MHV_BACKUP_SERVER", "mahavishnu")
        capsys.readouterr()
        code = main(list(args))
        out, err = capsys.readouterr()
        return Ran(code, out, err)

    return run


def test_primary_lost_under_load_loses_no_acknowledged_write(drill: Drill) -> None:
    lost = drill.scenario("primary_lost")
    assert lost["ok"]
    assert lost["lost_acknowledged_writes"] == 0
    assert lost["rpo_seconds"] == 0
    assert lost["acknowledged"]["create_task"] > 0
    assert lost["acknowledged"]["webhook"] > 0
    # The outage hit clients that were writing: some calls were refused, none acknowledged.
    assert lost["refused_during_load_and_outage"]
    assert lost["rto_seconds"] > lost["phases_seconds"]["restore"] > 0


def test_operator_error_brings_every_row_back_and_changes_nothing_else(drill: Drill) -> None:
    mistake = drill.scenario("operator_error")
    assert mistake["ok"]
    assert mistake["rows_deleted"] > 300
    assert mistake["rows_recovered"] == mistake["rows_deleted"]
    assert mistake["tables_differing_from_before_the_mistake"] == []
    assert mistake["tables_compared"] >= 9


def test_restored_audit_chain_is_whole_and_holds_every_acknowledged_change(drill: Drill) -> None:
    audit = drill.scenario("audit_integrity")
    assert audit["ok"]
    assert audit["chain_verified"]
    assert audit["anchors_compared"] >= 2
    assert audit["anchors_contradicted"] == 0
    acknowledged = drill.scenario("primary_lost")["acknowledged"]["create_task"]
    assert audit["acknowledged_tasks_with_audit_event"] == acknowledged


def test_backup_verification_passes_every_check(drill: Drill) -> None:
    report = drill.result["verification"]
    assert report["ok"], report
    assert set(report["checks"]) == {
        "page_checksums",
        "indexes",
        "row_counts",
        "foreign_keys",
        "audit_chain",
        "anchors",
        "outbox_audit",
    }
    assert report["checks"]["indexes"]["btree_indexes_checked"] >= 20
    assert report["checks"]["page_checksums"]["bad_checksums"] == 0
    assert report["restore_point"].startswith("mhv-mark-")


def test_backup_list_and_info(mhv: Callable[..., Ran]) -> None:
    listed = mhv("backup", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    backups = json.loads(listed.stdout)
    assert [b["status"] for b in backups] == ["DONE"]
    assert backups[0]["keep"] == "standalone"
    info = mhv("backup", "info", "latest", "--json")
    assert info.returncode == 0, info.stderr
    facts = json.loads(info.stdout)
    window = facts["recovery_window"]
    assert window["start"] == backups[0]["end_time"]
    assert window["end"] > window["start"]
    assert facts["backup"]["backup_id"] == backups[0]["backup_id"]


def test_restore_to_a_mark_shows_progress_and_makes_a_side_cluster(
    mhv: Callable[..., Ran], tmp_path: Path
) -> None:
    backup = json.loads(mhv("backup", "list", "--json").stdout)[0]["backup_id"]
    destination = tmp_path / "side"
    done = mhv("restore", "--destination", str(destination), "--target-name", f"mhv-mark-{backup}")
    assert done.returncode == 0, done.stderr
    progress = [line for line in done.stderr.splitlines() if line.startswith("restore:")]
    assert any("%" in line for line in progress), done.stderr
    assert any("Copying the base backup" in line for line in progress)
    assert f"restored backup {backup} into {destination}" in done.stdout
    assert (destination / "PG_VERSION").exists()
    assert (destination / "recovery.signal").exists()
    config = (destination / "postgresql.auto.conf").read_text()
    assert f"recovery_target_name = 'mhv-mark-{backup}'" in config
    assert "synchronous_standby_names = ''" in config


def _refusal(result: Ran, code: str) -> str:
    assert result.returncode == 1, result.stdout + result.stderr
    first = result.stderr.splitlines()[0]
    assert first.startswith(f"error: [{code}] "), result.stderr
    assert "Traceback" not in result.stderr
    return result.stderr


def test_restore_never_writes_over_data(mhv: Callable[..., Ran], tmp_path: Path) -> None:
    used = tmp_path / "used"
    used.mkdir()
    (used / "PG_VERSION").write_text("16\n")
    (used / "postmaster.pid").write_text(f"{os.getpid()}\n{used}\n")
    text = _refusal(mhv("restore", "--destination", str(used)), "MHV-053")
    assert f"a PostgreSQL server (pid {os.getpid()}) runs on it" in text
    assert "never restore over a running cluster" in text
    (used / "postmaster.pid").unlink()
    text = _refusal(mhv("restore", "--destination", str(used)), "MHV-053")
    assert "is not empty (PG_VERSION)" in text
    assert (used / "PG_VERSION").read_text() == "16\n"


def test_restore_refuses_a_time_outside_the_window(mhv: Callable[..., Ran], tmp_path: Path) -> None:
    destination = str(tmp_path / "new")
    text = _refusal(
        mhv(
            "restore",
            "--destination",
            destination,
            "--target-time",
            "2001-01-01T00:00:00+00:00",
        ),
        "MHV-052",
    )
    assert "is outside the recoverable window" in text
    assert "mhv backup info" in text
    text = _refusal(
        mhv("restore", "--destination", destination, "--target-time", "2001-01-01T00:00"),
        "MHV-052",
    )
    assert "has no UTC offset" in text
    assert not Path(destination).exists()


def test_no_repository_is_a_clear_error(mhv: Callable[..., Ran], tmp_path: Path) -> None:
    text = _refusal(mhv("backup", "list", home=tmp_path / "nothing"), "MHV-050")
    assert f"No backup repository in {tmp_path / 'nothing'}" in text
    assert "mhv backup init" in text


def test_a_repository_refuses_another_cluster(
    drill: Drill, mhv: Callable[..., Ran], cluster: Cluster
) -> None:
    before = (drill.home / "barman.conf").read_text()
    text = _refusal(mhv("backup", "init", "--database-url", cluster.admin_url), "MHV-051")
    assert "backs up the cluster with system identifier" in text
    # Nothing of the repository was rewritten.
    assert (drill.home / "barman.conf").read_text() == before


def test_exporter_serves_the_backup_metrics(drill: Drill) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MHV_")}
    env.update(MHV_BACKUP_HOME=str(drill.home), MHV_BACKUP_SERVER="mahavishnu")
    process = subprocess.Popen(
        [str(Path(sys.executable).with_name("mhv")), "backup", "exporter", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert process.stdout is not None
        assert "backup metrics on" in process.stdout.readline()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as answer:
            text = answer.read().decode()
    finally:
        process.terminate()
        code = process.wait(timeout=30)
        if process.stdout is not None:
            process.stdout.close()
    assert code == 0
    values = {
        line.split()[0]: float(line.split()[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    assert values["mhv_backup_completed"] == 1
    assert values["mhv_backup_last_success_timestamp_seconds"] > 1.7e9
    assert values["mhv_backup_verification_last_ok"] == 1
    assert values["mhv_backup_verification_last_success_timestamp_seconds"] > 1.7e9
    # The drill's primary is stopped: nothing streams.
    assert values["mhv_wal_receiver_streaming"] == 0
    assert values["mhv_wal_archive_errors"] == 0
