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


def test_embedding_settings_are_checked_and_the_provider_chain_printed() -> None:
    shipped = _run()
    assert "embeddings: local sentence-transformers/all-MiniLM-L6-v2" in shipped.stdout
    assert "semantic search: not checked (MHV_TASK_DATABASE_URL is not set)" in shipped.stdout
    remote = _run(
        MHV_EMBEDDING_REMOTE_URL="https://embeddings.example/v1",
        MHV_EMBEDDING_REMOTE_MODEL="example/minilm",
    )
    assert remote.returncode == 0, remote.stderr
    assert "embeddings: remote example/minilm (384 dimensions)" in remote.stdout
    assert "then local sentence-transformers/all-MiniLM-L6-v2 when it fails" in remote.stdout
    broken = _run(MHV_EMBEDDING_WORKER_BATCH_SIZE="0")
    assert broken.returncode != 0
    assert "[MHV-001] environment: MHV_EMBEDDING_WORKER_BATCH_SIZE:" in broken.stderr
    no_model = _run(MHV_EMBEDDING_REMOTE_URL="https://embeddings.example/v1")
    assert no_model.returncode != 0
    assert "MHV_EMBEDDING_REMOTE_MODEL is not" in no_model.stderr
