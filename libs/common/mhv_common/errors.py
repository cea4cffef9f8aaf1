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

    Subclasses fix `code`; instances carry a message and optional typed details. The message is
    written for the caller and must not contain internal detail (SQL, paths, stack traces).
    """

    code: ClassVar[str] = "MHV-008"

    def __init__(
        self,
        message: str | None = None,
        *,
        recovery: Iterable[str] | None = None,
        violations: Iterable[FieldViolation] = (),
        retry_after: float | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self.spec = spec_for(self.code)
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


def _subclass(spec: ErrorSpec) -> type[MahavishnuError]:
    name = "".join(part.capitalize() for part in spec.name.split("_"))
    if not name.endswith("Error"):
        name += "Error"
    return type(name, (MahavishnuError,), {"code": spec.code, "__doc__": spec.title})


# One subclass per catalog row, e.g. ValidationError, TaskNotFoundError.
_CLASSES: dict[str, type[MahavishnuError]] = {spec.code: _subclass(spec) for spec in CATALOG}

ConfigurationError = _CLASSES["MHV-001"]
DatabaseConnectionError = _CLASSES["MHV-002"]
ValidationError = _CLASSES["MHV-003"]
AuthenticationError = _CLASSES["MHV-004"]
AuthorizationError = _CLASSES["MHV-005"]
RateLimitExceededError = _CLASSES["MHV-006"]
DeadlineExceededError = _CLASSES["MHV-007"]
InternalError = _CLASSES["MHV-008"]
ServiceUnavailableError = _CLASSES["MHV-009"]
NotImplementedRpcError = _CLASSES["MHV-010"]
InvalidPageTokenError = _CLASSES["MHV-011"]
RequestCancelledError = _CLASSES["MHV-012"]
TaskNotFoundError = _CLASSES["MHV-100"]
TaskCreationFailedError = _CLASSES["MHV-101"]
TaskUpdateFailedError = _CLASSES["MHV-102"]
TaskDeletionFailedError = _CLASSES["MHV-103"]
TaskAlreadyCompletedError = _CLASSES["MHV-104"]
TaskBlockedError = _CLASSES["MHV-105"]
InvalidTaskTransitionError = _CLASSES["MHV-106"]
UserNotFoundError = _CLASSES["MHV-110"]
UserAlreadyExistsError = _CLASSES["MHV-111"]
UserInactiveError = _CLASSES["MHV-112"]
UserHasTasksError = _CLASSES["MHV-113"]
RepositoryNotFoundError = _CLASSES["MHV-200"]
RepositoryNotConfiguredError = _CLASSES["MHV-201"]
WorktreeCreationFailedError = _CLASSES["MHV-202"]
WebhookSignatureInvalidError = _CLASSES["MHV-300"]
WebhookReplayDetectedError = _CLASSES["MHV-301"]
GithubApiError = _CLASSES["MHV-302"]
GitlabApiError = _CLASSES["MHV-303"]
WebhookTimestampInvalidError = _CLASSES["MHV-304"]
WebhookPayloadTooLargeError = _CLASSES["MHV-305"]
WebhookSourceUnknownError = _CLASSES["MHV-306"]
DeliveryNotFoundError = _CLASSES["MHV-307"]
DeliveryNotRetryableError = _CLASSES["MHV-308"]
AuditChainBrokenError = _CLASSES["MHV-400"]


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
    "AuthenticationError",
    "AuthorizationError",
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
    "NotImplementedRpcError",
    "RateLimitExceededError",
    "RepositoryNotConfiguredError",
    "RepositoryNotFoundError",
    "RequestCancelledError",
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
