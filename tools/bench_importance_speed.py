#!/usr/bin/env python
"""Time scoring every channel group of a ResNet-50 with each pruning criterion.

The dependency graph is built once and every group is collected once, so only the criteria's
own cost is timed. Repetitions are interleaved (criterion order rotates each repetition), so any
background load falls on all criteria alike; the median and the minimum over repetitions are
reported, with their ratio to ``l2`` (torch-pruning's ``GroupMagnitudeImportance``). The
process CPU time is reported too: with ``--threads 1`` it barely depends on background load.

Requirement checked (``--max-ratio``): KCP (default variant) costs no more than 2x ``l2``.

    python tools/bench_importance_speed.py --threads 2 --repeats 15 --json out.json
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import platform
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch_pruning as tp

import kcp_plugin

DEFAULT_CRITERIA = ("l2", "kcp", "kcp_mean", "kcp_kmeans", "fpgm")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Time scoring every group of a (randomly initialised) timm model with each "
        "criterion; report median/min per criterion and the ratio to l2.",
    )
    p.add_argument("--model", default="resnet50", help="timm model name (default: resnet50)")
    p.add_argument("--input-size", type=int, default=224,
                   help="input side for tracing the graph (default: 224; scoring ignores it)")
    p.add_argument("--criteria", default=",".join(DEFAULT_CRITERIA),
                   help="comma-separated registry names; l2 is always added as the baseline "
                   f"(default: {','.join(DEFAULT_CRITERIA)})")
    p.add_argument("--repeats", type=int, default=15,
                   help="timed repetitions per criterion, interleaved (default: 15)")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed passes per criterion first (default: 1)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads(N)")
    p.add_argument("--seed", type=int, default=0, help="torch.manual_seed before building")
    p.add_argument("--max-ratio", type=float, default=2.0,
                   help="pass/fail bound on median(kcp) / median(l2) (default: 2.0)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    return p.parse_args(argv)


def source_fingerprint(obj: object) -> str:
    """sha256 (12 hex digits) of the file defining ``obj``: which KCP version was timed."""
    with open(inspect.getsourcefile(obj), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:12]


def collect_groups(model: nn.Module, size: int) -> list[tp.dependency.Group]:
    example = torch.randn(1, 3, size, size)
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    return list(dg.get_all_groups(root_module_types=[nn.Conv2d, nn.Linear]))


def score_all(imp: tp.importance.Importance, groups: list) -> int:
    """Score every group; return how many got no score (``None``)."""
    skipped = 0
    with torch.no_grad():
        for g in groups:
            if imp(g) is None:
                skipped += 1
    return skipped


def run(args: argparse.Namespace) -> dict:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.criteria.split(",") if n.strip()]
    if "l2" not in names:
        names.insert(0, "l2")
    fingerprint = source_fingerprint(kcp_plugin.KCPImportance)  # before any edit can land

    import timm

    torch.manual_seed(args.seed)
    model = timm.create_model(args.model, pretrained=False).eval()
    groups = collect_groups(model, args.input_size)
    channels = sum(len(g[0].idxs) for g in groups)

    skipped = {}
    for n in names:
        for _ in range(max(args.warmup, 1)):
            skipped[n] = score_all(kcp_plugin.get_importance(n), groups)

    times: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(args.repeats):
        k = rep % len(names)
        for n in names[k:] + names[:k]:  # rotate the order each repetition
            imp = kcp_plugin.get_importance(n)  # fresh: KCP caches scores within a step
            c0, t0 = time.process_time(), time.perf_counter()
            score_all(imp, groups)
            times[n].append(time.perf_counter() - t0)
            cpu[n].append(time.process_time() - c0)

    base_med = statistics.median(times["l2"])
    base_min = min(times["l2"])
    base_cpu = statistics.median(cpu["l2"])
    rows = []
    for n in names:
        med, low = statistics.median(times[n]), min(times[n])
        rows.append({
            "criterion": n, "median_ms": 1e3 * med, "min_ms": 1e3 * low,
            "ratio_median": med / base_med, "ratio_min": low / base_min,
            "cpu_median_ms": 1e3 * statistics.median(cpu[n]),
            "ratio_cpu_median": statistics.median(cpu[n]) / base_cpu,
            "groups_without_score": skipped[n], "times_ms": [1e3 * t for t in times[n]],
            "cpu_ms": [1e3 * t for t in cpu[n]],
        })
    return {
        "model": args.model, "groups": len(groups), "root_channels": channels,
        "repeats": args.repeats, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "torch_pruning": tp.__version__,
        "python": platform.python_version(), "machine": platform.machine(),
        "kcp_source_sha256": fingerprint,
        "max_ratio": args.max_ratio, "rows": rows,
    }


def markdown(result: dict) -> str:
    lines = [
        f"{result['model']} (random init): {result['groups']} groups, "
        f"{result['root_channels']} root channels; {result['repeats']} interleaved repetitions, "
        f"{result['threads']} threads, torch {result['torch']}, "
        f"torch-pruning {result['torch_pruning']}, kcp.py sha256 {result['kcp_source_sha256']}",
        "",
        "| criterion | median (ms) | min (ms) | median / l2 | min / l2 | CPU median (ms) "
        "| CPU / l2 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['criterion']} | {r['median_ms']:.1f} | {r['min_ms']:.1f} | "
            f"{r['ratio_median']:.2f}x | {r['ratio_min']:.2f}x | {r['cpu_median_ms']:.1f} | "
            f"{r['ratio_cpu_median']:.2f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.repeats < 1:
        raise SystemExit("--repeats must be >= 1")
    result = run(args)
    print(markdown(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    kcp = next((r for r in result["rows"] if r["criterion"] == "kcp"), None)
    if kcp is not None:
        ok = kcp["ratio_median"] <= args.max_ratio
        print(f"\nkcp / l2 (median) = {kcp['ratio_median']:.2f}x: "
              f"{'PASS' if ok else 'FAIL'} (bound {args.max_ratio:.1f}x)")
        return 0 if ok else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
