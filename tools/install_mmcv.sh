#!/usr/bin/env bash
# Install mmcv 2.1.0 with its compiled ops (mmcv._ext) into .venv, built from the PyPI source
# distribution against the torch installed there. mmsegmentation 1.2.2 needs mmcv >= 2.0.0rc4,
# < 2.2.0 with ops; PyPI has no binary wheel of it for current torch, so it has to be compiled
# (about 12 minutes on 2 cores). The built wheel is cached OUTSIDE the clone, per machine, keyed by
# the torch and Python versions, so a fresh clone on the same machine installs it in seconds.
#
# Idempotent: returns at once when an importable mmcv 2.1.0 with mmcv._ext is installed.
# Why the build needs changes (see ../shared/reference/environment.md):
#   - mmcv's setup.py imports pkg_resources, gone from setuptools >= 70: build without isolation
#     with setuptools<70 (+ wheel) placed first on PYTHONPATH, not installed into .venv;
#   - torch >= 2.10's headers need C++20: its setup.py's -std=c++14/17 become -std=c++20.
# The ops are built for the CPU (GPUs hidden during the build) unless KCP_MMCV_CUDA=1.
#   usage: bash tools/install_mmcv.sh          (env: KCP_CACHE, MAX_JOBS, KCP_MMCV_CUDA)
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
version=2.1.0
[ -x "$py" ] || { echo "install_mmcv.sh: no .venv; run tools/setup_env.sh first" >&2; exit 1; }

has_mmcv() {
  "$py" - "$version" <<'EOF' >/dev/null 2>&1
import sys
import torch  # noqa: F401  (loads the libraries mmcv._ext links against)
import mmcv
import mmcv._ext  # noqa: F401  (the compiled ops mmseg needs)
sys.exit(0 if mmcv.__version__ == sys.argv[1] else 1)
EOF
}
if has_mmcv; then
  exit 0
fi

cuda="${KCP_MMCV_CUDA:-0}"
key="$("$py" -c 'import sys, torch
v = torch.__version__.split("+")[0]
print("torch%s-cp%d%d" % (v, sys.version_info.major, sys.version_info.minor))')"
[ "$cuda" = 1 ] && key="$key-cuda" || key="$key-cpu"
cache="${KCP_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kcp-plugin}"
wheel_dir="$cache/wheels/mmcv-$version-$key"
mkdir -p "$wheel_dir"

# One build at a time per machine: a second caller waits here and then finds the cached wheel.
exec 9>"$cache/wheels/.mmcv-$version-$key.lock"
flock 9

install_cached() {
  local whl
  whl="$(ls "$wheel_dir"/mmcv-"$version"-*.whl 2>/dev/null | head -n1 || true)"
  [ -n "$whl" ] || return 1
  echo "install_mmcv.sh: installing cached $whl"
  # --force-reinstall --no-deps replaces a broken or op-less mmcv; the second call adds any
  # missing runtime dependency (mmcv does not depend on torch, so the pinned torch stays).
  "$py" -m pip install -q --no-deps --force-reinstall "$whl"
  "$py" -m pip install -q "$whl"
}

if ! install_cached; then
  work="$(mktemp -d "${TMPDIR:-/tmp}/kcp-mmcv-build.XXXXXX")"
  trap 'rm -rf "$work"' EXIT
  echo "install_mmcv.sh: building mmcv $version with ops (about 12 min on 2 cores), in $work"
  # Build tools beside, not inside, .venv: setuptools<70 keeps pkg_resources; ninja compiles in
  # parallel (MAX_JOBS).
  "$py" -m pip install -q --disable-pip-version-check --target "$work/tools" \
    "setuptools<70" wheel ninja 2>&1 | grep -v "dependency resolver\|requires setuptools" || true
  export PYTHONPATH="$work/tools${PYTHONPATH:+:$PYTHONPATH}"
  export PATH="$work/tools/bin:$PATH"
  "$py" -m pip download -q --no-deps --no-binary :all: --no-build-isolation \
    -d "$work" "mmcv==$version"
  tar -xzf "$work/mmcv-$version.tar.gz" -C "$work"
  src="$work/mmcv-$version"
  sed -i -e 's/-std=c++14/-std=c++20/g' -e 's/-std=c++17/-std=c++20/g' "$src/setup.py"
  grep -q -- '-std=c++20' "$src/setup.py" || { echo "install_mmcv.sh: setup.py patch failed" >&2; exit 1; }
  export MMCV_WITH_OPS=1 MAX_JOBS="${MAX_JOBS:-2}"
  if [ "$cuda" != 1 ]; then
    export CUDA_VISIBLE_DEVICES="" FORCE_CUDA=0
  fi
  start=$SECONDS
  "$py" -m pip wheel --no-build-isolation --no-deps -w "$work/dist" "$src"
  echo "install_mmcv.sh: built in $((SECONDS - start)) s"
  cp "$work"/dist/mmcv-"$version"-*.whl "$wheel_dir"/
  install_cached
fi

has_mmcv || { echo "install_mmcv.sh: mmcv $version with mmcv._ext does not import" >&2; exit 1; }
echo "install_mmcv.sh: mmcv $version with ops installed"
