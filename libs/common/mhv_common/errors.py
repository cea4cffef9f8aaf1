"""Typed exceptions derived from the error catalog, and their wire encodings.

Raise a `MahavishnuError` subclass anywhere in the domain or store layers; the gRPC edge
(`mhv_common.interceptors`) turns it into a ``google.rpc.Status`` and the HTTP edge into the
plan's JSON body. Unknown exceptions never leak: they become `InternalError` with no text of
their own.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2

from mhv_common._catalog import CATALOG, ERROR_DOMAIN, ErrorSpec, by_code

ErrorCode = enum.Enum(  # type: ignore[misc]
    "ErrorCode", {spec.name: spec.code for spec in CATALOG}, type=str
)
ErrorCode.__doc__ = "Every MHV code by symbolic name, e.g. ``ErrorCode.VALIDATION_ERROR``."

_SPECS = by_code()

GRPC_DETAILS_METADATA_KEY = "grpc-status-details-bin"


def spec_for(code: str) -> ErrorSpec:
    """Return the catalog row for an ``MHV-NNN`` code."""
    return _SPECS[str(code.value if isinstance(code, enum.Enum) else code)]


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One invalid field of a request.

    Attributes:
        field: Dotted path of the field, e.g. ``title`` or ``task.deadline``.
        description: What is wrong, in words a caller can act on.
    """

    field: str
    description: str


class MahavishnuError(Exception):
    """Root of every error a caller may see.

    Each subclass below names its catalog row, ``class ValidationError(MahavishnuError,
    code="MHV-003")``, and carries it as `spec` (with `code` copied from it); instances carry a
    message and optional typed details. The message is written for the caller and must not
    contain internal detail (SQL, paths, stack traces). The root itself stands for MHV-008.
    """

    spec: ClassVar[ErrorSpec] = _SPECS["MHV-008"]
    code: ClassVar[str] = "MHV-008"

    def __init_subclass__(cls, *, code: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if code is not None:
            cls.spec = _SPECS[code]
        cls.code = cls.spec.code

    def __init__(
        self,
        message: str | None = None,
        *,
        recovery: Iterable[str] | None = None,
        violations: Iterable[FieldViolation] = (),
        retry_after: float | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self.message = message or self.spec.title
        self.recovery = tuple(recovery) if recovery is not None else self.spec.recovery
        self.violations = tuple(violations)
        self.retry_after = retry_after
        self.metadata = dict(metadata or {})
        super().__init__(f"[{self.code}] {self.message}")

    def __repr__(self) -> str:
        parts = [f"code={self.code}", f"message={self.message!r}"]
        if self.violations:
            parts.append(f"violations={[v.field for v in self.violations]}")
        if self.retry_after is not None:
            parts.append(f"retry_after={self.retry_after:.3f}")
        return f"{type(self).__name__}({', '.join(parts)})"

    @property
    def grpc_status(self) -> grpc.StatusCode:
        """The gRPC status code for this error."""
        return self.spec.grpc_status

    @property
    def http_status(self) -> int:
        """The HTTP status code for this error."""
        return self.spec.http_status

    def to_dict(self) -> dict[str, Any]:
        """Encode as the plan's JSON error body for HTTP callers."""
        body: dict[str, Any] = {
            "error_code": self.code,
            "message": self.message,
            "recovery": list(self.recovery),
            "documentation": self.spec.doc_url,
        }
        if self.violations:
            body["field_violations"] = [
                {"field": v.field, "description": v.description} for v in self.violations
            ]
        if self.retry_after is not None:
            body["retry_after_seconds"] = round(self.retry_after, 3)
        return body

    def to_rpc_status(self) -> status_pb2.Status:
        """Encode as ``google.rpc.Status``.

        Details: ErrorInfo, Help and LocalizedMessage always; BadRequest when there are field
        violations; RetryInfo when the error is retryable.
        """
        status = status_pb2.Status(
            code=self.grpc_status.value[0], message=f"[{self.code}] {self.message}"
        )
        info = error_details_pb2.ErrorInfo(
            reason=self.spec.name,
            domain=ERROR_DOMAIN,
            metadata={"error_code": self.code, **self.metadata},
        )
        _pack(status, info)
        if self.violations:
            _pack(
                status,
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(
                            field=v.field, description=v.description
                        )
                        for v in self.violations
                    ]
                ),
            )
        if self.spec.retryable:
            delay = duration_pb2.Duration()
            delay.FromNanoseconds(int((self.retry_after or 1.0) * 1e9))
            _pack(status, error_details_pb2.RetryInfo(retry_delay=delay))
        _pack(
            status,
            error_details_pb2.Help(
                links=[
                    error_details_pb2.Help.Link(
                        description=f"{self.code}: {self.spec.title}", url=self.spec.doc_url
                    )
                ]
            ),
        )
        _pack(
            status,
            error_details_pb2.LocalizedMessage(
                locale="en-US", message=" ".join([self.message, *self.recovery])
            ),
        )
        return status


def _pack(status: status_pb2.Status, message: Any) -> None:
    detail = any_pb2.Any()
    detail.Pack(message)
    status.details.append(detail)


