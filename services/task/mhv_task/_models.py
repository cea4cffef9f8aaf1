"""Request validation: the plan's TaskCreateRequest and FTSSearchQuery, done right.

Differences from the plan's sample code, on purpose:

- Titles are never rejected for their *content*: ``'; DROP TABLE tasks; --`` is a legal title.
  SQL injection is prevented by parameters, not by filtering text, and the text round-trips
  byte for byte (emoji, right-to-left text and ``<script>`` included; format characters such as
  RLM or ZWJ are kept).
- Control characters are removed as the plan intends (NUL and the C0/C1 controls except tab
  and newline); the plan's ``str.iscntrl`` does not exist in Python.
- A deadline in the past says so, instead of being reported as an invalid date format.
- Every violation is reported at once, as a list of field violations.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import uuid
from typing import Annotated, Any, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, field_validator
from pydantic import ValidationError as PydanticValidationError

from mhv_common.config import REPOSITORY_NAME_PATTERN
from mhv_common.errors import FieldViolation, ValidationError

Priority = Literal["low", "medium", "high", "critical"]
PRIORITIES: tuple[Priority, ...] = ("low", "medium", "high", "critical")

# C0 and C1 control characters except TAB (\x09) and LF (\x0a); NUL included.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_USERNAME = re.compile(r"^[A-Za-z0-9._-]{1,100}$")
_EMAIL = re.compile(r"^[^@\s]{1,64}@[^@\s]{1,190}$")
_SEARCH_FORBIDDEN = (";", "--", "/*", "*/")
MAX_METADATA_BYTES = 16 * 1024
MAX_REQUEST_ID = 100

_M = TypeVar("_M", bound=BaseModel)


def is_username(value: str) -> bool:
    """Whether `value` can be a username at all."""
    return _USERNAME.fullmatch(value) is not None


def _holds_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_holds_nul(k) or _holds_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_holds_nul(v) for v in value)
    return False


def clean_text(value: str) -> str:
    """Remove NUL and control characters (keeping tab and newline) and trim whitespace."""
    return _CONTROL.sub("", value).strip()


def _check_metadata(value: dict[str, Any]) -> dict[str, Any]:
    if _holds_nul(value):
        # PostgreSQL's jsonb cannot hold \u0000; metadata is stored as given, so refuse it.
        raise ValueError("must not contain NUL characters (\\u0000) in keys or values")
    size = len(json.dumps(value, ensure_ascii=False, default=str).encode())
    if size > MAX_METADATA_BYTES:
        raise ValueError(f"must be at most {MAX_METADATA_BYTES} bytes as JSON (got {size})")
    return value


def parse_deadline(value: str, *, now: dt.datetime | None = None) -> dt.datetime:
    """Parse an ISO 8601 date-time in the future; one without an offset is UTC."""
    try:
        deadline = dt.datetime.fromisoformat(value.strip())
    except ValueError:
        raise ValueError("is not an ISO 8601 date-time (e.g. 2030-01-31T17:00:00Z)") from None
    if deadline.tzinfo is None:
        deadline = deadline.replace(tzinfo=dt.UTC)
    try:
        deadline.astimezone(dt.UTC)
    except OverflowError:
        raise ValueError("is out of range (after 9999-12-31 in UTC)") from None
    if deadline <= (now or dt.datetime.now(dt.UTC)):
        raise ValueError("must be in the future")
    return deadline


def parse_uuid(value: str) -> uuid.UUID:
    """Parse a user id."""
    try:
        return uuid.UUID(value)
    except ValueError:
        raise ValueError("is not a user id (UUID)") from None


def _title(value: str) -> str:
    value = clean_text(value)
    if not value:
        raise ValueError("must not be empty")
    if len(value) > 200:
        raise ValueError(f"must be at most 200 characters (got {len(value)})")
    return value


def _description(value: str | None) -> str | None:
    if value is None:
        return None
    value = clean_text(value)
    if len(value) > 5000:
        raise ValueError(f"must be at most 5000 characters (got {len(value)})")
    return value or None


def _deadline(value: str | dt.datetime | None) -> dt.datetime | None:
    if value is None or value == "":
        return None
    if isinstance(value, dt.datetime):
        return value
    return parse_deadline(value)


def _optional_uuid(value: str | uuid.UUID | None) -> uuid.UUID | None:
    if value is None or value == "":
        return None
    return value if isinstance(value, uuid.UUID) else parse_uuid(value)


Title = Annotated[str, BeforeValidator(_title)]
Description = Annotated[str | None, BeforeValidator(_description)]
Deadline = Annotated[dt.datetime | None, BeforeValidator(_deadline)]
Metadata = Annotated[dict[str, Any], AfterValidator(_check_metadata)]
OptionalUserId = Annotated[uuid.UUID | None, BeforeValidator(_optional_uuid)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TaskCreateRequest(_Strict):
    """A validated CreateTask request."""

    title: Title
    description: Description = None
    repository: str = Field(max_length=100, pattern=REPOSITORY_NAME_PATTERN)
    priority: Priority = "medium"
    deadline: Deadline = None
    metadata: Metadata = Field(default_factory=dict)
    assigned_to: OptionalUserId = None
    request_id: str | None = Field(default=None, max_length=MAX_REQUEST_ID)

    @field_validator("request_id", mode="before")
    @classmethod
    def _request_id(cls, value: str | None) -> str | None:
        if value and _CONTROL.search(value):
            raise ValueError("must not contain control characters")
        return value or None


class TaskChanges(_Strict):
    """The fields an UpdateTask may change; only those named in the mask are given."""

    title: Title | None = None
    description: Description = None
    priority: Priority | None = None
    deadline: Deadline = None
    metadata: Metadata | None = None


UPDATABLE_FIELDS = tuple(TaskChanges.model_fields)


class FTSSearchQuery(_Strict):
    """A full-text search query (the plan's rules)."""

    query: str

    @field_validator("query", mode="before")
    @classmethod
    def _query(cls, value: str) -> str:
        value = value.replace("\x00", "").strip()
        if not value:
            raise ValueError("must not be empty")
        if len(value) > 500:
            raise ValueError(f"must be at most 500 characters (got {len(value)})")
        for token in _SEARCH_FORBIDDEN:
            if token in value:
                # Not an injection risk (the query is a parameter of websearch_to_tsquery),
                # but the plan rejects these as defence in depth and so do we.
                raise ValueError(f"must not contain {token!r}")
        return value


class UserCreateRequest(_Strict):
    """A validated CreateUser request."""

    username: str
    email: str
    display_name: str | None = Field(default=None, max_length=200)
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("username")
    @classmethod
    def _username(cls, value: str) -> str:
        if not _USERNAME.fullmatch(value):
            raise ValueError("must be 1-100 letters, digits, '.', '_' or '-'")
        return value

    @field_validator("email")
    @classmethod
    def _email(cls, value: str) -> str:
        value = value.strip()
        if len(value) > 255 or not _EMAIL.fullmatch(value) or _CONTROL.search(value):
            raise ValueError("is not an email address")
        return value

    @field_validator("display_name", mode="before")
    @classmethod
    def _display_name(cls, value: str | None) -> str | None:
        return clean_text(value) or None if value is not None else None

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, Any]) -> dict[str, Any]:
        return _check_metadata(value)


def violations_from(error: PydanticValidationError, *, prefix: str = "") -> list[FieldViolation]:
    """Pydantic's errors as field violations, one per problem."""
    out = []
    for item in error.errors():
        field = ".".join(str(p) for p in item["loc"]) or "request"
        message = str(item["msg"]).removeprefix("Value error, ")
        if item["type"] == "string_pattern_mismatch" and field.endswith("repository"):
            message = "must match ^[A-Za-z0-9_-]+$ (letters, digits, '_' and '-')"
        out.append(FieldViolation(f"{prefix}{field}", message))
    return out


def validate(model: type[_M], data: dict[str, Any], *, prefix: str = "") -> _M:
    """Build `model` from `data` or raise MHV-003 with every field violation."""
    try:
        return model.model_validate(data)
    except PydanticValidationError as exc:
        raise ValidationError(violations=violations_from(exc, prefix=prefix)) from None
