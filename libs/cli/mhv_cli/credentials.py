"""Rotating credentials: token signing keys, webhook secrets, database passwords.

The commands docs/runbooks/security-incident-response.md runs:

- ``mhv keys generate --kid KID --private-key FILE [--subject service:task]``: a new Ed25519
  signing key (mode 0600) and its public JWK on stdout.
- ``mhv keys jwks --file JWKS [--add JWK_FILE ...] [--remove KID ...]``: add the new public
  key to the verification keys, remove a compromised one. Services read their JWKS at start:
  restart them, and every token of a removed key is refused from then on.
- ``mhv secrets rotate-webhook --source NAME [--current VALUE] [--overlap-hours H]``: a new
  webhook secret, listed first, with the old one still accepted for H hours (0 when it leaked:
  the old one is dropped at once). Without ``--current`` it rotates the local deployment's
  secret in ``.mhv/secrets.json``; with it, it prints the new ``MHV_WEBHOOK_SECRETS_<NAME>``
  value for your secret store.
- ``mhv secrets rotate-db-password --slice task|audit|webhook``: a new password for the
  service's database role (``ALTER ROLE``), every session of the role ended so that a leaked
  password's connections die with it; recorded for the local deployment, printed otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime as dt
import json
import os
import secrets
import sys
from pathlib import Path
from typing import Any

import asyncpg

from mhv_cli import devstate
from mhv_cli.migrate import SERVICE_SLICES
from mhv_common.auth import SUBJECT_MEMBER, generate_signing_key
from mhv_common.errors import ConfigurationError


def _private(path: Path, content: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(content)


def _keys_generate(args: argparse.Namespace) -> int:
    path = Path(args.private_key)
    if path.exists():
        raise ConfigurationError(f"{path} exists: a key is never overwritten.")
    pem, jwk = generate_signing_key()
    jwk.update(kid=args.kid, use="sig")
    if args.subject:
        jwk[SUBJECT_MEMBER] = args.subject
    _private(path, pem)
    print(json.dumps(jwk))
    return 0


def _keys_jwks(args: argparse.Namespace) -> int:
    path = Path(args.file)
    document: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {"keys": []}
    keys = [k for k in document.get("keys", []) if k.get("kid") not in set(args.remove)]
    removed = len(document.get("keys", [])) - len(keys)
    if len(args.remove) > removed:
        raise ConfigurationError(f"{path.name} holds no key with id {', '.join(args.remove)}.")
    for added in args.add:
        jwk = json.loads(Path(added).read_text() if Path(added).exists() else added)
        if not jwk.get("kid"):
            raise ConfigurationError("The key to add has no 'kid'.")
        if any(k.get("kid") == jwk["kid"] for k in keys):
            raise ConfigurationError(f"{path.name} already holds a key with id {jwk['kid']!r}.")
        keys.append(jwk)
    if not keys:
        raise ConfigurationError("A JWKS without keys would refuse every token; keep one.")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"keys": keys}, indent=2) + "\n")
    tmp.chmod(0o600)
    tmp.replace(path)
    print(f"{path}: {', '.join(str(k['kid']) for k in keys)}")
    return 0


def new_webhook_secret(source: str, *, current: str) -> str:
    """A fresh secret in the form the source uses (a ``whsec_`` key where `current` is one)."""
    token = secrets.token_bytes(32)
    if current.split(",")[0].strip().startswith("whsec_") or source == "generic":
        return "whsec_" + base64.b64encode(token).decode()
    return token.hex()


def rotated(source: str, current: str, *, overlap_hours: float, now: dt.datetime) -> str:
    """The ``MHV_WEBHOOK_SECRETS_<SOURCE>`` value after a rotation.

    The new secret comes first (labelled by the rotation time); the previous newest entry
    stays accepted until ``now + overlap_hours`` (dropped at once when 0); older entries go.
    """
    stamp = now.strftime("%Y%m%d%H%M")
    fresh = f"{new_webhook_secret(source, current=current)};id=k{stamp}"
    previous = current.split(",")[0].strip()
    if overlap_hours <= 0 or not previous:
        return fresh
    secret, *options = [p.strip() for p in previous.split(";")]
    kept = [o for o in options if o.startswith("id=")]
    until = (now + dt.timedelta(hours=overlap_hours)).strftime("%Y-%m-%dT%H:%M:%SZ")
    return ", ".join([fresh, ";".join([secret, f"expires={until}", *kept])])


def _rotate_webhook(args: argparse.Namespace) -> int:
    now = dt.datetime.now(dt.UTC)
    variable = f"MHV_WEBHOOK_SECRETS_{args.source.upper()}"
    if args.current is not None:
        value = rotated(args.source, args.current, overlap_hours=args.overlap_hours, now=now)
        print(f"{variable}={value}")
        return 0
    state = devstate.DevState(devstate.home())
    if not state.secrets_file.exists():
        raise ConfigurationError(
            "No local deployment secrets to rotate.",
            recovery=("Give the current value with --current VALUE to rotate it elsewhere.",),
        )
    data = state.secrets()
    hooks = data["webhook_secrets"]
    if args.source not in hooks:
        raise ConfigurationError(f"No webhook source {args.source!r} in {state.secrets_file}.")
    hooks[args.source] = rotated(
        args.source, str(hooks[args.source]), overlap_hours=args.overlap_hours, now=now
    )
    path = state.secrets_file
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(data, indent=2))
    tmp.replace(path)
    newest = hooks[args.source].split(",")[0].split(";")[0]
    print(f"rotated {args.source} in {path}; restart `mhv up`, then give the sender:")
    print(newest)
    return 0


async def rotate_db_password(admin_url: str, role: str) -> tuple[str, int]:
    """Set a new password on `role` and end its sessions; (password, sessions ended)."""
    password = secrets.token_urlsafe(24)
    conn = await asyncpg.connect(admin_url)
    try:
        quoted = '"' + role.replace('"', '""') + '"'
        literal = "'" + password.replace("'", "''") + "'"
        await conn.execute(f"ALTER ROLE {quoted} PASSWORD {literal}")
        ended = await conn.fetchval(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE usename = $1",
            role,
        )
    finally:
        await conn.close()
    return password, int(ended)


def _rotate_db(args: argparse.Namespace) -> int:
    from mhv_cli.main import admin_url, role_names

    role = role_names().for_slice(args.slice)
    password, ended = asyncio.run(rotate_db_password(admin_url(), role))
    state = devstate.DevState(devstate.home())
    local = state.secrets_file.exists() and not os.environ.get("MHV_DATABASE_URL")
    print(f"{role}: new password set, {ended} session(s) ended", file=sys.stderr)
    if local:
        data = state.secrets()
        data["db_passwords"][args.slice] = password
        fd = os.open(state.secrets_file, os.O_WRONLY | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(data, indent=2))
        print(f"recorded in {state.secrets_file}; restart `mhv up`", file=sys.stderr)
    else:
        print(f"MHV_DB_PASSWORD_{args.slice.upper()}={password}")
    return 0


def add_commands(sub: Any) -> None:
    """Register ``keys`` and ``secrets`` on the ``mhv`` subcommand parser."""
    keys = sub.add_parser("keys", help="token signing keys: generate, edit the JWKS")
    actions = keys.add_subparsers(dest="action", required=True)
    generate = actions.add_parser("generate", help="a new signing key; its JWK on stdout")
    generate.add_argument("--kid", required=True, help="key id, e.g. admin-2026-05")
    generate.add_argument("--private-key", required=True, help="where to write it (0600)")
    generate.add_argument("--subject", help="bind it to one subject, e.g. service:task")
    generate.set_defaults(func=_keys_generate)
    jwks = actions.add_parser("jwks", help="add or remove verification keys")
    jwks.add_argument("--file", required=True, help="the JWKS file (MHV_AUTH_JWKS_FILE)")
    jwks.add_argument("--add", action="append", default=[], help="a JWK (file or JSON)")
    jwks.add_argument("--remove", action="append", default=[], help="a key id")
    jwks.set_defaults(func=_keys_jwks)

    secrets_ = sub.add_parser("secrets", help="rotate webhook secrets and database passwords")
    rotate = secrets_.add_subparsers(dest="action", required=True)
    webhook = rotate.add_parser("rotate-webhook", help="a new webhook secret, old one overlapping")
    webhook.add_argument("--source", required=True, help="github, gitlab, generic, ...")
    webhook.add_argument("--current", help="current MHV_WEBHOOK_SECRETS_<SOURCE> value")
    webhook.add_argument(
        "--overlap-hours", type=float, default=24.0, help="0 when the secret leaked"
    )
    webhook.set_defaults(func=_rotate_webhook)
    database = rotate.add_parser("rotate-db-password", help="a new password for a service role")
    database.add_argument("--slice", required=True, choices=list(SERVICE_SLICES))
    database.set_defaults(func=_rotate_db)
