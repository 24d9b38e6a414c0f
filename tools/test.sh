#!/usr/bin/env bash
# The whole test suite: set up .venv with every tested extra, lint, run pytest.
#   usage: bash tools/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh "dev,timm,torchvision"
.venv/bin/ruff check kcp_plugin tests tools setup.py
.venv/bin/python -m pytest -q "$@"
