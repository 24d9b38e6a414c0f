#!/usr/bin/env python
"""Prunability sweep: prune many timm / torchvision models to half their MACs and check them.

For every model spec and criterion, a freshly built (random-weight) model is pruned with
``kcp_plugin.prune(model, x, criterion, target_macs_ratio=0.5)`` and checked:

* every output keeps its shape (dict / tuple outputs: each value) and stays finite;
* the MACs kept are within ``--tolerance`` of the target;
* ``save_pruned`` then ``load_pruned(builder, path, x)`` rebuilds a model whose eval-mode outputs
  are ``torch.equal`` to the pruned model's.

Exceptions are caught per model and criterion; the error type, message and the last traceback
frame inside kcp_plugin / torch_pruning are recorded. A spec may carry its own input size as
``SPEC@SIZE`` (e.g. ``timm:vit_tiny_patch16_224@224``); others use ``--size``.

    python tools/sweep_models.py --threads 2 --json sweep.json
    python tools/sweep_models.py --models torchvision:resnet18,timm:convnext_atto --criteria kcp
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import inspect
import json
import math
import os
import platform
import signal
import sys
import tempfile
import time
import traceback
import warnings
from typing import Any

import torch
import torch_pruning as tp

import kcp_plugin
from kcp_plugin.zoo import build_from_spec

DEFAULT_MODELS = (
    "torchvision:resnet18",
    "torchvision:resnext50_32x4d",
    "torchvision:mobilenet_v2",
    "torchvision:mobilenet_v3_small",
    "torchvision:efficientnet_b0",
    "torchvision:regnet_x_400mf",
    "torchvision:convnext_tiny",
    "torchvision:shufflenet_v2_x0_5",
    "torchvision:lraspp_mobilenet_v3_large",
    "torchvision:fcn_resnet50",
    "torchvision:deeplabv3_resnet50",
    "timm:resnet18",
    "timm:resnext26ts",
    "timm:efficientnet_b0",
    "timm:mobilenetv3_small_100",
    "timm:convnext_atto",
    "timm:regnetx_002",
    "timm:vit_tiny_patch16_224@224",
    "timm:deit_tiny_patch16_224@224",
    "timm:swin_tiny_patch4_window7_224@224",
    "timm:edgenext_xx_small",
)
# Slow (~5 min for l2 + kcp on 2 shared cores: every dense layer consumes all earlier channels,
# so each group has dozens of members); run with --models default,extra.
EXTRA_MODELS = ("torchvision:densenet121",)
ALIASES = {"default": DEFAULT_MODELS, "extra": EXTRA_MODELS}
DEFAULT_CRITERIA = ("l2", "kcp")
OUR_CODE = ("kcp_plugin", "torch_pruning")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Prune each model to a MACs target with each criterion; check output "
        "shapes, finiteness, MACs and the save/load round trip.",
    )
    p.add_argument("--models", default="default",
                   help="comma-separated specs (SOURCE:NAME[@SIZE]) or the aliases 'default' "
                   f"({len(DEFAULT_MODELS)} torchvision and timm models) and 'extra' "
                   f"({', '.join(EXTRA_MODELS)}); default: default")
    p.add_argument("--criteria", default=",".join(DEFAULT_CRITERIA),
                   help=f"comma-separated registry names (default: {','.join(DEFAULT_CRITERIA)})")
    p.add_argument("--size", type=int, default=64,
                   help="input side for specs without @SIZE (default: 64)")
    p.add_argument("--batch", type=int, default=1, help="input batch size (default: 1)")
    p.add_argument("--target", type=float, default=0.5,
                   help="target_macs_ratio (default: 0.5)")
    p.add_argument("--tolerance", type=float, default=0.02,
                   help="allowed |MACs kept - target| (default: 0.02)")
    p.add_argument("--timeout", type=int, default=300,
                   help="seconds per model and criterion before giving up (default: 300)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads(N)")
    p.add_argument("--seed", type=int, default=0, help="seed for weights and inputs")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--show-warnings", action="store_true",
                   help="show torch-pruning's 'Unwrapped parameters detected' warnings "
                   "(hidden by default: convnext layer_scale triggers one per trial)")
    return p.parse_args(argv)


def expand_models(value: str) -> list[str]:
    items = []
    for item in (m.strip() for m in value.split(",")):
        if item:
            items.extend(ALIASES.get(item, (item,)))
    return items


def parse_spec(item: str, size: int) -> tuple[str, int]:
    """``SOURCE:NAME@SIZE`` -> ``(SOURCE:NAME, SIZE)``; without ``@SIZE`` the default size."""
    spec, sep, s = item.strip().partition("@")
    return spec, int(s) if sep else size


def named_tensors(out: Any, prefix: str = "out") -> dict[str, torch.Tensor]:
    """Flatten a model output (tensor, dict, tuple/list, nested) into named tensors."""
    if isinstance(out, torch.Tensor):
        return {prefix: out}
    items: list[tuple[Any, Any]] = []
    if isinstance(out, dict):
        items = list(out.items())
    elif isinstance(out, (tuple, list)):
        items = list(enumerate(out))
    found: dict[str, torch.Tensor] = {}
    for k, v in items:
        found.update(named_tensors(v, f"{prefix}[{k!r}]"))
    return found


def _frame(f: traceback.FrameSummary) -> str:
    name = f.filename
    if not os.path.relpath(name).startswith(".."):
        name = os.path.relpath(name)
    for p in (*OUR_CODE, "timm", "torchvision", "torch"):
        i = name.rfind(f"{os.sep}{p}{os.sep}")
        if i >= 0:
            name = name[i + 1:]
            break
    return f"{name}:{f.lineno} in {f.name}"


def last_frame(exc: BaseException, ours_only: bool = True) -> str | None:
    """``file:line in function`` of the innermost frame (in kcp_plugin or torch_pruning)."""
    frames = traceback.extract_tb(exc.__traceback__)
    if ours_only:
        frames = [f for f in frames if any(f"{os.sep}{p}{os.sep}" in f.filename for p in OUR_CODE)]
    return _frame(frames[-1]) if frames else None


def describe_error(exc: BaseException, stage: str) -> dict[str, Any]:
    err = {
        "stage": stage,
        "type": type(exc).__name__,
        "message": str(exc).strip().splitlines()[0][:300] if str(exc).strip() else "",
        "where": last_frame(exc),
        "innermost": last_frame(exc, ours_only=False),
        "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
    }
    cause = exc.__cause__ or exc.__context__
    if cause is not None:
        err["cause"] = {
            "type": type(cause).__name__,
            "message": str(cause).strip()[:300],
            "where": last_frame(cause),
        }
    return err


class TimeLimitExceeded(Exception):
    """A model and criterion ran past ``--timeout``."""


@contextlib.contextmanager
def time_limit(seconds: int):
    """Raise ``TimeLimitExceeded`` in the main thread after ``seconds`` (POSIX; else no limit)."""
    if seconds <= 0 or not hasattr(signal, "SIGALRM"):
        yield
        return

    def handler(signum, frame):
        raise TimeLimitExceeded(f"gave up after {seconds} s")

    old = signal.signal(signal.SIGALRM, handler)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def check_one(base: torch.nn.Module, spec: str, x: torch.Tensor, criterion: str,
              args: argparse.Namespace, workdir: str) -> dict[str, Any]:
    """Prune a copy of ``base`` with ``criterion`` and run every check."""
    row: dict[str, Any] = {"criterion": criterion, "ok": False}
    stage = "forward (original)"
    t0 = time.perf_counter()
    try:
        with time_limit(args.timeout):
            model = copy.deepcopy(base).eval()
            with torch.no_grad():
                before = named_tensors(model(x))
            stage = "prune"
            report = kcp_plugin.prune(model, x, criterion, target_macs_ratio=args.target,
                                      macs_tolerance=args.tolerance, progress=False)
            row["prune_s"] = time.perf_counter() - t0
            row["macs_ratio"] = report.macs_ratio
            row["params_ratio"] = report.params_ratio
            row["pruning_ratio"] = report.pruning_ratio
            row["search_trials"] = len(report.search)
            row["protected"] = len(report.protected)
            row["macs_ok"] = abs(report.macs_ratio - args.target) <= args.tolerance
            stage = "forward (pruned)"
            model.eval()
            with torch.no_grad():
                after = named_tensors(model(x))
            row["shape_ok"] = list(before) == list(after) and all(
                before[k].shape == after[k].shape for k in before
            )
            if not row["shape_ok"]:
                row["shapes"] = {
                    k: [list(before[k].shape), list(after[k].shape) if k in after else None]
                    for k in before
                }
            row["finite_ok"] = all(bool(torch.isfinite(v).all()) for v in after.values())
            stage = "save/load"
            path = os.path.join(workdir, "pruned.pt")
            kcp_plugin.save_pruned(model, path)
            loaded = kcp_plugin.load_pruned(
                lambda: build_from_spec(spec), path, x
            ).eval()
            with torch.no_grad():
                again = named_tensors(loaded(x))
            row["roundtrip_ok"] = list(after) == list(again) and all(
                torch.equal(after[k], again[k]) for k in after
            )
            same_shapes = list(after) == list(again) and all(
                after[k].shape == again[k].shape for k in after
            )
            if not row["roundtrip_ok"] and same_shapes:
                row["roundtrip_max_abs_diff"] = max(
                    float((after[k] - again[k]).abs().max()) for k in after
                )
            row["ok"] = all(row[k] for k in ("macs_ok", "shape_ok", "finite_ok", "roundtrip_ok"))
    except Exception as exc:  # TimeLimitExceeded included
        row["error"] = describe_error(exc, stage)
    row["time_s"] = time.perf_counter() - t0
    return row


def sweep(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if not args.show_warnings:
        warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
    criteria = [c.strip() for c in args.criteria.split(",") if c.strip()]
    for c in criteria:
        kcp_plugin.get_importance(c)  # fail fast on a typo
    with open(inspect.getsourcefile(kcp_plugin.KCPImportance), "rb") as f:
        fingerprint = hashlib.sha256(f.read()).hexdigest()[:12]  # which KCP version ran
    results = []
    with tempfile.TemporaryDirectory() as workdir:
        for item in expand_models(args.models):
            spec, size = parse_spec(item, args.size)
            entry: dict[str, Any] = {"model": spec, "size": size, "rows": []}
            t0 = time.perf_counter()
            try:
                torch.manual_seed(args.seed)
                base = build_from_spec(spec)
                entry["params"] = sum(p.numel() for p in base.parameters())
            except Exception as exc:
                entry["error"] = describe_error(exc, "build")
                base = None
            if base is not None:
                x = torch.randn(args.batch, 3, size, size,
                                generator=torch.Generator().manual_seed(args.seed))
                for c in criteria:
                    entry["rows"].append(check_one(base, spec, x, c, args, workdir))
                    print(f"  {spec} [{c}]: {summary(entry['rows'][-1])}", file=sys.stderr,
                          flush=True)
            entry["time_s"] = time.perf_counter() - t0
            results.append(entry)
    return {
        "target_macs_ratio": args.target, "tolerance": args.tolerance,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "torch_pruning": tp.__version__, "python": platform.python_version(),
        "kcp_source_sha256": fingerprint, "criteria": criteria, "results": results,
    }


def _mark(v: Any) -> str:
    return "-" if v is None else ("yes" if v else "**no**")


def summary(row: dict[str, Any]) -> str:
    if "error" in row:
        e = row["error"]
        return f"FAIL at {e['stage']}: {e['type']}: {e['message'][:120]}"
    if row["ok"]:
        return f"ok (MACs {row['macs_ratio']:.3f}, {row['time_s']:.1f} s)"
    bad = [k[:-3] for k in ("macs_ok", "shape_ok", "finite_ok", "roundtrip_ok") if not row[k]]
    return f"check failed: {', '.join(bad)} (MACs {row['macs_ratio']:.3f})"


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"target_macs_ratio {result['target_macs_ratio']} (tolerance {result['tolerance']}), "
        f"{result['threads']} threads, torch {result['torch']}, "
        f"torch-pruning {result['torch_pruning']}, kcp.py sha256 {result['kcp_source_sha256']}",
        "",
        "| model | input | criterion | result | MACs kept | params kept | shape | finite "
        "| round trip | time (s) |",
        "|---|---:|---|---|---:|---:|---|---|---|---:|",
    ]
    failures = []
    for entry in result["results"]:
        rows = entry["rows"] or [{"criterion": "-", "error": entry.get("error"), "time_s": 0.0}]
        for row in rows:
            if "error" in row:
                e = row["error"]
                status = f"error ({e['stage']}): {e['type']}"
                failures.append((entry["model"], row["criterion"], e))
            else:
                status = "ok" if row["ok"] else "**check failed**"
            macs = f"{row['macs_ratio']:.3f}" if "macs_ratio" in row else "-"
            params = f"{row['params_ratio']:.3f}" if "params_ratio" in row else "-"
            lines.append(
                f"| {entry['model']} | {entry['size']} | {row['criterion']} | {status} | {macs} "
                f"| {params} | {_mark(row.get('shape_ok'))} | {_mark(row.get('finite_ok'))} "
                f"| {_mark(row.get('roundtrip_ok'))} | {row['time_s']:.1f} |"
            )
    total = sum(e["time_s"] for e in result["results"])
    n_ok = sum(r.get("ok", False) for e in result["results"] for r in e["rows"])
    n_all = sum(max(len(e["rows"]), 1) for e in result["results"])
    lines += ["", f"{n_ok}/{n_all} passed every check; total {total:.0f} s"]
    if failures:
        lines += ["", "Errors:", ""]
        for model, crit, e in failures:
            where = f" at `{e['where']}`" if e.get("where") else ""
            if e.get("innermost") and e["innermost"] != e.get("where"):
                where += f" (raised in `{e['innermost']}`)"
            lines.append(f"* {model} [{crit}], {e['stage']}: `{e['type']}: {e['message']}`"
                         f"{where}")
            cause = e.get("cause")
            if cause:
                cwhere = f" at `{cause['where']}`" if cause.get("where") else ""
                msg = cause["message"].splitlines()[0] if cause["message"] else ""
                lines.append(f"  * caused by `{cause['type']}: {msg}`{cwhere}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not 0 < args.target <= 1 or math.isnan(args.target):
        raise SystemExit("--target must be in (0, 1]")
    result = sweep(args)
    print(markdown(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, default=str)
    ok = all(r.get("ok", False) for e in result["results"] for r in e["rows"])
    ok = ok and all(e["rows"] for e in result["results"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
