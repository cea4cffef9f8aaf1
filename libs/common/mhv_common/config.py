"""Configuration: `MHV_*` environment through pydantic-settings, and the YAML files in settings/.

Environment holds deployment facts and secrets (database URLs, key files, ports); the YAML files
hold what an operator edits and reviews (which repositories exist, which webhook senders are
declared). `mhv validate-config` loads both and reports the file and line at fault.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)
from pydantic import ValidationError as PydanticValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from mhv_common.auth import MAX_PERSON_TOKEN_SECONDS, MAX_SERVICE_TOKEN_SECONDS
from mhv_common.errors import ConfigurationError

REPOSITORY_NAME_PATTERN = r"^[A-Za-z0-9_-]+$"
_ROOT = Path(__file__).resolve().parents[3]
DEFAULT_REPOS_FILE = _ROOT / "settings" / "repos.yaml"
DEFAULT_WEBHOOKS_FILE = _ROOT / "settings" / "webhooks.yaml"

# The plan's defaults, per method class; `role:class` and `role:*` keys override them.
DEFAULT_RATE_LIMITS: dict[str, str] = {
    "create": "10/minute",
    "search": "30/minute",
    "webhook": "100/minute",
    # Per client address, before a webhook's signature is checked: only stops floods.
    "webhook_unverified": "1200/minute",
    "general": "60/minute",
    # Internal callers (the webhook gateway, the outbox relay) act for many people at once.
    "service:*": "200/second",
}


class CommonSettings(BaseSettings):
    """Settings every service shares. Environment variables are ``MHV_<FIELD>``."""

    model_config = SettingsConfigDict(env_prefix="MHV_", extra="ignore", frozen=True)

    log_level: str = "INFO"
    log_format: Literal["json", "text"] = "json"
    bind_host: str = "127.0.0.1"
    # Several processes of one service may share its gRPC (and HTTPS) port: SO_REUSEPORT, the
    # kernel spreads connections across them.
    reuse_port: bool = False
    metrics_host: str = "127.0.0.1"
    # A plaintext listener answering grpc.health.v1 only, for probes that cannot speak TLS
    # (the kubelet's gRPC probes; mhv_common.probes). None: off. 0: a free port.
    health_port: int | None = None

    # gRPC over TLS. With a certificate and its key the server listens with TLS only; with a CA
    # file this service's calls to the others use TLS and trust only that CA. Plaintext is
    # allowed on a loopback address only, unless grpc_allow_plaintext says otherwise.
    grpc_tls_cert_file: Path | None = None
    grpc_tls_key_file: Path | None = None
    grpc_tls_ca_file: Path | None = None
    grpc_allow_plaintext: bool = False
    # Each gRPC connection takes no new calls after this long (those in flight may finish) and
    # its client connects again, looking the callee's DNS name up afresh: replicas added
    # since are then balanced onto. 0: connections last as long as the client keeps them.
    grpc_max_connection_age_seconds: float = Field(default=300.0, ge=0)
    # A gRPC connection must finish its handshake (TLS, and the HTTP/2 preface and settings)
    # this soon after it is accepted, or grpc closes it (grpc's own default: 120 s).
    grpc_handshake_timeout_seconds: float = Field(default=10.0, gt=0)

    auth_jwks: str | None = None
    auth_jwks_file: Path | None = None
    auth_issuer: str = "mahavishnu"
    auth_audience: str = "mahavishnu-api"
    auth_signing_key_file: Path | None = None
    auth_signing_key_id: str = "dev-1"
    # The longest a token may live (exp - iat): people's tokens, and services' own.
    auth_max_token_lifetime_seconds: float = Field(default=MAX_PERSON_TOKEN_SECONDS, gt=0)
    auth_max_service_token_lifetime_seconds: float = Field(
        default=MAX_SERVICE_TOKEN_SECONDS, gt=0, le=3600
    )

    rate_limit_storage_uri: str = "memory://"
    rate_limits: dict[str, str] = Field(default_factory=dict)
    # Method classes refused (MHV-018) while a shared storage (Redis) is unreachable; every
    # other class is counted in each process meanwhile (mhv_common.ratelimit).
    rate_limit_fail_closed: list[str] = Field(default_factory=list)

    default_deadline_seconds: float = 10.0
    shutdown_grace_seconds: float = 10.0
    # Requests each listener of a process admits at once; more are shed with MHV-017 at the
    # door (mhv_common.admission). 0: no bound.
    max_in_flight: int = Field(default=256, ge=0)

    db_pool_min_size: int = 2
    db_pool_max_size: int = 10
    db_acquire_timeout_seconds: float = 5.0
    db_statement_timeout_seconds: float = 30.0

    repos_file: Path = DEFAULT_REPOS_FILE
    webhooks_file: Path = DEFAULT_WEBHOOKS_FILE

    def effective_rate_limits(self) -> dict[str, str]:
        """The plan's defaults overlaid with ``MHV_RATE_LIMITS``."""
        return {**DEFAULT_RATE_LIMITS, **self.rate_limits}


