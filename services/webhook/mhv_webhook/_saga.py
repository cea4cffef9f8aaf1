"""Processing deliveries: the saga that turns an issue event into task changes.

A worker leases a delivery (``SELECT ... FOR UPDATE SKIP LOCKED``), then advances its saga one
step at a time. Each step runs in a transaction that holds the delivery's ``saga_log`` row with
``SELECT ... FOR UPDATE``, makes its call to the task service, and records the step before
committing. The steps:

1. ``actor``: the user who made the change exists (created if missing);
2. ``claim``: the issue's task is found, or this saga claims the right to create it (a
   committed claim, so that two deliveries about one issue never both create a task, and a
   saga that dies after creating one finds it again);
3. ``task``: the claimed task is created, with an idempotency key derived from the delivery,
   so a repeated step returns the same task, and the claim records it;
4. ``change``: the change is applied (edit, close, assign; nothing more for opened/reopened);
5. the delivery is marked completed.

A worker that dies at any step boundary stops renewing its lease; another worker then resumes
from the last recorded step. A call that fails for a reason retrying can fix is retried with
exponential backoff, then dead-lettered (WebhookAdminService.RetryDelivery re-queues it). A
call that can never succeed ends the saga compensated: a task this saga created is cancelled,
so nothing is left half-done.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
import socket
import uuid
from collections.abc import Mapping
from contextlib import AbstractAsyncContextManager

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace

from mhv_common import context
from mhv_common.config import RepositoryCatalog
from mhv_common.errors import (
    InvalidTaskTransitionError,
    MahavishnuError,
    TaskAlreadyCompletedError,
)
from mhv_webhook._changes import Change, IgnoredEvent, IssueChange, Kind
from mhv_webhook._metrics import SAGA_OUTCOMES
from mhv_webhook._scheme import Scheme
from mhv_webhook._schemes import interpret
from mhv_webhook._store_saga import Claimed, IssueBusy, LeaseLost, Sagas, SagaStep
from mhv_webhook._taskclient import (
    PermanentError,
    QualityGate,
    TaskClient,
    TaskStatus,
    TransientError,
)

logger = logging.getLogger(__name__)
tracer = trace.get_tracer("mahavishnu.webhook.saga")

STEPS = ("started", "actor", "claim", "task", "change", "done")
# Answers that mean "the change no longer applies", which completes the saga: e.g. closing an
# issue whose task was completed already.
_ALREADY = (TaskAlreadyCompletedError, InvalidTaskTransitionError)
# What completing a task for a closed issue records: the gateway itself runs no checks.
_CLOSED_ISSUE_GATE = QualityGate(passed=True, checks_run=0)


def _after(step: str, done: str) -> bool:
    return STEPS.index(step) > STEPS.index(done)


class SagaWorker:
    """One worker: claims deliveries and runs their sagas until stopped.

    Args:
        sagas: The saga store.
        client: The task service client.
        repositories: Repository mapping for incoming issues.
        schemes: Source name -> its scheme, which reads the source's deliveries.
        index: Worker number, for its name.
        lease_seconds: How long a claim lasts without renewal.
        max_attempts: Attempts before a delivery may be dead-lettered...
        dead_letter_after_seconds: ...and how long it must have been failing: an outage of
            the task service shorter than this only delays deliveries.
        retry_base_seconds: First retry delay; doubled each attempt (with jitter), capped.
        poll_seconds: Pause when there is nothing to do.
        crash_after: Fault injection for crash tests: SIGKILL this process right after the
            named step commits. Empty in production.
    """

    def __init__(
        self,
        sagas: Sagas,
        client: TaskClient,
        repositories: RepositoryCatalog,
        schemes: Mapping[str, Scheme],
        *,
        index: int,
        lease_seconds: float = 30.0,
        max_attempts: int = 8,
        dead_letter_after_seconds: float = 86_400.0,
        retry_base_seconds: float = 1.0,
        poll_seconds: float = 0.2,
        crash_after: str = "",
    ) -> None:
        self.name = f"saga-worker-{index}"
        self._id = f"{socket.gethostname()}:{os.getpid()}:{index}"
        self._sagas = sagas
        self._client = client
        self._repos = repositories
        self._schemes = schemes
        self._lease = lease_seconds
        self._max_attempts = max_attempts
        self._dead_after = dead_letter_after_seconds
        self._retry_base = retry_base_seconds
        self._poll = poll_seconds
        self._crash_after = crash_after
        self._stop = asyncio.Event()

    def stop(self) -> None:
        """Finish the current saga step and return."""
        self._stop.set()

    async def run(self) -> None:
        """Claim and process deliveries until stopped."""
        while not self._stop.is_set():
            try:
                claimed = await self._sagas.claim(
                    worker=self._id, lease_seconds=self._lease, timeout=context.time_left()
                )
            except Exception as exc:  # the database is down: wait and try again
                logger.warning("saga claim failed", extra={"error": type(exc).__name__})
                claimed = None
            if claimed is None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), self._poll)
                continue
            try:
                await self.process(claimed)
            except Exception:
                # Never lose the worker: the delivery's lease runs out and it is retried.
                logger.exception("saga failed unexpectedly", extra={"delivery": str(claimed.id)})

    async def process(self, claimed: Claimed) -> None:
        """Run one delivery's saga to its end or to its next retry."""
        carrier = {"traceparent": claimed.traceparent or ""}
        if claimed.tracestate:
            carrier["tracestate"] = claimed.tracestate
        # Continue the trace of the request that delivered the webhook.
        token = otel_context.attach(propagate.extract(carrier))
        req = context.RequestContext(request_id=str(claimed.id), method="webhook.saga")
        try:
            with (
                context.bind(req),
                tracer.start_as_current_span(
                    "webhook.saga",
                    attributes={
                        "webhook.delivery": str(claimed.id),
                        "webhook.source": claimed.source,
                    },
                ),
            ):
                await self._process(claimed)
        finally:
            otel_context.detach(token)

    async def _process(self, claimed: Claimed) -> None:
        intent = interpret(
            self._schemes.get(claimed.source),
            source=claimed.source,
            event=claimed.event,
            body=claimed.body,
            repositories=self._repos,
        )
        try:
            if isinstance(intent, IgnoredEvent):
                await self._end(claimed, "ignored", "completed", intent.reason)
                return
            await self._run(claimed, intent)
            await self._end(claimed, "completed", "completed")
        except LeaseLost:
            logger.warning(
                "saga lease lost; another worker resumes it", extra={"delivery": str(claimed.id)}
            )
        except PermanentError as exc:
            await self._compensate(claimed, intent, exc)
        except (TransientError, IssueBusy) as exc:
            await self._retry(claimed, str(exc))
        except MahavishnuError as exc:
            # Our own database or deadline (MHV-002, MHV-007): try again later.
            await self._retry(claimed, f"[{exc.code}] {exc.message}")

    def _step(self, claimed: Claimed) -> AbstractAsyncContextManager[SagaStep]:
        """A saga step's transaction, holding the saga row."""
        return self._sagas.step(
            claimed.id, worker=self._id, lease_seconds=self._lease, timeout=context.time_left()
        )

    async def _run(self, claimed: Claimed, change: IssueChange) -> None:
        with context.deadline_scope(self._lease / 2):
            async with self._step(claimed) as step:
                actor = step.saga.user_id
                if not _after(step.saga.step, "started"):
                    actor = await self._client.ensure_user(change.actor)
                    await step.record("actor", user_id=actor, timeout=context.time_left())
        self._failpoint("actor")
        assert actor is not None
        with context.deadline_scope(self._lease / 2):
            async with self._step(claimed) as step:
                if not _after(step.saga.step, "actor"):
                    # Committed before any task is created: see migrations/webhook/0003.
                    task_id, create = await step.claim_issue(
                        change.source,
                        change.external_key,
                        replace=change.kind == Kind.REOPENED,
                        timeout=context.time_left(),
                    )
                    if task_id is not None and await self._client.task_status(task_id) is None:
                        # The linked task was deleted: this issue needs a new one.
                        task_id, create = await step.claim_issue(
                            change.source,
                            change.external_key,
                            replace=True,
                            timeout=context.time_left(),
                        )
                    await step.record(
                        "claim", task_id=task_id, created_task=create, timeout=context.time_left()
                    )
        self._failpoint("claim")
        with context.deadline_scope(self._lease / 2):
            async with self._step(claimed) as step:
                if not _after(step.saga.step, "claim"):
                    task_id = step.saga.task_id
                    if step.saga.created_task:
                        # Repeating this (after a crash) returns the same task: the request id
                        # is this delivery's.
                        task_id = await self._client.create_task(
                            request_id=claimed.idempotency_key,
                            title=change.title.strip() or change.external_key,
                            description=change.description,
                            repository=change.repository,
                            actor=actor,
                        )
                        await step.link_task(
                            change.source, change.external_key, task_id, timeout=context.time_left()
                        )
                    await step.record("task", task_id=task_id, timeout=context.time_left())
        self._failpoint("task")
        with context.deadline_scope(self._lease / 2):
            async with self._step(claimed) as step:
                if not _after(step.saga.step, "task"):
                    assert step.saga.task_id is not None
                    await self._apply(change, step.saga.task_id, actor)
                    await step.record("change", timeout=context.time_left())
        self._failpoint("change")

    async def _apply(self, change: IssueChange, task_id: int, actor: uuid.UUID) -> None:
        try:
            if change.kind == Kind.EDITED:
                await self._client.update_task(
                    task_id,
                    title=change.title.strip() or change.external_key,
                    description=change.description,
                    actor=actor,
                )
            elif change.kind == Kind.CLOSED:
                await self._close(task_id, actor, not_planned=change.not_planned)
            elif change.kind == Kind.ASSIGNED:
                assignee = (
                    await self._client.ensure_user(change.assignee) if change.assignee else None
                )
                await self._client.assign_task(task_id, assignee, actor=actor)
        except PermanentError as exc:
            if not isinstance(exc.error, _ALREADY):
                raise

    async def _close(self, task_id: int, actor: uuid.UUID, *, not_planned: bool) -> None:
        """Drive the task to cancelled or completed from wherever it is (safe to repeat)."""
        if not_planned:
            await self._client.cancel_task(
                task_id, reason="issue closed as not planned", actor=actor
            )
            return
        for _ in range(4):
            status = await self._client.task_status(task_id)
            if status is None or status.closed:
                return
            if status == TaskStatus.BLOCKED:
                await self._client.unblock_task(task_id, actor=actor)
            elif status == TaskStatus.PENDING:
                await self._client.start_task(task_id, actor=actor)
            else:
                await self._client.complete_task(
                    task_id, quality_gate=_CLOSED_ISSUE_GATE, actor=actor
                )

    async def _compensate(self, claimed: Claimed, intent: Change, error: PermanentError) -> None:
        """Undo what this saga did, then end it compensated.

        Only a task this saga created is cancelled (and its issue claim released, so a later
        event starts afresh); a task it merely found is left as it was.
        """
        reason = f"{error}"
        saga = await self._sagas.saga(claimed.id, timeout=context.time_left())
        if isinstance(intent, IssueChange) and saga is not None and saga.created_task:
            try:
                if saga.task_id is not None:
                    await self._client.cancel_task(
                        saga.task_id,
                        reason=f"webhook delivery {claimed.id} failed",
                        actor=saga.user_id or await self._client.ensure_user(intent.actor),
                    )
                await self._sagas.release_claim(
                    claimed.id, intent.source, intent.external_key, timeout=context.time_left()
                )
            except PermanentError as exc:
                if not isinstance(exc.error, _ALREADY):
                    reason += f"; compensation: {exc}"
            except TransientError as exc:
                # The undo itself must happen: retry the whole saga later, which fails
                # the same way and compensates again.
                await self._retry(claimed, f"{error}; compensation: {exc}")
                return
        logger.warning("saga compensated", extra={"delivery": str(claimed.id), "reason": reason})
        await self._end(claimed, "compensated", "compensated", reason)

    async def _end(self, claimed: Claimed, state: str, saga_state: str, error: str = "") -> None:
        if await self._sagas.finish(
            claimed.id,
            worker=self._id,
            state=state,
            saga_state=saga_state,
            error=error,
            timeout=context.time_left(),
        ):
            SAGA_OUTCOMES.labels(state).inc()
            self._failpoint("done")

    async def _retry(self, claimed: Claimed, error: str) -> None:
        # Only failures that outlast both bounds dead-letter: a task service down for an
        # hour delays its deliveries (retried at most every 5 minutes), it does not park them.
        dead = claimed.attempts >= self._max_attempts and claimed.age_seconds >= self._dead_after
        delay = min(self._retry_base * 2 ** (claimed.attempts - 1), 300.0)
        delay *= random.uniform(0.75, 1.25)  # noqa: S311 - jitter, not security
        await self._sagas.reschedule(
            claimed.id,
            worker=self._id,
            delay_seconds=delay,
            dead=dead,
            error=error,
            timeout=context.time_left(),
        )
        if dead:
            SAGA_OUTCOMES.labels("dead_letter").inc()
        logger.warning(
            "saga step failed; %s",
            "dead-lettered" if dead else "will retry",
            extra={
                "delivery": str(claimed.id),
                "attempt": claimed.attempts,
                "retry_in_s": None if dead else round(delay, 2),
                "error": error,
            },
        )

    def _failpoint(self, step: str) -> None:
        if self._crash_after == step:
            # Fault injection for the crash tests: die exactly at this step boundary, the way a
            # killed process would, with no cleanup.
            os.kill(os.getpid(), signal.SIGKILL)
