"""The ``mhv`` command: run, migrate, check and get tokens for a Mahavishnu deployment."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence

import asyncpg

from mhv_cli import devstate
from mhv_cli.migrate import RoleNames, held_back, migrate_down, migrate_up
from mhv_common.auth import MAX_PERSON_TOKEN_SECONDS, Role, TokenIssuer
from mhv_common.config import (
    AuditSettings,
    CommonSettings,
    TaskSettings,
    WebhookSettings,
    load_repositories,
    load_settings,
    load_webhook_sources,
)
from mhv_common.errors import ConfigurationError, MahavishnuError, UserNotFoundError


def role_names() -> RoleNames:
    """Role names of this deployment (``MHV_DB_ROLE_PREFIX``, default ``mhv``)."""
    return RoleNames(os.environ.get("MHV_DB_ROLE_PREFIX", "mhv"))


def admin_url() -> str:
    """The administrator database URL: ``MHV_DATABASE_URL``, else the one `mhv up` recorded."""
    url = os.environ.get("MHV_DATABASE_URL") or devstate.DevState(devstate.home()).read_state().get(
        "database_url"
    )
    if not url:
        raise ConfigurationError(
            "No database configured.",
            recovery=(
                "Set MHV_DATABASE_URL to an administrator URL of your PostgreSQL,",
                "or start the local deployment with `make run` (`mhv up`) first.",
            ),
        )
    return str(url)


def issuer(settings: CommonSettings) -> TokenIssuer:
    """The token issuer: ``MHV_AUTH_SIGNING_KEY_FILE`` or the local deployment's key."""
    state = devstate.DevState(devstate.home())
    path = settings.auth_signing_key_file or state.signing_key
    return TokenIssuer.from_file(
        path,
        key_id=settings.auth_signing_key_id,
        issuer=settings.auth_issuer,
        audience=settings.auth_audience,
    )


# People's tokens are short-lived: deactivating a user takes effect within this much time.
MAX_TOKEN_TTL_SECONDS = MAX_PERSON_TOKEN_SECONDS


async def _token(args: argparse.Namespace) -> int:
    if not 1 <= args.ttl <= MAX_TOKEN_TTL_SECONDS:
        raise ConfigurationError(
            f"--ttl must be between 1 and {MAX_TOKEN_TTL_SECONDS} seconds.",
            recovery=("Ask for a shorter token and get a new one when it expires.",),
        )
    settings = load_settings(CommonSettings)
    conn = await asyncpg.connect(admin_url())
    try:
        # Issuing a token is this deployment's sign-in: it is what last_login_at records.
        row = await conn.fetchrow(
            "UPDATE task.users SET last_login_at = now() WHERE username = $1"
            " RETURNING id, username, is_active",
            args.username,
        )
    finally:
        await conn.close()
    if row is None:
        raise UserNotFoundError(f"No user named {args.username!r}.")
    if not row["is_active"]:
        raise ConfigurationError(f"User {args.username!r} is deactivated.")
    token = issuer(settings).issue(
        subject=str(row["id"]),
        roles=[args.role],
        ttl_seconds=args.ttl,
        username=row["username"],
    )
    print(token)
    return 0


async def _migrate(args: argparse.Namespace) -> int:
    roles = role_names()
    if args.down:
        undone = await migrate_down(
            admin_url(),
            slice_name=args.down,
            to_version=args.to,
            roles=roles,
            allow_data_loss=args.allow_data_loss,
        )
        for m in undone:
            print(f"reverted {m.slice}/{m.version:04d}_{m.name}")
        return 0
    passwords = {
        s: os.environ[f"MHV_DB_PASSWORD_{s.upper()}"]
        for s in ("task", "audit", "webhook")
        if os.environ.get(f"MHV_DB_PASSWORD_{s.upper()}")
    }
    done = await migrate_up(admin_url(), roles=roles, passwords=passwords)
    for m in done:
        print(f"applied {m.slice}/{m.version:04d}_{m.name}")
    waiting = await held_back(admin_url())
    for m in waiting:
        print(
            f"held back {m.slice}/{m.version:04d}_{m.name}: this server does not offer the "
            f"{m.requires} extension (semantic search stays off; keyword search works)"
        )
    if not done and not waiting:
        print("database is up to date")
    return 0


def _validate_config(_args: argparse.Namespace) -> int:
    common = load_settings(CommonSettings)
    for factory in (TaskSettings, AuditSettings, WebhookSettings):
        load_settings(factory)
    repos = load_repositories(common.repos_file)
    sources = load_webhook_sources(common.webhooks_file)
    print(
        f"{common.repos_file.name}: {len(repos.repositories)} repositories "
        f"({', '.join(repos.names())})"
    )
    print(
        f"{common.webhooks_file.name}: {len(sources)} webhook sources "
        f"({', '.join(s.name for s in sources)})"
    )
    print("environment: ok")
    from mhv_cli.reindex import provider_chain, semantic_search_status
    from mhv_task._embedding import EmbeddingSettings

    embedding = load_settings(EmbeddingSettings)
    print(f"embeddings: {provider_chain(embedding)}")
    task = load_settings(TaskSettings)
    print(asyncio.run(semantic_search_status(task.task_database_url)))
    return 0


def _up(_args: argparse.Namespace) -> int:
    from mhv_cli.up import run_up

    return asyncio.run(run_up())


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``mhv``."""
    parser = argparse.ArgumentParser(prog="mhv", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser(
        "up",
        help="start the whole system (a private PostgreSQL too, if MHV_DATABASE_URL is unset)",
    ).set_defaults(func=_up)
    token = sub.add_parser("token", help="print a bearer token for an existing user")
    token.add_argument("--username", required=True)
    token.add_argument("--role", required=True, choices=[str(r) for r in Role])
    token.add_argument(
        "--ttl", type=int, default=3600, help=f"lifetime in seconds (1-{MAX_TOKEN_TTL_SECONDS})"
    )
    token.set_defaults(func=lambda a: asyncio.run(_token(a)))
    migrate = sub.add_parser("migrate", help="apply (or with --down, revert) migrations")
    migrate.add_argument("--down", choices=["task", "audit", "webhook", "platform"])
    migrate.add_argument("--to", type=int, default=0, help="version to revert to")
    migrate.add_argument(
        "--allow-data-loss",
        action="store_true",
        help="revert even migrations whose down file destroys rows that exist (MHV-060)",
    )
    migrate.set_defaults(func=lambda a: asyncio.run(_migrate(a)))
    sub.add_parser(
        "validate-config", help="check settings/*.yaml and the MHV_* environment"
    ).set_defaults(func=_validate_config)
    from mhv_cli import _backup_commands, anchors, credentials, reindex

    _backup_commands.add_commands(sub)
    anchors.add_commands(sub)
    credentials.add_commands(sub)
    reindex.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``mhv``; errors print their MHV code and recovery steps and exit non-zero."""
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except MahavishnuError as exc:
        print(f"error: [{exc.code}] {exc.message}", file=sys.stderr)
        for step in exc.recovery:
            print(f"  - {step}", file=sys.stderr)
        return 1
    except (OSError, asyncpg.PostgresError) as exc:
        print(f"error: [MHV-002] cannot use the database: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    raise SystemExit(main())
