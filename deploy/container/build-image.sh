#!/usr/bin/env bash
# `make image`: builds deploy/container/Containerfile with buildah where no container registry
# is reachable, runs the built image (the command line, a service refusing a bad
# configuration, then `mhv migrate` and a service serving on a real PostgreSQL, probed and
# stopped), and prints the image's size.
#
# The Containerfile's bases (python:3.11-slim-bookworm to build, distroless python3-debian12 to
# run) come from registries. Here both are made from Debian 12 packages with mmdebstrap instead,
# the same distribution and Python 3.11:
#
#   build base    Debian 12 + python3 + pip          (the build stage installs the wheels)
#   runtime base  Debian 12 essentials + python3, with dpkg removed and the user 65532 added,
#                 as distroless has (distroless also has no shell; this stand-in keeps the
#                 essential set's)
#
# and passed as BUILD_IMAGE and RUNTIME_IMAGE. The wheels still come from PyPI, checked against
# the lock's hashes. Everything lives under $MHV_IMAGE_WORK (default .mhv/image, git-ignored),
# in a container storage of its own; the bases are made once and reused.
#
# Output: an OCI archive, $MHV_IMAGE_WORK/mahavishnu-<version>.oci.tar, loadable with
# `skopeo copy oci-archive:... docker://<registry>/mahavishnu:<version>` or `podman load`.
set -euo pipefail

cd "$(dirname "$0")/../.."
work=${MHV_IMAGE_WORK:-.mhv/image}
mkdir -p "$work"
work=$(cd "$work" && pwd)
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml | head -1)
revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)
image=localhost/mahavishnu:$version

./deploy/container/install-build-tools.sh

store=(--root "$work/storage" --runroot "$work/run" --storage-driver "${MHV_STORAGE_DRIVER:-vfs}")
say() { printf 'image: %s\n' "$*"; }

# --- the two bases, from Debian 12 --------------------------------------------------------
# Each base is made once per set of options and imported into the storage as
# localhost/mahavishnu-<name>:<hash of its options>.
base() {  # name, then mmdebstrap options
    local name=$1
    shift
    local key
    key=$(printf '%s\n' "$@" | sha256sum | cut -c1-12)
    local tar=$work/$name-$key.tar ref=localhost/mahavishnu-$name:$key
    if [[ ! -s "$tar" ]]; then
        say "making the $name base with mmdebstrap (once)"
        mmdebstrap --quiet --mode=root --format=tar "$@" bookworm "$tar.part"
        mv "$tar.part" "$tar"
    fi
    if ! buildah "${store[@]}" inspect --type image "$ref" >/dev/null 2>&1; then
        say "importing the $name base"
        local ctr
        ctr=$(buildah "${store[@]}" from scratch)
        buildah "${store[@]}" add "$ctr" "$tar" / >/dev/null
        buildah "${store[@]}" config \
            --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$ctr"
        buildah "${store[@]}" commit --quiet --rm "$ctr" "$ref" >/dev/null
    fi
    eval "${name//-/_}=\$ref"
}
base build-base --variant=apt --include=python3,python3-pip,ca-certificates
# Like distroless (python3-debian12 sits on its cc image, which has libstdc++): Python, the C++
# runtime grpcio links, CA certificates, time zones; the user 65532 (nonroot); no dpkg.
base runtime-base --variant=essential \
    --include=python3,libstdc++6,ca-certificates,tzdata,netbase \
    --customize-hook='echo "nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin" >> "$1/etc/passwd"' \
    --customize-hook='echo "nonroot:x:65532:" >> "$1/etc/group"' \
    --customize-hook='mkdir -p "$1/home/nonroot" && chown 65532:65532 "$1/home/nonroot"' \
    --customize-hook='rm -f "$1"/usr/bin/dpkg* "$1"/usr/sbin/dpkg* "$1"/usr/bin/apt*' \
    --customize-hook='rm -rf "$1"/var/cache/* "$1"/var/lib/apt/lists/* "$1"/usr/share/doc/* "$1"/usr/share/man/*'

# --- the image --------------------------------------------------------------------------
say "building $image (revision $revision)"
# RUN steps see this machine's CA bundle: the way to PyPI may pass a TLS-inspecting proxy
# that only the host's bundle trusts. The image itself keeps its own bundle.
buildah "${store[@]}" build --quiet --isolation chroot --layers=false \
    --volume /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro \
    -f deploy/container/Containerfile \
    --build-arg BUILD_IMAGE="$build_base" --build-arg RUNTIME_IMAGE="$runtime_base" \
    --build-arg VERSION="$version" --build-arg REVISION="$revision" \
    -t "$image" . >/dev/null
rm -rf "$work/oci" "$work/bundle"
buildah "${store[@]}" push --quiet "$image" "oci:$work/oci:$version"
archive=$work/mahavishnu-$version.oci.tar
rm -f "$archive"
skopeo copy --quiet "oci:$work/oci:$version" "oci-archive:$archive:$version"

umoci unpack --image "$work/oci:$version" "$work/bundle" >/dev/null
cp "$work/bundle/config.json" "$work/bundle/image-config.json"

# The bundle's config is the image's own process: user, entrypoint, environment. Run it with
# runc, the root filesystem read-only, /tmp a fresh tmpfs, no network; the arguments replace
# the image's CMD, as a Deployment's `args` do.
run_image() {  # expected exit status, then the arguments
    local expect=$1
    shift
    say "running the image with: $*"
    python3 deploy/container/smoke_config.py "$work/bundle" "$@"
    local status=0
    runc run --bundle "$work/bundle" "mahavishnu-smoke-$$" >"$work/run.log" 2>&1 || status=$?
    sed 's/^/    /' "$work/run.log"
    if [[ $status -ne $expect ]]; then
        echo "error: expected exit status $expect, got $status" >&2
        exit 1
    fi
}
# The command line, with the settings files baked into the image.
run_image 0 mhv validate-config
# A service: imports everything it runs with (grpc, asyncpg, cryptography, uvicorn), then
# refuses to start without its secrets and TLS, with an MHV code and status 1.
run_image 1 webhook
grep -q 'MHV-001' "$work/run.log" || { echo "error: no MHV-001 from the webhook" >&2; exit 1; }
# Anything else: usage, status 64.
run_image 64 serve
# Serving: mhv migrate, then the audit service on a real PostgreSQL, probed and stopped as
# Kubernetes would (MHV_SMOKE_DATABASE_URL, default the server on 127.0.0.1:5432).
.venv/bin/python deploy/container/smoke_serve.py "$work/bundle"

size=$(stat -c %s "$archive")
unpacked=$(du -sb "$work/bundle/rootfs" | cut -f1)
ours=$(du -sb "$work/bundle/rootfs/opt/mahavishnu" | cut -f1)
say "built $image: OCI archive $archive"
say "size: $((size / 1024 / 1024)) MiB compressed; $((unpacked / 1024 / 1024)) MiB unpacked," \
    "of which /opt/mahavishnu (code and wheels) $((ours / 1024 / 1024)) MiB"
