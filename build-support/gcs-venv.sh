#!/usr/bin/env bash
# A GCS emulator for the object-storage tests (tests/test_object_storage.py: shards read from
# gs://), in its own venv, like moto for S3. It serves gcsfs faithfully enough to read shards;
# tensorstore's GCS driver rejects its object generations, so checkpoints are tested on S3 only.
#
# Makes ${RTDLM_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/rtdlm-tools}/gcs-venv and prints
# gcs=<its gcp-storage-emulator command> as its last line (CI exports it as RTDLM_GCS).
set -euo pipefail
exec "$(dirname "$0")/tool-venv.sh" gcs gcs=bin/gcp-storage-emulator \
  "import gcp_storage_emulator" gcp-storage-emulator==2026.7.19
