#!/usr/bin/env bash
# A Python with transformers and a CPU build of PyTorch, for `exporter hf`'s check and the
# Hugging Face interop tests. Kept out of the project's lockfiles: PyTorch is several GB where a
# plain requirement pulls its CUDA build, and nothing we ship imports it.
#
# Makes ${RTDLM_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/rtdlm-tools}/hf-venv with Python 3.11
# (the CPU wheel of torch 2.13.0 these machines carry is for 3.11; elsewhere pip fetches it from
# PyTorch's CPU index if you add --index-url https://download.pytorch.org/whl/cpu), and prints
# python=<its interpreter> as its last line: pass that as `exporter hf --hf-python` or set
# RTDLM_HF_PYTHON. torch is installed first and alone: asked for by transformers' extras, pip
# would take a CUDA build.
set -euo pipefail
TOOL_PYTHON=3.11 exec "$(dirname "$0")/tool-venv.sh" hf python=bin/python \
  "import torch, transformers" torch==2.13.0 transformers==5.25.0
