#!/usr/bin/env bash
# Debian's Prometheus and Alertmanager: the monitoring tests (tests/test_monitoring_*.py) run the
# real binaries and skip without them (CI sets RTDLM_REQUIRE_MONITORING_TOOLS=1, so they fail).
set -euo pipefail
if ! command -v promtool >/dev/null || ! command -v prometheus-alertmanager >/dev/null; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
    prometheus prometheus-alertmanager >/dev/null
fi
promtool --version | head -1
prometheus-alertmanager --version 2>&1 | head -1
