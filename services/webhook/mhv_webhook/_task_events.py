"""Task events, version 1: how any system drives tasks through signed Standard Webhooks.

A delivery to a ``standard`` source is a Standard Webhooks payload, ``{"type", "timestamp",
"data"}``. The types below are task events; `SCHEMA` is their JSON Schema, published as
docs/webhooks/task-events.v1.schema.json (``make generate``) and documented in
docs/webhooks/task-events.md. Every task event names its task by the sender's own
``external_id``; ``task.create`` makes the task, the others change it.

Task events are checked against the schema when they arrive (`check`): a sender learns of a
mistake from the 400 answer (MHV-003, one field violation per problem) while it can still
correct it, and nothing invalid is stored. A delivery of any other type is not a task event:
it is stored and ignored, as before.
"""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Mapping
from typing import Any

import jsonschema

from mhv_common.config import REPOSITORY_NAME_PATTERN, RepositoryCatalog
from mhv_common.errors import FieldViolation, ValidationError
from mhv_webhook._changes import (
    Change,
    IgnoredEvent,
    Kind,
    Missing,
    QualityGate,
    TaskChange,
    sender_time,
    username,
)

VERSION = 1
SCHEMA_ID = "https://mahavishnu.invalid/schemas/webhooks/task-events.v1.schema.json"
# At most this many problems are reported for one delivery.
MAX_VIOLATIONS = 20
# The actor of a task event that names none.
DEFAULT_ACTOR = "system"

_RFC3339 = (
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,9})?"
    r"([Zz]|[+-][0-9]{2}:[0-9]{2})$"
)
_ACCOUNT = {
    "type": "string",
    "pattern": "^[A-Za-z0-9._-]{1,64}$",
    "description": "An account of the sending system; becomes the user <source>.<account>.",
}
_FIELDS: dict[str, Any] = {
    "external_id": {
        "type": "string",
        "pattern": "^[\\x21-\\x7e]{1,200}$",
        "description": "The sender's id of the task: 1-200 printable ASCII characters.",
    },
    "title": {"type": "string", "minLength": 1, "maxLength": 200, "pattern": "\\S"},
    "description": {"type": "string", "maxLength": 5000},
    "repository": {
        "type": "string",
        "maxLength": 100,
        "pattern": REPOSITORY_NAME_PATTERN,
        "description": "A repository configured in settings/repos.yaml.",
    },
    "priority": {"enum": ["low", "medium", "high", "critical"]},
    "deadline": {
        "type": "string",
        "pattern": _RFC3339,
        "description": "RFC 3339 date-time in the future.",
    },
    "actor": _ACCOUNT,
}


def _data(
    *,
    required: tuple[str, ...] = (),
    optional: tuple[str, ...] = (),
    extra: Mapping[str, Any] | None = None,
    **rules: Any,
) -> dict[str, Any]:
    """The schema of one event type's ``data``: external_id, actor and the named fields."""
    names = ("external_id", "actor", *required, *optional)
    return {
        "type": "object",
        "required": ["external_id", *required],
        "additionalProperties": False,
        "properties": {**{n: {"$ref": f"#/$defs/{n}"} for n in names}, **(extra or {})},
        **rules,
    }


_DATA: dict[str, dict[str, Any]] = {
    "task.create": _data(
        required=("title", "repository"), optional=("description", "priority", "deadline")
    ),
    "task.update": _data(
        optional=("title", "description", "priority", "deadline"), minProperties=2
    ),
    "task.assign": _data(
        extra={"assignee": {"anyOf": [{"$ref": "#/$defs/account"}, {"type": "null"}]}},
        required=("assignee",),
    ),
    "task.complete": _data(
        extra={
            "quality_gate": {
                "type": "object",
                "required": ["passed"],
                "additionalProperties": False,
                "properties": {
                    "passed": {"type": "boolean"},
                    "checks_run": {"type": "integer", "minimum": 0, "maximum": 100000},
                    "checks": {
                        "type": "array",
                        "maxItems": 200,
                        "items": {
                            "type": "object",
                            "required": ["name", "passed"],
                            "additionalProperties": False,
                            "properties": {
                                "name": {"type": "string", "minLength": 1, "maxLength": 200},
                                "passed": {"type": "boolean"},
                                "detail": {"type": "string", "maxLength": 2000},
                            },
                        },
                    },
                },
            }
        },
    ),
    "task.cancel": _data(extra={"reason": {"type": "string", "maxLength": 1000}}),
}
TYPES = tuple(_DATA)

SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": SCHEMA_ID,
    "title": f"Mahavishnu task events, version {VERSION}",
    "description": (
        "Standard Webhooks payloads that create and change tasks. Each event names its task "
        "by the sender's external_id. Types other than these are not task events: the gateway "
        "stores and ignores them."
    ),
    "type": "object",
    "required": ["type", "timestamp", "data"],
    "properties": {
        "type": {"enum": list(TYPES)},
        "timestamp": {
            "type": "string",
            "pattern": _RFC3339,
            "description": "When the event happened (RFC 3339); orders create, complete, cancel.",
        },
        "data": {"type": "object"},
    },
    "allOf": [
        {
            "if": {"properties": {"type": {"const": name}}, "required": ["type"]},
            "then": {"properties": {"data": {"$ref": f"#/$defs/{name}"}}},
        }
        for name in TYPES
    ],
    "$defs": {**_FIELDS, "account": _ACCOUNT, **_DATA},
}


@functools.cache
def _validator() -> jsonschema.protocols.Validator:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    return jsonschema.Draft202012Validator(SCHEMA)


def is_task_event(payload: Mapping[str, Any]) -> bool:
    """Whether the payload's type is one of the task events (the others are not checked)."""
    return payload.get("type") in TYPES


def check(payload: Mapping[str, Any], repositories: RepositoryCatalog | None) -> None:
    """Refuse a task event that breaks the schema (or names an unconfigured repository).

    Raises:
        ValidationError: MHV-003 with one field violation per problem, named by its path
            (``data.title``), at most `MAX_VIOLATIONS`.
    """
    if not is_task_event(payload):
        return
    errors = sorted(_validator().iter_errors(payload), key=lambda e: list(e.absolute_path))
    # One problem per field, the first the schema names (an empty title is "must not be
    # empty", not also "does not have the required form").
    first: dict[str, FieldViolation] = {}
    for error in errors:
        for violation in _violations(error):
            first.setdefault(violation.field, violation)
    for violation in _beyond_the_schema(payload, repositories):
        first.setdefault(violation.field, violation)
    violations = list(first.values())
    if violations:
        raise ValidationError(
            f"The {payload.get('type')} event does not match task events v{VERSION} "
            "(docs/webhooks/task-events.md).",
            violations=violations[:MAX_VIOLATIONS],
        )


def _beyond_the_schema(
    payload: Mapping[str, Any], repositories: RepositoryCatalog | None
) -> list[FieldViolation]:
    """What a schema cannot say: real dates, a future deadline, a configured repository."""
    # Only values of the right type are looked at: the schema reports the others.
    found: list[FieldViolation] = []
    data = payload.get("data")
    data = data if isinstance(data, dict) else {}
    timestamp = payload.get("timestamp")
    if isinstance(timestamp, str) and sender_time(timestamp) is None:
        found.append(FieldViolation("timestamp", "is not a valid date-time"))
    if isinstance(data.get("deadline"), str):
        deadline = sender_time(data["deadline"])
        if deadline is None:
            found.append(FieldViolation("data.deadline", "is not a valid date-time"))
        elif deadline <= dt.datetime.now(dt.UTC):
            found.append(FieldViolation("data.deadline", "must be in the future"))
    repository = data.get("repository")
    if (
        repositories is not None
        and isinstance(repository, str)
        and not repositories.get(repository)
    ):
        found.append(
            FieldViolation(
                "data.repository",
                f"{repository!r} is not configured; configured: {', '.join(repositories.names())}",
            )
        )
    return found