# --- One class per catalog row, in catalog order ----------------------------------------------
# Name: the row's name in CapWords ending in "Error" (MHV-010 is NotImplementedRpcError, so as
# not to shadow the builtin); docstring: "code: title". A new row gets its class here; the
# tests in tests/common/test_errors.py fail until it has one.


class ConfigurationError(MahavishnuError, code="MHV-001"):
    """MHV-001: The service configuration is invalid."""


class DatabaseConnectionError(MahavishnuError, code="MHV-002"):
    """MHV-002: The database is unavailable."""


class ValidationError(MahavishnuError, code="MHV-003"):
    """MHV-003: The request is invalid."""


class AuthenticationError(MahavishnuError, code="MHV-004"):
    """MHV-004: The request carries no valid credentials."""


class AuthorizationError(MahavishnuError, code="MHV-005"):
    """MHV-005: The caller is not allowed to do this."""


class RateLimitExceededError(MahavishnuError, code="MHV-006"):
    """MHV-006: Too many requests."""


class DeadlineExceededError(MahavishnuError, code="MHV-007"):
    """MHV-007: The operation did not finish within its deadline."""


class InternalError(MahavishnuError, code="MHV-008"):
    """MHV-008: An internal error occurred."""


class ServiceUnavailableError(MahavishnuError, code="MHV-009"):
    """MHV-009: A service this operation depends on is unavailable."""


class NotImplementedRpcError(MahavishnuError, code="MHV-010"):
    """MHV-010: This operation is not implemented by this server."""


class InvalidPageTokenError(MahavishnuError, code="MHV-011"):
    """MHV-011: The page token is invalid or was issued for a different query."""


class RequestCancelledError(MahavishnuError, code="MHV-012"):
    """MHV-012: The caller cancelled the request."""


class ServerDrainingError(MahavishnuError, code="MHV-016"):
    """MHV-016: This server is shutting down and takes no new requests."""


class ServerOverloadedError(MahavishnuError, code="MHV-017"):
    """MHV-017: This server is at its limit of requests in progress and shed this one."""


class RateLimitStorageUnavailableError(MahavishnuError, code="MHV-018"):
    """MHV-018: The shared rate-limit storage is unreachable; this operation waits for it."""


class BackupNotFoundError(MahavishnuError, code="MHV-050"):
    """MHV-050: No backup repository is configured here, or it holds no completed backup."""


class BackupRepositoryMismatchError(MahavishnuError, code="MHV-051"):
    """MHV-051: The backup repository belongs to another database cluster."""


class RestoreTargetOutOfRangeError(MahavishnuError, code="MHV-052"):
    """MHV-052: The recovery target time lies outside the recoverable window."""


class RestoreDestinationInUseError(MahavishnuError, code="MHV-053"):
    """MHV-053: The restore destination is not an empty folder: restores never overwrite data."""


class BackupFailedError(MahavishnuError, code="MHV-054"):
    """MHV-054: The backup engine could not complete the operation."""


class BackupVerificationFailedError(MahavishnuError, code="MHV-055"):
    """MHV-055: A restored backup failed verification."""


class MigrationWouldLoseDataError(MahavishnuError, code="MHV-060"):
    """MHV-060: This down migration would destroy data, so it was not run."""


class TaskNotFoundError(MahavishnuError, code="MHV-100"):
    """MHV-100: The task does not exist."""


class TaskCreationFailedError(MahavishnuError, code="MHV-101"):
    """MHV-101: The task could not be created."""


class TaskUpdateFailedError(MahavishnuError, code="MHV-102"):
    """MHV-102: The task changed since you read it (stale etag)."""


class TaskDeletionFailedError(MahavishnuError, code="MHV-103"):
    """MHV-103: The task cannot be deleted in its current state."""


class TaskAlreadyCompletedError(MahavishnuError, code="MHV-104"):
    """MHV-104: The task is already completed."""


class TaskBlockedError(MahavishnuError, code="MHV-105"):
    """MHV-105: The task is blocked."""


class InvalidTaskTransitionError(MahavishnuError, code="MHV-106"):
    """MHV-106: The task cannot move to that status from its current status."""


class UserNotFoundError(MahavishnuError, code="MHV-110"):
    """MHV-110: The user does not exist."""


class UserAlreadyExistsError(MahavishnuError, code="MHV-111"):
    """MHV-111: A user with that username or email already exists."""


class UserInactiveError(MahavishnuError, code="MHV-112"):
    """MHV-112: The user is deactivated."""


class UserHasTasksError(MahavishnuError, code="MHV-113"):
    """MHV-113: The user created tasks and cannot be deleted."""


class SemanticSearchUnavailableError(MahavishnuError, code="MHV-118"):
    """MHV-118: Semantic search is not available on this server."""


class QueryEmbeddingFailedError(MahavishnuError, code="MHV-119"):
    """MHV-119: The search query could not be embedded."""


class RepositoryNotFoundError(MahavishnuError, code="MHV-200"):
    """MHV-200: The repository is not configured."""


class RepositoryNotConfiguredError(MahavishnuError, code="MHV-201"):
    """MHV-201: The repository is listed but not fully configured."""