class OutboxRelaySettings(CommonSettings):
    """Where a service with an audit outbox relays it (`mhv_common.outbox.OutboxRelay`)."""

    audit_target: str = "127.0.0.1:50052"
    # The name the audit service's certificate must carry (with TLS).
    audit_tls_name: str = "mahavishnu-audit"
    relay_enabled: bool = True
    relay_batch_size: int = 200
    relay_poll_interval_seconds: float = 0.05
    relay_rpc_timeout_seconds: float = 5.0


class TaskSettings(OutboxRelaySettings):
    """Task service settings."""

    task_database_url: str = ""
    task_grpc_port: int = 50051
    task_metrics_port: int = 9101
    # Processes serving the task port (SO_REUSEPORT); see mhv_common.processes.
    task_processes: int = Field(default=1, ge=1, le=64)
    # Fault injection for crash tests only: SIGKILL the process after a batch was recorded by
    # the audit service and before it is marked delivered.
    relay_crash_after_send: bool = False


class AuditSettings(CommonSettings):
    """Audit service settings."""

    audit_database_url: str = ""
    audit_grpc_port: int = 50052
    # Service principals allowed to record audit events: the task and webhook services' relays
    # (each only about its own subjects).
    audit_writers: list[str] = Field(default_factory=lambda: ["service:task", "service:webhook"])
    audit_metrics_port: int = 9102
    audit_processes: int = Field(default=1, ge=1, le=64)
    # The audit service verifies its whole hash chain this often by itself (0: never).
    audit_verify_interval_seconds: float = Field(default=3600.0, ge=0)
    # Where it asks whether a person's user is still active (mhv_common.revocation).
    task_target: str = "127.0.0.1:50051"
    task_tls_name: str = "mahavishnu-task"


class WebhookSettings(OutboxRelaySettings):
    """Webhook gateway settings (its admin actions' audit outbox relays like the task one's)."""

    webhook_database_url: str = ""
    webhook_admin_grpc_port: int = 50053
    webhook_https_port: int = 8443
    webhook_metrics_port: int = 9103
    # The gRPC and HTTPS ports are both shared by every process.
    webhook_processes: int = Field(default=1, ge=1, le=64)
    webhook_tls_cert_file: Path | None = None
    webhook_tls_key_file: Path | None = None
    task_target: str = "127.0.0.1:50051"
    # The name the task service's certificate must carry (with TLS).
    task_tls_name: str = "mahavishnu-task"
    webhook_workers: int = 4
    webhook_dedup_retention_seconds: int = 4 * 24 * 3600
    webhook_past_window_seconds: int = 300
    webhook_future_window_seconds: int = 30
    webhook_dedup_purge_interval_seconds: float = 3600.0
    # Finished deliveries keep their raw bodies for operators this long, then are deleted.
    webhook_delivery_retention_seconds: int = 30 * 24 * 3600
    webhook_gauge_interval_seconds: float = 15.0
    webhook_body_timeout_seconds: float = 30.0
    # Open connections and requests in flight; beyond it the gateway answers 503 at once.
    webhook_max_concurrency: int = 1024
    # A connection must send a request head this soon, or is closed (slow or idle clients).
    webhook_head_timeout_seconds: float = Field(default=10.0, gt=0)
    # A connection must finish its TLS handshake this soon after it is accepted, or is closed.
    webhook_tls_handshake_timeout_seconds: float = Field(default=10.0, gt=0)
    # Open connections one client address may hold (0: no cap; use 0 behind a proxy).
    webhook_max_connections_per_address: int = Field(default=256, ge=0)
    webhook_saga_lease_seconds: float = 30.0
    webhook_saga_max_attempts: int = 8
    # A delivery is dead-lettered only after max_attempts AND this long since it arrived.
    webhook_saga_dead_letter_after_seconds: float = Field(default=86_400.0, ge=0)
    webhook_saga_retry_base_seconds: float = 1.0
    webhook_saga_poll_seconds: float = 0.2
    # Fault injection for crash tests only: SIGKILL the gateway after this saga step commits.
    webhook_saga_crash_after: str = ""


