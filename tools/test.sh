#!/usr/bin/env bash
# The whole test suite: set up .venv with every tested extra, build/install mmcv with its ops
# for the mmseg tests (cached per machine: ~12 min on 2 cores the first time, seconds after),
# lint, run pytest.
#   usage: bash tools/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh "dev,timm,torchvision,nni,mmseg,deploy,study,smp"
bash tools/install_mmcv.sh
.venv/bin/ruff check kcp_plugin tests tools setup.py
.venv/bin/python -m pytest -q "$@"
