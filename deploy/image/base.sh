#!/usr/bin/env bash
# Makes the base image the Dockerfile builds FROM when no image registry is reachable: Debian bookworm (minbase)
# with python3, python3-venv, CA certificates and binutils (strip), made by debootstrap from Debian's package
# mirror and imported with podman. Only the build stage runs on it: the final image is assembled from scratch.
#
#   deploy/image/base.sh            # no-op when the image exists; else imports the cached root file system,
#                                   # else bootstraps it (1-3 minutes) and caches it for next time
#
# The root file system is cached as a tarball outside the repository (GATE_BASE_CACHE, default
# /var/cache/gate-image-base), so a wiped container store costs a 10-second import, not a new bootstrap.
# Where a registry is reachable, any Debian bookworm with these packages will do (--build-arg BASE_IMAGE=...).
set -euo pipefail

IMAGE=${GATE_BASE_IMAGE:-localhost/gate-base:bookworm}
CACHE=${GATE_BASE_CACHE:-/var/cache/gate-image-base}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm
PACKAGES=python3,python3-venv,ca-certificates,binutils
VERSION=2  # bump with PACKAGES: an older cached base is then made again
TARBALL=$CACHE/$SUITE-python3-v$VERSION.tar

log() { echo "gate-base: $*" >&2; }

podman() { "$(dirname "$0")/podman.sh" "$@"; }

if podman image exists "$IMAGE" &&
  [[ $(podman image inspect --format '{{ index .Labels "gate.base.version" }}' "$IMAGE") == "$VERSION" ]]; then
  exit 0
fi

if [[ ! -s $TARBALL ]]; then
  command -v debootstrap >/dev/null || { log "debootstrap is not installed (apt-get install debootstrap)"; exit 1; }
  [[ $(id -u) == 0 ]] || { log "debootstrap needs root"; exit 1; }
  mkdir -p "$CACHE"
  root=$(mktemp -d "$CACHE/rootfs.XXXXXX")
  trap 'rm -rf "$root"' EXIT
  started=$SECONDS
  log "bootstrapping Debian $SUITE into $root from $MIRROR (once; cached in $TARBALL)"
  # python3-venv brings ensurepip (the build stage's pip), binutils the strip for the wheels' shared objects.
  debootstrap --variant=minbase --include="$PACKAGES" \
    "$SUITE" "$root" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 \
    || { log "debootstrap failed; see $CACHE/debootstrap.log"; exit 1; }
  # Trim what a container never reads: package lists and caches, manuals, translations, docs (licences kept).
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* "$root"/var/cache/debconf/*-old \
    "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/usr/share/locale/* "$root"/var/log/*
  find "$root"/usr/share/doc -mindepth 1 -not -name copyright -not -type d -delete
  tar -C "$root" --numeric-owner -cf "$TARBALL.tmp" .
  mv "$TARBALL.tmp" "$TARBALL"
  find "$CACHE" -maxdepth 1 -name "$SUITE-python3*.tar" ! -name "$(basename "$TARBALL")" -delete  # older versions
  log "root file system ready in $((SECONDS - started)) s"
fi

log "importing $TARBALL as $IMAGE"
podman import --quiet \
  --change 'ENV LANG=C.UTF-8' \
  --change "LABEL gate.base.version=$VERSION" \
  --change 'CMD ["/bin/bash"]' \
  "$TARBALL" "$IMAGE" >/dev/null
