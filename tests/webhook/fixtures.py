"""The sender payload fixtures of tests/webhook/payloads/ (see its README for their sources)."""

from __future__ import annotations

import copy
import functools
import json
import urllib.parse
from pathlib import Path
from typing import Any

PAYLOADS = Path(__file__).resolve().parent / "payloads"


@functools.cache
def _load(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((PAYLOADS / f"{name}.json").read_text())
    return loaded


def payload(name: str) -> dict[str, Any]:
    """A fresh copy of a fixture, e.g. ``payload("github/issues.opened")``."""
    return copy.deepcopy(_load(name))


def github_issue(action: str, number: int, *, repository: str = "example/demo") -> dict[str, Any]:
    """GitHub's ``issues`` delivery for `action`, about issue `number` of `repository`."""
    found = payload(f"github/issues.{action}")
    found["issue"]["number"] = number
    found["issue"]["html_url"] = f"https://github.com/{repository}/issues/{number}"
    found["repository"]["full_name"] = repository
    return found


def gitlab_issue(case: str, iid: int, *, project: str = "example/demo") -> dict[str, Any]:
    """GitLab's Issue Hook delivery for `case` (``open``, ``update.labels``, ...), issue `iid`."""
    found = payload(f"gitlab/issue.{case}")
    found["object_attributes"]["iid"] = iid
    found["project"]["path_with_namespace"] = project
    return found


def task_event(kind: str, external_id: str, **data: Any) -> dict[str, Any]:
    """A Standard Webhooks task event (``create``, ``update``, ...) for `external_id`."""
    found = payload(f"standard/task.{kind}")
    found["data"]["external_id"] = external_id
    found["data"].update(data)
    return found


def body(value: dict[str, Any]) -> bytes:
    """A payload as a sender sends it: compact JSON."""
    return json.dumps(value, separators=(",", ":")).encode()


def form_body(value: dict[str, Any]) -> bytes:
    """A payload as GitHub sends it with content type application/x-www-form-urlencoded."""
    return urllib.parse.urlencode({"payload": json.dumps(value)}).encode("ascii")
