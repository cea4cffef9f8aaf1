"""Several processes of one service on one port: ``MHV_<SERVICE>_PROCESSES``.

A Python process uses one core. To use more cores of one host, a service started with
``MHV_TASK_PROCESSES=4`` (or ``_AUDIT_``, ``_WEBHOOK_``) becomes a supervisor that starts four
copies of its own command line and serves none of the traffic itself:

- every copy binds the service's ports (gRPC, and the gateway's HTTPS) with ``SO_REUSEPORT``;
  the kernel spreads incoming connections across them;
- the supervisor alone serves ``/metrics``: the copies write their metrics to files in one
  folder (prometheus-client's multiprocess mode) and a scrape sums them. Counters and
  histograms add up; each gauge declares how copies combine (``multiprocess_mode``: ``livesum``
  for per-process amounts, ``livemostrecent`` for observations of the shared database, ``max``
  for timestamps). ``process_*`` series describe the supervisor. The folder is
  ``PROMETHEUS_MULTIPROC_DIR`` when set (emptied at start), else a temporary one;
- SIGTERM or SIGINT to the supervisor is passed to every copy, which drains as a single process
  would; the supervisor exits 0 once all exited 0;
- a copy killed by a signal (the OOM killer, SIGKILL) is started again after a short pause,
  while the others go on serving; more than `RESTART_LIMIT` restarts within
  `RESTART_WINDOW_SECONDS`, or a copy that exits by itself (a port it cannot bind, a lost
  listener, an error), stops the whole service with exit status 1: an orchestrator restarts it.

The default, one process, runs the service directly, without a supervisor. On Kubernetes run one
process per pod and scale with replicas; several processes suit a host or VM without an
orchestrator.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, ProcessCollector, multiprocess, start_http_server

from mhv_common import logs
from mhv_common.config import CommonSettings
from mhv_common.errors import ConfigurationError

logger = logging.getLogger(__name__)

CHILD_INDEX_ENV = "MHV_PROCESS_INDEX"
"""Set by the supervisor in each copy's environment: its index, 0 to N-1."""
SUPERVISOR_PID_ENV = "MHV_SUPERVISOR_PID"
"""Set by the supervisor in each copy's environment: its own process id."""
METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
RESTART_LIMIT = 5
RESTART_WINDOW_SECONDS = 60.0
_MAX_RESTART_PAUSE_SECONDS = 5.0

_PR_SET_PDEATHSIG = 1
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None


def child_index() -> int | None:
    """The index of this process among its service's copies, or None when it is not one."""
    value = os.environ.get(CHILD_INDEX_ENV)
    return int(value) if value is not None and value.isdigit() else None


def follow_supervisor() -> None:
    """In a copy: get SIGTERM when the supervisor dies, even by SIGKILL; exit if it is gone.

    Done by the copy itself at start rather than between fork and exec in the supervisor, where
    only async-signal-safe calls belong.
    """
    supervisor = int(os.environ.get(SUPERVISOR_PID_ENV, "0"))
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if supervisor and os.getppid() != supervisor:  # it died before the call above
        raise SystemExit(1)


def check(service: str, *, processes: int, grpc_port: int) -> None:
    """Refuse settings several processes cannot run with (before anything starts).

    Raises:
        ConfigurationError: Port 0 (each copy would pick its own port), or a metrics folder
            that is not a directory.

    """
    if processes <= 1:
        return
    variable = f"MHV_{service.upper()}_PROCESSES"
    if grpc_port == 0:
        raise ConfigurationError(
            f"{variable}={processes} needs a fixed gRPC port: with port 0 each process would "
            "listen on a port of its own."
        )
    given = os.environ.get(METRICS_DIR_ENV)
    if given and not Path(given).is_dir():
        raise ConfigurationError(
            f"{METRICS_DIR_ENV} must name an existing, writable folder ({variable}={processes} "
            "keeps every process's metrics there)."
        )


