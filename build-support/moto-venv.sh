#!/usr/bin/env bash
# An S3-compatible server for the object-storage tests (tests/test_object_storage.py), in its
# own venv: moto's server mode is a service the trainer talks to over HTTP, like a bucket, not
# something it imports.
#
# Makes ${RTDLM_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/rtdlm-tools}/moto-venv and prints
# moto=<its moto_server command> as its last line (CI exports it as RTDLM_MOTO). Running it
# again with the same pin installs nothing.
set -euo pipefail

PIN="moto[server]==5.2.6"

tools_dir="${RTDLM_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/rtdlm-tools}"
venv="$tools_dir/moto-venv"
stamp="$venv/rtdlm-pin"

if [ "$(cat "$stamp" 2>/dev/null)" != "$PIN" ]; then
  echo "moto-venv: making $venv with $PIN" >&2
  rm -rf "$venv"
  mkdir -p "$tools_dir"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "$PIN"
  echo "$PIN" > "$stamp"
fi
"$venv/bin/python" -c "import moto.server" || { echo "moto-venv: $venv is broken; delete it" >&2; exit 1; }
echo "moto=$venv/bin/moto_server"
