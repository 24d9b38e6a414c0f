#!/usr/bin/env python
"""Accuracy at equal measured latency: the latency-table allocation against one uniform ratio.

Issue 23: on the benchmark's segmentation task (DeepLabV3-lite on generated scenes,
``tools/benchmark.py``'s segmentation profile: 512 training scenes, 1000 dense steps), each seed's
trained dense model is pruned with ``kcp`` to each latency target twice:

* ``table``: ``prune(..., target_latency_ratio=t)`` (widths from the latency table, verified by
  measurement);
* ``uniform``: ``prune(..., target_latency_ratio=t, latency_allocation="uniform")`` (one channel
  ratio for every group, at the backend's channel multiple, searched on measured latency);

then dense and both pruned models are measured together (passes interleaved), both are
fine-tuned with the same budget (the profile's 200 steps) and evaluated (mIoU on held-out
scenes). Latency is measured with torch on the CPU, one thread, at batch ``--batch`` (16 by
default: a 64x64 scene at batch 1 runs in about 2 ms, which a shared machine cannot time to a few
percent).

Writes ``latency_study.json`` / ``.md`` / ``.png`` into ``--out``; the JSON after every row.

    python tools/latency_study.py --out docs/benchmarks --dense-cache outputs/dense_cache
    python tools/latency_study.py --quick --out /tmp/study          # smoke run (a minute)
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import statistics
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from kcp_plugin import Backend, TargetUnreachable, compare_latency, count_macs_params, prune
from kcp_plugin.bench.protocol import PROFILES, dense_model, forward_for
from kcp_plugin.bench.tasks import get_task
from kcp_plugin.bench.training import make_loader, train

NAME = "latency_study"
ALLOCATIONS = ("table", "uniform")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--targets", nargs="+", type=float, default=[0.7, 0.5],
                   help="fractions of the dense latency kept (default 0.7 0.5)")
    p.add_argument("--task", default="segmentation",
                   help="benchmark task (default segmentation: DeepLabV3-lite, width 8)")
    p.add_argument("--criterion", default="kcp")
    p.add_argument("--batch", type=int, default=16, help="batch of the latency measurements")
    p.add_argument("--runs", type=int, default=15, help="timed passes per measurement")
    p.add_argument("--dense-cache", default=None, help="folder of trained dense models")
    p.add_argument("--quick", action="store_true", help="smoke run: small data and budgets")
    p.add_argument("--out", default="outputs/latency_study")
    args = p.parse_args(argv)
    if not all(0 < t <= 1 for t in args.targets):
        p.error("--targets must be fractions in (0, 1]")
    if args.batch < 1 or args.runs < 3:
        p.error("--batch must be >= 1 and --runs >= 3")
    return args


def run(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    profile = PROFILES["quick" if args.quick else "segmentation"]
    profile = replace(profile, dense_cache=args.dense_cache, latency_runs=0)
    if args.quick:
        profile = replace(profile, n_train=64, n_val=32, dense_steps=60, finetune_steps=20)
    task = get_task(args.task)
    backend = Backend("torch", threads=1, batch=args.batch, runs=args.runs)
    command = "python tools/latency_study.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if sys.argv else []))
    result: dict[str, Any] = {"meta": {"command": command.strip(), "task": args.task,
                                       "criterion": args.criterion,
                                       "setting": backend.describe(),
                                       "finetune_steps": profile.finetune_steps,
                                       "dense_steps": profile.dense_steps,
                                       "n_train": profile.n_train, "n_val": profile.n_val},
                              "dense": [], "rows": []}
    torch.set_num_threads(1)
    x, fwd = task.example_inputs(), forward_for(task)
    start = time.perf_counter()
    for seed in args.seeds:
        train_ds, val_ds = task.splits(seed, profile.n_train, profile.n_val)
        train_loader = make_loader(train_ds, profile.batch_size, seed)
        val_loader = make_loader(val_ds, profile.batch_size, seed, shuffle=False)
        dense, dense_row = dense_model(task, seed, profile, train_loader, val_loader, None)
        result["dense"].append({k: v for k, v in dense_row.items() if k != "widths"})
        macs0 = count_macs_params(dense, x, fwd)[0]
        for target in args.targets:
            pruned = {}
            for allocation in ALLOCATIONS:
                model = copy.deepcopy(dense)
                t0 = time.perf_counter()
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        prune(model, x, args.criterion, target_latency_ratio=target,
                              latency_backend=backend, latency_allocation=allocation,
                              forward_fn=fwd, progress=False)
                except TargetUnreachable as exc:  # a finding, recorded: the other goes on
                    result["rows"].append({"seed": seed, "target": target,
                                           "allocation": allocation, "unreachable": str(exc)})
                    print(f"seed {seed} target {target} {allocation}: {exc}", flush=True)
                    continue
                pruned[allocation] = (model, time.perf_counter() - t0)
            stats = compare_latency([dense] + [m for m, _ in pruned.values()], x, fwd,
                                    backend=replace(backend, runs=2 * args.runs))
            for (allocation, (model, prune_s)), s in zip(pruned.items(), stats[1:]):
                after_prune = task.evaluate(model, val_loader)[task.metric]
                torch.manual_seed(seed)
                loader = make_loader(train_ds, profile.batch_size, seed)
                train(model, task, loader, profile.finetune_steps, profile.finetune_lr,
                      desc=f"fine-tune {allocation}", progress=False)
                value = task.evaluate(model, val_loader)[task.metric]
                row = {"seed": seed, "target": target, "allocation": allocation,
                       "latency_kept": s.median_ms / stats[0].median_ms,
                       "macs_kept": count_macs_params(model, x, fwd)[0] / macs0,
                       "after_prune": after_prune, "value": value,
                       "dense_value": dense_row["value"], "prune_s": prune_s}
                result["rows"].append(row)
                print(f"seed {seed} target {target} {allocation}: latency kept "
                      f"{row['latency_kept']:.3f}, MACs kept {row['macs_kept']:.3f}, "
                      f"{task.metric} {value:.2f} (dense {dense_row['value']:.2f}, after "
                      f"prune {after_prune:.2f}; pruned in {prune_s:.0f} s)", flush=True)
                result["meta"]["total_s"] = time.perf_counter() - start
                write(result, out, quiet=True)
    return result


def _mean_sd(values: list[float]) -> str:
    if len(values) > 1:
        return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"
    return f"{values[0]:.2f}" if values else "-"


def markdown(result: dict[str, Any]) -> str:
    meta, rows = result["meta"], result["rows"]
    dense = [d["value"] for d in result["dense"]]
    lines = [f"`{meta['command']}`", "",
             f"{meta.get('total_s', 0) / 60:.0f} min. Task {meta['task']}, criterion "
             f"`{meta['criterion']}`, {meta['finetune_steps']} fine-tuning steps after the "
             f"prune (dense: {meta['dense_steps']} steps on {meta['n_train']} scenes; "
             f"{meta['n_val']} held out). Latency on {meta['setting']}, dense and both pruned "
             f"models measured together. Dense mIoU {_mean_sd(dense)} over "
             f"{len(dense)} seed(s); mean ± standard deviation over seeds.", "",
             "| latency target | allocation | latency kept | MACs kept | mIoU after prune | "
             "mIoU after fine-tuning |", "|---|---|---|---|---|---|"]
    for target in dict.fromkeys(r["target"] for r in rows):
        for allocation in ALLOCATIONS:
            every = [r for r in rows if r["target"] == target and r["allocation"] == allocation]
            rs = [r for r in every if "value" in r]
            if len(rs) < len(every):
                lines.append(f"| {target} | {allocation} | unreachable in "
                             f"{len(every) - len(rs)} of {len(every)} seeds | | | |")
            if not rs:
                continue
            lines.append(
                f"| {target} | {allocation} | {_mean_sd([r['latency_kept'] for r in rs])} | "
                f"{_mean_sd([r['macs_kept'] for r in rs])} | "
                f"{_mean_sd([r['after_prune'] for r in rs])} | "
                f"{_mean_sd([r['value'] for r in rs])} |")
    lines += ["", "Per seed:", "", "| seed | target | allocation | latency kept | MACs kept | "
              "mIoU |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['seed']} | {r['target']} | {r['allocation']} | {r['latency_kept']:.3f} | "
              f"{r['macs_kept']:.3f} | {r['value']:.2f} |" if "value" in r else
              f"| {r['seed']} | {r['target']} | {r['allocation']} | unreachable | | |"
              for r in rows]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    """mIoU after fine-tuning against latency kept, one point per seed and allocation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for allocation, marker in zip(ALLOCATIONS, ("*", "o")):
        rs = [r for r in result["rows"] if r["allocation"] == allocation and "value" in r]
        ax.scatter([r["latency_kept"] for r in rs], [r["value"] for r in rs], marker=marker,
                   s=90 if marker == "*" else 40, label=allocation)
    for d in result["dense"]:
        ax.axhline(d["value"], color="grey", lw=0.6, ls=":")
    ax.set_xlabel("latency kept (measured)")
    ax.set_ylabel("mIoU after fine-tuning")
    ax.set_title(f"{result['meta']['task']}: equal latency, {result['meta']['criterion']}\n"
                 f"{result['meta']['setting']}", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(result: dict[str, Any], out: Path, quiet: bool = False) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{NAME}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"{NAME}.md").write_text(markdown(result))
    plot(result, out / f"{NAME}.png")
    if not quiet:
        print(markdown(result))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    try:
        result = run(args, out)
    except KeyboardInterrupt:
        print("interrupted: the rows so far are in " + str(out), file=sys.stderr)
        return 130
    write(result, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
