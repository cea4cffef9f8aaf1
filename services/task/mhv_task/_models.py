"""The typed seam between the gRPC edge and the domain: requests in, domain objects out.

The edge decodes each RPC into one of the request models below (`validate` builds it and turns
every problem into one MHV-003 with a field violation each); the domain takes the model and
returns the objects at the end of this module, or raises a catalog error. The rules that need
no database live here; those that do (the task exists, the user is active, the etag is fresh)
live in the domain.

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

import base64
import datetime as dt
import enum
import hashlib
import json
import math
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Generic, Literal, NamedTuple, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic import ValidationError as PydanticValidationError
from pydantic_core import PydanticCustomError

from mhv_common.config import REPOSITORY_NAME_PATTERN, RepositoryCatalog
from mhv_common.errors import FieldViolation, RepositoryNotFoundError, ValidationError
from mhv_common.ids import uuid_or_none
from mhv_common.structs import NOT_FINITE
from mhv_common.timestamps import from_micros, micros_of
from mhv_task._lifecycle import Status

Priority = Literal["low", "medium", "high", "critical"]
PRIORITIES: tuple[Priority, ...] = ("low", "medium", "high", "critical")
_STATUSES = frozenset(s.value for s in Status)

# C0 and C1 control characters except TAB (\x09) and LF (\x0a); NUL included.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_USERNAME = re.compile(r"^[A-Za-z0-9._-]{1,100}$")
_EMAIL = re.compile(r"^[^@\s]{1,64}@[^@\s]{1,190}$")
_SEARCH_FORBIDDEN = (";", "--", "/*", "*/")
MAX_METADATA_BYTES = 16 * 1024
MAX_REQUEST_ID = 100
MAX_REASON = 1000
MAX_GATE_CHECKS = 200
MAX_CHECK_NAME = 200
MAX_CHECK_DETAIL = 2000
_HOLDS_NUL = "must not contain NUL characters (\\u0000) in keys or values"
# The error type of a repository missing from settings/repos.yaml (see `validate`).
UNKNOWN_REPOSITORY = "unknown_repository"

_M = TypeVar("_M", bound=BaseModel)
_T = TypeVar("_T")


# --- value rules --------------------------------------------------------------------------------


def is_username(value: str) -> bool:
    """Whether `value` can be a username at all."""
    return _USERNAME.fullmatch(value) is not None


def clean_text(value: str) -> str:
    """Remove NUL and control characters (keeping tab and newline) and trim whitespace."""
    return _CONTROL.sub("", value).strip()


def _unstorable(value: Any) -> str | None:
    """Why PostgreSQL's jsonb could not hold `value`, or None when it can."""
    if isinstance(value, str):
        return _HOLDS_NUL if "\x00" in value else None
    if isinstance(value, float):
        return None if math.isfinite(value) else NOT_FINITE
    if isinstance(value, dict):
        for key, item in value.items():
            problem = _unstorable(key) or _unstorable(item)
            if problem:
                return problem
    elif isinstance(value, list):
        for item in value:
            problem = _unstorable(item)
            if problem:
                return problem
    return None


def _refused_by_decoding(value: Any) -> Any:
    # The edge hands on a Struct it could not decode (a NaN in it) as the reason, a
    # `mhv_common.structs.NotFiniteError`: refused here, it joins the other violations, and an
    # UpdateTask whose mask does not name the field ignores it like any other value.
    if isinstance(value, ValueError):
        raise value
    return value


def _check_metadata(value: dict[str, Any]) -> dict[str, Any]:
    # Metadata is stored as given, so refuse what jsonb cannot hold rather than alter it.
    problem = _unstorable(value)
    if problem:
        raise ValueError(problem)
    size = len(json.dumps(value, ensure_ascii=False, default=str).encode())
    if size > MAX_METADATA_BYTES:
        raise ValueError(f"must be at most {MAX_METADATA_BYTES} bytes as JSON (got {size})")
    return value


def _in_future(deadline: dt.datetime, now: dt.datetime | None) -> dt.datetime:
    if deadline.tzinfo is None:
        deadline = deadline.replace(tzinfo=dt.UTC)
    try:
        deadline.astimezone(dt.UTC)
    except OverflowError:
        raise ValueError("is out of range (after 9999-12-31 in UTC)") from None
    if deadline <= (now or dt.datetime.now(dt.UTC)):
        raise ValueError("must be in the future")
    return deadline


