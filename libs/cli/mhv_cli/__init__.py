"""The ``mhv`` command and the local-deployment tools behind it.

Its public surface is these modules:

===========  =====================================================================================
main         the ``mhv`` command (``up``, ``token``, ``migrate``, ``backup``, ``restore``, ...)
up           ``mhv up``: the whole system on one machine, in the foreground
devstate     the local deployment's state folder (``.mhv/``): keys, secrets, certificates, URLs
migrate      the migration runner: ordered up/down SQL per slice, a lock, checksums, roles
pgcluster    a private PostgreSQL cluster (the ``pgserver`` build or another), and `free_port`
entrypoint   the container image's entrypoint: ``task``, ``audit``, ``webhook`` or ``mhv ...``
backup       the backup repository (Barman): WAL streaming, base backups, the catalogue
restore      ``mhv restore``: a backup and its WAL into a new data folder, never over data
marks        count marks: row counts under write locks with a restore point, after each backup
verify       backup verification (``scripts/verify-backups.py``): restore and check
anchors      audit chain anchors kept outside the database; ``mhv audit``
credentials  rotating signing keys, webhook secrets, database passwords (``mhv keys/secrets``)
reindex      semantic search: whether a database offers it; ``mhv reindex`` (backfill, model switch)
===========  =====================================================================================
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mhv_cli import (
        anchors,
        backup,
        credentials,
        devstate,
        entrypoint,
        main,
        marks,
        migrate,
        pgcluster,
        reindex,
        restore,
        up,
        verify,
    )

__all__ = [
    "anchors",
    "backup",
    "credentials",
    "devstate",
    "entrypoint",
    "main",
    "marks",
    "migrate",
    "pgcluster",
    "reindex",
    "restore",
    "up",
    "verify",
]


def __getattr__(name: str) -> ModuleType:
    # Modules load on first use: ``python -m mhv_cli.main`` must not find `main` imported
    # already, and ``mhv token`` should not pay for what ``mhv up`` needs.
    if name in __all__:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
