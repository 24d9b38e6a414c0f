#!/usr/bin/env python
"""CPU latency of the benchmark models pruned to MACs targets, next to their MACs ratio.

Latency depends on the pruned widths, not on the weights, so the models are pruned at random
initialisation (no training): each task's model is pruned with ``--criterion`` to every target at
the benchmark's input size, then timed at that size and at ``--scale`` times it (the
segmentation and stereo nets are fully convolutional, so larger inputs show where compute, not
per-layer overhead, dominates). Dense and pruned models are timed interleaved, median over
``--runs`` passes, so background load falls on both alike. Run it on a quiet machine.
Deployment-sized models (timm / torchvision), onnxruntime next to torch eager, several thread
counts and the latency target: ``tools/bench_deploy.py`` (docs/deploy.md).

    python tools/bench_latency.py --threads 1 --out outputs/latency
    python tools/bench_latency.py --tasks segmentation stereo --targets 0.5 0.3 --scale 1 4
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path
from typing import Any

import torch

from kcp_plugin import count_macs_params, measure_latency, prune
from kcp_plugin.bench import get_task
from kcp_plugin.bench.protocol import forward_for
from kcp_plugin.bench.tasks import TASKS
from kcp_plugin.models import example_inputs
from kcp_plugin.progress import progress_bar


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=sorted(TASKS),
                   help="benchmark tasks whose models are timed (default: all)")
    p.add_argument("--criterion", default="kcp", help="registered data-free criterion")
    p.add_argument("--targets", nargs="+", type=float, default=[0.5, 0.3],
                   help="fractions of MACs kept (default: 0.5 0.3)")
    p.add_argument("--scale", nargs="+", type=int, default=[1, 4],
                   help="input side multipliers for timing (default: 1 4; classification: 1)")
    p.add_argument("--runs", type=int, default=30, help="timed passes per model (median)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="outputs/latency", help="output folder")
    args = p.parse_args(argv)
    if any(not 0 < t <= 1 for t in args.targets):
        p.error("--targets must be fractions in (0, 1]")
    if any(s < 1 for s in args.scale) or args.runs < 1:
        p.error("--scale and --runs must be >= 1")
    return args


def _inputs(task: Any, scale: int) -> Any:
    size = task.data_kwargs.get("size")
    if isinstance(size, int):
        size = (size, size)
    return example_inputs(task.model, size=(size[0] * scale, size[1] * scale))


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One row per (task, target, scale): MACs ratio and latency ratio of the pruned model."""
    rows = []
    jobs = [(t, target) for t in args.tasks for target in args.targets]
    for task_name, target in progress_bar(jobs, desc="latency"):
        task = get_task(task_name)
        dense = task.build(args.seed).eval()
        pruned = task.build(args.seed).eval()
        fwd = forward_for(task)
        prune(pruned, task.example_inputs(), args.criterion, target_macs_ratio=target,
              forward_fn=fwd, progress=False)
        scales = [1] if task.name == "classification" else args.scale
        for scale in scales:
            x = _inputs(task, scale)
            macs_d = count_macs_params(dense, x, fwd)[0]
            macs_p = count_macs_params(pruned, x, fwd)[0]
            dense_ms, pruned_ms = [], []
            for _ in range(3):  # interleaved thirds: load spikes hit both models
                dense_ms.append(measure_latency(dense, x, fwd, runs=max(1, args.runs // 3),
                                                threads=args.threads))
                pruned_ms.append(measure_latency(pruned, x, fwd, runs=max(1, args.runs // 3),
                                                 threads=args.threads))
            d, q = sorted(dense_ms)[1], sorted(pruned_ms)[1]
            shape = tuple((x[0] if isinstance(x, tuple) else x).shape[-2:])
            rows.append({"task": task_name, "model": task.model, "criterion": args.criterion,
                         "target_macs": target, "input": list(shape), "macs_dense": macs_d,
                         "macs_ratio": macs_p / macs_d, "dense_ms": d, "pruned_ms": q,
                         "latency_ratio": q / d})
    return rows


def markdown(rows: list[dict[str, Any]], threads: int) -> str:
    lines = [f"CPU latency, batch 1, {threads} thread(s), median ms; pruned at random init.", "",
             "| task | model | input | MACs kept | dense ms | pruned ms | latency ratio |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['task']} | {r['model']} | {r['input'][0]}x{r['input'][1]} | "
                     f"{r['macs_ratio']:.3f} | {r['dense_ms']:.2f} | {r['pruned_ms']:.2f} | "
                     f"{r['latency_ratio']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot([0, 1], [0, 1], "k:", lw=1, label="latency = MACs")
    series: dict[str, list] = {}
    for r in rows:
        series.setdefault(f"{r['model']} {r['input'][0]}x{r['input'][1]}", []).append(r)
    for label, rs in series.items():
        rs = sorted(rs, key=lambda r: r["macs_ratio"])
        ax.plot([r["macs_ratio"] for r in rs] + [1.0], [r["latency_ratio"] for r in rs] + [1.0],
                "-o", label=label)
    ax.set_xlabel("fraction of MACs kept")
    ax.set_ylabel("latency / dense latency")
    ax.set_xlim(0, 1.05)
    ax.set_ylim(0, 1.3)
    ax.legend(fontsize=7)
    ax.set_title("CPU latency of pruned models vs MACs kept")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        rows = measure(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    meta = {"threads": args.threads, "runs": args.runs, "torch": torch.__version__,
            "machine": platform.processor() or platform.machine()}
    (out / "latency.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    (out / "latency.md").write_text(markdown(rows, args.threads))
    plot(rows, out / "latency_vs_macs.png")
    print(markdown(rows, args.threads))
    print(f"results in {out}/ (latency.json, latency.md, latency_vs_macs.png)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
