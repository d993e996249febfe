#!/usr/bin/env bash
# An MLflow tracking server for the tracking tests (tests/test_tracking.py), in its own venv:
# the server (Flask, SQLAlchemy, pandas and the rest) is a service the trainer talks to over
# HTTP, not something it imports; the trainer's client is mlflow-skinny, in the lockfiles.
#
# Makes ${RTDLM_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/rtdlm-tools}/mlflow-venv and prints
# mlflow=<its mlflow command> as its last line (CI exports it as RTDLM_MLFLOW). Running it again
# with the same pin installs nothing. The pin matches the client's mlflow-skinny
# (3rdparty/python/cpu-requirements.txt).
set -euo pipefail

PIN=mlflow==3.17.2

tools_dir="${RTDLM_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/rtdlm-tools}"
venv="$tools_dir/mlflow-venv"
stamp="$venv/rtdlm-pin"

if [ "$(cat "$stamp" 2>/dev/null)" != "$PIN" ]; then
  echo "mlflow-venv: making $venv with $PIN" >&2
  rm -rf "$venv"
  mkdir -p "$tools_dir"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "$PIN"
  echo "$PIN" > "$stamp"
fi
"$venv/bin/mlflow" --version >/dev/null || { echo "mlflow-venv: $venv is broken; delete it" >&2; exit 1; }
echo "mlflow=$venv/bin/mlflow"
