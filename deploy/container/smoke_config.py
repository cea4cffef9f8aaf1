"""Point an unpacked image's OCI runtime config at one command, as Kubernetes would run it.

Usage: ``python3 smoke_config.py BUNDLE ARGS...`` (deploy/container/build-image.sh). Starts from
the image's own process (``BUNDLE/image-config.json``: user, entrypoint, environment), replaces
its CMD with ARGS, mounts the root filesystem read-only with a fresh tmpfs on /tmp (the one
writable path the manifests declare) and gives it a network namespace of its own, with nothing
in it. Writes ``BUNDLE/config.json``. deploy/container/smoke_serve.py uses `write_config` with
extra variables, read-only bind mounts and the host's network.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path


def write_config(
    bundle: Path,
    args: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    mounts: Mapping[Path, str] | None = None,
    host_network: bool = False,
) -> None:
    """Write the runtime config of `bundle` for `args`.

    Args:
        bundle: The unpacked image (umoci unpack), with its original config saved as
            ``image-config.json``.
        args: What replaces the image's CMD.
        env: Variables added to (or replacing) the image's.
        mounts: Host folder -> container path, mounted read-only.
        host_network: Share the host's network (to reach a database on its loopback) instead
            of an empty network namespace.
    """
    config = json.loads((bundle / "image-config.json").read_text())
    config["root"]["readonly"] = True
    process = config["process"]
    entrypoint = process["args"][: process["args"].index("--help")]  # the image's CMD
    process["args"] = [*entrypoint, *args]
    process["terminal"] = False
    variables = dict(v.split("=", 1) for v in process["env"])
    variables.update(env or {})
    process["env"] = [f"{k}={v}" for k, v in variables.items()]
    # A mount point inside the container, made fresh for this run (not a shared folder).
    tmp = "/tmp"  # noqa: S108
    config_mounts = [m for m in config["mounts"] if m["destination"] != tmp]
    options = ["nosuid", "nodev", "mode=1777"]
    config_mounts.append(
        {"destination": tmp, "type": "tmpfs", "source": "tmpfs", "options": options}
    )
    for source, destination in (mounts or {}).items():
        config_mounts.append(
            {
                "destination": destination,
                "type": "bind",
                "source": str(source),
                "options": ["rbind", "ro", "nosuid", "nodev"],
            }
        )
    config["mounts"] = config_mounts
    namespaces = [n for n in config["linux"]["namespaces"] if n["type"] != "network"]
    if not host_network:
        namespaces.append({"type": "network"})
    config["linux"]["namespaces"] = namespaces
    (bundle / "config.json").write_text(json.dumps(config))


if __name__ == "__main__":
    write_config(Path(sys.argv[1]), sys.argv[2:])
