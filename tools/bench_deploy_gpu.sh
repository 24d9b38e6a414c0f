#!/usr/bin/env bash
# The GPU part of the deployment benchmark (tools/bench_deploy.py), as run on a lent GPU machine:
# CUDA bf16, batch 64 (segmentation nets batch 8 at 512x512, the stereo net batch 8 at
# 256x512), models in order of priority under a time limit (a lease is short), the latency
# tables cached in OUT/cache. A smoke check of the CUDA path runs first and stops the script if
# it fails, before any time is spent on the benchmark.
#   usage: bash tools/bench_deploy_gpu.sh OUT_DIR [more tools/bench_deploy.py arguments]
#   env:   PYTHON (default python3), TIME_LIMIT (seconds after which no new model starts; 330)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:?usage: bash tools/bench_deploy_gpu.sh OUT_DIR [args]}"
shift
py="${PYTHON:-python3}"
mkdir -p "$out"
export KCP_CACHE="$out/cache" PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv || true
"$py" - <<'PY'
import torch, torchvision, kcp_plugin
from kcp_plugin.deploy.table import LatencyTable, trace_layers
print("torch", torch.__version__, "torchvision", torchvision.__version__, torch.cuda.get_device_name())
m, x = torchvision.models.resnet18().eval(), torch.randn(1, 3, 224, 224)
b = kcp_plugin.Backend("cuda", dtype="bf16", batch=64, runs=10)
print("smoke: resnet18 dense", kcp_plugin.compare_latency([m], x, backend=b)[0].describe(), "on", b.describe())
t = LatencyTable(b, levels=3)
calls = [(c, True, True) for c in trace_layers(m, x, batch=64)[:2]]
t.ensure(calls)
print("smoke: table ok,", t.measured, "layer measurements; conv1 at dense widths",
      round(t.cost(*calls[1], calls[1][0].cin, calls[1][0].cout), 4), "ms")
PY
"$py" tools/bench_deploy.py --backends cuda --models resnet50 mobilenetv3_large_100 \
  convnext_tiny vit_small_patch16_224 deeplabv3_resnet50 stereo_lite fcn_resnet50 \
  --time-limit "${TIME_LIMIT:-330}" --out "$out" "$@"
