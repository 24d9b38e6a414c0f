#!/usr/bin/env python
"""Deployment benchmark: latency kept vs MACs kept, torch eager and onnxruntime, 1 and 2 threads.

Issue 16 ("deploy what you prune"): a pruned model is only worth its MACs if the runtime it is
deployed on turns fewer MACs into less time. For each model, pruned with ``kcp`` to each
``--ratios`` fraction of its MACs (``round_to`` variants where listed), this measures the
latency kept (pruned median / dense median) with :func:`kcp_plugin.compare_latency` (dense and
pruned passes interleaved, fixed threads, median and quartiles) in torch eager and in
onnxruntime (each model exported and checked by :func:`kcp_plugin.export_onnx`), on each
``--threads`` count. Latency depends on the widths, not on the weights, so models are pruned at
random initialisation (nothing is downloaded). Then the latency target: one model pruned with
``prune(..., target_latency_ratio=r)``, its search time and the latency it keeps, measured
again afterwards.

Writes ``deploy_latency.json``, ``deploy_latency.md`` and ``deploy_latency.png`` (latency kept
vs MACs kept per backend, with the y = x line) into ``--out``.

    python tools/bench_deploy.py --out docs/benchmarks              # the full run (~30 min)
    python tools/bench_deploy.py --quick --out /tmp/deploy          # smoke run (~1-2 min)
    python tools/bench_deploy.py --models resnet50 mobilenetv3_large_100 --threads 1

(``tools/bench_latency.py`` is the older study of the benchmark's own small nets at several
input sizes, torch eager only.)
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import shlex
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from kcp_plugin import compare_latency, count_macs_params, prune
from kcp_plugin.deploy.latency import BACKENDS, LatencyStats
from kcp_plugin.graph import ForwardFn, default_forward
from kcp_plugin.models import example_inputs as builtin_inputs
from kcp_plugin.zoo import build_from_spec

CRITERION = "kcp"
NAME = "deploy_latency"  # file stem of the outputs
GOAL = 1.2  # the goal: onnxruntime latency kept <= 1.2 x MACs kept (convnets)


def segmentation_out(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """torchvision segmentation models return ``{"out": ..., "aux": ...}``: keep ``"out"``."""
    return model(x)["out"]


@dataclass(frozen=True)
class Case:
    """A benchmarked model.

    Attributes:
        spec: Model spec for :func:`kcp_plugin.zoo.build_from_spec` (random weights).
        size: Input ``(H, W)`` of the full run; ``quick_size`` that of ``--quick``.
        kwargs: Constructor arguments.
        forward: How to call the model (None: ``model(x)`` / ``model(*x)``).
        round_to: Channel multiples pruned and timed (None: no rounding).
        prune_size: Input ``(H, W)`` the model is pruned (traced) at, if not ``size``: the
            widths ``kcp`` keeps depend on the weights only, and tracing the 512x512
            segmentation nets costs seconds per pass; MACs kept are counted at ``size``.
        slow: Seconds per forward pass: timed with ``--slow-runs`` passes and one warm-up.
        family: ``"convnet"`` (the issue's goal applies), ``"transformer"`` or ``"stereo"``.
    """

    spec: str
    size: tuple[int, int]
    quick_size: tuple[int, int]
    kwargs: dict[str, Any] = field(default_factory=dict)
    forward: ForwardFn | None = None
    round_to: tuple[int | None, ...] = (None,)
    prune_size: tuple[int, int] | None = None
    slow: bool = False
    family: str = "convnet"


# round_to=8: onnxruntime's blocked-layout (NCHWc) convolutions need channel counts that are
# multiples of its block (8 with AVX2, 16 with AVX-512); other widths fall back to plain NCHW
# kernels. stereo_lite's layers (8-32 channels) are too narrow for 8 to reach 50% of the MACs.
_SEG = dict(kwargs={"aux_loss": False}, forward=segmentation_out, prune_size=(128, 128),
            slow=True, round_to=(None, 8))
CASES: dict[str, Case] = {
    "resnet50": Case("timm:resnet50", (224, 224), (64, 64), round_to=(None, 8)),
    "mobilenetv3_large_100": Case("timm:mobilenetv3_large_100", (224, 224), (64, 64),
                                  round_to=(None, 8)),
    "deeplabv3_resnet50": Case("torchvision:deeplabv3_resnet50", (512, 512), (64, 64), **_SEG),
    "fcn_resnet50": Case("torchvision:fcn_resnet50", (512, 512), (64, 64), **_SEG),
    "vit_small_patch16_224": Case("timm:vit_small_patch16_224", (224, 224), (224, 224),
                                  family="transformer"),
    "stereo_lite": Case("builtin:stereo_lite", (256, 512), (64, 128), family="stereo"),
    "resnet20": Case("builtin:resnet20", (32, 32), (32, 32)),
}
FULL_MODELS = ["resnet50", "mobilenetv3_large_100", "deeplabv3_resnet50", "fcn_resnet50",
               "vit_small_patch16_224", "stereo_lite"]
QUICK_MODELS = ["resnet20", "mobilenetv3_large_100"]
FULL = {"runs": 10, "target_model": "resnet50"}
QUICK = {"runs": 3, "target_model": "resnet20"}


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
                                    f"{k} ({c.spec}, {c.size[0]}x{c.size[1]})"
                                    for k, c in CASES.items()))
    p.add_argument("--models", nargs="+", choices=list(CASES), default=None, metavar="MODEL",
                   help=f"models to time (default: {' '.join(FULL_MODELS)}; --quick: "
                   f"{' '.join(QUICK_MODELS)}); choices: {', '.join(CASES)}")
    p.add_argument("--ratios", nargs="+", type=_fraction, default=[0.5, 0.3], metavar="R",
                   help="fractions of the MACs kept by kcp (default: 0.5 0.3)")
    p.add_argument("--threads", nargs="+", type=_positive, default=[1, 2], metavar="N",
                   help="CPU thread counts timed (default: 1 2)")
    p.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS),
                   help="latency backends (default: both; onnxruntime needs kcp-plugin[deploy])")
    p.add_argument("--runs", type=_positive, default=None,
                   help="timed passes per model and setting (default 10; --quick: 3)")
    p.add_argument("--slow-runs", type=_positive, default=5,
                   help="timed passes for the slow models (512x512 segmentation; default 5)")
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed passes first (default 2; slow models: 1)")
    p.add_argument("--latency-target", type=_fraction, default=0.5, metavar="R",
                   help="latency target row: prune(..., target_latency_ratio=R) (default 0.5)")
    p.add_argument("--no-latency-target", action="store_true", help="skip that row")
    p.add_argument("--latency-target-model", choices=list(CASES), default=None,
                   help="model of the latency target row (default resnet50; --quick: resnet20)")
    p.add_argument("--latency-target-backend", choices=BACKENDS, default="torch",
                   help="backend of the latency target (default torch, on 1 thread)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: small models at small inputs, 3 runs")
    p.add_argument("--seed", type=int, default=0, help="random init seed")
    p.add_argument("--out", default="outputs/deploy", help="output folder")
    p.add_argument("--replot", default=None, metavar="JSON",
                   help="measure nothing: rewrite the table and plot of a saved "
                   f"{NAME}.json into --out")
    args = p.parse_args(argv)
    if args.replot:
        if not Path(args.replot).is_file():
            p.error(f"--replot {args.replot}: no such file")
        return args
    profile = QUICK if args.quick else FULL
    args.models = args.models or (QUICK_MODELS if args.quick else FULL_MODELS)
    args.runs = args.runs or profile["runs"]
    args.latency_target_model = args.latency_target_model or profile["target_model"]
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.latency_target_backend == "onnxruntime" or "onnxruntime" in args.backends:
        try:
            from kcp_plugin.deploy.export import require_deploy

            require_deploy()
        except ImportError as exc:
            p.error(f"{exc} (or pass --backends torch)")
    args.ratios = sorted(set(args.ratios), reverse=True)
    args.threads = sorted(set(args.threads))
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        p.error(f"--out {out} is a file; give a folder")
    return args


def _inputs(case: Case, size: tuple[int, int], seed: int) -> Any:
    """Random inputs at ``size``: the builtin models' own (stereo: a pair), else an image."""
    torch.manual_seed(seed)
    if case.spec.startswith("builtin:"):
        return builtin_inputs(case.spec.split(":", 1)[1], size=size)
    return torch.randn(1, 3, *size)


def _build(case: Case, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return build_from_spec(case.spec, **case.kwargs).eval()


def _aten_macs(model: nn.Module, x: Any, fwd: ForwardFn) -> float:
    """Conv / matmul MACs counted by torch's ``FlopCounterMode`` (attention's matmuls too,
    which torch-pruning's counter, the one MACs targets use, does not see)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fwd(model, x)
    return counter.get_total_flops() / 2


def _kept_range(dense: LatencyStats, pruned: LatencyStats) -> tuple[float, float]:
    """The latency kept's spread from the quartiles: pruned q1 / dense q3 .. pruned q3 /
    dense q1 (conservative: both spreads at their extremes)."""
    return pruned.q1_ms / dense.q3_ms, pruned.q3_ms / dense.q1_ms


def _say(text: str) -> None:
    print(text, flush=True)


def prepare(name: str, args: argparse.Namespace) -> tuple[nn.Module, list[dict[str, Any]], Any]:
    """Build the dense model and its pruned variants.

    Returns:
        ``(dense, variants, x)``: each variant a dict with ``model``, ``target_macs``,
        ``round_to``, ``macs_kept``, ``aten_macs_kept``, ``params_kept``, ``prune_s`` (or
        ``error``); ``x`` the timing inputs.
    """
    case = CASES[name]
    size = case.quick_size if args.quick else case.size
    prune_size = size if args.quick or case.prune_size is None else case.prune_size
    fwd = case.forward or default_forward
    dense = _build(case, args.seed)
    x = _inputs(case, size, args.seed)
    xp = x if prune_size == size else _inputs(case, prune_size, args.seed)
    macs_d, params_d = count_macs_params(dense, x, fwd)
    aten_d = _aten_macs(dense, xp, fwd)
    variants = []
    for ratio in args.ratios:
        for multiple in case.round_to:
            v: dict[str, Any] = {"target_macs": ratio, "round_to": multiple}
            pruned = copy.deepcopy(dense)
            start = time.perf_counter()
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    prune(pruned, xp, CRITERION, target_macs_ratio=ratio, round_to=multiple,
                          forward_fn=case.forward, progress=False)
            except Exception as exc:  # recorded: one model's failure must not end the run
                v["error"] = f"prune: {type(exc).__name__}: {exc}"
                _say(f"  {name} target {ratio} round_to {multiple}: {v['error']}")
                variants.append(v)
                continue
            v["prune_s"] = time.perf_counter() - start
            macs_p, params_p = count_macs_params(pruned, x, fwd)
            v.update(model=pruned, macs_kept=macs_p / macs_d, params_kept=params_p / params_d,
                     aten_macs_kept=_aten_macs(pruned, xp, fwd) / aten_d,
                     warnings=sorted({str(w.message).split(":")[0] for w in caught
                                      if issubclass(w.category, UserWarning)}))
            _say(f"  pruned {name} to {ratio} of the MACs (round_to {multiple}): MACs kept "
                 f"{v['macs_kept']:.3f}, params kept {v['params_kept']:.3f} "
                 f"({v['prune_s']:.0f} s)")
            variants.append(v)
    info = {"macs_dense": macs_d, "params_dense": params_d, "aten_macs_dense": aten_d}
    for v in variants:
        v.update(info)
    return dense, variants, x


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One row per (model, variant, backend, threads): MACs kept and latency kept."""
    rows: list[dict[str, Any]] = []
    total = len(args.models) * len(args.backends) * len(args.threads)
    done = 0
    for name in args.models:
        case = CASES[name]
        _say(f"{name} ({case.spec}): building and pruning")
        dense, variants, x = prepare(name, args)
        ok = [v for v in variants if "error" not in v]
        runs = min(args.runs, args.slow_runs) if case.slow and not args.quick else args.runs
        warmup = min(args.warmup, 1) if case.slow and not args.quick else args.warmup
        shape = list((x[0] if isinstance(x, tuple) else x).shape[-2:])
        base = {"model": name, "spec": case.spec, "family": case.family, "input": shape}
        for v in variants:
            if "error" in v:
                rows.append({**base, **{k: v[k] for k in ("target_macs", "round_to", "error")}})
        for backend in args.backends:
            for threads in args.threads:
                done += 1
                if not ok:
                    continue
                start = time.perf_counter()
                try:
                    with warnings.catch_warnings():
                        # the exporter's notes on shape asserts it bakes in (timm's patch
                        # embedding): the export is checked against torch at this shape
                        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
                        stats = compare_latency([dense] + [v["model"] for v in ok], x,
                                                case.forward, warmup=warmup, runs=runs,
                                                threads=threads, backend=backend)
                except Exception as exc:  # e.g. ExportError: recorded, the run goes on
                    error = f"{backend}: {type(exc).__name__}: {exc}"
                    _say(f"[{done}/{total}] {name} {backend} {threads} thread(s): {error}")
                    for v in ok:
                        rows.append({**base, "target_macs": v["target_macs"],
                                     "round_to": v["round_to"], "backend": backend,
                                     "threads": threads, "error": error})
                    continue
                d = stats[0]
                kept = []
                for v, s in zip(ok, stats[1:]):
                    low, high = _kept_range(d, s)
                    rows.append({
                        **base, "target_macs": v["target_macs"], "round_to": v["round_to"],
                        "macs_kept": v["macs_kept"], "aten_macs_kept": v["aten_macs_kept"],
                        "params_kept": v["params_kept"], "macs_dense": v["macs_dense"],
                        "prune_s": v["prune_s"], "prune_warnings": v["warnings"],
                        "backend": backend, "threads": threads, "runs": s.runs,
                        "dense_ms": d.median_ms, "dense_q1_ms": d.q1_ms, "dense_q3_ms": d.q3_ms,
                        "pruned_ms": s.median_ms, "pruned_q1_ms": s.q1_ms,
                        "pruned_q3_ms": s.q3_ms, "latency_kept": s.median_ms / d.median_ms,
                        "latency_kept_low": low, "latency_kept_high": high,
                        "load": os.getloadavg()[0]})
                    kept.append(f"{v['macs_kept']:.2f}->{s.median_ms / d.median_ms:.2f}")
                _say(f"[{done}/{total}] {name} {backend} {threads} thread(s): dense "
                     f"{d.describe()}; MACs->latency kept {', '.join(kept)} "
                     f"({time.perf_counter() - start:.0f} s)")
        del dense, variants
    return rows


def latency_target(args: argparse.Namespace) -> dict[str, Any]:
    """The latency-target row: ``prune(..., target_latency_ratio=r)`` on one model (1 thread),
    timed, then the result measured again against the dense model with twice the runs."""
    name = args.latency_target_model
    case = CASES[name]
    size = case.quick_size if args.quick else case.size
    dense = _build(case, args.seed)
    x = _inputs(case, size, args.seed)
    model = copy.deepcopy(dense)
    row: dict[str, Any] = {"model": name, "spec": case.spec, "input": list(size),
                           "target_latency_ratio": args.latency_target,
                           "backend": args.latency_target_backend, "threads": 1,
                           "runs": args.runs}
    _say(f"latency target: {name}, target_latency_ratio={args.latency_target} "
         f"({args.latency_target_backend}, 1 thread, {args.runs} runs per trial)")
    logger = logging.getLogger("kcp_plugin.deploy.search")  # one line per trial
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("  %(message)s"))
    logger.addHandler(handler)
    previous = logger.level
    logger.setLevel(logging.INFO)
    start = time.perf_counter()
    try:
        report = prune(model, x, CRITERION, target_latency_ratio=args.latency_target,
                       latency_backend=args.latency_target_backend, latency_threads=1,
                       latency_runs=max(args.runs, 3), forward_fn=case.forward, progress=False)
    except Exception as exc:
        row["error"] = f"{type(exc).__name__}: {exc}"
        _say(f"  latency target failed: {row['error']}")
        return row
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)
    row["search_s"] = time.perf_counter() - start
    fwd = case.forward or default_forward
    d, p = compare_latency([dense, model], x, fwd, warmup=args.warmup, runs=2 * args.runs,
                           threads=1, backend=args.latency_target_backend)
    low, high = _kept_range(d, p)
    row.update(
        trials=[{"target_macs": m, "round_to": k, "latency_kept": lat}
                for m, k, lat in report.latency_search],
        macs_kept=report.macs_after / report.macs_before, round_to=report.round_to,
        search_latency_kept=report.latency_after_ms / report.latency_before_ms,
        latency_kept=p.median_ms / d.median_ms, latency_kept_low=low, latency_kept_high=high,
        dense_ms=d.median_ms, pruned_ms=p.median_ms, recheck_runs=p.runs)
    row["within_tolerance"] = abs(row["search_latency_kept"] - args.latency_target) <= 0.05
    _say(f"  {len(row['trials'])} trials in {row['search_s']:.0f} s: MACs kept "
         f"{row['macs_kept']:.3f}, latency kept {row['search_latency_kept']:.3f} in the search, "
         f"{row['latency_kept']:.3f} re-measured ({p.runs} runs)")
    return row


