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

Every one of them is audited: before anything is written, changed or printed, the command
records what it is about to do in the audit log (AuditService.RecordEvents, as the administrator
whose token is in ``MHV_TOKEN``, at ``MHV_AUDIT_TARGET``): subject kind ``credential``, the
credential's name as subject, key ids and counts as details, never key material or secrets. If
it cannot record, it stops with MHV-401 and changes nothing. ``--no-audit`` skips the record for
the one time there is no audit service yet (the first keys of a new deployment), and says so.
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
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import jwt
from google.protobuf import struct_pb2

from mahavishnu.audit.v1 import audit_pb2, audit_pb2_grpc
from mhv_cli import devstate
from mhv_cli.migrate import SERVICE_SLICES
from mhv_common.auth import SUBJECT_MEMBER, generate_signing_key
from mhv_common.client import service_channel
from mhv_common.config import OutboxRelaySettings, load_settings
from mhv_common.errors import AuditRecordFailedError, ConfigurationError
from mhv_common.ids import uuid_or_none
from mhv_common.redaction import redact_details
from mhv_common.timestamps import to_timestamp
from mhv_common.tls import peer

# Bound on recording one event: the audit service answers in milliseconds when it is up.
_RECORD_TIMEOUT_SECONDS = 15.0


def _token_subject(token: str) -> str:
    """The subject a bearer token names; the audit service checks the token itself."""
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        raise AuditRecordFailedError("MHV_TOKEN does not hold a bearer token.") from None
    subject = str(claims.get("sub", ""))
    if uuid_or_none(subject) is None:
        raise AuditRecordFailedError(
            "MHV_TOKEN must be a person's token: its subject is not a user id."
        )
    return subject


async def _send(event: audit_pb2.EventRecord, token: str) -> None:
    settings = load_settings(OutboxRelaySettings)
    callee = peer(settings, settings.audit_target, settings.audit_tls_name)
    async with service_channel(callee) as channel:
        await audit_pb2_grpc.AuditServiceStub(channel).RecordEvents(
            audit_pb2.RecordEventsRequest(events=[event]),
            metadata=(("authorization", f"Bearer {token}"),),
            timeout=_RECORD_TIMEOUT_SECONDS,
        )


def record_credential_event(
    args: argparse.Namespace, event_type: str, credential: str, details: dict[str, Any]
) -> None:
    """Record a credential change in the audit log before it is made.

    Raises:
        AuditRecordFailedError: No usable token, or the audit service could not be reached or
            refused the record (MHV-401); the caller must then change nothing.

    """
    if getattr(args, "no_audit", False):
        print(
            f"warning: {event_type} of {credential} is NOT recorded in the audit log (--no-audit)",
            file=sys.stderr,
        )
        return
    token = os.environ.get("MHV_TOKEN", "").strip()
    if not token:
        raise AuditRecordFailedError("MHV_TOKEN is not set: no administrator to record this as.")
    struct = struct_pb2.Struct()
    struct.update(redact_details(details))
    event = audit_pb2.EventRecord(
        event_id=str(uuid.uuid4()),
        event_type=event_type,
        user_id=_token_subject(token),
        details=struct,
        occur_time=to_timestamp(dt.datetime.now(dt.UTC)),
        request_id=f"mhv-{uuid.uuid4().hex}",
        subject_kind="credential",
        subject_id=credential,
    )
    try:
        asyncio.run(_send(event, token))
    except grpc.RpcError as exc:
        code = exc.code() if callable(getattr(exc, "code", None)) else None
        reason = code.name if isinstance(code, grpc.StatusCode) else "no answer"
        raise AuditRecordFailedError(
            f"The audit service did not record {event_type} of {credential} ({reason}):"
            " nothing was changed."
        ) from None


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
    record_credential_event(
        args,
        "signing_key_generated",
        f"signing-key:{args.kid}",
        {"kid": args.kid, "bound_subject": args.subject or "", "public_key": jwk["x"]},
    )
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
    record_credential_event(
        args,
        "jwks_published",
        f"jwks:{path.name}",
        {
            "added": [str(k["kid"]) for k in keys[len(keys) - len(args.add) :]],
            "removed": list(args.remove),
            "kids": [str(k["kid"]) for k in keys],
        },
    )
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


def _secret_id(value: str) -> str:
    """The label (``id=...``) of the newest secret of a rotated value: names it, reveals nothing."""
    options = value.split(",")[0].split(";")[1:]
    return next((o.strip()[3:] for o in options if o.strip().startswith("id=")), "")


def _rotate_webhook(args: argparse.Namespace) -> int:
    now = dt.datetime.now(dt.UTC)
    variable = f"MHV_WEBHOOK_SECRETS_{args.source.upper()}"
    audited = {"source": args.source, "overlap_hours": args.overlap_hours}
    if args.current is not None:
        value = rotated(args.source, args.current, overlap_hours=args.overlap_hours, now=now)
        record_credential_event(
            args,
            "webhook_secret_rotated",
            f"webhook-secret:{args.source}",
            {**audited, "secret_id": _secret_id(value), "applied": "printed"},
        )
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
    record_credential_event(
        args,
        "webhook_secret_rotated",
        f"webhook-secret:{args.source}",
        {**audited, "secret_id": _secret_id(hooks[args.source]), "applied": "local"},
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
    url = admin_url()
    record_credential_event(
        args, "db_password_rotated", f"db-password:{role}", {"slice": args.slice, "role": role}
    )
    password, ended = asyncio.run(rotate_db_password(url, role))
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
    audit = argparse.ArgumentParser(add_help=False)
    audit.add_argument(
        "--no-audit",
        action="store_true",
        help="do not record in the audit log: only before the deployment has an audit service",
    )
    keys = sub.add_parser("keys", help="token signing keys: generate, edit the JWKS")
    actions = keys.add_subparsers(dest="action", required=True)
    generate = actions.add_parser(
        "generate", help="a new signing key; its JWK on stdout", parents=[audit]
    )
    generate.add_argument("--kid", required=True, help="key id, e.g. admin-2026-05")
    generate.add_argument("--private-key", required=True, help="where to write it (0600)")
    generate.add_argument("--subject", help="bind it to one subject, e.g. service:task")
    generate.set_defaults(func=_keys_generate)
    jwks = actions.add_parser("jwks", help="add or remove verification keys", parents=[audit])
    jwks.add_argument("--file", required=True, help="the JWKS file (MHV_AUTH_JWKS_FILE)")
    jwks.add_argument("--add", action="append", default=[], help="a JWK (file or JSON)")
    jwks.add_argument("--remove", action="append", default=[], help="a key id")
    jwks.set_defaults(func=_keys_jwks)

    secrets_ = sub.add_parser("secrets", help="rotate webhook secrets and database passwords")
    rotate = secrets_.add_subparsers(dest="action", required=True)
    webhook = rotate.add_parser(
        "rotate-webhook", help="a new webhook secret, old one overlapping", parents=[audit]
    )
    webhook.add_argument("--source", required=True, help="github, gitlab, generic, ...")
    webhook.add_argument("--current", help="current MHV_WEBHOOK_SECRETS_<SOURCE> value")
    webhook.add_argument(
        "--overlap-hours", type=float, default=24.0, help="0 when the secret leaked"
    )
    webhook.set_defaults(func=_rotate_webhook)
    database = rotate.add_parser(
        "rotate-db-password", help="a new password for a service role", parents=[audit]
    )
    database.add_argument("--slice", required=True, choices=list(SERVICE_SLICES))
    database.set_defaults(func=_rotate_db)
