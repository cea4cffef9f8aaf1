"""A real Prometheus for tests: a given scrape config and rule files, a free port, temp storage.

    with Prometheus(scrape_config({"mahavishnu-task": ["127.0.0.1:9101"]}), RULE_FILES,
                    tmp_path) as prom:
        prom.wait_for_targets({"mahavishnu-task"})
        prom.query('up{job="mahavishnu-task"}')

Queries raise `PromQLError` when Prometheus rejects them (a parse error, say), so a test can
tell "returns nothing" from "is not valid".
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import yaml

from mhv_cli.pgcluster import free_port
from tests.observability.tools import RULES_DIR, Daemon, tool

RULE_FILES = tuple(sorted(RULES_DIR.glob("*.yml")))


class PromQLError(Exception):
    """Prometheus answered a query with an error."""


def scrape_config(
    jobs: Mapping[str, Sequence[str]],
    *,
    interval: str = "1s",
    alertmanagers: Sequence[str] = (),
) -> dict[str, Any]:
    """A Prometheus config scraping `jobs` (job name -> host:port targets) every `interval`.

    Rules are evaluated as often as targets are scraped; `alertmanagers` (host:port) receive
    the alerts.
    """
    config: dict[str, Any] = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": list(targets)}]}
            for job, targets in jobs.items()
        ],
    }
    if alertmanagers:
        config["alerting"] = {
            "alertmanagers": [{"static_configs": [{"targets": list(alertmanagers)}]}]
        }
    return config


class Prometheus(Daemon):
    """Prometheus on a free port with its own temporary TSDB."""

    def __init__(
        self,
        config: Mapping[str, Any],
        rule_files: Sequence[Path],
        workdir: Path,
        *,
        resend_delay: str = "1s",
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        full = dict(config)
        full["rule_files"] = [str(p) for p in rule_files]
        self.config_path = workdir / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(full, sort_keys=False))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        super().__init__(
            [
                tool("prometheus"),
                f"--config.file={self.config_path}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                # Alerts evaluated before the Alertmanager is discovered are dropped and only
                # sent again after this delay (1m by default).
                f"--rules.alert.resend-delay={resend_delay}",
                "--log.level=warn",
            ],
            workdir / "prometheus.log",
            f"{self.url}/-/ready",
        )

    def _get(self, path: str, params: Mapping[str, str] | None = None) -> Any:
        response = httpx.get(f"{self.url}{path}", params=params, timeout=30)
        body = response.json()
        if body.get("status") != "success":
            raise PromQLError(f"{body.get('errorType')}: {body.get('error')} ({params})")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The instant vector of `expr` now (a scalar or string becomes one sample)."""
        data = self._get("/api/v1/query", {"query": expr})
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return list(data["result"])

    def query_range(self, expr: str, *, seconds: float, step: str = "1s") -> list[dict[str, Any]]:
        """The range of `expr` over the last `seconds`."""
        end = time.time()
        params = {"query": expr, "start": str(end - seconds), "end": str(end), "step": step}
        return list(self._get("/api/v1/query_range", params)["result"])

    def wait_until(
        self,
        expr: str,
        condition: Callable[[list[dict[str, Any]]], bool] = bool,
        *,
        timeout: float = 30,
    ) -> list[dict[str, Any]]:
        """Poll `expr` until `condition` holds on its result; the result, or TimeoutError."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(expr)
            if condition(result):
                return result
            if time.monotonic() > deadline:
                raise TimeoutError(f"{expr!r} still {result!r} after {timeout}s")
            time.sleep(0.25)

    def panels_without_data(self, queries: Sequence[Any], *, timeout: float = 20) -> list[str]:
        """Run every panel query until all return data; those that never did, by name.

        A rate needs two scrapes of its series, and a series may appear a scrape after another,
        so one pass right after start-up can miss data that is there a second later.
        """
        deadline = time.monotonic() + timeout
        pending = list(queries)
        while True:
            with ThreadPoolExecutor(max_workers=8) as pool:
                results = list(pool.map(lambda q: self.query(q.promql()), pending))
            pending = [q for q, result in zip(pending, results, strict=True) if not result]
            if not pending or time.monotonic() > deadline:
                return [f"{q.dashboard} / {q.panel} / {q.ref_id}: {q.expr}" for q in pending]
            time.sleep(0.5)

    def targets(self) -> list[dict[str, Any]]:
        """Active scrape targets with their health."""
        return list(self._get("/api/v1/targets")["activeTargets"])

    def wait_for_targets(self, jobs: Collection[str], *, timeout: float = 30) -> None:
        """Wait until every target of `jobs` has been scraped successfully."""
        deadline = time.monotonic() + timeout
        while True:
            health = {t["labels"]["job"]: t["health"] for t in self.targets()}
            if all(health.get(job) == "up" for job in jobs):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"targets not up after {timeout}s: {health}")
            time.sleep(0.25)

    def rule_groups(self) -> list[dict[str, Any]]:
        """The loaded rule groups with each rule's health and last error."""
        return list(self._get("/api/v1/rules")["groups"])