def parse_deadline(value: str, *, now: dt.datetime | None = None) -> dt.datetime:
    """Parse an ISO 8601 date-time in the future; one without an offset is UTC."""
    try:
        deadline = dt.datetime.fromisoformat(value.strip())
    except ValueError:
        raise ValueError("is not an ISO 8601 date-time (e.g. 2030-01-31T17:00:00Z)") from None
    return _in_future(deadline, now)


def _title(value: str | None) -> str:
    value = clean_text(value or "")
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


def _deadline(value: str | dt.datetime | tuple[int, int] | None) -> dt.datetime | None:
    """Text (CreateTask), a Timestamp's (seconds, nanos) (UpdateTask) or a datetime."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        return parse_deadline(value)
    if isinstance(value, tuple):
        # Truncated to the microsecond, PostgreSQL's precision.
        micros = micros_of(*value)
        if micros is None:
            raise ValueError("is out of range (years 1 to 9999)")
        value = from_micros(micros)
    return _in_future(value, None)


def _uuid(value: str | uuid.UUID) -> uuid.UUID:
    if isinstance(value, uuid.UUID):
        return value
    parsed = uuid_or_none(value) if isinstance(value, str) else None
    if parsed is None:
        raise ValueError("is not a user id (UUID)")
    return parsed


def _optional_uuid(value: str | uuid.UUID | None) -> uuid.UUID | None:
    return None if value is None or value == "" else _uuid(value)


def _task_id(value: int) -> int:
    if value <= 0:
        raise ValueError("must be a positive task id")
    return value


def _priority_or_medium(value: Any) -> Any:
    # Unspecified means medium. A number the edge has no name for comes through as it is and
    # fails the Literal with the other violations.
    return "medium" if value is None else value


def _known_priority(value: Any) -> str | None:
    if value is None or value in PRIORITIES:
        return value  # type: ignore[no-any-return]
    raise ValueError("unknown priority")


def _known_status(value: Any) -> str | None:
    if value is None or value in _STATUSES:
        return value  # type: ignore[no-any-return]
    raise ValueError("unknown status")


def _reason(value: str) -> str:
    value = clean_text(value)
    if len(value) > MAX_REASON:
        raise ValueError(f"at most {MAX_REASON} characters")
    return value


def _bounded_text(limit: int) -> AfterValidator:
    def check(value: str) -> str:
        if len(value) > limit:
            raise ValueError(f"at most {limit}")
        return value

    return AfterValidator(check)


def _search_text(value: str) -> str:
    value = value.replace("\x00", "").strip()
    if not value:
        raise ValueError("must not be empty")
    if len(value) > 500:
        raise ValueError(f"must be at most 500 characters (got {len(value)})")
    for token in _SEARCH_FORBIDDEN:
        if token in value:
            # Not an injection risk (the query is a parameter of websearch_to_tsquery), but
            # the plan rejects these as defence in depth and so do we.
            raise ValueError(f"must not contain {token!r}")
    return value


def unknown_repository(catalog: RepositoryCatalog, name: str) -> str:
    """The field violation of a repository missing from settings/repos.yaml."""
    known = ", ".join(catalog.names()[:10])
    return f"{name!r} is not in settings/repos.yaml (configured: {known})"


Title = Annotated[str, BeforeValidator(_title)]
Description = Annotated[str | None, BeforeValidator(_description)]
Deadline = Annotated[dt.datetime | None, BeforeValidator(_deadline)]
Metadata = Annotated[
    dict[str, Any], BeforeValidator(_refused_by_decoding), AfterValidator(_check_metadata)
]
UserId = Annotated[uuid.UUID, BeforeValidator(_uuid)]
OptionalUserId = Annotated[uuid.UUID | None, BeforeValidator(_optional_uuid)]
TaskId = Annotated[int, AfterValidator(_task_id)]
PriorityOrMedium = Annotated[Priority, BeforeValidator(_priority_or_medium)]
PriorityFilter = Annotated[Priority | None, BeforeValidator(_known_priority)]
StatusFilter = Annotated[str | None, BeforeValidator(_known_status)]
RepositoryName = Annotated[str, StringConstraints(max_length=100, pattern=REPOSITORY_NAME_PATTERN)]
Reason = Annotated[str, BeforeValidator(_reason)]
SearchText = Annotated[str, BeforeValidator(_search_text)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def configured_repository(value: str, info: ValidationInfo) -> str:
    """`value`, when the validation context (a `RepositoryCatalog`, if given) configures it."""
    catalog = info.context
    if isinstance(catalog, RepositoryCatalog) and catalog.get(value) is None:
        raise PydanticCustomError(
            UNKNOWN_REPOSITORY, "{problem}", {"problem": unknown_repository(catalog, value)}
        )
    return value


# --- task requests ------------------------------------------------------------------------------


class TaskCreateRequest(_Strict):
    """A validated CreateTask request.

    Validated with the repository catalog as context (`validate(..., context=catalog)`), an
    unconfigured repository is reported with the other violations; the domain refuses it
    either way.
    """

    title: Title
    description: Description = None
    repository: RepositoryName
    priority: PriorityOrMedium = "medium"
    deadline: Deadline = None
    metadata: Metadata = Field(default_factory=dict)
    assigned_to: OptionalUserId = None
    request_id: str | None = Field(default=None, max_length=MAX_REQUEST_ID)

    @field_validator("repository")
    @classmethod
    def _configured(cls, value: str, info: ValidationInfo) -> str:
        return configured_repository(value, info)

    @field_validator("request_id", mode="before")
    @classmethod
    def _request_id(cls, value: str | None) -> str | None:
        if value and _CONTROL.search(value):
            raise ValueError("must not contain control characters")
        return value or None

    def fingerprint(self) -> str:
        """A digest of everything but the request id: a retry must send the same (AIP-155).

        Stored with the task, so it must not change between releases for the same request.
        """
        body = self.model_dump(mode="json", exclude={"request_id"})
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


class TaskRef(_Strict):
    """One task, and optionally the etag of the version the caller read (GetTask, DeleteTask)."""

    id: TaskId
    etag: str = ""


class TaskListRequest(_Strict):
    """ListTasks: filters (None: any) and a page."""

    repository: RepositoryName | None = None
    status: StatusFilter = None
    priority: PriorityFilter = None
    assigned_to: OptionalUserId = None
    page_size: int = 0
    page_token: str = ""

    def filters(self) -> dict[str, Any]:
        """The filters, as the store applies them and as page tokens are bound to."""
        return {
            "repository": self.repository,
            "status": self.status,
            "priority": self.priority,
            "assigned_to": self.assigned_to,
        }


class SearchMode(enum.StrEnum):
    """How SearchTasks finds tasks (SEARCH_MODE_UNSPECIFIED is resolved before the domain)."""

    KEYWORD = "keyword"
    SEMANTIC = "semantic"
    HYBRID = "hybrid"


class FTSSearchQuery(_Strict):
    """SearchTasks: the plan's query rules, filters, a page, and the mode (None: unspecified)."""

    query: SearchText
    mode: SearchMode | None = None
    repository: RepositoryName | None = None
    status: StatusFilter = None
    page_size: int = 0
    page_token: str = ""

    def filters(self) -> dict[str, Any]:
        """The filters, as the store applies them."""
        return {"repository": self.repository, "status": self.status}


