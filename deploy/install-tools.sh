#!/usr/bin/env bash
# Installs tools the test suite and `mhv` run for real, each only when missing.
#
#   deploy/install-tools.sh           Debian packages: by default Prometheus 2.42 (with promtool)
#                                     and Alertmanager 0.25 (with amtool); another script may
#                                     ask for other tools and packages the same way, through
#                                     INSTALL_TOOLS and INSTALL_PACKAGES
#                                     (deploy/container/install-build-tools.sh).
#   deploy/install-tools.sh backup    Barman 3.19 (the PostgreSQL backup engine behind
#                                     `mhv backup` / `mhv restore`) in its own virtual
#                                     environment, .tools/barman/ (MHV_TOOLS_DIR moves it), from
#                                     the hashed lock deploy/backup/requirements.lock; and from
#                                     Debian: gpg (backup encryption) and, to build psycopg2,
#                                     gcc and libpq-dev.
#
# The monitoring packages' daemons are not needed (tests start their own processes on free
# ports with temporary storage); whether the package manages to start them does not matter.
#
# Why Barman from PyPI and not Debian's pgBackRest 2.45 or Barman 3.4: the private PostgreSQL
# is 16, which pgBackRest learnt in 2.46 ("unexpected control version = 1300"), and Barman
# learnt backup encryption in 3.14 and `restore --partial-wal` (zero data loss) later still.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3.11}

fail() {
    echo "error: $1" >&2
    exit 1
}

as_root=()
need_root() {
    command -v apt-get >/dev/null 2>&1 || fail "apt-get is not available; install $* yourself"
    if [[ $(id -u) -eq 0 ]]; then
        as_root=()
    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        as_root=(sudo)
    else
        fail "not root and sudo needs a password or is missing; install the Debian packages $*"
    fi
}

apt_install() {
    need_root "$@"
    echo "installing Debian packages: $*"
    # Waits for a concurrent apt/dpkg run instead of failing on its lock; a stale package
    # index is the usual reason the first attempt fails.
    local install=("${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get
        -o DPkg::Lock::Timeout=300 install -y -q --no-install-recommends "$@")
    "${install[@]}" || { "${as_root[@]}" apt-get -o DPkg::Lock::Timeout=300 update -q \
        && "${install[@]}"; } || fail "apt-get install $* failed"
}

debian_tools() {
    local tools packages missing=() tool
    read -r -a tools <<<"${INSTALL_TOOLS:-promtool prometheus amtool prometheus-alertmanager}"
    read -r -a packages <<<"${INSTALL_PACKAGES:-prometheus prometheus-alertmanager}"
    for tool in "${tools[@]}"; do
        command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
    done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    echo "missing: ${missing[*]}"
    apt_install "${packages[@]}"
    for tool in "${tools[@]}"; do
        command -v "$tool" >/dev/null 2>&1 || fail "$tool still missing after installing"
    done
}

backup() {
    local venv=${MHV_TOOLS_DIR:-$root/.tools}/barman
    local lock=$root/deploy/backup/requirements.lock
    local stamp
    stamp=$venv/.installed-$(sha256sum "$lock" | cut -c1-16)
    local packages=()
    command -v gpg >/dev/null 2>&1 || packages+=(gpg)
    if [[ ! -e $stamp ]]; then
        command -v gcc >/dev/null 2>&1 || packages+=(gcc)
        command -v pg_config >/dev/null 2>&1 || packages+=(libpq-dev)
    fi
    [[ ${#packages[@]} -eq 0 ]] || apt_install "${packages[@]}"
    [[ -e $stamp ]] && return 0
    command -v "$python" >/dev/null 2>&1 || fail "$python is required to install Barman"
    echo "installing Barman into $venv"
    rm -rf "$venv"
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --require-hashes \
        -r "$lock" || fail "pip could not install $lock into $venv"
    "$venv/bin/barman" --version >/dev/null || fail "$venv/bin/barman does not run"
    touch "$stamp"
}

case "${1:-}" in
    "") debian_tools ;;
    backup) backup ;;
    *) fail "unknown target '$1' (no argument: Debian tools; backup: Barman)" ;;
esac
