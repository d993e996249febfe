#!/usr/bin/env bash
# infra/docker-compose.yml run by a real engine: Debian's docker-compose, talking to podman's
# Docker API, starts the `training-cpu` service exactly as the file defines it (its command,
# metrics on 0.0.0.0:8000, healthcheck, read-only root, uid 10001, named volumes) for a few tiny
# steps, with only RTDLM_RUN and RTDLM_ARGS set. It must answer its healthcheck, exit 0 and leave
# a checkpoint in the `runs` volume. Needs the CPU image, built by Pants:
# ./pants package apps/trainer:image (build-support/test-images.sh builds it).
# Not Debian's podman-compose 1.0.3: it ignores profiles, rejects per-network aliases, starts
# every service on `run` and drops exit codes.
#   --install-only: just install docker-compose (tests/test_compose.py uses its schema and parser).
set -euo pipefail
cd "$(dirname "$0")/.."

fail() { echo "test-compose: FAIL: $*" >&2; exit 1; }
sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
if ! command -v docker-compose >/dev/null; then
  echo "test-compose: installing docker-compose from Debian" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
    docker-compose >/dev/null
fi
if [ "${1:-}" = --install-only ]; then
  echo "test-compose: $(docker-compose version --short)"
  exit 0
fi
eval "$(build-support/install-container-tools.sh)"  # podman, its Docker API: DOCKER_HOST

image=ghcr.io/auralithai/rt-dlm:train-cpu-latest
podman image exists "$image" || fail "no $image: build it with ./pants package apps/trainer:image"

start=$(date +%s)
project="rtdlm-compose-test-$$"
name="${project}-trainer"
log="$(mktemp)"
compose() { docker-compose -p "$project" -f infra/docker-compose.yml --profile cpu "$@"; }
cleanup() {
  compose down --volumes --remove-orphans >/dev/null 2>&1 || true
  podman rm -f "$name" >/dev/null 2>&1 || true
  podman volume ls -q --filter "label=com.docker.compose.project=$project" \
    | xargs -r podman volume rm -f >/dev/null 2>&1 || true
  podman network rm -f "${project}_default" >/dev/null 2>&1 || true
  rm -f "$log"
}
trap cleanup EXIT

# Only the run's name and length change; everything else is the compose file's own.
export RTDLM_TAG=latest RTDLM_RUN=smoke
export RTDLM_ARGS="--max-steps 3 --batch-size 4 --eval-every 3 --checkpoint-every 3 --sample-tokens 0"
compose run -d --name "$name" training-cpu >"$log" 2>&1 || { cat "$log"; fail "docker-compose run"; }

# While it trains: the healthcheck (the image's Python fetching /metrics; podman runs it on
# demand, as no systemd timers run here) passes, and the exporter answers on the container's
# network address, where Prometheus scrapes it, not only on its loopback.
healthy=no scraped=no
while [ "$(podman inspect "$name" --format '{{.State.Running}}')" = true ]; do
  if podman healthcheck run "$name" >/dev/null 2>&1; then
    healthy=yes
    ip="$(podman inspect "$name" --format '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}')"
    python3 -c 'import sys, urllib.request as u
sys.exit(b"\nrtdlm_training_steps_total{" not in u.urlopen(sys.argv[1], timeout=5).read())' \
      "http://$ip:8000/metrics" && scraped=yes
    break
  fi
  sleep 0.5
done
status="$(podman wait "$name")"
podman logs "$name" >"$log" 2>&1
tail -3 "$log"
[ "$status" = 0 ] || { cat "$log"; fail "training-cpu exited $status, expected 0"; }
[ "$healthy" = yes ] || fail "the healthcheck never passed while training ran"
grep -q '^done: 3 steps' "$log" || fail "the run did not finish 3 steps"
[ "$scraped" = yes ] || fail "no rtdlm metrics at the container's address, port 8000"

inspect() { podman inspect "$name" --format "$1"; }
[ "$(inspect '{{.Config.User}}')" = 10001:10001 ] || fail "not running as 10001:10001"
[ "$(inspect '{{.HostConfig.ReadonlyRootfs}}')" = true ] || fail "the root filesystem is writable"
[ "$(inspect '{{.EffectiveCaps}}')" = "[]" ] || fail "capabilities left: $(inspect '{{.EffectiveCaps}}')"

runs="$(podman volume inspect "${project}_runs" --format '{{.Mountpoint}}')"
[ -d "$runs/smoke/checkpoints/3" ] || fail "no checkpoint 3 in the runs volume"
[ "$(stat -c %u "$runs/smoke/checkpoints/3")" = 10001 ] || fail "checkpoint not owned by uid 10001"

# `up` then `stop`, as an operator does: SIGTERM, with the service's grace period to finish the
# step and checkpoint; on-failure must not restart a container that was stopped.
export RTDLM_RUN=sig RTDLM_ARGS="--max-steps 100000 --checkpoint-every 100000 --batch-size 4 --eval-every 3"
RTDLM_METRICS_PORT="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
export RTDLM_METRICS_PORT  # the published host port: any free one
compose up -d training-cpu >"$log" 2>&1 || { cat "$log"; fail "docker-compose up"; }
up="$(compose ps -q training-cpu)"
for _ in $(seq 240); do podman logs "$up" 2>&1 | grep -q '^step *3 |' && break; sleep 0.5; done
compose stop training-cpu >"$log" 2>&1 || { cat "$log"; fail "docker-compose stop"; }
podman logs "$up" >"$log" 2>&1
tail -1 "$log"
stopped="$(podman inspect "$up" --format '{{.State.Status}} {{.RestartCount}} exit {{.State.ExitCode}}')"
# 143: unfinished (a Job or `restart: on-failure` would start it again); not restarted: stopped.
[ "$stopped" = "exited 0 exit 143" ] || fail "stop: $stopped; expected exited, never restarted, exit 143"
grep -q '^stopped by SIGTERM after step' "$log" || fail "stop: the trainer did not stop on SIGTERM"
saved="$(ls "$runs/sig/checkpoints" | grep -E '^[0-9]+$' | tail -1)"
[ -n "$saved" ] || fail "stop: no checkpoint written"

echo "test-compose: ok (training-cpu via docker-compose on podman: healthy, 3 steps, checkpoint 3" \
  "in the runs volume; stopped, it checkpointed step $saved, ${stopped#* * }; $(( $(date +%s) - start )) s)"