class TaskChanges(_Strict):
    """The fields an UpdateTask may change; only those named in the mask are given.

    A new ``repository`` moves the task there: like CreateTask's, it must be configured
    (checked with the repository catalog as validation context, and by the domain).
    """

    title: Title | None = None
    description: Description = None
    priority: PriorityOrMedium = "medium"
    deadline: Deadline = None
    metadata: Metadata = Field(default_factory=dict)
    repository: RepositoryName | None = None

    @field_validator("repository")
    @classmethod
    def _configured(cls, value: str | None, info: ValidationInfo) -> str:
        if value is None:
            raise ValueError("must name a configured repository")
        return configured_repository(value, info)


UPDATABLE_FIELDS = tuple(TaskChanges.model_fields)


def _updatable(path: str) -> str:
    if path not in UPDATABLE_FIELDS:
        raise ValueError(f"{path!r} cannot be updated; updatable: {', '.join(UPDATABLE_FIELDS)}")
    return path


class UpdateMask(_Strict):
    """The fields an UpdateTask changes (AIP-134)."""

    paths: tuple[Annotated[str, AfterValidator(_updatable)], ...] = ()


class TaskUpdateRequest(_Strict):
    """UpdateTask: the fields named by the mask, each held to its CreateTask rule.

    Values of fields the mask does not name are ignored, not validated.
    """

    id: TaskId
    etag: str = ""
    task: TaskChanges
    update_mask: UpdateMask

    @model_validator(mode="before")
    @classmethod
    def _only_masked(cls, data: Any) -> Any:
        if isinstance(data, dict):
            mask = data.get("update_mask")
            paths = mask.get("paths", ()) if isinstance(mask, dict) else ()
            values = data.get("task") or {}
            data = {**data, "task": {k: v for k, v in values.items() if k in paths}}
        return data

    @field_validator("update_mask")
    @classmethod
    def _not_empty(cls, value: UpdateMask) -> UpdateMask:
        if not value.paths:
            raise ValueError("must name at least one field")
        return value

    def changes(self) -> dict[str, Any]:
        """Field -> new value, for the fields the mask names."""
        return {path: getattr(self.task, path) for path in self.update_mask.paths}


