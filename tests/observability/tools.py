"""The real monitoring binaries the tests run, and a process wrapper that always cleans up.

The tools come from Debian's ``prometheus`` and ``prometheus-alertmanager`` packages, installed
by ``make test`` (deploy/install-tools.sh) when missing.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Self

import httpx

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
RULES_DIR = DEPLOY / "prometheus" / "rules"
RULE_TESTS_DIR = DEPLOY / "prometheus" / "tests"
ALERTMANAGER_CONFIG = DEPLOY / "alertmanager" / "alertmanager.yml"

# Upstream names first, then Debian's name for the Alertmanager daemon.
_NAMES = {
    "promtool": ("promtool",),
    "prometheus": ("prometheus",),
    "amtool": ("amtool",),
    "alertmanager": ("alertmanager", "prometheus-alertmanager"),
}


def tool(name: str) -> str:
    """Path of the binary `name`; a clear failure when it is not installed."""
    for candidate in _NAMES[name]:
        found = shutil.which(candidate)
        if found:
            return found
    raise RuntimeError(
        f"{name} is not installed: run `make test` (it runs deploy/install-tools.sh), or install "
        "the Debian packages prometheus and prometheus-alertmanager"
    )


def run(name: str, *args: str | Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run a tool to completion, capturing its output."""
    return subprocess.run(
        [tool(name), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


class Daemon:
    """A long-running tool process: started on free ports, logged to a file, always stopped."""

    def __init__(self, argv: Sequence[str], log_path: Path, ready_url: str) -> None:
        self.argv = list(argv)
        self.log_path = log_path
        self.ready_url = ready_url
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, *, timeout: float = 30) -> None:
        """Start the process and wait until `ready_url` answers 200."""
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.argv[0]} exited at start:\n{self.logs()[-3000:]}")
            try:
                if httpx.get(self.ready_url, timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"{self.argv[0]} not ready in {timeout}s:\n{self.logs()[-3000:]}"
                )
            time.sleep(0.1)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self, *, timeout: float = 10) -> None:
        """SIGTERM, then SIGKILL if it does not exit in `timeout` seconds."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def logs(self) -> str:
        """Everything the process wrote so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
