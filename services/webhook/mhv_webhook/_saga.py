"""Processing deliveries: the saga that turns an issue event into task changes.

A worker leases a delivery (``SELECT ... FOR UPDATE SKIP LOCKED``), then advances its saga one
step at a time. Each step runs in a transaction that holds the delivery's ``saga_log`` row with
``SELECT ... FOR UPDATE``, makes its call to the task service, and records the step before
committing. The steps:

1. ``actor``: the user who made the change exists (created if missing);
2. ``claim``: the issue's task is found, or this saga claims the right to create it (a
   committed claim, so that two deliveries about one issue never both create a task, and a
   saga that dies after creating one finds it again). An issue opened again after its task
   ended gets a new task; a state change older than the last one applied is ignored;
3. ``task``: the claimed task is created, with an idempotency key derived from the delivery,
   so a repeated step returns the same task, and the claim records it;
4. ``change``: the change is applied: the open task follows the change's fields (title,
   description, metadata, assignee, repository), or is completed or cancelled;
5. the delivery is marked completed.

A worker that dies at any step boundary stops renewing its lease; another worker then resumes
from the last recorded step. A call that fails for a reason retrying can fix is retried with
exponential backoff, then dead-lettered (WebhookAdminService.RetryDelivery re-queues it). A
call that can never succeed ends the saga compensated: a task this saga created is cancelled,
so nothing is left half-done. Any other exception in a step (payload content Python, protobuf
or PostgreSQL cannot take, or a bug) takes the retry path too, and is dead-lettered after the
configured attempts, releasing the issue claim it holds.
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
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace

from mhv_common import context
from mhv_common.config import RepositoryCatalog
from mhv_common.db import is_connection_error
from mhv_common.errors import (
    DatabaseConnectionError,
    DeadlineExceededError,
    InvalidTaskTransitionError,
    MahavishnuError,
    TaskAlreadyCompletedError,
    TaskUpdateFailedError,
)
from mhv_webhook._changes import (
    Change,
    IgnoredEvent,
    Kind,
    Missing,
    TaskChange,
    merged_metadata,
    sender_time,
)
from mhv_webhook._metrics import SAGA_OUTCOMES
from mhv_webhook._scheme import Scheme
from mhv_webhook._schemes import interpret
from mhv_webhook._store_saga import (
    Abandoned,
    Claimed,
    IssueBusy,
    LeaseLost,
    Sagas,
    SagaStep,
)
from mhv_webhook._taskclient import (
    PermanentError,
    TaskClient,
    TaskServiceError,
    TaskSnapshot,
    TaskStatus,
    TransientError,
)

logger = logging.getLogger(__name__)
tracer = trace.get_tracer("mahavishnu.webhook.saga")

STEPS = ("started", "actor", "claim", "task", "change", "done")
# Answers that mean "the change no longer applies", which completes the saga: e.g. closing an
# issue whose task was completed already.
_ALREADY = (TaskAlreadyCompletedError, InvalidTaskTransitionError)
# Reads of a task before an update that someone else's change keeps making stale.
_UPDATE_ATTEMPTS = 3


class NothingToDo(Exception):
    """The change has nothing to act on: the delivery ends ignored, with this reason."""


class TaskNotYetCreated(Exception):
    """The change addresses a task that an earlier event creates, not here yet: retry later."""


# Failures that mean "not now": the task service or our database is unreachable or slow,
# another delivery is creating the issue's task, or the task's creating event is not here yet.
_WAIT_AND_RETRY = (
    TransientError,
    IssueBusy,
    TaskNotYetCreated,
    DatabaseConnectionError,
    DeadlineExceededError,
)


def _not_now(exc: Exception) -> bool:
    """Whether `exc` says "not now" (retrying unchanged can succeed), not "never"."""
    return isinstance(exc, (*_WAIT_AND_RETRY, TimeoutError)) or is_connection_error(exc)


def _reason(exc: Exception) -> str:
    """What a failed attempt records on the delivery (the store makes it storable)."""
    if isinstance(exc, MahavishnuError):
        return f"[{exc.code}] {exc.message}"
    if isinstance(exc, (TaskServiceError, IssueBusy, TaskNotYetCreated)):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


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
                    worker=self._id,
                    lease_seconds=self._lease,
                    max_attempts=self._max_attempts,
                    timeout=context.time_left(),
                )
            except Exception as exc:  # the database is down: wait and try again
                logger.warning("saga claim failed", extra={"error": type(exc).__name__})
                claimed = None
            if isinstance(claimed, Abandoned):
                SAGA_OUTCOMES.labels("dead_letter").inc()
                logger.warning(
                    "saga abandoned at its last attempt; dead-lettered",
                    extra={"delivery": str(claimed.id), "attempt": claimed.attempts},
                )
                continue
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
        try:
            await self._advance(claimed)
        except LeaseLost:
            logger.warning(
                "saga lease lost; another worker resumes it", extra={"delivery": str(claimed.id)}
            )
        except Exception as exc:
            if _not_now(exc):
                await self._retry(claimed, _reason(exc), outage=True)
                return
            # Anything else, whatever raised it (a bug, or payload content that Python,
            # protobuf or PostgreSQL cannot take), fails the same way on every attempt: it
            # must not hold the worker, the lease or the issue's claim. It is retried like
            # any failure, and dead-lettered after the configured attempts.
            logger.warning(
                "saga step raised",
                exc_info=True,
                extra={"delivery": str(claimed.id), "attempt": claimed.attempts},
            )
            await self._retry(claimed, _reason(exc), outage=False)

    async def _advance(self, claimed: Claimed) -> None:
        intent = interpret(
            self._schemes.get(claimed.source),
            source=claimed.source,
            event=claimed.event,
            body=claimed.body,
            content_type=claimed.content_type,
            repositories=self._repos,
        )
        try:
            if isinstance(intent, IgnoredEvent):
                await self._end(claimed, "ignored", "completed", intent.reason)
                return
            await self._run(claimed, intent)
            await self._end(claimed, "completed", "completed")
        except NothingToDo as exc:
            await self._end(claimed, "ignored", "completed", str(exc))
        except PermanentError as exc:
            await self._compensate(claimed, intent, exc)

    def _step(self, claimed: Claimed) -> AbstractAsyncContextManager[SagaStep]:
        """A saga step's transaction, holding the saga row."""
        return self._sagas.step(
            claimed.id, worker=self._id, lease_seconds=self._lease, timeout=context.time_left()
        )

    async def _run(self, claimed: Claimed, change: TaskChange) -> None:
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
                    task_id, create = await self._claim(step, change)
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
                        assert change.repository is not None
                        task_id = await self._client.create_task(
                            request_id=claimed.idempotency_key,
                            title=(change.title or "").strip() or change.external_key,
                            description=change.description or "",
                            repository=change.repository,
                            actor=actor,
                            metadata=merged_metadata({}, change.metadata),
                            priority=change.priority,
                            deadline=change.deadline,
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
                    await self._apply(
                        change, step.saga.task_id, actor, created=step.saga.created_task
                    )
                    await step.record("change", timeout=context.time_left())
        self._failpoint("change")

    async def _claim(self, step: SagaStep, change: TaskChange) -> tuple[int | None, bool]:
        """The task the change applies to: (its id, False), or (None, True) to create one.

        Raises:
            IssueBusy: Another delivery's saga is creating the task (retry shortly).
            NothingToDo: A late state change, or nothing to act on (ignored).
            TaskNotYetCreated: The task's creating event has not been processed (retry).
        """
        key, left = change.external_key, context.time_left
        if change.moved_from is not None:
            # The thing moved: its task, if it had one, goes with it.
            await step.move_link(change.source, change.moved_from, key, timeout=left())
        link = await step.lock_link(change.source, key, timeout=left())
        if link.being_created:
            raise IssueBusy(f"delivery {link.delivery} is creating the task of {key}")
        ordered = change.kind.changes_state and change.happened_at is not None
        if ordered and link.state_at is not None:
            assert change.happened_at is not None
            if change.happened_at < link.state_at:
                raise NothingToDo(
                    f"{change.kind} of {key} at {change.happened_at.isoformat()} is older than "
                    f"the state change applied already ({link.state_at.isoformat()})"
                )
        linked = link.task_id
        task = await self._client.get_task(linked) if linked is not None else None
        reopened = task is not None and task.status.closed and change.kind == Kind.OPENED
        if task is None or reopened:
            if not reopened and change.missing != Missing.CREATE:
                if change.missing == Missing.WAIT and linked is None:
                    raise TaskNotYetCreated(
                        f"no task for {key} yet; the event that creates it may still come"
                    )
                gone = f"task {linked} of {key} was deleted" if linked else f"{key} has no task"
                raise NothingToDo(f"{gone}: the {change.kind.value} event changes nothing")
            # A new thing, or one whose task was deleted, or (re)opened after its task
            # ended: completed and cancelled tasks are final, so it gets a new task.
            await step.claim_issue(change.source, key, timeout=left())
            linked = None
        if ordered:
            assert change.happened_at is not None
            await step.mark_state(change.source, key, change.happened_at, timeout=left())
        return linked, linked is None

    async def _apply(
        self, change: TaskChange, task_id: int, actor: uuid.UUID, *, created: bool
    ) -> None:
        ends = change.kind in (Kind.CLOSED, Kind.DELETED) or (
            change.kind == Kind.TRANSFERRED and change.repository is None
        )
        try:
            if ends:
                await self._close(task_id, actor, change)
            else:
                await self._follow(change, task_id, actor, created=created)
        except PermanentError as exc:
            if not isinstance(exc.error, _ALREADY):
                raise

    async def _follow(
        self, change: TaskChange, task_id: int, actor: uuid.UUID, *, created: bool
    ) -> None:
        """Make the open task look as the change says (a closed task keeps its last state)."""
        task: TaskSnapshot | None = None
        for attempt in range(_UPDATE_ATTEMPTS):
            task = await self._client.get_task(task_id)
            if task is None or task.status.closed:
                return
            # A task this saga created got the change's fields when it was created.
            changes = {} if created else _differences(change, task)
            if not changes:
                break
            try:
                await self._client.update_task(task_id, changes, etag=task.etag, actor=actor)
                break
            except PermanentError as exc:
                # Someone changed the task since it was read: read it again.
                last = attempt == _UPDATE_ATTEMPTS - 1
                if last or not isinstance(exc.error, TaskUpdateFailedError):
                    raise
        if change.assignees is not None and task is not None:
            # The task has one assignee: the first of the issue's.
            first = change.assignees[0] if change.assignees else None
            assignee = await self._client.ensure_user(first) if first else None
            if assignee != task.assigned_to:
                await self._client.assign_task(task_id, assignee, actor=actor)

    async def _close(self, task_id: int, actor: uuid.UUID, change: TaskChange) -> None:
        """Drive the task to cancelled or completed from wherever it is (safe to repeat)."""
        if change.cancel_reason:
            await self._client.cancel_task(task_id, reason=change.cancel_reason, actor=actor)
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
                # No gate ran unless the sender reports one: the record says "not run".
                await self._client.complete_task(
                    task_id, quality_gate=change.quality_gate, actor=actor
                )

    async def _compensate(self, claimed: Claimed, intent: Change, error: PermanentError) -> None:
        """Undo what this saga did, then end it compensated.

        Only a task this saga created is cancelled (and its issue claim released, so a later
        event starts afresh); a task it merely found is left as it was.
        """
        reason = f"{error}"
        saga = await self._sagas.saga(claimed.id, timeout=context.time_left())
        if isinstance(intent, TaskChange) and saga is not None and saga.created_task:
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
                await self._retry(claimed, f"{error}; compensation: {exc}", outage=True)
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

    async def _retry(self, claimed: Claimed, error: str, *, outage: bool) -> None:
        # A failure retrying can fix (`outage`) dead-letters only when it outlasts both
        # bounds: a task service down for an hour delays its deliveries (retried at most
        # every 5 minutes), it does not park them. Any other failure dead-letters after the
        # configured attempts: repeating it longer cannot help.
        dead = claimed.attempts >= self._max_attempts and (
            not outage or claimed.age_seconds >= self._dead_after
        )
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


def _differences(change: TaskChange, task: TaskSnapshot) -> dict[str, Any]:
    """The fields to update for the task to look as the change says."""
    wanted: dict[str, Any] = {
        "title": (change.title or "").strip() or None,
        "description": change.description,
        "priority": change.priority,
    }
    # Only a move changes the repository: a task moved by hand stays where it was put.
    if change.kind == Kind.TRANSFERRED or change.moved_from is not None:
        wanted["repository"] = change.repository
    changes = {
        name: value
        for name, value in wanted.items()
        if value is not None and value != getattr(task, name)
    }
    if change.deadline is not None:
        changes["deadline"] = sender_time(change.deadline)
    metadata = merged_metadata(task.metadata, change.metadata)
    if metadata != task.metadata:
        changes["metadata"] = metadata
    return changes
