#!/usr/bin/env bash
# Publishing per changed target, checked the way publish.yml runs it (build-support/publish.sh):
# on a scripted git history in a scratch clone, each commit must select exactly the artifacts it
# touches; then one image and the chart go to a real local registry (Debian's docker-registry
# on 127.0.0.1), are pulled back and run, and republishing the same chart version is refused.
# Needs the container tools and helm (build-support/install-{container-tools,helm}.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(build-support/install-container-tools.sh)"
export RTDLM_HELM="${RTDLM_HELM:-$(build-support/install-helm.sh | sed -n 's/^helm=//p')}"
fail() { echo "test-publish: FAIL: $*" >&2; exit 1; }

work="$(mktemp -d)"
repo="$work/repo"
cleanup() {
  [ -n "${registry_pid:-}" ] && kill "$registry_pid" 2>/dev/null
  pkill -f "pantsd \[$repo\]" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
git clone -q . "$repo"
cd "$repo"
git config user.email ci@rtdlm.invalid && git config user.name "rtdlm ci"

# One commit per case: append a comment line to each file, then compare the plan for HEAD~1.
expect() {
  local name="$1" expected="$2" actual; shift 2
  for file in "$@"; do echo "# touched by test-publish" >>"$file"; done
  git commit -qam "test-publish: $name"
  actual="$(RTDLM_PUBLISH_WHEELS=1 build-support/publish.sh --plan HEAD~1 | sort | tr '\n' ' ')"
  echo "test-publish: $name -> ${actual:-nothing}"
  [ "$actual" = "$expected" ] || fail "$name selected '${actual}', expected '${expected}'"
}
images="apps/exporter:image apps/trainer:image apps/trainer:image-gpu"
expect "a lib both apps use (rtdlm-ckpt)" \
  "$images libs/rtdlm-ckpt:dist libs/rtdlm-export:dist libs/rtdlm-train:dist " \
  libs/rtdlm-ckpt/src/rtdlm/ckpt/retention.py
expect "a lib only the exporter uses (rtdlm-export)" \
  "apps/exporter:image libs/rtdlm-export:dist " \
  libs/rtdlm-export/src/rtdlm/export/quantize.py
expect "the chart only" "infra/helm/rtdlm:rtdlm " infra/helm/rtdlm/values.yaml
expect "a doc only" "" README.md infra/README.md
expect "the Dockerfile" "$images " infra/docker/app.Dockerfile
expect "the exporter app's BUILD and the chart" \
  "apps/exporter:image infra/helm/rtdlm:rtdlm " apps/exporter/BUILD infra/helm/rtdlm/Chart.yaml

# A real publish of the last commit's selection (the exporter image and the chart).
mkdir -p "$work/registry"
cat >"$work/registry.yml" <<CONF
version: 0.1
log: {level: warn}
storage: {filesystem: {rootdirectory: $work/registry}}
http: {addr: 127.0.0.1:5000}
CONF
docker-registry serve "$work/registry.yml" >"$work/registry.log" 2>&1 &
registry_pid=$!
for _ in $(seq 50); do curl -sf http://127.0.0.1:5000/v2/ >/dev/null && break; sleep 0.2; done
curl -sf http://127.0.0.1:5000/v2/ >/dev/null || fail "the local registry did not start: $(cat "$work/registry.log")"

export RTDLM_IMAGE_REGISTRY=127.0.0.1:5000/auralithai RTDLM_CHART_REGISTRY=oci://127.0.0.1:5000/charts
export RTDLM_VERSION=test
build-support/publish.sh HEAD~1
revision="$(git rev-parse HEAD)"
curl -sf http://127.0.0.1:5000/v2/auralithai/rt-dlm/tags/list | tee "$work/tags.json"; echo
for tag in export-test "export-$revision" export-latest; do
  grep -q "\"$tag\"" "$work/tags.json" || fail "tag $tag was not pushed"
done
grep -q '"train' "$work/tags.json" && fail "a trainer image was pushed, but nothing of it changed"
podman rmi -f "127.0.0.1:5000/auralithai/rt-dlm:export-$revision" >/dev/null 2>&1 || true
podman pull -q "127.0.0.1:5000/auralithai/rt-dlm:export-$revision" >/dev/null
podman run --rm "127.0.0.1:5000/auralithai/rt-dlm:export-$revision" --help >/dev/null \
  || fail "the pulled exporter image does not run"
mkdir -p "$work/pulled"
"$RTDLM_HELM" pull oci://127.0.0.1:5000/charts/rtdlm --version 0.1.0 -d "$work/pulled" >/dev/null 2>&1
"$RTDLM_HELM" template check "$work/pulled/rtdlm-0.1.0.tgz" >/dev/null || fail "the pulled chart does not render"

if out="$(build-support/publish.sh HEAD~1 2>&1)"; then fail "republishing chart 0.1.0 was not refused"; fi
grep -q "already in oci://127.0.0.1:5000/charts" <<<"$out" || fail "unclear refusal: $out"
echo "test-publish: ok (selection on 6 commits; exporter image and chart 0.1.0 pushed, pulled, run; republish refused)"
