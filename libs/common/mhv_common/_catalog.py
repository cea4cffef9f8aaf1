"""The error catalog: the one table every MHV error code comes from.

Exceptions (`mhv_common.errors`), the gRPC status details, the HTTP JSON body and the pages
under `docs/errors/` are all derived from `CATALOG`. Add a code here, then run
`make generate` to refresh the documentation.

Ranges follow the plan:

- MHV-001..099 system errors (050..069: backup, restore and migration commands)
- MHV-100..199 task and user errors
- MHV-200..299 repository errors
- MHV-300..399 external integration (webhooks, GitHub, GitLab)
- MHV-400..499 audit log errors
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import grpc

DOCS_BASE_URL_VARIABLE = "MHV_DOCS_BASE_URL"
"""Where the repository's files are published (``https://host/org/repo/blob/main/``).

Error help links are this base plus the page's repository path (``docs/errors/mhv-003.md``).
Unset, the link is that repository path itself, which a user of this repository can open.
"""
ERROR_DOMAIN = "mahavishnu"


def docs_base_url() -> str:
    """The configured base of documentation links, ending in ``/`` (empty: repository paths)."""
    base = os.environ.get(DOCS_BASE_URL_VARIABLE, "").strip()
    return base if not base or base.endswith("/") else f"{base}/"


@dataclass(frozen=True, slots=True)
class ErrorSpec:
    """One row of the catalog.

    Attributes:
        code: The stable public code, ``MHV-NNN``.
        name: Symbolic name, used as ``ErrorInfo.reason``.
        grpc_status: Status code a gRPC caller receives.
        http_status: Status code an HTTP caller receives.
        title: One-line human description; the default message.
        recovery: Steps the caller can take, most useful first.
        retryable: Whether the same request may succeed later unchanged; such errors carry
            ``RetryInfo``.
    """

    code: str
    name: str
    grpc_status: grpc.StatusCode
    http_status: int
    title: str
    recovery: tuple[str, ...]
    retryable: bool = False

    @property
    def doc_path(self) -> str:
        """Path of the generated documentation page, relative to the repository root."""
        return f"docs/errors/{self.code.lower()}.md"

    @property
    def doc_url(self) -> str:
        """Link to the documentation page: `docs_base_url` plus `doc_path`."""
        return f"{docs_base_url()}{self.doc_path}"


_S = grpc.StatusCode

CATALOG: tuple[ErrorSpec, ...] = (
    # --- System errors (001-099) ------------------------------------------------------------
    ErrorSpec(
        "MHV-001",
        "CONFIGURATION_ERROR",
        _S.FAILED_PRECONDITION,
        500,
        "The service configuration is invalid.",
        (
            "Check settings/repos.yaml and the MHV_* environment for syntax errors.",
            "Run `mhv validate-config`; it prints the file and line at fault.",
        ),
    ),
    ErrorSpec(
        "MHV-002",
        "DATABASE_CONNECTION_ERROR",
        _S.UNAVAILABLE,
        503,
        "The database is unavailable.",
        (
            "Retry after the delay given in RetryInfo / Retry-After.",
            "A connection lost while a change commits cannot tell whether it was saved: retry "
            "CreateTask with the same request_id (it never creates twice), and re-read a "
            "resource (its etag) before repeating any other change.",
            "If it persists, check the database health and the "
            "database_connections metric (docs/runbooks/database-unavailable.md).",
        ),
        retryable=True,
    ),
    ErrorSpec(
        "MHV-003",
        "VALIDATION_ERROR",
        _S.INVALID_ARGUMENT,
        400,
        "The request is invalid.",
        (
            "Read the field violations: each names the field and what is wrong with it.",
            "Correct every listed field and send the request again.",
        ),
    ),
    ErrorSpec(
        "MHV-004",
        "AUTHENTICATION_ERROR",
        _S.UNAUTHENTICATED,
        401,
        "The request carries no valid credentials.",
        (
            "Send `authorization: Bearer <token>` metadata.",
            "Get a fresh token with `mhv token --username NAME --role ROLE`; tokens expire.",
        ),
    ),
    ErrorSpec(
        "MHV-005",
        "AUTHORIZATION_ERROR",
        _S.PERMISSION_DENIED,
        403,
        "The caller is not allowed to do this.",
        (
            "Check the roles in your token: viewer reads, member changes its own tasks, "
            "admin does everything.",
            "Ask an administrator for a token with the role this operation needs.",
        ),
    ),
    ErrorSpec(
        "MHV-006",
        "RATE_LIMIT_EXCEEDED",
        _S.RESOURCE_EXHAUSTED,
        429,
        "Too many requests.",
        (
            "Wait for the delay given in RetryInfo / Retry-After, then retry.",
            "Spread requests out; limits apply per caller and per operation class.",
        ),
        retryable=True,
    ),
    ErrorSpec(
        "MHV-007",
        "DEADLINE_EXCEEDED",
        _S.DEADLINE_EXCEEDED,
        504,
        "The operation did not finish within its deadline.",
        (
            "A deadline that passes while a change commits cannot tell whether it was saved: "
            "retry CreateTask with the same request_id (it never creates twice), and re-read a "
            "resource (its etag) before repeating any other change.",
            "Give the call a longer deadline if the operation is known to be slow.",
        ),
        retryable=True,
    ),
    ErrorSpec(
        "MHV-008",
        "INTERNAL_ERROR",
        _S.INTERNAL,
        500,
        "An internal error occurred.",
        (
            "Retry once; if it happens again, report the request id to the operators.",
            "Operators: find the request id in the service logs for the cause.",
        ),
    ),
    ErrorSpec(
        "MHV-009",
        "SERVICE_UNAVAILABLE",
        _S.UNAVAILABLE,
        503,
        "A service this operation depends on is unavailable.",
        (
            "Retry after the delay given in RetryInfo / Retry-After.",
            "Operators: check the health of the downstream services.",
        ),
        retryable=True,
    ),
    ErrorSpec(
        "MHV-010",
        "NOT_IMPLEMENTED",
        _S.UNIMPLEMENTED,
        501,
        "This operation is not implemented by this server.",
        ("Check that the server runs the release that introduced the operation.",),
    ),
    ErrorSpec(
        "MHV-011",
        "INVALID_PAGE_TOKEN",
        _S.INVALID_ARGUMENT,
        400,
        "The page token is invalid or was issued for a different query.",
        (
            "Send the same filters that produced the page token.",
            "Start again from the first page by omitting page_token.",
        ),
    ),
    ErrorSpec(
        "MHV-012",
        "REQUEST_CANCELLED",
        _S.CANCELLED,
        499,
        "The caller cancelled the request.",
        (
            "A change cancelled while it committed may have been saved: re-read the resource "
            "(or retry CreateTask with the same request_id) before sending it again.",
        ),
    ),
    ErrorSpec(
        "MHV-016",
        "SERVER_DRAINING",
        _S.UNAVAILABLE,
        503,
        "This server is shutting down and takes no new requests.",
        (
            "Retry after the delay given in RetryInfo / Retry-After: the request was not "
            "started, and another replica (or this one, restarted) will take it.",
            "Operators: clients should follow readiness (health NOT_SERVING) and stop sending "
            "to a draining replica (docs/operations/shutdown-and-overload.md).",
        ),
        retryable=True,
    ),
    ErrorSpec(
        "MHV-017",
        "SERVER_OVERLOADED",
        _S.UNAVAILABLE,
        503,
        "This server is at its limit of requests in progress and shed this one.",
        (
            "Retry after the delay given in RetryInfo / Retry-After: the request was not started.",
            "Operators: add replicas or processes, or raise MHV_MAX_IN_FLIGHT if the machine "
            "has room (the admission_in_flight metric; docs/operations/shutdown-and-overload.md).",
        ),
        retryable=True,
    ),
    ErrorSpec(
        "MHV-018",
        "RATE_LIMIT_STORAGE_UNAVAILABLE",
        _S.UNAVAILABLE,
        503,
        "The shared rate-limit storage is unreachable; this operation waits for it.",
        (
            "Retry after the delay given in RetryInfo / Retry-After.",
            "Operators: the RateLimitStorageDown alert names the service; bring Redis back "
            "(docs/operations/shutdown-and-overload.md), or remove the class from "
            "MHV_RATE_LIMIT_FAIL_CLOSED to count it per process meanwhile.",
        ),
        retryable=True,
    ),
    # --- Backups, restores and migrations (050-069): operators' commands, not RPCs ----------
    ErrorSpec(
        "MHV-050",
        "BACKUP_NOT_FOUND",
        _S.FAILED_PRECONDITION,
        500,
        "No backup repository is configured here, or it holds no completed backup.",
        (
            "Point MHV_BACKUP_HOME at the backup repository's folder (the backup host's), or "
            "create one for this database with `mhv backup init`.",
            "Take a first backup with `mhv backup run`; `mhv backup list` shows what exists.",
            "See docs/runbooks/disaster-recovery.md.",
        ),
    ),
    ErrorSpec(
        "MHV-051",
        "BACKUP_REPOSITORY_MISMATCH",
        _S.FAILED_PRECONDITION,
        500,
        "The backup repository belongs to another database cluster.",
        (
            "Check MHV_BACKUP_HOME and MHV_BACKUP_SERVER: the repository records the system "
            "identifier of the cluster it backs up, and this one differs.",
            "A cluster rebuilt from scratch (initdb) is a new cluster: give it a new "
            "repository (`mhv backup init --server NEW-NAME`); never mix two clusters' WAL.",
        ),
    ),
    ErrorSpec(
        "MHV-052",
        "RESTORE_TARGET_OUT_OF_RANGE",
        _S.OUT_OF_RANGE,
        400,
        "The recovery target time lies outside the recoverable window.",
        (
            "Pick a time inside the window the error gives (`mhv backup info` shows it): no "
            "earlier than the end of the oldest backup, no later than the last WAL received.",
            "Times need a UTC offset, e.g. 2026-05-01T09:30:00+00:00.",
        ),
    ),
    ErrorSpec(
        "MHV-053",
        "RESTORE_DESTINATION_IN_USE",
        _S.FAILED_PRECONDITION,
        409,
        "The restore destination is not an empty folder: restores never overwrite data.",
        (
            "Restore into a new, empty folder (`--destination`), then start PostgreSQL on it.",
            "To replace a lost primary, first make sure its server is stopped and move its old "
            "data folder aside; never restore over a running cluster.",
        ),
    ),
    ErrorSpec(
        "MHV-054",
        "BACKUP_FAILED",
        _S.UNAVAILABLE,
        503,
        "The backup engine could not complete the operation.",
        (
            "Run `mhv backup check`: it lists every failing precondition (database "
            "reachable, WAL streaming running, encryption key usable).",
            "The engine's own log is in MHV_BACKUP_HOME (barman.log).",
        ),
    ),
    ErrorSpec(
        "MHV-055",
        "BACKUP_VERIFICATION_FAILED",
        _S.DATA_LOSS,
        500,
        "A restored backup failed verification.",
        (
            "Read the JSON report: it names each failed check (index corruption, row counts, "
            "foreign keys, audit chain, anchors, outbox).",
            "Take a new backup now and verify it; follow docs/runbooks/backup-verification-"
            "failed.md.",
        ),
    ),
    ErrorSpec(
        "MHV-060",
        "MIGRATION_WOULD_LOSE_DATA",
        _S.FAILED_PRECONDITION,
        409,
        "This down migration would destroy data, so it was not run.",
        (
            "Keep the data: roll the application back without reverting this migration "
            "(docs/runbooks/rollback.md), or export the rows first.",
            "If losing those rows is intended, take a backup (`mhv backup run`) and run the "
            "command again with --allow-data-loss.",
        ),
    ),
    # --- Task and user errors (100-199) -----------------------------------------------------
    ErrorSpec(
        "MHV-100",
        "TASK_NOT_FOUND",
        _S.NOT_FOUND,
        404,
        "The task does not exist.",
        (
            "Check the task id; ListTasks shows the tasks you can see.",
            "The task may have been deleted.",
        ),
    ),
    ErrorSpec(
        "MHV-101",
        "TASK_CREATION_FAILED",
        _S.ABORTED,
        409,
        "The task could not be created.",
        (
            "Retry with the same request_id: it never creates a second task.",
            "If a different request already used this request_id, choose a new one.",
        ),
    ),
    ErrorSpec(
        "MHV-102",
        "TASK_UPDATE_FAILED",
        _S.ABORTED,
        409,
        "The task changed since you read it (stale etag).",
        (
            "Read the task again with GetTask to get its current etag.",
            "Re-apply your change to the fresh task and send it with the new etag.",
        ),
    ),
    ErrorSpec(
        "MHV-103",
        "TASK_DELETION_FAILED",
        _S.FAILED_PRECONDITION,
        409,
        "The task cannot be deleted in its current state.",
        ("Cancel or complete the task first, or read its current etag and retry.",),
    ),
    ErrorSpec(
        "MHV-104",
        "TASK_ALREADY_COMPLETED",
        _S.FAILED_PRECONDITION,
        409,
        "The task is already completed.",
        (
            "No action is needed if this was a retry.",
            "Create a new task for follow-up work.",
        ),
    ),
    ErrorSpec(
        "MHV-105",
        "TASK_BLOCKED",
        _S.FAILED_PRECONDITION,
        409,
        "The task is blocked.",
        (
            "Resolve the reason given in blocked_reason.",
            "Call UnblockTask, then retry.",
        ),
    ),
    ErrorSpec(
        "MHV-106",
        "INVALID_TASK_TRANSITION",
        _S.FAILED_PRECONDITION,
        409,
        "The task cannot move to that status from its current status.",
        (
            "Read the task's status with GetTask.",
            "Allowed: pending -> in_progress -> completed; pending/in_progress <-> blocked; "
            "any open status -> cancelled.",
        ),
    ),
    ErrorSpec(
        "MHV-110",
        "USER_NOT_FOUND",
        _S.NOT_FOUND,
        404,
        "The user does not exist.",
        ("Check the user id or username; ListUsers shows existing users.",),
    ),
    ErrorSpec(
        "MHV-111",
        "USER_ALREADY_EXISTS",
        _S.ALREADY_EXISTS,
        409,
        "A user with that username or email already exists.",
        ("Use GetUser to fetch the existing user, or choose another username or email.",),
    ),
    ErrorSpec(
        "MHV-112",
        "USER_INACTIVE",
        _S.FAILED_PRECONDITION,
        409,
        "The user is deactivated.",
        ("Choose an active user; ListUsers shows who is active.",),
    ),
    ErrorSpec(
        "MHV-113",
        "USER_HAS_TASKS",
        _S.FAILED_PRECONDITION,
        409,
        "The user created tasks and cannot be deleted.",
        (
            "Deactivate the user with DeactivateUser instead: their tasks keep their author.",
            "Or delete the tasks they created first.",
        ),
    ),
    ErrorSpec(
        "MHV-118",
        "SEMANTIC_SEARCH_UNAVAILABLE",
        _S.FAILED_PRECONDITION,
        409,
        "Semantic search is not available on this server.",
        (
            "Search with mode SEARCH_MODE_KEYWORD, or leave the mode unspecified: keyword search "
            "keeps working.",
            "Operators: install pgvector on the PostgreSQL server, run `mhv migrate` (it applies "
            "the held-back semantic search migrations), then restart the task service; "
            "`mhv validate-config` says whether semantic search is available.",
        ),
    ),
    ErrorSpec(
        "MHV-119",
        "QUERY_EMBEDDING_FAILED",
        _S.UNAVAILABLE,
        503,
        "The search query could not be embedded.",
        (
            "Retry after the delay in RetryInfo.",
            "Search with mode SEARCH_MODE_KEYWORD meanwhile.",
            "Operators: see docs/runbooks/embedding-provider-failing.md.",
        ),
        retryable=True,
    ),
    # --- Repository errors (200-299) --------------------------------------------------------
    ErrorSpec(
        "MHV-200",
        "REPOSITORY_NOT_FOUND",
        _S.NOT_FOUND,
        404,
        "The repository is not configured.",
        (
            "Add the repository to settings/repos.yaml.",
            "Run `mhv validate-config` to verify, restart the service, and try again.",
        ),
    ),
    ErrorSpec(
        "MHV-201",
        "REPOSITORY_NOT_CONFIGURED",
        _S.FAILED_PRECONDITION,
        409,
        "The repository is listed but not fully configured.",
        (
            "Complete the repository's entry in settings/repos.yaml; `mhv validate-config` tells "
            "what is missing.",
        ),
    ),
    ErrorSpec(
        "MHV-202",
        "WORKTREE_CREATION_FAILED",
        _S.INTERNAL,
        500,
        "A working tree for the repository could not be created.",
        ("Retry; if it persists, check disk space and the repository's access rights.",),
    ),
    # --- External integration errors (300-399) ----------------------------------------------
    ErrorSpec(
        "MHV-300",
        "WEBHOOK_SIGNATURE_INVALID",
        _S.UNAUTHENTICATED,
        401,
        "The webhook signature is missing or does not match.",
        (
            "Check that the sender and the gateway share the same secret "
            "(MHV_WEBHOOK_SECRETS_<SOURCE>).",
            "Sign the exact raw body; re-serialising JSON changes the bytes.",
            "See docs/security/webhook-authentication.md for each sender's scheme.",
        ),
    ),
    ErrorSpec(
        "MHV-301",
        "WEBHOOK_REPLAY_DETECTED",
        _S.ALREADY_EXISTS,
        200,
        "This webhook delivery was already received.",
        (
            "This webhook was already processed; no action is needed if this was a retry.",
            "If you see this unexpectedly, see docs/runbooks/webhook-security.md.",
        ),
    ),
    ErrorSpec(
        "MHV-302",
        "GITHUB_API_ERROR",
        _S.UNAVAILABLE,
        502,
        "The GitHub integration failed.",
        ("Retry later; check GitHub's status page.",),
        retryable=True,
    ),
    ErrorSpec(
        "MHV-303",
        "GITLAB_API_ERROR",
        _S.UNAVAILABLE,
        502,
        "The GitLab integration failed.",
        ("Retry later; check the GitLab instance's status.",),
        retryable=True,
    ),
    ErrorSpec(
        "MHV-304",
        "WEBHOOK_TIMESTAMP_INVALID",
        _S.UNAUTHENTICATED,
        401,
        "The webhook timestamp is missing, malformed or outside the accepted window.",
        (
            "Check the sender's clock (NTP); the gateway accepts 300 s in the past and 30 s in "
            "the future by default.",
            "Do not replay old deliveries; send a fresh one with a new id and timestamp.",
        ),
    ),
    ErrorSpec(
        "MHV-305",
        "WEBHOOK_PAYLOAD_TOO_LARGE",
        _S.INVALID_ARGUMENT,
        413,
        "The webhook body exceeds the source's size limit.",
        ("Send a smaller payload, or raise the source's body cap in settings.",),
    ),
    ErrorSpec(
        "MHV-306",
        "WEBHOOK_SOURCE_UNKNOWN",
        _S.NOT_FOUND,
        404,
        "No webhook source with that name is configured.",
        ("Declare the source in settings/webhooks.yaml and set its secret.",),
    ),
    ErrorSpec(
        "MHV-307",
        "DELIVERY_NOT_FOUND",
        _S.NOT_FOUND,
        404,
        "The webhook delivery does not exist.",
        ("Check the delivery id; ListDeliveries shows recent deliveries.",),
    ),
    ErrorSpec(
        "MHV-308",
        "DELIVERY_NOT_RETRYABLE",
        _S.FAILED_PRECONDITION,
        409,
        "Only dead-lettered deliveries can be retried.",
        ("Wait for the delivery to finish or reach the dead-letter state.",),
    ),
    # --- Audit errors (400-499) -------------------------------------------------------------
    ErrorSpec(
        "MHV-400",
        "AUDIT_CHAIN_BROKEN",
        _S.DATA_LOSS,
        500,
        "The audit log hash chain is broken.",
        (
            "Treat as a security incident and preserve evidence first: follow "
            "docs/runbooks/audit-chain-broken.md.",
            "VerifyAuditChain reports the first row at fault and what happened to it.",
            "Events refused meanwhile wait in the task service's outbox; none is lost.",
        ),
    ),
    ErrorSpec(
        "MHV-401",
        "AUDIT_RECORD_FAILED",
        _S.UNAVAILABLE,
        503,
        "The operation could not be recorded in the audit log, so it was not done.",
        (
            "Give an administrator's token in MHV_TOKEN (`mhv token --username YOU --role "
            "admin`) and the audit service's address in MHV_AUDIT_TARGET (with "
            "MHV_GRPC_TLS_CA_FILE for TLS).",
            "Check that the audit service is up and the token is an administrator's, then run "
            "the command again: nothing was changed.",
        ),
    ),
)


def by_code() -> dict[str, ErrorSpec]:
    """Index the catalog by its ``MHV-NNN`` code."""
    return {spec.code: spec for spec in CATALOG}


def by_name() -> dict[str, ErrorSpec]:
    """Index the catalog by symbolic name."""
    return {spec.name: spec for spec in CATALOG}
