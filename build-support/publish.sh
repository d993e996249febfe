#!/usr/bin/env bash
# Publishes what a change touched: the images, the Helm chart and (with RTDLM_PUBLISH_WHEELS=1,
# on version tags) the wheels whose own files, or anything they depend on, changed since BASE
# (Pants' --changed-since with --changed-dependents=transitive).
#   build-support/publish.sh --plan BASE   # print the selected targets only
#   build-support/publish.sh BASE          # build and push them
# Image tags: train[-cpu]-$RTDLM_VERSION, -<git sha>, -latest (apps/*/BUILD). A chart version,
# like a wheel version, is published once: a changed chart needs a new version in Chart.yaml.
# RTDLM_IMAGE_REGISTRY / RTDLM_CHART_REGISTRY replace pants.toml's registries (tests: a local one).
set -euo pipefail
cd "$(dirname "$0")/.."
die() { echo "publish: $*" >&2; exit 1; }

plan=false
if [ "${1:-}" = --plan ]; then plan=true; shift; fi
base="${1:?usage: build-support/publish.sh [--plan] BASE (the commit to compare against)}"
git rev-parse --verify -q "$base^{commit}" >/dev/null \
  || die "$base is not a commit in this clone (a shallow checkout? fetch with depth 0)"

types=docker_image,helm_chart
[ "${RTDLM_PUBLISH_WHEELS:-0}" = 1 ] && types+=,python_distribution
selection=(--changed-since="$base" --changed-dependents=transitive --filter-target-type="$types")
mapfile -t targets < <(./pants "${selection[@]}" list)
if $plan; then
  [ ${#targets[@]} -eq 0 ] || printf '%s\n' "${targets[@]}"
  exit 0
fi
[ ${#targets[@]} -gt 0 ] || { echo "publish: nothing publishable changed since $base"; exit 0; }

registries=()
if [ -n "${RTDLM_IMAGE_REGISTRY:-}" ]; then
  registries+=("--docker-registries={'ghcr': {'address': '$RTDLM_IMAGE_REGISTRY', 'default': True}}")
fi
chart_registry="${RTDLM_CHART_REGISTRY:-$(python3 -c 'import tomllib
print(tomllib.load(open("pants.toml", "rb"))["helm"]["registries"]["ghcr"]["address"])')}"
registries+=("--helm-registries={'ghcr': {'address': '$chart_registry', 'default': True}}")

for target in "${targets[@]}"; do
  chart="${target%%:*}/Chart.yaml"
  [ -f "$chart" ] || continue
  name="$(sed -n 's/^name: *//p' "$chart")" version="$(sed -n 's/^version: *//p' "$chart")"
  if "${RTDLM_HELM:-helm}" show chart "$chart_registry/$name" --version "$version" >/dev/null 2>&1; then
    die "chart $name $version is already in $chart_registry and $target changed since $base: raise 'version' in $chart"
  fi
done

echo "publish: ${targets[*]}"
./pants "${selection[@]}" "${registries[@]}" publish