# --- settings/repos.yaml --------------------------------------------------------------------

RepositoryName = Annotated[
    str, StringConstraints(min_length=1, max_length=100, pattern=REPOSITORY_NAME_PATTERN)
]


def _name_list(value: Any) -> Any:
    # One name, or a list of them (mirrors, renamed repositories, forks filed together).
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else value


# `owner/name` on GitHub; `group/[subgroup/...]name` (path_with_namespace) on GitLab.
ExternalNames = Annotated[
    tuple[Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)+$")], ...],
    BeforeValidator(_name_list),
]


class Repository(BaseModel):
    """A configured code repository tasks can belong to."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: RepositoryName
    description: str = ""
    github: ExternalNames = Field(default=(), description="GitHub `owner/name`s mapped here.")
    gitlab: ExternalNames = Field(default=(), description="GitLab `group/name`s mapped here.")


class RepositoriesFile(BaseModel):
    """Schema of settings/repos.yaml."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    repositories: list[Repository]

    @field_validator("repositories")
    @classmethod
    def _unique_names(cls, repos: list[Repository]) -> list[Repository]:
        seen: set[str] = set()
        for repo in repos:
            if repo.name in seen:
                raise ValueError(f"repository {repo.name!r} is listed twice")
            seen.add(repo.name)
        return repos


@dataclass(frozen=True, slots=True)
class RepositoryCatalog:
    """The repositories tasks may be filed against."""

    repositories: tuple[Repository, ...]

    def get(self, name: str) -> Repository | None:
        """Return the repository called `name`, if configured."""
        return next((r for r in self.repositories if r.name == name), None)

    def by_external(
        self, *, github: str | None = None, gitlab: str | None = None
    ) -> Repository | None:
        """Map a GitHub ``owner/name`` or GitLab ``group/name`` to a configured repository.

        Names compare without regard to case, as both senders treat them.
        """
        for repo in self.repositories:
            if github is not None and github.lower() in (n.lower() for n in repo.github):
                return repo
            if gitlab is not None and gitlab.lower() in (n.lower() for n in repo.gitlab):
                return repo
        return None

    def names(self) -> list[str]:
        """Configured repository names, in file order."""
        return [r.name for r in self.repositories]


# --- settings/webhooks.yaml -----------------------------------------------------------------

SourceName = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,31}$")]


# The largest body each kind of sender sends, by default the cap of its sources:
#   github:   "Payloads are capped at 25 MB" (GitHub Docs, Webhook events and payloads,
#             "Payload cap"); GitHub does not deliver larger payloads at all.
#   gitlab:   GitLab refuses to send a webhook body over 25 MiB
#             (WebHookService::REQUEST_BODY_SIZE_LIMIT = 25.megabytes, since GitLab 13.3,
#             merge request gitlab-org/gitlab!38687); an issue description alone may be about
#             1 MB (GitLab application limits), so 1 MiB was too small.
#   standard: the Standard Webhooks specification sets no maximum and recommends payloads
#             "usually smaller than 20kb" (spec, "Payload size"); 1 MiB is ample for the task
#             events of docs/webhooks/task-events.md (at most about 40 KB).
DEFAULT_BODY_CAPS: dict[str, int] = {
    "github": 25 * 1024 * 1024,
    "gitlab": 25 * 1024 * 1024,
    "standard": 1024 * 1024,
}


