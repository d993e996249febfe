#!/usr/bin/env bash
# Two containers, one job: the CPU trainer image as two workers on a network of their own,
# configured as the Helm chart configures the pods of its Indexed Job (RTDLM_COORDINATOR_ADDRESS
# naming pod 0, RTDLM_NUM_PROCESSES, RTDLM_PROCESS_ID), the run dir on a volume both mount.
# A worker is killed (podman kill), then the coordinator: each time the other exits 1 within
# the heartbeat timeout with one line saying which process was lost, and the job, started
# again, resumes and ends on the loss of an uninterrupted job.
# Needs the trainer image (build-support/test-images.sh builds it; built here if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(build-support/install-container-tools.sh)"

fail() { echo "test-two-containers: FAIL: $*" >&2; exit 1; }
image_id() { python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["image_id"])' "$1"; }

[ -f dist/apps.trainer/image.docker-info.json ] || ./pants package apps/trainer:image
image="$(image_id dist/apps.trainer/image.docker-info.json)"

job="rtdlm-job-$$"
subnet="10.89.$(( RANDOM % 200 + 20 ))"
coordinator="$job-0.$job-workers"  # the chart's <job>-0.<headless service>:<port>
runs="$(mktemp -d)"
cleanup() {
  podman rm -f "$job-0" "$job-1" >/dev/null 2>&1 || true
  podman network rm "$job" >/dev/null 2>&1 || true
  rm -rf "$runs"
}
trap cleanup EXIT
chown 10001:10001 "$runs"
podman network create --subnet "$subnet.0/24" "$job" >/dev/null

args=(--preset tiny --batch-size 4 --seq-len 32 --set model.num_layers=1 --set model.d_model=64)
args+=(--set model.compute_dtype=float32 --no-metrics --eval-every 1000 --sample-tokens 0)
args+=(--peak-flops 1e12 --max-steps 60 --checkpoint-every 8 --heartbeat-timeout 5)

start_job() {  # start_job RUN: both workers, detached
  podman rm -f "$job-0" "$job-1" >/dev/null 2>&1 || true
  for i in 0 1; do
    podman run -d --name "$job-$i" --network "$job" --ip "$subnet.$(( 10 + i ))" \
      --add-host "$coordinator:$subnet.10" \
      -e RTDLM_COORDINATOR_ADDRESS="$coordinator:8476" -e RTDLM_NUM_PROCESSES=2 \
      -e RTDLM_PROCESS_ID="$i" -e HOME=/tmp \
      --read-only --cap-drop=ALL --security-opt=no-new-privileges --tmpfs /tmp \
      -v "$runs:/runs" "$image" "${args[@]}" --run-dir "/runs/$1" >/dev/null
  done
}
lines() { if [ -f "$runs/$1/steps.jsonl" ]; then wc -l < "$runs/$1/steps.jsonl"; else echo 0; fi; }
final_loss() { python3 -c 'import json, sys
print({json.loads(l)["step"]: json.loads(l)["loss"] for l in open(sys.argv[1])}[60])' "$runs/$1/steps.jsonl"; }
finish_job() {  # both workers exit 0
  for i in 0 1; do
    [ "$(podman wait "$job-$i")" = 0 ] || { podman logs "$job-$i" 2>&1 | tail -20; fail "worker $i of $1 failed"; }
  done
}
kill_after() {  # kill_after RUN STEPS VICTIM EXPECTED-LINE: the job started, STEPS steps on
  local run=$1 want=$(( $(lines "$1") + $2 )) victim=$3 expected=$4 survivor=$(( 1 - $3 ))
  start_job "$run"
  for _ in $(seq 1200); do [ "$(lines "$run")" -ge "$want" ] && break; sleep 0.25; done
  [ "$(lines "$run")" -ge "$want" ] || fail "$run did not train $2 steps"
  local step; step="$(tail -1 "$runs/$run/steps.jsonl" | python3 -c 'import json, sys; print(json.load(sys.stdin)["step"])')"
  podman kill "$job-$victim" >/dev/null
  local killed_at=$SECONDS
  code="$(timeout 60 podman wait "$job-$survivor")" || fail "worker $survivor still runs 60 s after worker $victim was killed"
  local took=$(( SECONDS - killed_at ))
  [ "$code" = 1 ] || fail "worker $survivor exited $code after worker $victim was killed, not 1"
  [ "$took" -le 20 ] || fail "worker $survivor took $took s to exit (heartbeat timeout 5 s)"
  said="$(podman logs "$job-$survivor" 2>&1 >/dev/null | grep -v '^\s*$' | tail -1)"
  errors="$(podman logs "$job-$survivor" 2>&1 >/dev/null | grep -c '^trainer: error:' || true)"
  [[ "$said" == "trainer: error: $expected"* ]] || fail "worker $survivor said: $said"
  [ "$errors" = 1 ] || fail "worker $survivor printed $errors error lines"
  echo "test-two-containers: killed worker $victim at step $step; worker $survivor exited 1 after $took s: $said"
}

start=$SECONDS
start_job straight
finish_job straight
kill_after job 12 1 "lost process 1 of 2 (no heartbeat for 5 s); "
kill_after job 12 0 "lost process 0 of 2, the coordinator (it stopped answering); "
start_job job
finish_job job
resumed="$(podman logs "$job-0" 2>/dev/null)"  # whole, then grep: grep -q would cut the pipe
grep -q "resumed from step" <<<"$resumed" || fail "the job started again did not resume"
python3 -c 'import math, sys; sys.exit(not math.isclose(float(sys.argv[1]), float(sys.argv[2]), rel_tol=1e-6))' \
  "$(final_loss job)" "$(final_loss straight)" \
  || fail "final loss $(final_loss job) after two losses, $(final_loss straight) uninterrupted"
echo "test-two-containers: ok in $(( SECONDS - start )) s: two workers on their own network, a worker and then the coordinator killed, resumed to the uninterrupted loss $(final_loss straight)"
