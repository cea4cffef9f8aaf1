"""The ``mhv`` command and the local-deployment tools behind it.

Its public surface is these modules:

==========  ======================================================================================
main        the ``mhv`` command (``up``, ``token``, ``migrate``, ``validate-config``, ...)
up          ``mhv up``: the whole system on one machine, in the foreground
devstate    the local deployment's state folder (``.mhv/``): keys, secrets, certificates, URLs
migrate     the migration runner: ordered up/down SQL per slice, a lock, checksums, roles
pgcluster   a private PostgreSQL cluster from the ``pgserver`` build, and `free_port`
entrypoint  the container image's entrypoint: ``task``, ``audit``, ``webhook`` or ``mhv ...``
==========  ======================================================================================
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mhv_cli import devstate, entrypoint, main, migrate, pgcluster, up

__all__ = ["devstate", "entrypoint", "main", "migrate", "pgcluster", "up"]


def __getattr__(name: str) -> ModuleType:
    # Modules load on first use: ``python -m mhv_cli.main`` must not find `main` imported
    # already, and ``mhv token`` should not pay for what ``mhv up`` needs.
    if name in __all__:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
