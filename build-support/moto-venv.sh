#!/usr/bin/env bash
# An S3-compatible server for the object-storage tests (tests/test_object_storage.py), in its
# own venv: moto's server mode is a service the trainer talks to over HTTP, like a bucket, not
# something it imports.
#
# Makes ${RTDLM_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/rtdlm-tools}/moto-venv and prints
# moto=<its moto_server command> as its last line (CI exports it as RTDLM_MOTO).
set -euo pipefail
exec "$(dirname "$0")/tool-venv.sh" moto moto=bin/moto_server "import moto.server" \
  "moto[server]==5.2.6"
