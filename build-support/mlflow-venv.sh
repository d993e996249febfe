#!/usr/bin/env bash
# An MLflow tracking server for the tracking tests (tests/test_tracking.py), in its own venv:
# the server (Flask, SQLAlchemy, pandas and the rest) is a service the trainer talks to over
# HTTP, not something it imports; the trainer's client is mlflow-skinny, in the lockfiles.
#
# Makes ${RTDLM_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/rtdlm-tools}/mlflow-venv and prints
# mlflow=<its mlflow command> as its last line (CI exports it as RTDLM_MLFLOW). The pin matches
# the client's mlflow-skinny (3rdparty/python/cpu-requirements.txt).
set -euo pipefail
exec "$(dirname "$0")/tool-venv.sh" mlflow mlflow=bin/mlflow "import mlflow.server" mlflow==3.17.2