def _cell(rows: list[dict[str, Any]], backend: str, threads: int) -> str:
    r = next((r for r in rows if r.get("backend") == backend and r.get("threads") == threads),
             None)
    if r is None:
        return "-"
    if "error" in r:
        return "failed"
    return f"{r['latency_kept']:.2f} ({r['latency_kept_low']:.2f}-{r['latency_kept_high']:.2f})"


def _goal(rows: list[dict[str, Any]], backend: str, threads: int) -> str:
    """Latency kept / MACs kept, and whether it meets the issue's goal (<= 1.2)."""
    r = next((r for r in rows if r.get("backend") == backend and r.get("threads") == threads
              and "latency_kept" in r), None)
    if r is None:
        return "-"
    ratio = r["latency_kept"] / r["macs_kept"]
    return f"{ratio:.2f} ({'yes' if ratio <= GOAL else 'no'})"


def _variants(rows: list[dict[str, Any]]) -> list[tuple[str, float, Any]]:
    seen: dict[tuple[str, float, Any], None] = {}
    for r in rows:
        seen.setdefault((r["model"], r["target_macs"], r["round_to"]), None)
    return list(seen)


def markdown(result: dict[str, Any]) -> str:
    """The results as markdown: latency kept per variant and setting, dense medians, the
    latency-target row."""
    meta, rows = result["meta"], result["rows"]
    settings = [(b, t) for b in meta["backends"] for t in meta["threads"]]
    label = {"torch": "torch", "onnxruntime": "ORT"}
    goal_setting = ("onnxruntime", min(meta["threads"]))
    goal_head = f"ORT {goal_setting[1]}T / MACs kept"
    lines = [
        f"`{meta['command']}`: {meta['total_s'] / 60:.1f} min on {meta['machine']} "
        f"({meta['cpus']} CPUs; load average {meta['load_before'][0]:.1f} before, "
        f"{meta['load_after'][0]:.1f} after); torch {meta['torch']}, onnxruntime "
        f"{meta.get('onnxruntime') or '-'}. Batch 1, random init, `{CRITERION}`; latency kept = "
        "pruned median / dense median, passes interleaved; in brackets pruned q1 / dense q3 to "
        "pruned q3 / dense q1.", "",
        "| model | input | MACs target | round_to | MACs kept | "
        + " | ".join(f"{label[b]} {t}T" for b, t in settings) + f" | {goal_head} |",
        "|---|---|---|---|---|" + "---|" * (len(settings) + 1)]
    for model, target, multiple in _variants(rows):
        rs = [r for r in rows if (r["model"], r["target_macs"], r["round_to"])
              == (model, target, multiple)]
        first = next((r for r in rs if "macs_kept" in r), rs[0])
        macs = f"{first['macs_kept']:.3f}" if "macs_kept" in first else "failed"
        if "macs_kept" in first and abs(first["aten_macs_kept"] - first["macs_kept"]) > 0.01:
            macs += f" (aten {first['aten_macs_kept']:.3f})"
        lines.append(f"| {model} | {first['input'][0]}x{first['input'][1]} | {target} | "
                     f"{multiple or '-'} | {macs} | "
                     + " | ".join(_cell(rs, b, t) for b, t in settings)
                     + f" | {_goal(rs, *goal_setting)} |")
    lines += ["", "Dense medians (ms):", "",
              "| model | " + " | ".join(f"{label[b]} {t}T" for b, t in settings) + " |",
              "|---|" + "---|" * len(settings)]
    for model in dict.fromkeys(r["model"] for r in rows):
        cells = []
        for b, t in settings:
            r = next((r for r in rows if r["model"] == model and r.get("backend") == b
                      and r.get("threads") == t and "dense_ms" in r), None)
            cells.append(f"{r['dense_ms']:.1f}" if r else "-")
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    target = result.get("latency_target")
    if target:
        lines += ["", f"Latency target ({target['backend']}, 1 thread): "
                  f"`prune(..., target_latency_ratio={target['target_latency_ratio']})`", ""]
        if "error" in target:
            lines.append(f"{target['model']}: failed: {target['error']}")
        else:
            lines += [
                "| model | target | MACs kept | latency kept (search) | latency kept "
                "(re-measured) | trials | search time |", "|---|---|---|---|---|---|---|",
                f"| {target['model']} | {target['target_latency_ratio']} | "
                f"{target['macs_kept']:.3f} | {target['search_latency_kept']:.3f} | "
                f"{target['latency_kept']:.3f} ({target['latency_kept_low']:.2f}-"
                f"{target['latency_kept_high']:.2f}) | {len(target['trials'])} | "
                f"{target['search_s']:.0f} s |"]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    """Latency kept vs MACs kept, one panel per backend (columns) and thread count (rows): a
    colour per model, circles for plain widths and hollow squares for ``round_to`` variants,
    bars from the quartiles; the y = x line and the issue's goal line y = 1.2 x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    meta, rows = result["meta"], [r for r in result["rows"] if "latency_kept" in r]
    backends, threads = meta["backends"], meta["threads"]
    fig, axes = plt.subplots(len(threads), len(backends), sharex=True, sharey=True,
                             figsize=(4.6 * len(backends) + 2.2, 3.9 * len(threads)),
                             squeeze=False)
    colours = {m: f"C{i}" for i, m in enumerate(dict.fromkeys(r["model"] for r in rows))}
    target = result.get("latency_target")
    xs = [r["macs_kept"] for r in rows] + ([target["macs_kept"]] if target
                                           and "macs_kept" in target else [])
    left, right = max(0.0, min(xs, default=0) - 0.08), min(1.02, max(xs, default=1) + 0.08)
    # the medians set the scale; a wild quartile (a load spike) is clipped, not the axis
    top = max([1.3] + [1.1 * r["latency_kept"] for r in rows])
    for i, n in enumerate(threads):
        for j, backend in enumerate(backends):
            ax = axes[i][j]
            ax.plot([0, 1.1], [0, 1.1], "k:", lw=1)
            ax.plot([0, 1.1], [0, 1.1 * GOAL], "k--", lw=0.8, alpha=0.5)
            for r in rows:
                if r["backend"] != backend or r["threads"] != n:
                    continue
                colour = colours[r["model"]]
                ax.errorbar(r["macs_kept"], r["latency_kept"],
                            yerr=[[r["latency_kept"] - r["latency_kept_low"]],
                                  [r["latency_kept_high"] - r["latency_kept"]]],
                            fmt="s" if r["round_to"] else "o", ms=6, color=colour, capsize=2,
                            mfc="none" if r["round_to"] else colour, lw=0.7, alpha=0.85)
            if target and "latency_kept" in target and target["backend"] == backend \
                    and target["threads"] == n:
                ax.plot(target["macs_kept"], target["latency_kept"], "*", ms=13, color="k")
            engine = "torch eager" if backend == "torch" else backend
            ax.set_title(f"{engine}, {n} thread{'s' if n > 1 else ''}", fontsize=10)
            ax.set_xlim(left, right)
            ax.set_ylim(0, top)
            ax.grid(alpha=0.3)
            if i == len(threads) - 1:
                ax.set_xlabel("MACs kept")
            if j == 0:
                ax.set_ylabel("latency kept (pruned / dense median)")
    handles = [Line2D([], [], ls=":", color="k"), Line2D([], [], ls="--", color="k", alpha=0.5)]
    labels = ["latency kept = MACs kept", f"{GOAL} x MACs kept (the goal)"]
    handles += [Line2D([], [], ls="", marker="o", color=c) for c in colours.values()]
    labels += list(colours)
    handles += [Line2D([], [], ls="", marker="o", color="grey"),
                Line2D([], [], ls="", marker="s", color="grey", mfc="none")]
    labels += ["plain widths", "round_to variant"]
    if target and "latency_kept" in target:
        handles.append(Line2D([], [], ls="", marker="*", ms=10, color="k"))
        labels.append(f"{target['model']}, target_latency_ratio={target['target_latency_ratio']}")
    fig.legend(handles, labels, loc="center right", fontsize=8, frameon=False)
    fig.suptitle(f"{CRITERION}-pruned models: CPU latency kept vs MACs kept (batch 1, bars: "
                 "quartile range)", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1 - 2.3 / fig.get_figwidth(), 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"torch": torch.__version__}
    for module in ("onnxruntime", "timm", "torchvision"):
        try:
            out[module] = __import__(module).__version__
        except ImportError:
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
        write(json.loads(Path(args.replot).read_text()), out)
        return 0
    command = "python tools/bench_deploy.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    threads_before = torch.get_num_threads()
    meta: dict[str, Any] = {
        "command": command.strip(), "criterion": CRITERION, "ratios": args.ratios,
        "threads": args.threads, "backends": args.backends, "runs": args.runs,
        "slow_runs": args.slow_runs, "warmup": args.warmup, "quick": args.quick,
        "seed": args.seed, "goal": GOAL, "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(), "load_before": list(os.getloadavg()), **_versions()}
    # pruning and counting on one thread: on a shared machine a second one mostly waits
    # (compare_latency sets each measurement's own thread count)
    torch.set_num_threads(1)
    start = time.perf_counter()
    try:
        rows = measure(args)
        target = None if args.no_latency_target else latency_target(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        torch.set_num_threads(threads_before)
    meta["total_s"] = time.perf_counter() - start
    meta["load_after"] = list(os.getloadavg())
    write({"meta": meta, "rows": rows, "latency_target": target}, out)
    print(f"{meta['total_s'] / 60:.1f} min")
    return 0


def write(result: dict[str, Any], out: Path) -> None:
    """``{NAME}.json`` (unless it is the file replotted), ``.md`` and ``.png`` into ``out``."""
    path = out / f"{NAME}.json"
    text = json.dumps(result, indent=2) + "\n"
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    table = markdown(result)
    (out / f"{NAME}.md").write_text(table)
    plot(result, out / f"{NAME}.png")
    print(table)
    print(f"results in {out}/ ({NAME}.json, {NAME}.md, {NAME}.png)")


if __name__ == "__main__":
    sys.exit(main())