class TaskAssignRequest(_Strict):
    """AssignTask: a user id, or None to unassign."""

    id: TaskId
    etag: str = ""
    assigned_to: OptionalUserId = None


class QualityCheck(_Strict):
    """One check of a quality gate, its text cleaned."""

    name: Annotated[str, BeforeValidator(clean_text), _bounded_text(MAX_CHECK_NAME)] = ""
    passed: bool = False
    detail: Annotated[str, BeforeValidator(clean_text), _bounded_text(MAX_CHECK_DETAIL)] = ""


class QualityGate(_Strict):
    """A quality-gate result, as CompleteTask records it.

    ``checks_run`` is at least the number of checks given. ``not_run`` says that no gate ran
    at all (a task completed elsewhere, e.g. by closing its issue): such a result has nothing
    else to say, so it cannot pass or list checks.
    """

    passed: bool = False
    checks_run: int = 0
    checks: list[QualityCheck] = Field(default_factory=list)
    not_run: bool = False

    @model_validator(mode="after")
    def _nothing_if_not_run(self) -> QualityGate:
        if self.not_run and (self.passed or self.checks_run or self.checks):
            raise ValueError(
                "a gate that did not run has no result: passed, checks_run and checks must be empty"
            )
        return self

    @model_validator(mode="before")
    @classmethod
    def _count_checks(cls, data: Any) -> Any:
        if isinstance(data, dict):
            run, checks = data.get("checks_run", 0), data.get("checks", ())
            if isinstance(run, int) and run >= 0 and isinstance(checks, list | tuple):
                data = {**data, "checks_run": max(run, len(checks))}
        return data

    @field_validator("checks_run")
    @classmethod
    def _not_negative(cls, value: int) -> int:
        if value < 0:
            raise ValueError("must not be negative")
        return value

    @field_validator("checks", mode="before")
    @classmethod
    def _bounded(cls, value: Any) -> Any:
        if isinstance(value, list | tuple) and len(value) > MAX_GATE_CHECKS:
            raise ValueError(f"at most {MAX_GATE_CHECKS} checks")
        return value

    def stored(self) -> dict[str, Any]:
        """The result as the task's ``quality_gate`` column holds it."""
        stored: dict[str, Any] = {
            "passed": self.passed,
            "checks_run": self.checks_run,
            "checks": [c.model_dump() for c in self.checks],
        }
        if self.not_run:
            stored["not_run"] = True
        return stored

    @classmethod
    def from_stored(cls, value: Mapping[str, Any]) -> QualityGate:
        """A stored result (already validated when it was recorded)."""
        return cls.model_construct(
            passed=bool(value.get("passed")),
            checks_run=int(value.get("checks_run", 0)),
            not_run=bool(value.get("not_run", False)),
            checks=[
                QualityCheck.model_construct(
                    name=str(c.get("name", "")),
                    passed=bool(c.get("passed")),
                    detail=str(c.get("detail", "")),
                )
                for c in value.get("checks", [])
            ],
        )


class TaskTransitionRequest(_Strict):
    """StartTask, CompleteTask, CancelTask, BlockTask and UnblockTask."""

    id: TaskId
    etag: str = ""
    reason: Reason = ""
    quality_gate: QualityGate | None = None


# --- user requests ------------------------------------------------------------------------------


