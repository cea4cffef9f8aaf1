#!/usr/bin/env bash
# Installs what `make image` builds the container image with, from Debian's packages:
# mmdebstrap (the Debian 12 base root filesystems), buildah (runs the Containerfile), umoci and
# skopeo (unpack and copy OCI images), runc (runs the built image once; podman for
# running it by hand). Does nothing
# when they are already on PATH.
set -euo pipefail

tools=(mmdebstrap buildah umoci skopeo podman runc)
packages=(mmdebstrap buildah umoci skopeo podman runc)

missing=()
for tool in "${tools[@]}"; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
[[ ${#missing[@]} -eq 0 ]] && exit 0

fail() {
    echo "error: ${missing[*]} not found and could not be installed ($1)." >&2
    echo "Install the Debian packages '${packages[*]}' (apt-get install ${packages[*]})." >&2
    exit 1
}

command -v apt-get >/dev/null 2>&1 || fail "apt-get is not available"
if [[ $(id -u) -eq 0 ]]; then
    as_root=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    as_root=(sudo)
else
    fail "not root and sudo needs a password or is missing"
fi

echo "installing ${packages[*]} for: ${missing[*]}"
apt_install() {
    "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 \
        install -y -q --no-install-recommends "${packages[@]}"
}
apt_install || { "${as_root[@]}" apt-get -o DPkg::Lock::Timeout=300 update -q && apt_install; } \
    || fail "apt-get install failed"

for tool in "${tools[@]}"; do
    command -v "$tool" >/dev/null 2>&1 || fail "$tool still missing after installing"
done
