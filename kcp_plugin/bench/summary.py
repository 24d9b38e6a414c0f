"""Benchmark results as tables and PNG plots (mean and spread over seeds).

Rows fine-tuned with distillation (a ``distill`` field: the setting's name) are grouped per
setting, and get their own table and plot (:func:`distill_markdown`, :func:`plot_distill`):
each setting against the same rows fine-tuned on the task loss alone (``none``) and the dense
model fine-tuned for the same steps (``dense_ft``).
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

from ..report import PruneReport

__all__ = ["aggregate", "distill_gaps", "distill_markdown", "markdown", "merge_results",
           "plot_accuracy_vs_macs", "plot_distill", "write_summary"]


# metrics where lower is better (the others: higher)
LOWER_IS_BETTER = {"epe", "bad1", "bad3", "epe_real", "bad1_real", "bad3_real"}


def _label(row: dict[str, Any]) -> str:
    """A row's criterion, with its distillation setting when it has one."""
    setting = row.get("distill")
    if setting is None:
        return row["criterion"]
    return f"{row['criterion']} (no KD)" if setting == "none" else \
        f"{row['criterion']} + KD {setting}"


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1)
    return mean, math.sqrt(var) if len(values) > 1 else 0.0


def aggregate(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One summary row per (task, criterion, schedule, distillation setting, target): means and
    spreads over seeds (``distill`` is None for rows without the field)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in result["rows"]:
        groups[(row["task"], row["criterion"], row["schedule"], row["target_macs"],
                row.get("distill"))].append(row)
    costs: dict[tuple, list[dict]] = defaultdict(list)
    for c in result.get("criteria", []):
        costs[(c["task"], c["criterion"])].append(c)
    dense: dict[str, list[float]] = defaultdict(list)
    for d in result["dense"]:
        dense[d["task"]].append(d["value"])
    out = []
    for (task, criterion, schedule, target, setting), rows in groups.items():
        ok = [r for r in rows if "error" not in r]
        value, spread = _mean_std([r["value"] for r in ok])
        dense_mean, _ = _mean_std(dense[task])
        c = costs.get((task, criterion), [])
        out.append({
            "task": task, "criterion": criterion, "schedule": schedule, "target_macs": target,
            "distill": setting, "metric": ok[0]["metric"] if ok else "", "value": value,
            "std": spread,
            "delta_vs_dense": value - dense_mean, "seeds": len(ok),
            "errors": [r["error"] for r in rows if "error" in r],
            "after_prune": _mean_std([r.get("after_prune") for r in ok])[0],
            "macs_ratio": _mean_std([r.get("macs_ratio") for r in ok])[0],
            "latency_ratio": _mean_std([r.get("latency_ratio") for r in ok])[0],
            "time_vs_l2": _mean_std([x["time_vs_l2"] for x in c])[0],
            "spearman_vs_l2": _mean_std([x["spearman_vs_l2"] for x in c])[0],
        })
    return sorted(out, key=lambda r: (r["task"], r["target_macs"], r["schedule"], r["criterion"],
                                      r["distill"] or ""))


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
                error = r["errors"][0] if r["errors"] else "no rows"
                what = "n/a" if "not applicable: " in error else "failed"
                error = error.split("not applicable: ", 1)[-1]
                lines.append(f"| {r['target_macs']:.0%} | {r['schedule']} | {_label(r)} | "
                             f"{what}: {error[:80]} | | | | | | |")
                continue
            lines.append(
                f"| {r['target_macs']:.0%} | {r['schedule']} | {_label(r)} | "
                f"{r['value']:.2f} ± {r['std']:.2f} | {r['delta_vs_dense']:+.2f} | "
                f"{r['after_prune']:.2f} | {r['macs_ratio']:.3f} | {r['latency_ratio']:.2f} | "
                f"{r['time_vs_l2']:.2f}x | {r['spearman_vs_l2']:.2f} |")
    return "\n".join(lines) + "\n"


def _figure_legend(fig: Any, axes: Any) -> None:
    """One legend on the figure's right for the labelled artists of ``axes`` (first kept)."""
    handles = {}
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    fig.legend(handles.values(), handles.keys(), loc="center right", fontsize=7)


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
    criteria = list(dict.fromkeys(_label(r) for r in summary))
    cmap = plt.get_cmap("tab20")
    colours = {c: cmap(i % 20) for i, c in enumerate(criteria)}
    markers = "osD^v<>ph*XP"
    n = max(1, len(schedules))
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n + 1.8, 4.2), sharey=True, squeeze=False)
    for ax, schedule in zip(axes[0], schedules or [""]):
        for i, criterion in enumerate(criteria):
            pts = sorted((r["macs_ratio"], r["value"], r["std"]) for r in summary
                         if _label(r) == criterion and r["schedule"] == schedule)
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
    axes[0][0].set_ylabel(metric + (" (lower is better)" if metric in LOWER_IS_BETTER else ""))
    _figure_legend(fig, axes[0])
    fig.suptitle(f"{task}: {metric} after pruning and fine-tuning (mean ± spread over seeds)",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0, 1 - 1.6 / (3.6 * n + 1.8), 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _better(metric: str, a: float, b: float) -> float:
    """How much better ``a`` is than ``b`` (positive: better), whatever the metric's direction."""
    return b - a if metric in LOWER_IS_BETTER else a - b


def distill_gaps(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Per (task, criterion, schedule, target, setting): the metric, its gain over the same rows
    fine-tuned on the task loss alone (``none``, paired by seed) and the fraction of the gap
    between those and the dense model fine-tuned for the same steps (``dense_ft``) that the
    setting closes; means and spreads over the seeds that have all three.

    Gains and gaps are signed so that positive is better (EPE: lower). ``floor_met``: the
    mean closes at least half of the gap and the gain lies outside its spread (mean - spread
    > 0); ``floor_strict``: mean - spread of the closed fraction >= 0.5.
    """
    ft = {(d["task"], d["seed"]): d["value"] for d in result.get("dense_ft", [])}
    rows = [r for r in result["rows"] if r.get("distill") is not None]
    base = {(r["task"], r["criterion"], r["schedule"], r["target_macs"], r["seed"]): r["value"]
            for r in rows if r["distill"] == "none" and "error" not in r}
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["task"], r["criterion"], r["schedule"], r["target_macs"], r["distill"])].append(r)
    out = []
    for (task, criterion, schedule, target, setting), members in groups.items():
        ok = [r for r in members if "error" not in r]
        entry: dict[str, Any] = {
            "task": task, "criterion": criterion, "schedule": schedule, "target_macs": target,
            "distill": setting, "seeds": len(ok),
            "errors": sorted({r["error"] for r in members if "error" in r}),
            "config": ok[0].get("distill_config") if ok else None,
        }
        if ok:
            metric = ok[0]["metric"]
            entry["metric"] = metric
            entry["value"], entry["std"] = _mean_std([r["value"] for r in ok])
            entry["after_prune"] = _mean_std([r.get("after_prune") for r in ok])[0]
            gains, closed, per_seed = [], [], {}
            for r in sorted(ok, key=lambda r: r["seed"]):
                key = (task, criterion, schedule, target, r["seed"])
                if key not in base or (task, r["seed"]) not in ft:
                    continue
                gain = _better(metric, r["value"], base[key])
                gap = _better(metric, ft[(task, r["seed"])], base[key])
                gains.append(gain)
                closed.append(gain / gap if gap > 0 else float("nan"))
                per_seed[r["seed"]] = closed[-1]
            entry["paired_seeds"] = len(gains)
            entry["gain"], entry["gain_std"] = _mean_std(gains)
            entry["closed"], entry["closed_std"] = _mean_std(closed)
            entry["closed_per_seed"] = per_seed
            entry["floor_met"] = bool(len(gains) > 1 and entry["closed"] >= 0.5
                                      and entry["gain"] - entry["gain_std"] > 0)
            entry["floor_strict"] = bool(len(gains) > 1
                                         and entry["closed"] - entry["closed_std"] >= 0.5)
        out.append(entry)
    order = {name: i for i, name in enumerate(dict.fromkeys(
        r["distill"] for r in rows))}
    return sorted(out, key=lambda e: (e["task"], -e["target_macs"], e["criterion"],
                                      e["schedule"], order[e["distill"]]))


def _describe(config: dict[str, Any] | None) -> str:
    """A distillation config in a few words (output loss, feature and DCA layers, weights)."""
    if not config:
        return "task loss only"
    parts = []
    if config.get("output"):
        temp = (f" T={config['temperature']:g}" if config["output"] in ("kl", "cwd") else "")
        parts.append(f"{config['output']}{temp} ×{config['weight']:g}")
    if config.get("layers"):
        parts.append(f"features ×{config['layer_weight']:g} at {', '.join(config['layers'])}")
    if config.get("dca_layers"):
        parts.append(f"DCA ×{config['dca_weight']:g} at {', '.join(config['dca_layers'])} "
                     f"(after {config['dca_batches']} batches)")
    return "; ".join(parts)


def distill_markdown(result: dict[str, Any]) -> str:
    """Per task: the dense model, the dense model fine-tuned for the rows' steps, and every
    distillation setting with its gain over ``none`` and the fraction of the gap it closes."""
    gaps = distill_gaps(result)
    lines: list[str] = []
    for task in dict.fromkeys(e["task"] for e in gaps):
        entries = [e for e in gaps if e["task"] == task]
        metric = next((e["metric"] for e in entries if "metric" in e), "metric")
        dense = _mean_std([d["value"] for d in result["dense"] if d["task"] == task])
        ft_rows = [d for d in result.get("dense_ft", []) if d["task"] == task]
        ft = _mean_std([d["value"] for d in ft_rows])
        steps = ft_rows[0]["steps"] if ft_rows else "?"
        direction = " (lower is better)" if metric in LOWER_IS_BETTER else ""
        d = 3 if metric in LOWER_IS_BETTER else 2  # EPE in pixels: below 1
        lines += [f"### {task}: distillation at equal fine-tuning steps ({metric}{direction}, "
                  "mean ± spread over seeds)", "",
                  f"Dense: {dense[0]:.{d}f} ± {dense[1]:.{d}f}; dense fine-tuned for the same "
                  f"{steps} steps (the reference): {ft[0]:.{d}f} ± {ft[1]:.{d}f} "
                  f"({len(ft_rows)} seed{'s' if len(ft_rows) != 1 else ''}). Gain: over the "
                  "same prune fine-tuned on the task loss alone, paired by seed (positive: "
                  "better); gap closed: gain / (dense fine-tuned - task loss alone), per seed "
                  "(% per seed in seed order).",
                  "",
                  f"| MACs kept | criterion | schedule | distillation | {metric} | gain vs none "
                  "| gap closed | per seed | right after prune | seeds |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for e in entries:
            head = (f"| {e['target_macs']:.0%} | {e['criterion']} | {e['schedule']} | "
                    f"{e['distill']} |")
            if not e["seeds"]:
                reason = e["errors"][0] if e["errors"] else "no rows"
                what = "n/a" if "not applicable: " in reason else "failed"
                reason = reason.split("not applicable: ", 1)[-1]
                lines.append(f"{head} {what}: {reason[:110]} | | | | | 0 |")
                continue
            gain = (f"{e['gain']:+.{d}f} ± {e['gain_std']:.{d}f}" if e["paired_seeds"] and
                    e["distill"] != "none" else "")
            closed = per_seed = ""
            if e["paired_seeds"] and e["distill"] != "none":
                closed = f"{100 * e['closed']:.0f}% ± {100 * e['closed_std']:.0f}%"
                per_seed = " / ".join(f"{100 * v:.0f}" for v in e["closed_per_seed"].values())
            lines.append(f"{head} {e['value']:.{d}f} ± {e['std']:.{d}f} | {gain} | {closed} | "
                         f"{per_seed} | {e['after_prune']:.{d}f} | {e['seeds']} |")
        described: dict[str, str] = {}
        for e in entries:
            if e["config"] or e["distill"] == "none":
                described.setdefault(e["distill"], _describe(e["config"]))
        lines += ["", "Settings:", "", *(f"- `{k}`: {v}" for k, v in described.items()), ""]
    return "\n".join(lines) + "\n"


def plot_distill(result: dict[str, Any], path: str | os.PathLike, task: str) -> None:
    """PNG, one column per MACs target. Top: a bar per distillation setting (mean ± spread
    over seeds), the dense model fine-tuned for the same steps as a dashed line and the dense
    model as a dotted one. Bottom: the fraction of that gap each setting closes (per seed,
    mean ± spread), with the half-way line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = [e for e in distill_gaps(result) if e["task"] == task]
    targets = sorted({e["target_macs"] for e in entries}, reverse=True)
    # settings the task cannot take (no rows at any target) are named, not drawn
    every = list(dict.fromkeys(e["distill"] for e in entries))  # colours: the same per name
    settings = [s for s in every if any(e["seeds"] for e in entries if e["distill"] == s)]
    missing = [s for s in every if s not in settings]
    metric = next((e["metric"] for e in entries if "metric" in e), "")
    dense = _mean_std([d["value"] for d in result["dense"] if d["task"] == task])[0]
    ft = _mean_std([d["value"] for d in result.get("dense_ft", []) if d["task"] == task])[0]
    cmap = plt.get_cmap("tab10")
    n = max(1, len(targets))
    fig, axes = plt.subplots(2, n, figsize=(0.6 * max(len(settings), 4) * n + 2.5, 6.4),
                             sharey="row", squeeze=False, gridspec_kw={"height_ratios": [3, 2]})
    values = [dense, ft] + [v for e in entries if e["seeds"]
                            for v in (e["value"] - e["std"], e["value"] + e["std"])]
    values = [v for v in values if v == v]
    for col, target in enumerate(targets or [None]):
        top, bottom = axes[0][col], axes[1][col]
        for i, setting in enumerate(settings):
            e = next((e for e in entries if e["target_macs"] == target
                      and e["distill"] == setting), None)
            if e is None or not e["seeds"]:
                top.text(i, 0.5, "n/a", ha="center", fontsize=7,
                         transform=top.get_xaxis_transform())
                continue
            colour = cmap(every.index(setting) % 10)
            top.bar(i, e["value"], yerr=e["std"], capsize=3, color=colour, label=setting)
            if setting != "none" and e.get("paired_seeds"):
                bottom.bar(i, 100 * e["closed"], yerr=100 * e["closed_std"], capsize=3,
                           color=colour)
        if ft == ft:
            top.axhline(ft, color="k", lw=1, ls="--", label="dense + same fine-tuning")
        if dense == dense:
            top.axhline(dense, color="k", lw=1, ls=":", label="dense")
        bottom.axhline(50, color="k", lw=1, ls="--")
        bottom.axhline(0, color="k", lw=0.5)
        top.set_title(f"{target:.0%} of MACs kept" if target is not None else "", fontsize=9)
        top.set_xticks(range(len(settings)))
        top.set_xticklabels([])
        bottom.set_xticks(range(len(settings)))
        bottom.set_xticklabels(settings, rotation=45, ha="right", fontsize=7)
    if values:
        lo, hi = min(values), max(values)
        pad = 0.1 * (hi - lo or 1)
        axes[0][0].set_ylim(lo - pad, hi + pad)
    axes[0][0].set_ylabel(metric + (" (lower is better)" if metric in LOWER_IS_BETTER else ""))
    axes[1][0].set_ylabel("gap closed (%)")
    _figure_legend(fig, axes[0])
    fig.suptitle(f"{task}: distillation at equal fine-tuning steps (mean ± spread over seeds)",
                 fontsize=10)
    if missing:
        fig.text(0.01, 0.005, f"not applicable to {task}: {', '.join(missing)}", fontsize=7)
    fig.tight_layout(rect=(0, 0.02, 1 - 2.1 / fig.get_figwidth(), 0.96))  # legend: 2.1 in
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
    if any("dense_ft" in json.loads(p.read_text()) for p in paths):
        merged["dense_ft"] = []
    seen: dict[tuple, tuple[float, Path]] = {}
    for path in paths:
        result = json.loads(path.read_text())
        merged["config"] = merged["config"] or result.get("config")
        for kind, fields in (("dense", ("task", "model", "seed")),
                             ("dense_ft", ("task", "model", "seed")),
                             ("rows", ("task", "model", "seed", "criterion", "schedule",
                                       "target_macs", "distill"))):
            for entry in result.get(kind, []):
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
    distilled = any(r.get("distill") is not None for r in result["rows"])
    if distilled:
        table += "\n" + distill_markdown(result)
    (out / "results.md").write_text(table)
    for task in dict.fromkeys(d["task"] for d in result["dense"]):
        plot_accuracy_vs_macs(result, out / f"accuracy_vs_macs_{task}.png", task)
        if distilled and any(r["task"] == task and r.get("distill") for r in result["rows"]):
            plot_distill(result, out / f"distill_{task}.png", task)
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
