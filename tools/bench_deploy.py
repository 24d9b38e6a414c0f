#!/usr/bin/env python
"""Deployment benchmark: capacity kept for the latency removed, per backend, side by side.

Issue 23 ("pruned means faster"): for each model and backend (torch eager on the CPU,
onnxruntime on the CPU, and CUDA when the machine has a GPU), three ways of pruning with
``kcp`` are compared at the same measured latency:

* **uniform, plain widths**: one channel ratio for every group (torch-pruning's local pruning,
  ``round_to=1``), swept over ``--ratios`` and measured: the MACs kept where the curve crosses
  each latency target are read off the sweep (linear interpolation between measured points);
* **uniform, round_to=8**: the same with torch-pruning's ``round_to=8``;
* **latency table**: ``prune(..., target_latency_ratio=t, latency_backend=backend)`` (the
  table allocation of :mod:`kcp_plugin.deploy.search`), its latency measured again afterwards.

At equal latency, more MACs kept is more capacity kept (the issue's goal: MACs kept / latency
kept >= 0.85 at a latency target of 0.5 on onnxruntime and the GPU). Also per model and
backend: ``prune(..., target_macs_ratio=r)`` with the new default widths (the backend's channel
multiple) against dense ("never slower than dense"), and the latency model's own check
(prediction error, share of the latency its layers explain).

Models are built with random weights (latency depends on widths, not weights; nothing is
downloaded). Every sweep variant of a model is timed in one ``compare_latency`` call with the
dense model, passes interleaved. Writes ``deploy_latency.json`` / ``.md`` / ``.png`` into
``--out`` (the JSON after every model, so an interrupted run keeps what it measured).

    python tools/bench_deploy.py --out docs/benchmarks                       # CPU backends
    python tools/bench_deploy.py --backends cuda --out /tmp/gpu --time-limit 420   # on a GPU
    python tools/bench_deploy.py --quick --out /tmp/deploy                   # smoke run
    python tools/bench_deploy.py --replot docs/benchmarks/deploy_latency.json --out docs/benchmarks
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import shlex
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from kcp_plugin import Backend, compare_latency, count_macs_params, prune
from kcp_plugin.deploy.backends import BACKENDS, check_backend
from kcp_plugin.graph import ForwardFn, default_forward
from kcp_plugin.models import example_inputs as builtin_inputs
from kcp_plugin.zoo import build_from_spec

CRITERION = "kcp"
NAME = "deploy_latency"  # file stem of the outputs
GOAL = 0.85  # the goal: MACs kept / latency kept at a latency target of 0.5


def segmentation_out(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """torchvision segmentation models return ``{"out": ..., "aux": ...}``: keep ``"out"``."""
    return model(x)["out"]


@dataclass(frozen=True)
class Case:
    """A benchmarked model.

    Attributes:
        spec: Model spec for :func:`kcp_plugin.zoo.build_from_spec` (random weights).
        cpu_size: Input ``(H, W)`` on the CPU backends (batch 1).
        cuda_size / cuda_batch: Input and batch on CUDA.
        quick_size: Input of ``--quick`` (every backend, batch 1 / 2 on CUDA).
        kwargs: Constructor arguments.
        forward: How to call the model (None: ``model(x)`` / ``model(*x)``).
        sweep_size: Input ``(H, W)`` the uniform sweep is pruned (traced) at: a fixed channel
            ratio gives the same widths at any input size, and tracing the 512x512
            segmentation nets costs seconds per pass. MACs are counted at the timed size.
        family: ``"convnet"`` (the issue's capacity goal applies), ``"transformer"`` or
            ``"stereo"``.
    """

    spec: str
    cpu_size: tuple[int, int]
    cuda_size: tuple[int, int]
    cuda_batch: int
    quick_size: tuple[int, int]
    kwargs: dict[str, Any] = field(default_factory=dict)
    forward: ForwardFn | None = None
    sweep_size: tuple[int, int] | None = None
    family: str = "convnet"


_SEG = dict(kwargs={"aux_loss": False}, forward=segmentation_out, sweep_size=(128, 128),
            cpu_size=(256, 256), cuda_size=(512, 512), cuda_batch=8, quick_size=(64, 64))
CASES: dict[str, Case] = {
    "resnet50": Case("timm:resnet50", (224, 224), (224, 224), 64, (64, 64)),
    "convnext_tiny": Case("timm:convnext_tiny", (224, 224), (224, 224), 64, (64, 64)),
    "vit_small_patch16_224": Case("timm:vit_small_patch16_224", (224, 224), (224, 224), 64,
                                  (224, 224), family="transformer"),
    "mobilenetv3_large_100": Case("timm:mobilenetv3_large_100", (224, 224), (224, 224), 64,
                                  (64, 64)),
    "deeplabv3_resnet50": Case("torchvision:deeplabv3_resnet50", **_SEG),
    "fcn_resnet50": Case("torchvision:fcn_resnet50", **_SEG),
    "stereo_lite": Case("builtin:stereo_lite", (128, 256), (256, 512), 8, (64, 128),
                        family="stereo"),
    "resnet20": Case("builtin:resnet20", (32, 32), (32, 32), 256, (32, 32)),
}
FULL_MODELS = ["resnet50", "convnext_tiny", "vit_small_patch16_224", "mobilenetv3_large_100",
               "deeplabv3_resnet50", "fcn_resnet50", "stereo_lite"]
QUICK_MODELS = ["resnet20"]
RATIOS = (0.15, 0.3, 0.45, 0.6)  # uniform sweep: channel ratios


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be a fraction in (0, 1)")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be >= 1")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; ``--quick`` fills in the small profile where options are not given."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="models: " + ", ".join(
                                    f"{k} ({c.spec}; CPU {c.cpu_size[0]}x{c.cpu_size[1]}, "
                                    f"CUDA {c.cuda_size[0]}x{c.cuda_size[1]} batch "
                                    f"{c.cuda_batch})" for k, c in CASES.items()))
    p.add_argument("--models", nargs="+", choices=list(CASES), default=None, metavar="MODEL",
                   help=f"models (default: {' '.join(FULL_MODELS)}; --quick: "
                   f"{' '.join(QUICK_MODELS)}); choices: {', '.join(CASES)}")
    p.add_argument("--backends", nargs="+", choices=BACKENDS, default=None,
                   help="latency backends (default: torch onnxruntime, and cuda when torch "
                   "sees a GPU)")
    p.add_argument("--targets", nargs="+", type=_fraction, default=[0.7, 0.5], metavar="T",
                   help="latency targets of the table allocation (default: 0.7 0.5)")
    p.add_argument("--macs-targets", nargs="+", type=_fraction, default=[0.5], metavar="R",
                   help="MACs targets pruned with the default widths and timed against dense "
                   "(default: 0.5)")
    p.add_argument("--ratios", nargs="+", type=_fraction, default=list(RATIOS), metavar="R",
                   help=f"channel ratios of the uniform sweep (default: {RATIOS})")
    p.add_argument("--runs", type=_positive, default=None,
                   help="timed passes per measurement (default: 10 on the CPU, 20 on CUDA; "
                   "--quick: 3)")
    p.add_argument("--threads", type=_positive, default=1, help="CPU threads (default 1)")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="bf16",
                   help="CUDA dtype (default bf16; the CPU backends run fp32)")
    p.add_argument("--device", default=None, help="CUDA device (default: cuda)")
    p.add_argument("--time-limit", type=float, default=None, metavar="S",
                   help="stop starting new models after S seconds (a GPU lease is short)")
    p.add_argument("--quick", action="store_true", help="smoke run: resnet20, 3 runs")
    p.add_argument("--seed", type=int, default=0, help="random init seed")
    p.add_argument("--out", default="outputs/deploy", help="output folder")
    p.add_argument("--replot", default=None, metavar="JSON", nargs="+",
                   help="measure nothing: merge saved deploy_latency.json files (e.g. a CPU "
                   "and a GPU run) and rewrite the table and plot into --out")
    args = p.parse_args(argv)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        p.error(f"--out {out} is a file; give a folder")
    if args.replot:
        for path in args.replot:
            if not Path(path).is_file():
                p.error(f"--replot {path}: no such file")
        return args
    args.models = args.models or (QUICK_MODELS if args.quick else FULL_MODELS)
    if args.backends is None:
        args.backends = ["torch", "onnxruntime"] + (["cuda"] if torch.cuda.is_available()
                                                     else [])
    for name in args.backends:
        try:
            check_backend(_backend(name, CASES[args.models[0]], args))
        except (ValueError, ImportError) as exc:
            p.error(f"--backends {name}: {exc}")
    args.targets = sorted(set(args.targets), reverse=True)
    args.ratios = sorted(set(args.ratios))
    return args


def _backend(name: str, case: Case, args: argparse.Namespace) -> Backend:
    """The measurement setting of a backend for a model."""
    cuda = name == "cuda"
    runs = args.runs or (3 if args.quick else 20 if cuda else 10)
    if cuda:
        batch = 2 if args.quick else case.cuda_batch
        return Backend("cuda", device=args.device, dtype=args.dtype, batch=batch, runs=runs,
                       warmup=5)
    return Backend(name, threads=args.threads, runs=runs, warmup=2)


def _inputs(case: Case, size: tuple[int, int], seed: int) -> Any:
    """Random batch-1 inputs at ``size``: the builtin models' own (stereo: a pair), else an
    image."""
    torch.manual_seed(seed)
    if case.spec.startswith("builtin:"):
        return builtin_inputs(case.spec.split(":", 1)[1], size=size)
    return torch.randn(1, 3, *size)


def _build(case: Case, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return build_from_spec(case.spec, **case.kwargs).eval()


def _say(text: str) -> None:
    print(text, flush=True)


def _quiet_prune(*args: Any, **kwargs: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return prune(*args, progress=False, **kwargs)


def _sweep(case: Case, dense: nn.Module, x: Any, size: tuple[int, int], backend: Backend,
           args: argparse.Namespace) -> list[dict[str, Any]]:
    """Uniform channel ratios with plain widths and round_to=8, timed with dense in one
    interleaved call."""
    fwd = case.forward or default_forward
    sweep_size = size if args.quick or case.sweep_size is None else case.sweep_size
    xs = x if sweep_size == size else _inputs(case, sweep_size, args.seed)
    macs_d = count_macs_params(dense, x, fwd)[0]
    variants = []
    for multiple in (1, 8):
        for ratio in args.ratios:
            model = copy.deepcopy(dense)
            try:
                _quiet_prune(model, xs, CRITERION, pruning_ratio=ratio, round_to=multiple,
                             forward_fn=case.forward)
            except Exception as exc:  # recorded: one variant's failure must not end the run
                _say(f"    uniform {ratio} round_to {multiple}: {type(exc).__name__}: {exc}")
                continue
            variants.append({"round_to": multiple, "pruning_ratio": ratio, "model": model,
                             "macs_kept": count_macs_params(model, x, fwd)[0] / macs_d})
    stats = compare_latency([dense] + [v["model"] for v in variants], x, case.forward,
                            backend=backend)
    rows = []
    for v, s in zip(variants, stats[1:]):
        rows.append({"kind": "uniform", "round_to": v["round_to"],
                     "pruning_ratio": v["pruning_ratio"], "macs_kept": v["macs_kept"],
                     "latency_kept": s.median_ms / stats[0].median_ms,
                     "dense_ms": stats[0].median_ms, "pruned_ms": s.median_ms,
                     "spread": [s.q1_ms / stats[0].q3_ms, s.q3_ms / stats[0].q1_ms]})
    return rows


def _macs_row(case: Case, dense: nn.Module, x: Any, size: tuple[int, int], backend: Backend,
              target: float, args: argparse.Namespace) -> dict[str, Any]:
    """``prune(target_macs_ratio=target)`` with the backend's default widths, timed against
    dense by prune itself (``latency_backend`` named)."""
    model = copy.deepcopy(dense)
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = prune(model, x, CRITERION, target_macs_ratio=target, latency_backend=backend,
                       forward_fn=case.forward, progress=False)
    return {"kind": "macs", "target_macs": target, "round_to": report.round_to,
            "macs_kept": report.macs_ratio,
            "latency_kept": report.latency_after_ms / report.latency_before_ms,
            "dense_ms": report.latency_before_ms, "pruned_ms": report.latency_after_ms,
            "slower_warning": any("slower than the dense" in str(w.message) for w in caught),
            "time_s": time.perf_counter() - start}


def _table_row(case: Case, dense: nn.Module, x: Any, backend: Backend, target: float
               ) -> dict[str, Any]:
    """``prune(target_latency_ratio=target)``, table allocation, then measured again."""
    model = copy.deepcopy(dense)
    start = time.perf_counter()
    report = _quiet_prune(model, x, CRITERION, target_latency_ratio=target,
                          latency_backend=backend, forward_fn=case.forward)
    elapsed = time.perf_counter() - start
    d, p = compare_latency([dense, model], x, case.forward, backend=backend)
    summary = report.latency_model or {}
    return {"kind": "table", "target_latency": target, "macs_kept": report.macs_ratio,
            "params_kept": report.params_ratio,
            "search_latency_kept": report.latency_after_ms / report.latency_before_ms,
            "latency_kept": p.median_ms / d.median_ms, "dense_ms": d.median_ms,
            "pruned_ms": p.median_ms, "spread": [p.q1_ms / d.q3_ms, p.q3_ms / d.q1_ms],
            "time_s": elapsed, "trials": summary.get("trials"),
            "table_share": summary.get("table_share"),
            "calibrated_max_abs_error": summary.get("calibrated_max_abs_error"),
            "fallback": summary.get("fallback"),
            "table_measurements": summary.get("table_measurements"),
            "points": summary.get("points"),
            "widths": {k: [report.widths_before[k], v] for k, v in report.widths_after.items()}}


def measure(args: argparse.Namespace, result: dict[str, Any], out: Path) -> None:
    """Every (model, backend): sweep, MACs rows, table rows; the JSON written after each."""
    start = time.perf_counter()
    for name in args.models:
        if args.time_limit and time.perf_counter() - start > args.time_limit:
            _say(f"time limit reached: {name} and later models skipped")
            result["meta"]["skipped"] = args.models[args.models.index(name):]
            break
        case = CASES[name]
        dense = _build(case, args.seed)
        for backend_name in args.backends:
            backend = _backend(backend_name, case, args)
            size = case.quick_size if args.quick else (
                case.cuda_size if backend.is_cuda else case.cpu_size)
            x = _inputs(case, size, args.seed)
            base = {"model": name, "spec": case.spec, "family": case.family,
                    "backend": backend_name, "setting": backend.describe(), "input": list(size),
                    "batch": backend.batch or 1}
            _say(f"{name} on {backend.describe()}, {size[0]}x{size[1]}")
            steps: list[tuple[str, Any, tuple]] = [
                ("sweep", _sweep, (case, dense, x, size, backend, args))]
            steps += [(f"macs {r}", _macs_row, (case, dense, x, size, backend, r, args))
                      for r in args.macs_targets]
            steps += [(f"table {t}", _table_row, (case, dense, x, backend, t))
                      for t in args.targets]
            for label, step, step_args in steps:
                t0 = time.perf_counter()
                try:
                    rows = step(*step_args)
                    rows = rows if isinstance(rows, list) else [rows]
                except Exception as exc:  # recorded, the run goes on
                    rows = [{"kind": label.split()[0], "error": f"{type(exc).__name__}: {exc}"}]
                for row in rows:
                    result["rows"].append({**base, **row})
                _say(f"  {label}: {_summary(rows)} ({time.perf_counter() - t0:.0f} s)")
            if backend.is_cuda:
                torch.cuda.empty_cache()
        result["meta"]["total_s"] = time.perf_counter() - start
        write(result, out, quiet=True)


def _summary(rows: list[dict[str, Any]]) -> str:
    parts = []
    for r in rows:
        if "error" in r:
            parts.append(f"failed: {r['error'][:300]}")
        elif r["kind"] == "uniform":
            parts.append(f"r{r['round_to']}@{r['pruning_ratio']}: {r['macs_kept']:.2f}->"
                         f"{r['latency_kept']:.2f}")
        elif r["kind"] == "macs":
            parts.append(f"MACs {r['macs_kept']:.3f} (round_to {r['round_to']}) -> latency "
                         f"{r['latency_kept']:.3f}")
        else:
            parts.append(f"latency {r['latency_kept']:.3f} (search {r['search_latency_kept']:.3f}"
                         f") at MACs {r['macs_kept']:.3f}; table share {r['table_share']}, "
                         f"calibrated error {r['calibrated_max_abs_error']}")
    return "; ".join(parts)


# --------------------------------------------------------------------------------- summaries
def uniform_at(rows: list[dict[str, Any]], round_to: int, target: float) -> float | None:
    """MACs kept where the uniform sweep (``round_to``) crosses latency ``target``: linear
    interpolation between the two measured points around it (dense is (1, 1)); None if the
    sweep does not reach that low."""
    points = sorted([(1.0, 1.0)] + [(r["latency_kept"], r["macs_kept"]) for r in rows
                                    if r.get("kind") == "uniform" and r["round_to"] == round_to
                                    and "latency_kept" in r])
    for (l0, m0), (l1, m1) in zip(points, points[1:]):
        if l0 <= target <= l1:
            return m0 if l1 == l0 else m0 + (target - l0) * (m1 - m0) / (l1 - l0)
    return None


def markdown(result: dict[str, Any]) -> str:
    """Per backend: at each latency target, MACs kept by uniform widths (plain, round_to=8)
    and by the table allocation, with the measured latency and the capacity ratio; then the
    MACs-target rows against dense."""
    meta, rows = result["meta"], result["rows"]
    lines = [f"`{meta['command']}`", "",
             f"{meta.get('total_s', 0) / 60:.1f} min; torch {meta['torch']}; criterion "
             f"`{CRITERION}`, random init. Latency kept = pruned median / dense median, passes "
             "interleaved. Uniform rows: MACs kept where the measured sweep of channel ratios "
             f"({', '.join(map(str, meta['ratios']))}) crosses the target (interpolated). "
             "Table rows: `prune(target_latency_ratio=t)`, measured again after the prune "
             "(search measurement in brackets).", ""]
    for setting in dict.fromkeys(r["setting"] for r in rows):
        rs = [r for r in rows if r["setting"] == setting]
        lines += [f"### {setting}", "",
                  "| model | input | target | uniform plain: MACs | uniform r8: MACs | table: "
                  "MACs | table: latency kept | within 5% | table: MACs / latency |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for model in dict.fromkeys(r["model"] for r in rs):
            mr = [r for r in rs if r["model"] == model]
            size = f"{mr[0]['input'][0]}x{mr[0]['input'][1]} (b{mr[0]['batch']})"
            for t in meta["targets"]:
                u1, u8 = uniform_at(mr, 1, t), uniform_at(mr, 8, t)
                tab = next((r for r in mr if r.get("kind") == "table"
                            and r.get("target_latency") == t), None)
                cells = [f"{u:.3f}" if u is not None else "not reached" for u in (u1, u8)]
                if tab is None:
                    cells += ["-", "-", "-", "-"]
                elif "error" in tab:
                    cells += [f"failed: {tab['error'][:80]}", "-", "-", "-"]
                else:
                    ok = abs(tab["latency_kept"] - t) <= 0.05 * t
                    cells += [f"{tab['macs_kept']:.3f}",
                              f"{tab['latency_kept']:.3f} ({tab['search_latency_kept']:.3f})",
                              "yes" if ok else "no",
                              f"{tab['macs_kept'] / tab['latency_kept']:.2f}"]
                lines.append(f"| {model} | {size} | {t} | " + " | ".join(cells) + " |")
        macs = [r for r in rs if r.get("kind") == "macs"]
        if macs:
            lines += ["", "MACs targets with the default widths (the backend's channel "
                      "multiple), against dense:", "",
                      "| model | MACs target | round_to used | MACs kept | latency kept | "
                      "slower than dense |", "|---|---|---|---|---|---|"]
            for r in macs:
                if "error" in r:
                    lines.append(f"| {r['model']} | - | - | failed: {r['error'][:80]} | - | - |")
                    continue
                lines.append(f"| {r['model']} | {r['target_macs']} | {r['round_to'] or 1} | "
                             f"{r['macs_kept']:.3f} | {r['latency_kept']:.3f} | "
                             f"{'yes' if r['latency_kept'] > 1 else 'no'} |")
        tables = [r for r in rs if r.get("kind") == "table" and "error" not in r]
        if tables:
            lines += ["", "Latency model (table allocation): share of the dense latency the "
                      "table's layers explain, largest prediction error after calibration, "
                      "trials, allocation time:", "",
                      "| model | target | table share | calibrated error | trials | "
                      "measurements | time |", "|---|---|---|---|---|---|---|"]
            for r in tables:
                err = r["calibrated_max_abs_error"]
                lines.append(f"| {r['model']} | {r['target_latency']} | {r['table_share']} | "
                             f"{'-' if err is None else f'{err:.1%}'} | {len(r['trials'] or [])}"
                             f" | {r['table_measurements']} | {r['time_s']:.0f} s |")
        lines.append("")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    """MACs kept vs latency kept, one panel per backend setting: the uniform sweeps (plain:
    dashed, round_to=8: solid) and the table allocation (stars) per model; up and left is
    better; the dotted line is MACs kept = latency kept."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    rows = [r for r in result["rows"] if "latency_kept" in r]
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    if not settings:
        return
    fig, axes = plt.subplots(1, len(settings), figsize=(5.2 * len(settings) + 2.4, 4.6),
                             squeeze=False)
    colours = {m: f"C{i}" for i, m in enumerate(dict.fromkeys(r["model"] for r in rows))}
    for ax, setting in zip(axes[0], settings):
        ax.plot([0, 1.05], [0, 1.05], "k:", lw=1)
        for model, colour in colours.items():
            mr = [r for r in rows if r["setting"] == setting and r["model"] == model]
            for multiple, style in ((1, "--"), (8, "-")):
                pts = sorted([(1.0, 1.0)] + [(r["latency_kept"], r["macs_kept"]) for r in mr
                                             if r["kind"] == "uniform"
                                             and r["round_to"] == multiple])
                if len(pts) > 1:
                    ax.plot(*zip(*pts), style, color=colour, lw=1, marker=".", ms=4,
                            alpha=0.8)
            for r in mr:
                if r["kind"] == "table":
                    ax.plot(r["latency_kept"], r["macs_kept"], "*", ms=12, color=colour,
                            mec="k", mew=0.5)
                elif r["kind"] == "macs":
                    ax.plot(r["latency_kept"], r["macs_kept"], "s", ms=6, mfc="none",
                            color=colour)
        ax.set_title(setting, fontsize=8)
        ax.set_xlabel("latency kept (pruned / dense median)")
        ax.set_ylabel("MACs kept")
        ax.set_xlim(0, 1.4)
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], ls="", marker="o", color=c) for c in colours.values()]
    labels = list(colours)
    handles += [Line2D([], [], ls="--", color="grey"), Line2D([], [], ls="-", color="grey"),
                Line2D([], [], ls="", marker="*", ms=10, color="grey", mec="k"),
                Line2D([], [], ls="", marker="s", mfc="none", color="grey"),
                Line2D([], [], ls=":", color="k")]
    labels += ["uniform, plain widths", "uniform, round_to=8", "latency table allocation",
               "MACs target, default widths", "MACs kept = latency kept"]
    fig.legend(handles, labels, loc="center right", fontsize=8, frameon=False)
    fig.suptitle(f"{CRITERION}-pruned models: capacity (MACs) kept against latency kept; "
                 "higher and further left is better", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1 - 2.5 / fig.get_figwidth(), 0.95))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"torch": torch.__version__}
    for module in ("onnxruntime", "timm", "torchvision", "torch_pruning"):
        try:
            out[module] = __import__(module).__version__
        except (ImportError, AttributeError):
            out[module] = None
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit status (0 ok, 2 bad arguments, 130 interrupted)."""
    try:
        args = parse_args(argv)
    except SystemExit as exc:  # argparse's exit: its status (2 for bad arguments)
        return int(exc.code or 0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.replot:
        merged: dict[str, Any] = {"meta": {}, "rows": []}
        for path in args.replot:
            data = json.loads(Path(path).read_text())
            merged["rows"] += data["rows"]
            for k, v in data["meta"].items():
                merged["meta"].setdefault(k, v)
            if len(args.replot) > 1:
                merged["meta"]["command"] = " and ".join(
                    json.loads(Path(p).read_text())["meta"]["command"] for p in args.replot)
        write(merged, out)
        return 0
    command = "python tools/bench_deploy.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    meta: dict[str, Any] = {
        "command": command.strip(), "criterion": CRITERION, "targets": args.targets,
        "macs_targets": args.macs_targets, "ratios": args.ratios, "backends": args.backends,
        "threads": args.threads, "quick": args.quick, "seed": args.seed, "goal": GOAL,
        "cpus": os.cpu_count(), "load_before": list(os.getloadavg()), **_versions()}
    if torch.cuda.is_available():
        meta["gpu"] = torch.cuda.get_device_name()
    result: dict[str, Any] = {"meta": meta, "rows": []}
    logging.getLogger("kcp_plugin").setLevel(logging.WARNING)
    try:
        measure(args, result, out)
    except KeyboardInterrupt:
        print("interrupted: the rows measured so far are written", file=sys.stderr)
        write(result, out)
        return 130
    meta["load_after"] = list(os.getloadavg())
    write(result, out)
    print(f"{meta.get('total_s', 0) / 60:.1f} min")
    return 0


def write(result: dict[str, Any], out: Path, quiet: bool = False) -> None:
    """``{NAME}.json``, ``.md`` and ``.png`` into ``out``."""
    (out / f"{NAME}.json").write_text(json.dumps(result, indent=1) + "\n")
    table = markdown(result)
    (out / f"{NAME}.md").write_text(table)
    plot(result, out / f"{NAME}.png")
    if not quiet:
        print(table)
        print(f"results in {out}/ ({NAME}.json, {NAME}.md, {NAME}.png)")


if __name__ == "__main__":
    sys.exit(main())
