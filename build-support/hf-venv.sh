#!/usr/bin/env bash
# A Python with transformers and a CPU build of PyTorch, for `exporter hf`'s check and the
# Hugging Face interop tests. Kept out of the project's lockfiles: PyTorch is several GB where a
# plain requirement pulls its CUDA build, and nothing we ship imports it.
#
# Makes ${RTDLM_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/rtdlm-tools}/hf-venv with Python 3.11
# (the CPU wheel of torch 2.13.0 these machines carry is for 3.11; elsewhere pip fetches it from
# PyTorch's CPU index if you add --index-url https://download.pytorch.org/whl/cpu), and prints
# python=<its interpreter> as its last line: pass that as `exporter hf --hf-python` or set
# RTDLM_HF_PYTHON. Running it again with the same pins installs nothing.
set -euo pipefail

PINS=(torch==2.13.0 transformers==5.25.0)

tools_dir="${RTDLM_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/rtdlm-tools}"
venv="$tools_dir/hf-venv"
stamp="$venv/rtdlm-pins"
say() { echo "hf-venv: $*" >&2; }

if [ "$(cat "$stamp" 2>/dev/null)" != "${PINS[*]}" ]; then
  python=""
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null \
      && [ "$("$candidate" -c 'import sys; print(sys.version_info[:2] == (3, 11))')" = True ]; then
      python="$candidate"
      break
    fi
  done
  [ -n "$python" ] || { say "error: needs a Python 3.11 (the torch CPU wheel's); install one"; exit 1; }
  say "making $venv with ${PINS[*]}"
  rm -rf "$venv"
  mkdir -p "$tools_dir"
  "$python" -m venv "$venv"
  # torch first and alone: asked for by transformers' extras, pip would take a CUDA build
  "$venv/bin/pip" install --quiet --disable-pip-version-check "${PINS[0]}"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "${PINS[@]:1}"
  echo "${PINS[*]}" > "$stamp"
fi
"$venv/bin/python" -c 'import torch, transformers' || { say "error: $venv is broken; delete it"; exit 1; }
echo "python=$venv/bin/python"