class UserCreateRequest(_Strict):
    """A validated CreateUser request."""

    username: str
    email: str
    display_name: str | None = Field(default=None, max_length=200)
    metadata: Metadata = Field(default_factory=dict)

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


class UserLookup(_Strict):
    """GetUser: by id, or else by username."""

    id: OptionalUserId = None
    username: str = ""


class UserRef(_Strict):
    """One user (DeactivateUser, DeleteUser)."""

    id: UserId


class UserListRequest(_Strict):
    """ListUsers: a page of users by username."""

    include_inactive: bool = False
    page_size: int = 0
    page_token: str = ""


# --- domain objects -----------------------------------------------------------------------------


class Task(NamedTuple):
    """A task as stored, one version of it.

    A named tuple rather than a frozen dataclass: as immutable, and several times cheaper to
    build, which every task RPC does at least once.
    """

    id: int
    title: str
    description: str | None
    repository: str
    priority: str
    status: Status
    status_before_block: Status | None
    deadline: dt.datetime | None
    created_by: uuid.UUID
    assigned_to: uuid.UUID | None
    metadata: dict[str, Any]
    blocked_reason: str | None
    cancel_reason: str | None
    quality_gate: QualityGate | None
    created_at: dt.datetime
    updated_at: dt.datetime
    started_at: dt.datetime | None
    completed_at: dt.datetime | None
    version: int

    @property
    def etag(self) -> str:
        """The opaque etag of this version (AIP-154)."""
        raw = f"{self.id}/{self.version}".encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")


class User(NamedTuple):
    """A user as stored."""

    id: uuid.UUID
    username: str
    email: str
    display_name: str | None
    active: bool
    metadata: dict[str, Any]
    created_at: dt.datetime
    updated_at: dt.datetime
    last_login_at: dt.datetime | None


@dataclass(frozen=True, slots=True)
class SearchHit:
    """A task that matched a search, and how well.

    Attributes:
        task: The task.
        rank: ``ts_rank_cd`` of the full-text match (0: keyword search did not find it).
        score: What results are ordered by: `rank` in keyword mode, the reciprocal rank fusion
            score in semantic and hybrid mode. Higher is better.
        similarity: Cosine similarity of the query's and task's embeddings (0: not found by
            semantic search).
        matched: The searches that found it (`SearchMode.KEYWORD`, `SearchMode.SEMANTIC`).
    """

    task: Task
    rank: float
    score: float = 0.0
    similarity: float = 0.0
    matched: tuple[SearchMode, ...] = ()


@dataclass(frozen=True, slots=True)
class SearchPage:
    """One page of search results, the next page's token, and the mode the search ran in."""

    items: list[SearchHit]
    next_page_token: str
    mode: SearchMode


@dataclass(frozen=True, slots=True)
class Page(Generic[_T]):
    """One page of a listing, and the token of the next ("" on the last page)."""

    items: list[_T]
    next_page_token: str


# --- building requests --------------------------------------------------------------------------


def _field(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "request"


def violations_from(error: PydanticValidationError, *, prefix: str = "") -> list[FieldViolation]:
    """Pydantic's errors as field violations, one per problem (``checks[3].name`` style)."""
    out = []
    for item in error.errors():
        field = _field(item["loc"])
        message = str(item["msg"]).removeprefix("Value error, ")
        if item["type"] == "string_pattern_mismatch" and field.endswith("repository"):
            message = "must match ^[A-Za-z0-9_-]+$ (letters, digits, '_' and '-')"
        out.append(FieldViolation(f"{prefix}{field}", message))
    return out


def validate(model: type[_M], data: dict[str, Any], *, prefix: str = "", context: Any = None) -> _M:
    """Build `model` from `data` or raise the catalog error with every field violation.

    Raises:
        RepositoryNotFoundError: The only problem is a repository missing from the catalog
            given as `context` (MHV-200).
        ValidationError: Anything else (MHV-003).
    """
    try:
        return model.model_validate(data, context=context)
    except PydanticValidationError as exc:
        violations = violations_from(exc, prefix=prefix)
        errors = exc.errors()
        if all(e["type"] == UNKNOWN_REPOSITORY for e in errors):
            raise RepositoryNotFoundError(
                f"Repository {errors[0]['input']!r} is not configured.", violations=violations
            ) from None
        raise ValidationError(violations=violations) from None
