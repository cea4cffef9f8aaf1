"""`mhv validate-config`: exits 0 on the shipped settings, MHV-001 with the line at fault."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(**env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MHV_")}
    return subprocess.run(
        [sys.executable, "-m", "mhv_cli.main", "validate-config"],
        env={**clean, **env},
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def test_shipped_settings_are_valid() -> None:
    result = _run()
    assert result.returncode == 0, result.stderr
    assert "demo" in result.stdout


@pytest.mark.parametrize(
    ("content", "line", "words"),
    [
        ("repositories:\n  - name: demo\n  - name: 'bad name!'\n", 3, "repositories.1.name"),
        ("repositories:\n  - name: demo\n    colour: blue\n", 3, "colour"),
        ("repositories:\n  - name: demo\n  - name: demo\n", 1, "listed twice"),
        ("repositories:\n  - name: [unclosed\n", 3, "YAML syntax error"),
        ("repos: []\n", 1, "repositories"),
    ],
)
def test_broken_repos_file_reports_mhv001_and_line(
    tmp_path: Path, content: str, line: int, words: str
) -> None:
    path = tmp_path / "repos.yaml"
    path.write_text(content)
    result = _run(MHV_REPOS_FILE=str(path))
    assert result.returncode != 0
    assert "[MHV-001]" in result.stderr
    assert f"repos.yaml:{line}:" in result.stderr
    assert words in result.stderr
    assert "Traceback" not in result.stderr


def test_a_repository_may_take_several_senders_names(tmp_path: Path) -> None:
    path = tmp_path / "repos.yaml"
    path.write_text(
        "repositories:\n"
        "  - name: demo\n"
        "    github: [example/demo, example/demo-mirror]\n"
        "    gitlab: [example/demo, mirrors/sub/demo]\n"
    )
    result = _run(MHV_REPOS_FILE=str(path))
    assert result.returncode == 0, result.stderr


def test_a_senders_name_mapped_twice_is_refused_with_its_line(tmp_path: Path) -> None:
    # The other cases of the rule: tests/common/test_config.py.
    path = tmp_path / "repos.yaml"
    path.write_text(
        "repositories:\n  - name: a\n    github: o/x\n  - name: b\n    github: [o/y, O/X]\n"
    )
    result = _run(MHV_REPOS_FILE=str(path))
    assert result.returncode != 0
    assert "[MHV-001]" in result.stderr
    assert (
        "repos.yaml:5: repositories.1.github: 'O/X' is already mapped to repository 'a'"
        in result.stderr
    ), result.stderr


def test_broken_environment_reports_the_variable() -> None:
    result = _run(MHV_TASK_GRPC_PORT="not-a-port")
    assert result.returncode != 0
    assert "[MHV-001]" in result.stderr
    assert "MHV_TASK_GRPC_PORT" in result.stderr


def test_unknown_webhook_scheme_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "webhooks.yaml"
    path.write_text(
        "sources:\n  - name: github\n    scheme: github\n  - name: x\n    scheme: ftp\n"
    )
    result = _run(MHV_WEBHOOKS_FILE=str(path))
    assert result.returncode != 0
    assert "webhooks.yaml:5:" in result.stderr