class WebhookSource(BaseModel):
    """A declared webhook sender; `body_cap_bytes` defaults to its scheme's maximum."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: SourceName
    scheme: Literal["github", "gitlab", "standard"]
    body_cap_bytes: int = Field(default=1024 * 1024, gt=0, le=64 * 1024 * 1024)
    rate_limit: str = "100/minute"

    @model_validator(mode="before")
    @classmethod
    def _scheme_cap(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("body_cap_bytes") is None:
            cap = DEFAULT_BODY_CAPS.get(str(data.get("scheme")))
            if cap is not None:
                data = {**data, "body_cap_bytes": cap}
        return data


class WebhooksFile(BaseModel):
    """Schema of settings/webhooks.yaml."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sources: list[WebhookSource]


M = TypeVar("M", bound=BaseModel)


def _line_index(text: str) -> dict[tuple[str | int, ...], int]:
    """Map each YAML path (keys and list indexes) to the 1-based line it starts on."""
    index: dict[tuple[str | int, ...], int] = {}

    def walk(node: yaml.Node, path: tuple[str | int, ...]) -> None:
        index[path] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                walk(value, (*path, str(key.value)))
                index[(*path, str(key.value))] = key.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, (*path, i))

    root = yaml.compose(text, Loader=yaml.SafeLoader)
    if root is not None:
        walk(root, ())
    return index


def load_yaml_model(path: Path, model: type[M]) -> M:
    """Load and validate a YAML settings file.

    Raises:
        ConfigurationError: Unreadable file, YAML syntax error or schema violation; the message
            names the file and the line at fault.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigurationError(f"{path.name}: cannot read the file ({exc.strerror}).") from exc
    try:
        data: Any = yaml.safe_load(text)
        lines = _line_index(text)
    except yaml.MarkedYAMLError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark else 0
        raise ConfigurationError(f"{path.name}:{line}: YAML syntax error: {exc.problem}.") from exc
    try:
        return model.model_validate(data)
    except PydanticValidationError as exc:
        first = exc.errors()[0]
        loc = tuple(first["loc"])
        line = 1
        for depth in range(len(loc), -1, -1):
            if loc[:depth] in lines:
                line = lines[loc[:depth]]
                break
        where = ".".join(str(p) for p in loc) or "(top level)"
        raise ConfigurationError(f"{path.name}:{line}: {where}: {first['msg']}.") from exc


def load_repositories(path: Path) -> RepositoryCatalog:
    """Load settings/repos.yaml.

    Raises:
        ConfigurationError: As `load_yaml_model`, or a GitHub or GitLab name is mapped twice
            (to two repositories, or twice to one): a delivery must file into one place.
    """
    repos = load_yaml_model(path, RepositoriesFile).repositories
    seen: dict[tuple[str, str], str] = {}
    for index, repo in enumerate(repos):
        for sender in ("github", "gitlab"):
            for external in getattr(repo, sender):
                key = (sender, external.lower())
                if key in seen:
                    lines = _line_index(path.read_text(encoding="utf-8"))
                    line = lines.get(("repositories", index, sender), 1)
                    raise ConfigurationError(
                        f"{path.name}:{line}: repositories.{index}.{sender}: {external!r} is "
                        f"already mapped to repository {seen[key]!r}; map each name once."
                    )
                seen[key] = repo.name
    return RepositoryCatalog(tuple(repos))


def load_webhook_sources(path: Path) -> tuple[WebhookSource, ...]:
    """Load settings/webhooks.yaml."""
    sources = load_yaml_model(path, WebhooksFile).sources
    names = [s.name for s in sources]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigurationError(f"{path.name}: source {dupes[0]!r} is declared twice.")
    return tuple(sources)


S = TypeVar("S", bound=BaseSettings)


def load_settings(factory: Callable[[], S]) -> S:
    """Build a settings object, turning pydantic's error into MHV-001."""
    try:
        return factory()
    except PydanticValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        config = getattr(factory, "model_config", {})
        prefix = str(config.get("env_prefix", "MHV_")) if isinstance(config, dict) else "MHV_"
        where = f"{prefix}{field.upper()}: " if field else ""
        raise ConfigurationError(f"environment: {where}{first['msg']}.") from exc


def redact_dsn(dsn: str) -> str:
    """A database URL with its password replaced, safe to log."""
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", dsn)
