#!/usr/bin/env bash
# Makes the base image the Dockerfile builds FROM when no image registry is reachable: Debian bookworm (minbase)
# with python3 and CA certificates, made by debootstrap from Debian's package mirror and imported with podman.
#
#   deploy/image/base.sh            # no-op when the image exists; else imports the cached root file system,
#                                   # else bootstraps it (1-3 minutes) and caches it for next time
#
# The root file system is cached as a tarball outside the repository (GATE_BASE_CACHE, default
# /var/cache/gate-image-base), so a wiped container store costs a 10-second import, not a new bootstrap.
# Where a registry is reachable, build FROM python:3.11-slim-bookworm instead (see the README); the Dockerfile
# uses only python3 and python3-venv from its base.
set -euo pipefail

IMAGE=${GATE_BASE_IMAGE:-localhost/gate-base:bookworm}
CACHE=${GATE_BASE_CACHE:-/var/cache/gate-image-base}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm
TARBALL=$CACHE/$SUITE-python3.tar

log() { echo "gate-base: $*" >&2; }

if podman image exists "$IMAGE"; then
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
  # python3-venv brings ensurepip (the build stage's pip); nothing here compiles anything.
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    "$SUITE" "$root" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 \
    || { log "debootstrap failed; see $CACHE/debootstrap.log"; exit 1; }
  # Trim what a container never reads: package lists and caches, manuals, translations, docs (licences kept).
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* "$root"/var/cache/debconf/*-old \
    "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/usr/share/locale/* "$root"/var/log/*
  find "$root"/usr/share/doc -mindepth 1 -not -name copyright -not -type d -delete
  tar -C "$root" --numeric-owner -cf "$TARBALL.tmp" .
  mv "$TARBALL.tmp" "$TARBALL"
  log "root file system ready in $((SECONDS - started)) s"
fi

log "importing $TARBALL as $IMAGE"
podman import --quiet \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["/bin/bash"]' \
  "$TARBALL" "$IMAGE" >/dev/null
