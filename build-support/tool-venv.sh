#!/usr/bin/env bash
# tool-venv.sh NAME KEY=PATH CHECK PIN... : a venv of tools kept out of the project's lockfiles
# (test servers, a PyTorch reference), shared by hf-venv.sh, mlflow-venv.sh and moto-venv.sh.
#
# Makes ${RTDLM_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/rtdlm-tools}/NAME-venv, installs
# each PIN with its own pip call, in order, checks it with `python -c CHECK`, and prints
# KEY=<the venv>/PATH as its last line. Running it again with the same pins installs nothing.
# TOOL_PYTHON=3.11 asks for that Python version (python3.11, else a python3 that is 3.11).
set -euo pipefail

name="$1" out="$2" check="$3"
shift 3
pins=("$@")
tools_dir="${RTDLM_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/rtdlm-tools}"
venv="$tools_dir/$name-venv"
stamp="$venv/rtdlm-pins"
say() { echo "$name-venv: $*" >&2; }

if [ "$(cat "$stamp" 2>/dev/null)" != "${pins[*]}" ]; then
  python=python3
  if [ -n "${TOOL_PYTHON:-}" ]; then
    python=""
    for candidate in "python$TOOL_PYTHON" python3; do
      if command -v "$candidate" >/dev/null \
        && [ "$("$candidate" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" = "$TOOL_PYTHON" ]; then
        python="$candidate"
        break
      fi
    done
    [ -n "$python" ] || { say "error: needs a Python $TOOL_PYTHON; install one"; exit 1; }
  fi
  say "making $venv with ${pins[*]}"
  rm -rf "$venv"
  mkdir -p "$tools_dir"
  "$python" -m venv "$venv"
  for pin in "${pins[@]}"; do
    "$venv/bin/pip" install --quiet --disable-pip-version-check "$pin"
  done
  echo "${pins[*]}" > "$stamp"
fi
"$venv/bin/python" -c "$check" || { say "error: $venv is broken; delete it"; exit 1; }
echo "${out%%=*}=$venv/${out#*=}"
