"""The procedures' commands are real: every `mhv` command parses, every PromQL query is valid
and reads known metrics, and the on-call handbook maps every alert to its runbook.

The commands that can run on one machine are also run for real by the tests beside this one
(the drill and backup commands in test_drill.py, migrations in tests/cli/test_migrate_data.py,
credentials in tests/cli/test_credentials.py, audit anchors in test_verify_checks.py).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from mhv_cli.main import build_parser
from tests.observability.contract import series_names
from tests.observability.promql import metric_names
from tests.observability.test_dashboards import BUILTIN, recorded_names
from tests.observability.tools import ROOT, RULES_DIR, run

PROCEDURES = [
    ROOT / "docs" / "runbooks" / name
    for name in (
        "disaster-recovery.md",
        "deployment.md",
        "rollback.md",
        "on-call-handbook.md",
        "security-incident-response.md",
        "database-migration.md",
        "backup-too-old.md",
        "backup-verification-failed.md",
        "wal-archiving-failing.md",
    )
] + [ROOT / "docs" / "dr" / "backups.md"]
_FENCE = re.compile(r"^[ \t]*```(\w*)\n(.*?)^[ \t]*```", re.MULTILINE | re.DOTALL)
_STOP = {">", ">>", "|", "&&", ";", "2>", "<"}


def blocks(path: Path, language: str) -> list[str]:
    return [body for lang, body in _FENCE.findall(path.read_text()) if lang == language]


_JOINERS = ("or", "and", "unless", "/", "*", "+", "-")


def queries(body: str) -> list[str]:
    """The queries of a PromQL block: one per line, but a line that ends or starts with a
    binary operator joins its neighbour."""
    found: list[str] = []
    for line in (raw.strip() for raw in body.strip().splitlines()):
        joins = found and (
            found[-1].endswith(_JOINERS) or line.startswith(_JOINERS) or line.startswith(")")
        )
        if joins:
            found[-1] += "\n" + line
        else:
            found.append(line)
    return found


def mhv_commands(path: Path) -> list[list[str]]:
    """The argument lists of every `mhv` call in the shell blocks of `path`."""
    found = []
    for body in blocks(path, "sh"):
        for line in body.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
                words = words[1:]
            if not words or (not words[0].endswith("/mhv") and words[0] != "mhv"):
                continue
            args = []
            for word in words[1:]:
                if word in _STOP:
                    break
                args.append(word)
            found.append(args)
    return found


def test_the_procedures_run_mhv() -> None:
    # The check below must not pass vacuously.
    commands = [c for path in PROCEDURES for c in mhv_commands(path)]
    assert len(commands) >= 25
    used = {" ".join(c[:2]) for c in commands}
    for needed in (
        "restore --destination",
        "backup run",
        "backup list",
        "backup info",
        "backup check",
        "backup receive",
        "audit verify",
        "audit anchor",
        "keys generate",
        "keys jwks",
        "secrets rotate-webhook",
        "secrets rotate-db-password",
        "migrate --down",
    ):
        assert needed in used, f"no procedure runs `mhv {needed}`"


@pytest.mark.parametrize("path", PROCEDURES, ids=lambda p: p.name)
def test_every_mhv_command_of_a_procedure_parses(path: Path) -> None:
    parser = build_parser()
    for args in mhv_commands(path):
        try:
            parser.parse_args(args)
        except SystemExit:
            pytest.fail(f"{path.name}: `mhv {' '.join(args)}` is not a valid mhv command")


def test_every_promql_query_of_a_procedure_is_valid(tmp_path: Path) -> None:
    known = series_names() | recorded_names() | BUILTIN
    rules = []
    for path in PROCEDURES:
        for body in blocks(path, "promql"):
            for number, query in enumerate(queries(body)):
                unknown = metric_names(query) - known
                assert not unknown, f"{path.name}: {query} reads unknown metrics {unknown}"
                rules.append(
                    {"record": f"doc:{path.stem.replace('-', '_')}:{number}", "expr": query}
                )
    assert len(rules) >= 10
    file = tmp_path / "queries.yml"
    file.write_text(yaml.safe_dump({"groups": [{"name": "docs", "rules": rules}]}))
    result = run("promtool", "check", "rules", file)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_handbook_maps_every_alert_to_its_runbook() -> None:
    handbook = (ROOT / "docs" / "runbooks" / "on-call-handbook.md").read_text()
    table = handbook.split("## Alerts and their runbooks", 1)[1].split("\n## ", 1)[0]
    mapped: dict[str, str] = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 3 and "`" in cells[0]:
            page = re.search(r"\(([a-z0-9-]+\.md)", cells[2])
            for name in re.findall(r"`(\w+)`", cells[0]):
                mapped[name] = page.group(1) if page else ""
    alerts = {}
    for path in RULES_DIR.glob("*.yml"):
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                if "alert" in rule:
                    alerts[rule["alert"]] = rule["annotations"]["runbook_url"].rsplit("/", 1)[1]
    assert set(mapped) == set(alerts), {
        "missing": sorted(set(alerts) - set(mapped)),
        "unknown": sorted(set(mapped) - set(alerts)),
    }
    wrong = {a: (mapped[a], page) for a, page in alerts.items() if mapped[a] != page}
    assert not wrong, f"the handbook points these alerts elsewhere than their rule: {wrong}"
