#!/usr/bin/env bash
# The main job on the embedded default: prune the builtin DeepLabV3-lite with KCP to 30% of its
# MACs and print MACs / params / CPU latency before and after.
#   usage: bash tools/demo.sh [kcp-prune args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh "dev,timm,torchvision"
mkdir -p outputs
exec .venv/bin/kcp-prune --out outputs/pruned.pt --plot outputs/widths.png "$@"
