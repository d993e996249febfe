#!/usr/bin/env bash
# Proves the dependency rules are enforced by Pants: a lib that imports another lib it may not
# use must make Pants fail with a visibility error. Adds a probe file, asks Pants for its
# dependencies, and removes the probe whatever happens.
set -euo pipefail
cd "$(dirname "$0")/.."

probe_forbidden() {  # FILE IMPORT: Pants must refuse FILE importing IMPORT.
  local file="$1" import="$2" out
  printf 'import %s  # probe: this import is forbidden\n' "$import" >"$file"
  trap 'rm -f "$file"' RETURN
  if out="$(./pants dependencies "$file" 2>&1)"; then
    echo "FAIL: Pants accepted '$import' in $file" >&2
    return 1
  fi
  if ! grep -q "DependencyRuleActionDeniedError\|violat" <<<"$out"; then
    echo "FAIL: Pants failed on $file, but not with a visibility error:" >&2
    echo "$out" >&2
    return 1
  fi
  echo "ok: '$import' in $file is refused:"
  grep -E "violat|->|DENY" <<<"$out" | head -4 | sed 's/^/    /'
}

probe_forbidden libs/rtdlm-model/src/rtdlm/model/_probe_forbidden.py rtdlm.train
probe_forbidden libs/rtdlm-data/src/rtdlm/data/_probe_forbidden.py rtdlm.model
probe_forbidden libs/rtdlm-ckpt/src/rtdlm/ckpt/_probe_forbidden.py rtdlm.model
probe_forbidden libs/rtdlm-export/src/rtdlm/export/_probe_forbidden.py rtdlm.train
probe_forbidden apps/exporter/src/rtdlm_exporter/_probe_forbidden.py rtdlm.train
probe_forbidden libs/rtdlm-train/src/rtdlm/train/_probe_forbidden.py rtdlm_trainer.main
