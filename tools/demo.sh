#!/usr/bin/env bash
# The main job on the embedded default: train a small DeepLabV3 on generated scenes, prune it with
# KCP to 30% of its MACs, fine-tune (without, then with distillation from the dense model, the
# same steps), print dense vs pruned mIoU / MACs / params / CPU latency.
#   usage: bash tools/demo.sh [tools/demo.py args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh "dev,timm,torchvision"
exec .venv/bin/python tools/demo.py "$@"
