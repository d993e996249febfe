#!/usr/bin/env bash
# The images, end to end, as a user runs them: Pants builds them (through podman's Docker API),
# then the CPU trainer image trains tiny as its own non-root user on a read-only root
# filesystem, writing checkpoints to a mounted folder; a second container resumes from them; a
# third is stopped with SIGTERM (what Kubernetes sends) and must checkpoint and exit 143.
# Needs a container engine: build-support/install-container-tools.sh (run here).
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(build-support/install-container-tools.sh)"

fail() { echo "test-images: FAIL: $*" >&2; exit 1; }
image_id() { python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["image_id"])' "$1"; }

start=$(date +%s)
./pants package apps/trainer:image apps/exporter:image
echo "test-images: both images built in $(( $(date +%s) - start )) s"
trainer="$(image_id dist/apps.trainer/image.docker-info.json)"
exporter="$(image_id dist/apps.exporter/image.docker-info.json)"
podman image ls --format '{{.Repository}}:{{.Tag}} {{.ID}} {{.Size}}' | grep -E "$trainer|$exporter"

# What the image says about itself.
inspect() { podman image inspect "$trainer" --format "$1"; }
[ "$(inspect '{{.Config.User}}')" = "10001:10001" ] || fail "the image's user is not 10001:10001"
[ "$(podman run --rm --entrypoint /usr/bin/id "$trainer" -un)" = rtdlm ] || fail "not running as rtdlm"
[ "$(inspect '{{index .Config.Labels "org.opencontainers.image.revision"}}')" = "$(git rev-parse HEAD)" ] \
  || fail "the revision label is not this commit"
inspect '{{json .Config.ExposedPorts}} {{json .Config.Volumes}}' | grep -q '8000/tcp.*/runs' \
  || fail "port 8000 or the /runs volume is not declared"
podman run --rm "$exporter" --help >/dev/null || fail "the exporter image does not start"

runs="$(mktemp -d)"
trap 'rm -rf "$runs"' EXIT
chown 10001:10001 "$runs"
# What a locked-down pod allows: read-only root, no capabilities, no privilege escalation.
run() {
  podman run --rm --read-only --cap-drop=ALL --security-opt=no-new-privileges \
    --tmpfs /tmp -v "$runs:/runs" "$@"
}
args=(--preset tiny --batch-size 4 --eval-every 3 --no-metrics)

run "$trainer" "${args[@]}" --run-dir /runs/tiny --checkpoint-every 3 --max-steps 6 | tee "$runs/first.log"
grep -q '^done: 6 steps' "$runs/first.log" || fail "the first run did not finish 6 steps"
[ -d "$runs/tiny/checkpoints/6" ] || fail "no checkpoint 6 in the mounted folder"
[ "$(stat -c %u "$runs/tiny/checkpoints/6")" = 10001 ] || fail "checkpoint not owned by uid 10001"

run "$trainer" "${args[@]}" --run-dir /runs/tiny --checkpoint-every 3 --max-steps 9 | tee "$runs/second.log"
grep -q 'resumed from step 6' "$runs/second.log" || fail "the second container did not resume from step 6"
grep -q '^done: 9 steps (3 this run' "$runs/second.log" || fail "the resumed run did not train steps 7 to 9"
python3 - "$runs/tiny/steps.jsonl" <<'PY' || fail "steps.jsonl is not steps 1..9 once each"
import json, sys
steps = [json.loads(line)["step"] for line in open(sys.argv[1])]
sys.exit(steps != list(range(1, 10)))
PY

# SIGTERM mid-run: checkpoint the step in hand and exit 143 (unfinished), so a Kubernetes Job
# starts the pod again, and that resumes from the checkpoint.
name="rtdlm-sigterm-$$"
podman run -d --name "$name" --read-only --cap-drop=ALL --security-opt=no-new-privileges \
  --tmpfs /tmp -v "$runs:/runs" "$trainer" "${args[@]}" --run-dir /runs/sig --max-steps 100000 --checkpoint-every 100000 >/dev/null
for _ in $(seq 240); do podman logs "$name" 2>&1 | grep -q '^step *3 |' && break; sleep 0.5; done
podman stop -t 120 "$name" >/dev/null
status="$(podman inspect "$name" --format '{{.State.ExitCode}}')"
podman logs "$name" 2>&1 | tail -3
podman rm "$name" >/dev/null
[ "$status" = 143 ] || fail "SIGTERM: exit code $status, expected 143"
ls "$runs/sig/checkpoints" | grep -qE '^[0-9]+$' || fail "SIGTERM: no checkpoint written"
echo "test-images: ok (build, non-root, read-only root, resume, SIGTERM checkpoint: $(ls "$runs/sig/checkpoints" | grep -E '^[0-9]+$' | tr '\n' ' '))"
