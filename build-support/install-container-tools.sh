#!/usr/bin/env bash
# A daemonless container engine for Pants' docker backend where no Docker daemon runs (CI here):
# podman (+ buildah, skopeo, runc) from Debian, a Debian bookworm base image made locally with
# debootstrap (no registry can be pulled from), Debian's docker-registry for publish tests, and
# podman's Docker API on a socket. Idempotent. Prints `export NAME=value` lines to eval:
#   eval "$(build-support/install-container-tools.sh)"
# after which `./pants package apps/trainer:image` builds with podman.
set -euo pipefail

readonly BASE_IMAGE=localhost/rtdlm-base:bookworm
state="${RTDLM_CONTAINER_STATE:-${XDG_CACHE_HOME:-$HOME/.cache}/rtdlm-containers}"
mkdir -p "$state"
log() { echo "install-container-tools: $*" >&2; }
sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"

if ! command -v podman >/dev/null || ! command -v debootstrap >/dev/null \
    || ! command -v docker-registry >/dev/null || ! command -v runc >/dev/null; then
  log "installing podman, runc, debootstrap and docker-registry from Debian"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
    podman buildah skopeo runc uidmap fuse-overlayfs debootstrap docker-registry \
    ca-certificates >/dev/null
fi
command -v docker >/dev/null || {
  log "no docker client on PATH: Pants' docker backend calls one (apt-get install docker.io, or"
  log "Docker's static client); podman's socket below is what it talks to"
  exit 1
}

# Our own engine settings, passed by variable, so the machine's files stay untouched:
# runc and cgroupfs work in unprivileged CI containers without systemd; a file event log.
cat >"$state/containers.conf" <<CONF
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF
# The local registry (publish tests) speaks plain HTTP.
cat >"$state/registries.conf" <<CONF
unqualified-search-registries = []
[[registry]]
location = "127.0.0.1:5000"
insecure = true
CONF
export CONTAINERS_CONF="$state/containers.conf" CONTAINERS_REGISTRIES_CONF="$state/registries.conf"

if ! podman image exists "$BASE_IMAGE"; then
  mirror="$(sed -n 's/^URIs: *\(http[^ ]*debian\)\/*$/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -1)"
  mirror="${mirror:-http://deb.debian.org/debian}"
  log "building $BASE_IMAGE with debootstrap from $mirror (about a minute)"
  rootfs="$(mktemp -d)"
  trap '$sudo rm -rf "$rootfs"' EXIT
  $sudo debootstrap --variant=minbase --include=python3,ca-certificates bookworm "$rootfs" "$mirror" >/dev/null
  $sudo rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  $sudo tar -C "$rootfs" -c . | podman import -q --change 'CMD ["/bin/bash"]' - "$BASE_IMAGE" >/dev/null
fi

socket="$state/podman.sock"
if ! DOCKER_HOST="unix://$socket" docker version >/dev/null 2>&1; then
  rm -f "$socket"
  # from /: the service outlives this shell, and a working directory removed later (a CI
  # clone, a worktree) makes every container it starts fail ("write child: broken pipe")
  (cd / && exec nohup podman system service --time=0 "unix://$socket") >"$state/podman-service.log" 2>&1 &
  for _ in $(seq 50); do
    DOCKER_HOST="unix://$socket" docker version >/dev/null 2>&1 && break
    sleep 0.2
  done
  DOCKER_HOST="unix://$socket" docker version >/dev/null || {
    log "podman's Docker API did not come up; its log:"; cat "$state/podman-service.log" >&2; exit 1; }
fi

log "$(podman --version), base image $BASE_IMAGE, Docker API at unix://$socket"
echo "export DOCKER_HOST=unix://$socket DOCKER_BUILDKIT=0 BASE_IMAGE=$BASE_IMAGE"
echo "export CONTAINERS_CONF=$CONTAINERS_CONF CONTAINERS_REGISTRIES_CONF=$CONTAINERS_REGISTRIES_CONF"
