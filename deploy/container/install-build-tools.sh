#!/usr/bin/env bash
# Installs what `make image` builds and runs the container image with, from Debian's
# packages: mmdebstrap (the Debian 12 base root filesystems), buildah (runs the
# Containerfile), umoci and skopeo (copy and unpack OCI images), runc (runs the built image
# once) and podman (to run it by hand). Does nothing when they are already on PATH.
set -euo pipefail
INSTALL_TOOLS="mmdebstrap buildah umoci skopeo podman runc" \
    INSTALL_PACKAGES="mmdebstrap buildah umoci skopeo podman runc" \
    exec "$(dirname "$0")/../install-tools.sh"
