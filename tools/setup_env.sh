#!/usr/bin/env bash
# Create (or update) the project-local virtual environment .venv and install kcp-plugin into it
# with the given extras (default: dev,timm,torchvision). Idempotent: a stamp file records what
# was installed, so a second run with unchanged setup.py returns in a second.
#   usage: bash tools/setup_env.sh [EXTRAS]
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-dev,timm,torchvision}"
py="${PYTHON:-python3.11}"
command -v "$py" >/dev/null 2>&1 || py=python3
if [ ! -x .venv/bin/python ]; then
  "$py" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
# The stamp holds the hash of what decides the install and the extras installed so far. A
# request for a subset of them returns at once; otherwise the union is installed, so that the
# demo (fewer extras) and the test suite (all of them) do not undo each other's stamp.
stamp=".venv/.kcp-installed"
hash="$(cat setup.py tools/setup_env.sh | sha256sum | cut -c1-16)"
old_hash="" have=""
if [ -f "$stamp" ]; then
  read -r old_hash have < "$stamp" || true
fi
missing=""
for extra in ${extras//,/ }; do
  case ",$have," in *",$extra,"*) ;; *) missing="$missing $extra" ;; esac
done
if [ "$old_hash" = "$hash" ] && [ -z "$missing" ]; then
  exit 0
fi
extras="$(printf '%s\n' ${have//,/ } ${extras//,/ } | sort -u | paste -sd, -)"
want="$hash $extras"
# A first install writes about 7 GB (torch's CUDA build alone is 5.5 GB): say so before pip
# fails half-way with "No space left on device" (a CI run hit that on a full shared disk).
if ! compgen -G ".venv/lib/python3*/site-packages/torch/__init__.py" >/dev/null; then
  free_kb="$(df -Pk . | awk 'NR==2 {print $4}')"
  if [ "${free_kb:-0}" -lt $((8 * 1024 * 1024)) ]; then
    echo "tools/setup_env.sh: .venv needs about 8 GB free for torch and the extras; only" \
         "$((free_kb / 1024)) MB are free on $(df -P . | awk 'NR==2 {print $6}')." \
         "Free some space (old clones and their .venv folders) and run again." >&2
    exit 1
  fi
fi
# torch 2.14.1 / torchvision 0.29.1 are the pair that installs and imports together here
# (see ../shared/reference/environment.md); pin them before anything can pull another torch.
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install -q -e ".[${extras}]" "torch==2.14.1" "torchvision==0.29.1"
case ",$extras," in
  *,mmseg,*)
    # mmengine 0.10.7 resolves `mmseg::` config bases with pkg_resources, which setuptools
    # >= 81 no longer ships (torch 2.14 needs >= 77). mmcv itself: tools/install_mmcv.sh.
    .venv/bin/python -m pip install -q "setuptools>=77,<81" "torch==2.14.1" ;;
esac
case ",$extras," in
  *,study,*)
    # the real-weights study loads the pretrained MTCNN state dicts bundled in facenet-pytorch's
    # wheel (kcp_plugin/models/mtcnn.py); its metadata pins torch < 2.3, so no dependencies
    .venv/bin/python -m pip install -q --no-deps "facenet-pytorch==2.6.0" ;;
esac
echo "$want" > "$stamp"