class WorktreeCreationFailedError(MahavishnuError, code="MHV-202"):
    """MHV-202: A working tree for the repository could not be created."""


class WebhookSignatureInvalidError(MahavishnuError, code="MHV-300"):
    """MHV-300: The webhook signature is missing or does not match."""


class WebhookReplayDetectedError(MahavishnuError, code="MHV-301"):
    """MHV-301: This webhook delivery was already received."""


class GithubApiError(MahavishnuError, code="MHV-302"):
    """MHV-302: The GitHub integration failed."""


class GitlabApiError(MahavishnuError, code="MHV-303"):
    """MHV-303: The GitLab integration failed."""


class WebhookTimestampInvalidError(MahavishnuError, code="MHV-304"):
    """MHV-304: The webhook timestamp is missing, malformed or outside the accepted window."""


class WebhookPayloadTooLargeError(MahavishnuError, code="MHV-305"):
    """MHV-305: The webhook body exceeds the source's size limit."""


class WebhookSourceUnknownError(MahavishnuError, code="MHV-306"):
    """MHV-306: No webhook source with that name is configured."""


class DeliveryNotFoundError(MahavishnuError, code="MHV-307"):
    """MHV-307: The webhook delivery does not exist."""


class DeliveryNotRetryableError(MahavishnuError, code="MHV-308"):
    """MHV-308: Only dead-lettered deliveries can be retried."""


class AuditChainBrokenError(MahavishnuError, code="MHV-400"):
    """MHV-400: The audit log hash chain is broken."""


class AuditRecordFailedError(MahavishnuError, code="MHV-401"):
    """MHV-401: The operation could not be recorded in the audit log, so it was not done."""


# Every class above by its code; `test_errors` checks that they match the catalog one to one.
_CLASSES: dict[str, type[MahavishnuError]] = {
    cls.code: cls for cls in MahavishnuError.__subclasses__() if cls.__module__ == __name__
}


def error_class(code: str) -> type[MahavishnuError]:
    """Return the exception class for an ``MHV-NNN`` code."""
    return _CLASSES[code]


def from_rpc_error(error: grpc.RpcError) -> MahavishnuError | None:
    """Rebuild the typed error a Mahavishnu server sent, on the client side.

    Returns None when the error carries no Mahavishnu ErrorInfo (e.g. a transport failure).
    """
    trailing = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    for key, value in trailing or ():
        if key != GRPC_DETAILS_METADATA_KEY:
            continue
        status = status_pb2.Status.FromString(value)
        code = None
        violations: list[FieldViolation] = []
        retry_after = None
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                if info.domain == ERROR_DOMAIN:
                    code = info.metadata.get("error_code")
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                violations = [FieldViolation(v.field, v.description) for v in bad.field_violations]
            elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                retry = error_details_pb2.RetryInfo()
                detail.Unpack(retry)
                retry_after = retry.retry_delay.ToNanoseconds() / 1e9
        if code is None or code not in _CLASSES:
            return None
        prefix = f"[{code}] "
        message = status.message[len(prefix) :] if status.message.startswith(prefix) else None
        return _CLASSES[code](message, violations=violations, retry_after=retry_after)
    return None


__all__ = [
    "GRPC_DETAILS_METADATA_KEY",
    "AuditChainBrokenError",
    "AuditRecordFailedError",
    "AuthenticationError",
    "AuthorizationError",
    "BackupFailedError",
    "BackupNotFoundError",
    "BackupRepositoryMismatchError",
    "BackupVerificationFailedError",
    "ConfigurationError",
    "DatabaseConnectionError",
    "DeadlineExceededError",
    "DeliveryNotFoundError",
    "DeliveryNotRetryableError",
    "ErrorCode",
    "FieldViolation",
    "GithubApiError",
    "GitlabApiError",
    "InternalError",
    "InvalidPageTokenError",
    "InvalidTaskTransitionError",
    "MahavishnuError",
    "MigrationWouldLoseDataError",
    "NotImplementedRpcError",
    "QueryEmbeddingFailedError",
    "RateLimitExceededError",
    "RateLimitStorageUnavailableError",
    "RepositoryNotConfiguredError",
    "RepositoryNotFoundError",
    "RequestCancelledError",
    "RestoreDestinationInUseError",
    "RestoreTargetOutOfRangeError",
    "SemanticSearchUnavailableError",
    "ServerDrainingError",
    "ServerOverloadedError",
    "ServiceUnavailableError",
    "TaskAlreadyCompletedError",
    "TaskBlockedError",
    "TaskCreationFailedError",
    "TaskDeletionFailedError",
    "TaskNotFoundError",
    "TaskUpdateFailedError",
    "UserAlreadyExistsError",
    "UserHasTasksError",
    "UserInactiveError",
    "UserNotFoundError",
    "ValidationError",
    "WebhookPayloadTooLargeError",
    "WebhookReplayDetectedError",
    "WebhookSignatureInvalidError",
    "WebhookSourceUnknownError",
    "WebhookTimestampInvalidError",
    "WorktreeCreationFailedError",
    "error_class",
    "from_rpc_error",
    "spec_for",
]
