"""Point an unpacked image's OCI runtime config at one command, as Kubernetes would run it.

Usage: ``python3 smoke_config.py BUNDLE ARGS...`` (deploy/container/build-image.sh). Starts from
the image's own process (``BUNDLE/image-config.json``: user, entrypoint, environment), replaces
its CMD with ARGS, mounts the root filesystem read-only with a fresh tmpfs on /tmp (the one
writable path the manifests declare) and gives it a network namespace of its own, with nothing
in it. Writes ``BUNDLE/config.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(bundle: Path, args: list[str]) -> None:
    """Write the runtime config of `bundle` for `args`."""
    config = json.loads((bundle / "image-config.json").read_text())
    config["root"]["readonly"] = True
    process = config["process"]
    entrypoint = process["args"][: process["args"].index("--help")]  # the image's CMD
    process["args"] = [*entrypoint, *args]
    process["terminal"] = False
    # A mount point inside the container, made fresh for this run (not a shared folder).
    tmp = "/tmp"  # noqa: S108
    mounts = [m for m in config["mounts"] if m["destination"] != tmp]
    options = ["nosuid", "nodev", "mode=1777"]
    mounts.append({"destination": tmp, "type": "tmpfs", "source": "tmpfs", "options": options})
    config["mounts"] = mounts
    namespaces = [n for n in config["linux"]["namespaces"] if n["type"] != "network"]
    config["linux"]["namespaces"] = [*namespaces, {"type": "network"}]
    (bundle / "config.json").write_text(json.dumps(config))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
