#!/usr/bin/env bash
# ./pants on a fresh machine cannot break itself: several started at once on an empty cache all
# succeed (one installs, the others wait), an installer killed midway leaves nothing that a
# later run trusts, and an install that stopped working is rebuilt with one line saying why.
# Each case runs the real script into a cache folder of its own (pip, PyPI, the pex build).
set -euo pipefail
cd "$(dirname "$0")/.."

cache="$(mktemp -d)"
logs="$(mktemp -d)"
trap 'rm -rf "$cache" "$logs"' EXIT
export RTDLM_PANTS_BOOTSTRAP="$cache"
pants() { ./pants --no-pantsd --version; }
fail() { echo "test-bootstrap: $*" >&2; for f in "$logs"/*; do echo "--- $f"; cat "$f"; done >&2; exit 1; }

echo "three ./pants at once on an empty cache"
pids=()
for i in 1 2 3; do pants >"$logs/out$i" 2>"$logs/err$i" & pids+=($!); done
for pid in "${pids[@]}"; do wait "$pid" || fail "a concurrent ./pants failed"; done
for i in 1 2 3; do [ "$(cat "$logs/out$i")" = 2.17.1 ] || fail "./pants $i printed no version"; done
installs="$(cat "$logs"/err* | grep -c '^./pants: installing Pants' || true)"
[ "$installs" = 1 ] || fail "expected one installer, saw $installs"
grep -q 'waiting for it' "$logs"/err* || fail "no ./pants said it waited for the installer"
echo "ok: all three printed 2.17.1; one installed, the others waited"

echo "an installer killed midway"
rm -rf "$logs"/* "$cache/pants-2.17.1.venv"
setsid ./pants --no-pantsd --version >"$logs/out" 2>"$logs/err" &  # its own process group
killed=$!
until grep -q 'installing Pants' "$logs/err" 2>/dev/null; do sleep 0.1; done
sleep 2  # pip is midway
kill -KILL -- "-$killed"
wait "$killed" 2>/dev/null || true
[ ! -e "$cache/pants-2.17.1.venv" ] || fail "a killed install was published"
ls -d "$cache"/pants-2.17.1-install-* >/dev/null 2>&1 || fail "expected the killed install's folder"
[ "$(pants 2>"$logs/err2")" = 2.17.1 ] || fail "./pants after a killed install failed"
[ "$(ls -d "$cache"/pants-2.17.1-install-* | wc -l)" = 1 ] || fail "the killed install's folder was kept"
echo "ok: nothing published by the killed installer; the next ./pants installed and removed its folder"

echo "an install that stopped working"
rm -rf "$logs"/*
rm -rf "$(cd "$cache/pants-2.17.1.venv" && pwd -P)"/lib/python3.9/site-packages/pants
[ "$(pants 2>"$logs/err")" = 2.17.1 ] || fail "./pants did not rebuild a broken install"
grep -q "^./pants: the Pants in $cache/pants-2.17.1.venv does not start (.*ModuleNotFoundError: No module named 'pants'); installing it again$" \
  "$logs/err" || fail "no one line saying why the install is rebuilt"
echo "ok: $(head -1 "$logs/err")"

echo "a marked venv of the older layout, half uninstalled"
rm -rf "$logs"/* "$cache/pants-2.17.1.venv"
mkdir -p "$cache/pants-2.17.1/bin" && touch "$cache/pants-2.17.1/.installed"
[ "$(pants 2>"$logs/err")" = 2.17.1 ] || fail "./pants trusted an older layout's marked venv"
grep -q "^./pants: installing Pants" "$logs/err" || fail "no new install beside the older venv"
echo "ok: not trusted; a new install was published beside it"
