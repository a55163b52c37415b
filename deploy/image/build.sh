#!/usr/bin/env bash
# Builds Gate's image with podman (buildah inside, no daemon): deploy/image/build.sh [TAG]
# Makes the local base image first when it is absent (deploy/image/base.sh), builds with --isolation chroot and
# the host's network, and lets pip in the build stage trust the host's CA bundle (for TLS-inspecting egress
# proxies) through a build-time mount that never reaches the image.
set -euo pipefail
cd "$(dirname "$0")/../.."

TAG=${1:-localhost/gate:latest}
BASE_IMAGE=${GATE_BASE_IMAGE:-localhost/gate-base:bookworm}
HOST_CA=${HOST_CA:-/etc/ssl/certs/ca-certificates.crt}

GATE_BASE_IMAGE=$BASE_IMAGE deploy/image/base.sh
mounts=()
[[ -r $HOST_CA ]] && mounts=(--volume "$HOST_CA:/etc/ssl/certs/ca-certificates.crt:ro")
deploy/image/podman.sh build \
  --isolation chroot --network host --format docker --layers \
  --build-arg "BASE_IMAGE=$BASE_IMAGE" "${mounts[@]}" \
  --tag "$TAG" .
# Each source change leaves the previous build's layers untagged (a few hundred MB); keep a day's worth as cache.
deploy/image/podman.sh image prune --force --filter until=24h >/dev/null || true