class Supervisor:
    """Runs N copies of this process's command on the service's shared ports.

    Args:
        service: Short service name, for logs.
        processes: How many copies.
        metrics_port: Port of the aggregated ``/metrics`` (None: no metrics endpoint).
        settings: The service's settings (metrics address, drain time, logging).
        command: The copies' command line; default: this process's own.
    """

    def __init__(
        self,
        service: str,
        *,
        processes: int,
        metrics_port: int | None,
        settings: CommonSettings,
        command: Sequence[str] | None = None,
    ) -> None:
        self._service = service
        self._count = processes
        self._metrics_port = metrics_port
        self._settings = settings
        self._command = list(command or [sys.executable, *sys.orig_argv[1:]])
        self._children: dict[int, asyncio.subprocess.Process] = {}
        self._restarts: list[float] = []
        self._stop = asyncio.Event()
        self._metrics_dir = Path()
        self._own_metrics_dir = False
        self._metrics_server: WSGIServer | None = None

    async def run(self) -> int:
        """Start the copies and watch them until told to stop; return the exit status."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        self._prepare_metrics_dir()
        try:
            self._serve_metrics()
            for index in range(self._count):
                await self._spawn(index)
            failed = await self._watch()
        finally:
            clean = await self._stop_children()
            self._close_metrics()
        return 1 if failed or not clean else 0

    def _prepare_metrics_dir(self) -> None:
        given = os.environ.get(METRICS_DIR_ENV)
        if given:
            # Files of an earlier run would add its counts (and its dead processes' gauges) in.
            self._metrics_dir = Path(given)
            for stale in self._metrics_dir.glob("*.db"):
                stale.unlink()
        else:
            self._metrics_dir = Path(tempfile.mkdtemp(prefix=f"mhv-{self._service}-metrics-"))
            self._own_metrics_dir = True

    def _serve_metrics(self) -> None:
        if self._metrics_port is None:
            return
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=str(self._metrics_dir))
        # process_start_time_seconds and friends: the supervisor's, which lives as long as
        # the service does (alerts count from the start time).
        ProcessCollector(registry=registry)
        server, _thread = start_http_server(
            self._metrics_port, addr=self._settings.metrics_host, registry=registry
        )
        self._metrics_server = server
        logger.info(
            "metrics of all processes served",
            extra={"metrics_port": server.server_port, "processes": self._count},
        )

    def _close_metrics(self) -> None:
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        if self._own_metrics_dir:
            shutil.rmtree(self._metrics_dir, ignore_errors=True)

    async def _spawn(self, index: int) -> None:
        env = {
            **os.environ,
            CHILD_INDEX_ENV: str(index),
            SUPERVISOR_PID_ENV: str(os.getpid()),
            METRICS_DIR_ENV: str(self._metrics_dir),
            "MHV_REUSE_PORT": "true",
        }
        process = await asyncio.create_subprocess_exec(
            *self._command,
            env=env,
            # Its own process group: a Ctrl-C in a terminal reaches the supervisor only, which
            # stops the copies in order.
            process_group=0,
        )
        self._children[index] = process
        logger.info("process started", extra={"index": index, "pid": process.pid})

    async def _watch(self) -> bool:
        """Wait for the stop signal (returns False) or a failure that ends the service (True)."""
        stop = asyncio.create_task(self._stop.wait())
        exits = {i: asyncio.create_task(p.wait()) for i, p in self._children.items()}
        try:
            while True:
                done, _ = await asyncio.wait(
                    [stop, *exits.values()], return_when=asyncio.FIRST_COMPLETED
                )
                if stop in done:
                    return False
                for index, waiter in list(exits.items()):
                    if waiter not in done:
                        continue
                    process = self._children[index]
                    multiprocess.mark_process_dead(process.pid, str(self._metrics_dir))
                    if not await self._replace(index, process):
                        return True
                    if self._stop.is_set():
                        return False
                    exits[index] = asyncio.create_task(self._children[index].wait())
        finally:
            for task in (stop, *exits.values()):
                task.cancel()

    async def _replace(self, index: int, process: asyncio.subprocess.Process) -> bool:
        """Start a copy again after it died; False when the service must stop instead."""
        code = process.returncode
        assert code is not None
        details = {"index": index, "pid": process.pid, "exit_status": code}
        if code >= 0:
            logger.error("a process exited on its own; stopping the service", extra=details)
            return False
        now = time.monotonic()
        self._restarts = [t for t in self._restarts if now - t < RESTART_WINDOW_SECONDS]
        if len(self._restarts) >= RESTART_LIMIT:
            logger.error(
                "processes keep dying; stopping the service",
                extra={**details, "restarts": len(self._restarts)},
            )
            return False
        pause = min(0.25 * 2 ** len(self._restarts), _MAX_RESTART_PAUSE_SECONDS)
        self._restarts.append(now)
        logger.error(
            "a process was killed; starting it again",
            extra={**details, "signal": signal.Signals(-code).name, "in_s": pause},
        )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), pause)
        if not self._stop.is_set():
            await self._spawn(index)
        return True

    async def _stop_children(self) -> bool:
        """SIGTERM every copy and wait for it to drain; True when all exited with status 0."""
        live = [p for p in self._children.values() if p.returncode is None]
        for process in live:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        # A copy drains its HTTPS requests (the gateway), its calls, then its workers, each
        # within the grace period (mhv_common.server).
        limit = 3 * self._settings.shutdown_grace_seconds + 5
        waits = [asyncio.create_task(p.wait()) for p in live]
        if waits:
            _done, pending = await asyncio.wait(waits, timeout=limit)
            if pending:
                logger.error("processes did not drain in time; killing them")
                for process in live:
                    if process.returncode is None:
                        with contextlib.suppress(ProcessLookupError):
                            process.kill()
                await asyncio.gather(*pending)
        for process in live:
            multiprocess.mark_process_dead(process.pid, str(self._metrics_dir))
        return all(p.returncode == 0 for p in live)


def supervise(
    service: str, *, processes: int, metrics_port: int | None, settings: CommonSettings
) -> int:
    """Run `processes` copies of this service (see the module docstring); return the status."""
    logs.configure(f"mahavishnu-{service}", level=settings.log_level, fmt=settings.log_format)
    if settings.rate_limit_storage_uri.startswith("memory"):
        logger.warning(
            "rate limits are kept per process: with several processes each allows the full "
            "limit; set MHV_RATE_LIMIT_STORAGE_URI to a Redis URL to share them"
        )
    supervisor = Supervisor(
        service, processes=processes, metrics_port=metrics_port, settings=settings
    )
    return asyncio.run(supervisor.run())
