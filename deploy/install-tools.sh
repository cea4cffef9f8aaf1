#!/usr/bin/env bash
# Installs the monitoring tools the test suite runs for real: Debian's Prometheus 2.42 (with
# promtool) and Alertmanager 0.25 (with amtool). Does nothing when they are already on PATH.
#
# The packages' daemons are not needed (tests start their own processes on free ports with
# temporary storage); whether the package manages to start them does not matter here.
set -euo pipefail

# Another script may ask for other tools and packages the same way
# (deploy/container/install-build-tools.sh).
read -r -a tools <<<"${INSTALL_TOOLS:-promtool prometheus amtool prometheus-alertmanager}"
read -r -a packages <<<"${INSTALL_PACKAGES:-prometheus prometheus-alertmanager}"

missing=()
for tool in "${tools[@]}"; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
[[ ${#missing[@]} -eq 0 ]] && exit 0

fail() {
    echo "error: ${missing[*]} not found and could not be installed ($1)." >&2
    echo "Install the Debian packages '${packages[*]}' (apt-get install ${packages[*]})," >&2
    echo "or put ${tools[*]} on PATH." >&2
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
    # Waits for a concurrent apt/dpkg run instead of failing on its lock.
    "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 \
        install -y -q --no-install-recommends "${packages[@]}"
}
# A stale package index is the usual reason the first attempt fails.
apt_install || { "${as_root[@]}" apt-get -o DPkg::Lock::Timeout=300 update -q && apt_install; } \
    || fail "apt-get install failed"

for tool in "${tools[@]}"; do
    command -v "$tool" >/dev/null 2>&1 || fail "$tool still missing after installing"
done