def _violations(error: jsonschema.ValidationError) -> list[FieldViolation]:
    """What one schema error means for the sender, as field violations."""
    if error.validator in ("allOf", "anyOf") and error.context:
        # A branch of the schema failed: its most specific errors say why.
        return [v for sub in error.context for v in _violations(sub)]
    path = ".".join(str(p) for p in error.absolute_path)
    at = path or "(payload)"
    rule, value = error.validator, error.validator_value
    if rule == "required":
        missing = error.message.split("'")[1] if "'" in error.message else "?"
        return [FieldViolation(f"{path}.{missing}" if path else missing, "is required")]
    if rule == "additionalProperties":
        known = set(error.schema.get("properties", {}))
        extra = sorted(set(error.instance) - known) if isinstance(error.instance, dict) else []
        return [
            FieldViolation(f"{path}.{name}" if path else name, "is not a field of this event")
            for name in extra
        ]
    described = {
        "type": f"must be of type {value}",
        "enum": "must be one of " + ", ".join(map(str, value)) if isinstance(value, list) else "",
        "const": f"must be {value!r}",
        "minLength": "must not be empty" if value == 1 else f"at least {value} characters",
        "maxLength": f"at most {value} characters",
        "pattern": f"does not have the required form ({value})",
        "minimum": f"must be at least {value}",
        "maximum": f"must be at most {value}",
        "maxItems": f"at most {value} entries",
        "minProperties": "names no field to change",
    }
    return [FieldViolation(at, described.get(str(rule)) or error.message[:200])]


def interpret(
    *, source: str, payload: Mapping[str, Any], repositories: RepositoryCatalog
) -> Change:
    """The task change a stored task event asks for (other types: ignored, with the reason).

    The event was checked when it arrived; what may have changed since (the repositories
    configured) is checked again.
    """
    kind_name = payload.get("type")
    if not is_task_event(payload):
        return IgnoredEvent(f"{kind_name!r} is not a task event: no task mapping")
    data = payload["data"]
    repository = data.get("repository")
    if repository is not None and repositories.get(repository) is None:
        return IgnoredEvent(f"repository {repository!r} is not configured")
    deadline = sender_time(data.get("deadline"))
    common = {
        "source": source,
        "external_key": data["external_id"],
        "repository": repository,
        "actor": username(source, data.get("actor", DEFAULT_ACTOR)),
        "happened_at": sender_time(payload.get("timestamp")),
    }
    if kind_name == "task.create":
        return TaskChange(
            kind=Kind.OPENED,
            title=data["title"],
            description=data.get("description", ""),
            priority=data.get("priority"),
            deadline=deadline.isoformat() if deadline else None,
            metadata={"origin": {"source": source, "key": data["external_id"]}},
            **common,
        )
    if kind_name == "task.update":
        return TaskChange(
            kind=Kind.EDITED,
            title=data.get("title"),
            description=data.get("description"),
            priority=data.get("priority"),
            deadline=deadline.isoformat() if deadline else None,
            missing=Missing.WAIT,
            **common,
        )
    if kind_name == "task.assign":
        assignee = data["assignee"]
        return TaskChange(
            kind=Kind.EDITED,
            assignees=(username(source, assignee),) if assignee else (),
            missing=Missing.WAIT,
            **common,
        )
    if kind_name == "task.complete":
        return TaskChange(
            kind=Kind.CLOSED,
            quality_gate=_gate(data.get("quality_gate")),
            missing=Missing.WAIT,
            **common,
        )
    return TaskChange(
        kind=Kind.CLOSED,
        cancel_reason=data.get("reason") or f"cancelled by {source}",
        missing=Missing.WAIT,
        **common,
    )


def _gate(value: Any) -> QualityGate | None:
    if not isinstance(value, dict):
        return None
    checks = tuple(
        (c["name"], bool(c["passed"]), c.get("detail", "")) for c in value.get("checks", ())
    )
    return QualityGate(
        passed=bool(value["passed"]),
        checks_run=max(int(value.get("checks_run", 0)), len(checks)),
        checks=checks,
    )
