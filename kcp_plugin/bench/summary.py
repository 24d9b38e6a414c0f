"""Benchmark results as tables and PNG plots (mean and spread over seeds)."""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

from ..report import PruneReport

__all__ = ["aggregate", "markdown", "merge_results", "plot_accuracy_vs_macs", "write_summary"]


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1)
    return mean, math.sqrt(var) if len(values) > 1 else 0.0


def aggregate(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One summary row per (task, criterion, schedule, target): means and spreads over seeds."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in result["rows"]:
        groups[(row["task"], row["criterion"], row["schedule"], row["target_macs"])].append(row)
    costs: dict[tuple, list[dict]] = defaultdict(list)
    for c in result.get("criteria", []):
        costs[(c["task"], c["criterion"])].append(c)
    dense: dict[str, list[float]] = defaultdict(list)
    for d in result["dense"]:
        dense[d["task"]].append(d["value"])
    out = []
    for (task, criterion, schedule, target), rows in groups.items():
        ok = [r for r in rows if "error" not in r]
        value, spread = _mean_std([r["value"] for r in ok])
        dense_mean, _ = _mean_std(dense[task])
        c = costs.get((task, criterion), [])
        out.append({
            "task": task, "criterion": criterion, "schedule": schedule, "target_macs": target,
            "metric": ok[0]["metric"] if ok else "", "value": value, "std": spread,
            "delta_vs_dense": value - dense_mean, "seeds": len(ok),
            "errors": [r["error"] for r in rows if "error" in r],
            "after_prune": _mean_std([r.get("after_prune") for r in ok])[0],
            "macs_ratio": _mean_std([r.get("macs_ratio") for r in ok])[0],
            "latency_ratio": _mean_std([r.get("latency_ratio") for r in ok])[0],
            "time_vs_l2": _mean_std([x["time_vs_l2"] for x in c])[0],
            "spearman_vs_l2": _mean_std([x["spearman_vs_l2"] for x in c])[0],
        })
    return sorted(out, key=lambda r: (r["task"], r["target_macs"], r["schedule"], r["criterion"]))


def markdown(result: dict[str, Any]) -> str:
    """The results tables (dense models, then pruned models per task) as markdown."""
    lines = ["### Dense models", "",
             "| task | model | seeds | metric | mean | spread | MACs | params | latency ms |",
             "|---|---|---|---|---|---|---|---|---|"]
    by_task: dict[str, list[dict]] = defaultdict(list)
    for d in result["dense"]:
        by_task[d["task"]].append(d)
    for task, rows in by_task.items():
        mean, std = _mean_std([r["value"] for r in rows])
        lat = _mean_std([r.get("latency_ms") for r in rows])[0]
        lines.append(f"| {task} | {rows[0]['model']} | {len(rows)} | {rows[0]['metric']} | "
                     f"{mean:.2f} | {std:.2f} | {rows[0]['macs'] / 1e6:.1f}M | "
                     f"{rows[0]['params'] / 1e3:.1f}K | {lat:.2f} |")
    summary = aggregate(result)
    for task in dict.fromkeys(r["task"] for r in summary):
        rows = [r for r in summary if r["task"] == task]
        metric = rows[0]["metric"] or "metric"
        lines += ["", f"### {task}: pruned and fine-tuned ({metric}, mean ± spread over seeds)",
                  "", f"| MACs kept | schedule | criterion | {metric} | Δ vs dense | right after "
                  "prune | MACs kept (got) | latency vs dense | scoring time vs l2 | "
                  "Spearman vs l2 |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if r["seeds"] == 0:
                lines.append(f"| {r['target_macs']:.0%} | {r['schedule']} | {r['criterion']} | "
                             f"failed: {r['errors'][0][:80]} | | | | | | |")
                continue
            lines.append(
                f"| {r['target_macs']:.0%} | {r['schedule']} | {r['criterion']} | "
                f"{r['value']:.2f} ± {r['std']:.2f} | {r['delta_vs_dense']:+.2f} | "
                f"{r['after_prune']:.2f} | {r['macs_ratio']:.3f} | {r['latency_ratio']:.2f} | "
                f"{r['time_vs_l2']:.2f}x | {r['spearman_vs_l2']:.2f} |")
    return "\n".join(lines) + "\n"


def plot_accuracy_vs_macs(result: dict[str, Any], path: str | os.PathLike, task: str) -> None:
    """PNG: the task's metric against MACs kept, one panel per schedule (one-shot, + compensation,
    iterative, SFP, SRFP, from scratch), one line per criterion in the same colour in every
    panel, and the dense model's mean as a dotted line. Panels keep many criteria readable."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = [r for r in aggregate(result) if r["task"] == task and r["seeds"]]
    dense = [d["value"] for d in result["dense"] if d["task"] == task]
    order = ("oneshot", "oneshot+comp", "iterative", "soft", "decay", "scratch")
    schedules = [s for s in order if any(r["schedule"] == s for r in summary)]
    schedules += sorted({r["schedule"] for r in summary} - set(order))
    criteria = list(dict.fromkeys(r["criterion"] for r in summary))
    cmap = plt.get_cmap("tab20")
    colours = {c: cmap(i % 20) for i, c in enumerate(criteria)}
    markers = "osD^v<>ph*XP"
    n = max(1, len(schedules))
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n + 1.8, 4.2), sharey=True, squeeze=False)
    for ax, schedule in zip(axes[0], schedules or [""]):
        for i, criterion in enumerate(criteria):
            pts = sorted((r["macs_ratio"], r["value"], r["std"]) for r in summary
                         if r["criterion"] == criterion and r["schedule"] == schedule)
            if not pts:
                continue
            xs, ys, es = zip(*pts)
            ax.errorbar(xs, ys, yerr=es, fmt="-" + markers[i % len(markers)], capsize=3,
                        color=colours[criterion], ms=4, label=criterion)
        if dense:
            ax.axhline(sum(dense) / len(dense), color="k", lw=1, ls=":", label="dense")
        ax.set_title(schedule, fontsize=9)
        ax.set_xlabel("fraction of MACs kept")
    metric = summary[0]["metric"] if summary else ""
    axes[0][0].set_ylabel(metric + (" (lower is better)" if metric == "epe" else ""))
    handles = {}
    for ax in axes[0]:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    fig.legend(handles.values(), handles.keys(), loc="center right", fontsize=7)
    fig.suptitle(f"{task}: {metric} after pruning and fine-tuning (mean ± spread over seeds)",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0, 1 - 1.6 / (3.6 * n + 1.8), 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def merge_results(paths: list[Path]) -> dict:
    """One results structure from several runs (seeds run in parallel, or a run continued).

    The same dense model (task, model, seed) or row (also criterion, schedule, target) may come
    from more than one file only with the same value: anything else means the runs used other
    settings (steps, data, machine), and averaging them would mix studies.

    Raises:
        ValueError: conflicting duplicates; the message names the entry and the files.
    """
    merged: dict = {"config": None, "dense": [], "rows": [], "criteria": []}
    seen: dict[tuple, tuple[float, Path]] = {}
    for path in paths:
        result = json.loads(path.read_text())
        merged["config"] = merged["config"] or result.get("config")
        for kind, fields in (("dense", ("task", "model", "seed")),
                             ("rows", ("task", "model", "seed", "criterion", "schedule",
                                       "target_macs"))):
            for entry in result[kind]:
                key = (kind, *(entry.get(f) for f in fields))
                value = entry.get("value", entry.get("error"))
                if key in seen:
                    if seen[key][0] != value:
                        raise ValueError(f"{path} and {seen[key][1]} disagree on {kind} "
                                         f"{dict(zip(fields, key[1:]))}: {value} vs "
                                         f"{seen[key][0]}; they come from different settings")
                    continue
                seen[key] = (value, path)
                merged[kind].append(entry)
        known = {(c["task"], c["seed"], c["criterion"]) for c in merged["criteria"]}
        merged["criteria"] += [c for c in result.get("criteria", [])
                               if (c["task"], c["seed"], c["criterion"]) not in known]
    return merged


def write_summary(result: dict, out: Path) -> None:
    """results.md and the PNG plots from a (possibly partial) results structure."""
    table = markdown(result)
    (out / "results.md").write_text(table)
    for task in dict.fromkeys(d["task"] for d in result["dense"]):
        plot_accuracy_vs_macs(result, out / f"accuracy_vs_macs_{task}.png", task)
    dense_widths = {(d["task"], d["seed"]): d.get("widths") for d in result["dense"]}
    for row in result["rows"]:
        if row["criterion"] == "kcp" and row["schedule"] == "oneshot" and "widths" in row \
                and dense_widths.get((row["task"], row["seed"])):
            report = PruneReport("kcp", 0, 0, 0, 0, 0.0, row["target_macs"], 1,
                                 dense_widths[(row["task"], row["seed"])], row["widths"], [])
            name = f"widths_{row['task']}_kcp{round(row['target_macs'] * 100)}_s{row['seed']}"
            report.plot_widths(out / f"{name}.png", title=f"{row['task']}: KCP, "
                               f"{row['target_macs']:.0%} of MACs kept (seed {row['seed']})")
    print(table)
