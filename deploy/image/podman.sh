#!/usr/bin/env bash
# podman as this project runs it without a daemon: runtime runc, cgroupfs, the host's network, and explicit
# ulimits within the host's hard limits (podman's defaults exceed a sandbox's, and runc then refuses to start).
#   deploy/image/podman.sh build ... | run ... | images ...
set -euo pipefail

conf=${GATE_CONTAINERS_CONF:-${TMPDIR:-/tmp}/gate-containers.conf}
nofile=$(ulimit -Hn)
nproc=$(ulimit -Hu)
[[ $nofile == unlimited || $nofile -gt 65536 ]] && nofile=65536
[[ $nproc == unlimited || $nproc -gt 4096 ]] && nproc=4096  # buildah's chroot runs cap it at 32768; Gate needs few

cat >"$conf.$$" <<CONF
# Written by deploy/image/podman.sh.
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]
netns = "host"
log_driver = "k8s-file"

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF
mv "$conf.$$" "$conf"
export CONTAINERS_CONF=$conf
exec podman "$@"
