"""``kcp-prune``: prune a model from the command line and print what it saved."""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

import torch

from . import __version__
from .deploy.backends import BACKENDS, Backend, check_backend, unavailable
from .deploy.latency import LatencyStats, compare_latency, fill_latency
from .deploy.search import ALLOCATIONS
from .errors import ExportError, UnprunableError
from .graph import check_runs
from .plan import save_pruned
from .pruning import prune
from .registry import importance_info, list_importances
from .zoo import DEFAULT_SPEC, SOURCES, ModelSpecError, build_from_spec

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_MODEL = 0, 1, 2, 3

EPILOG = """\
model specs:
  builtin:NAME        a model shipped with kcp_plugin (see --list-models)
  timm:NAME           timm.create_model(NAME), random weights (needs kcp-plugin[timm]);
                      pruned through kcp_plugin.integrations.timm (head bookkeeping)
  torchvision:NAME    torchvision.models.get_model(NAME, weights=None)
  module:PKG.MOD:FN   any function returning an nn.Module

exit codes: 0 success, 1 pruning (or ONNX export) failed, 2 invalid arguments, 3 model could
            not be built

examples:
  kcp-prune                                   # builtin DeepLabV3-lite, KCP to 30% of MACs
  kcp-prune --model timm:resnet50 --importance kcp --target-macs 0.3 \\
            --input-shape 1,3,224,224 --out pruned.pt
  kcp-prune --model builtin:stereo_lite --input-shape 1,3,64,128 --input-shape 1,3,64,128
  kcp-prune --model torchvision:resnet18 --input-shape 1,3,224,224 --onnx pruned.onnx \\
            --latency-backend onnxruntime        # needs kcp-plugin[deploy]
"""


def _shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"shape {text!r} must be comma-separated integers"
        ) from None
    if not dims or any(d < 1 for d in dims):
        raise argparse.ArgumentTypeError(f"shape {text!r} must have positive dimensions")
    return dims


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"{value} must be in (0, 1]")
    return value


def _keyvalue(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"{text!r} must look like key=value")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key, value


def _round_to(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1 or 'auto', got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The ``kcp-prune`` argument parser."""
    p = argparse.ArgumentParser(
        prog="kcp-prune",
        description="Structurally prune a model with KCP (or another registered criterion) "
        "through torch-pruning's dependency graph, print MACs / params / CPU latency before "
        "and after, and save the pruning plan with the weights.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default=DEFAULT_SPEC,
                   help=f"model spec, SOURCE:NAME with SOURCE in {{{','.join(SOURCES)}}} "
                   f"(default: {DEFAULT_SPEC})")
    p.add_argument("--model-arg", action="append", type=_keyvalue, default=[],
                   metavar="KEY=VALUE", help="constructor argument (value parsed as JSON if it "
                   "can be), repeatable, e.g. --model-arg num_classes=19")
    p.add_argument("--importance", default="kcp",
                   help="criterion name from the registry (default: kcp; see --list-importances)")
    p.add_argument("--importance-arg", action="append", type=_keyvalue, default=[],
                   metavar="KEY=VALUE", help="criterion argument, repeatable, e.g. "
                   "--importance-arg centre=mean")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--target-macs", type=_fraction, default=None, metavar="FRACTION",
                        help="fraction of MACs to keep, e.g. 0.3 (default: 0.3 unless "
                        "--pruning-ratio or --target-latency is given); with --target-latency "
                        "a MACs cap on top of it")
    target.add_argument("--pruning-ratio", type=float, default=None, metavar="RATIO",
                        help="channel pruning ratio in [0, 1) instead of a MACs target")
    p.add_argument("--target-latency", type=_fraction, default=None, metavar="FRACTION",
                   help="fraction of the dense latency to keep, measured here on the example "
                   "input with --latency-backend, --dtype, --batch and --threads (slower than a "
                   "MACs target: the model is measured)")
    p.add_argument("--input-shape", action="append", type=_shape, default=None,
                   metavar="N,C,H,W", help="example input shape; repeat for models taking "
                   "several inputs (stereo) (default: 1,3,128,128)")
    p.add_argument("--iterative-steps", type=int, default=1, metavar="N",
                   help="prune in N steps, re-scoring each step (default: 1)")
    p.add_argument("--round-to", type=_round_to, default=None, metavar="N",
                   help="keep channel counts multiples of N (default with a MACs target: the "
                   "--latency-backend's multiple, lowered for narrow nets; 1: never round); "
                   "'auto' (with --target-latency): measure 1, 8 and 16 and keep the fastest")
    p.add_argument("--global-pruning", action="store_true",
                   help="rank channels across layers instead of per layer")
    p.add_argument("--max-pruning-ratio", type=float, default=None, metavar="RATIO",
                   help="no layer loses more than this fraction of its channels (default: 0.9, "
                   "raised to 0.95 with a warning when only that reaches a MACs target)")
    p.add_argument("--ignore", action="append", default=[], metavar="LAYER",
                   help="qualified layer name never to prune, repeatable (output layers are "
                   "protected automatically)")
    p.add_argument("--latency-runs", type=int, default=10, metavar="N",
                   help="timed forward passes per latency measurement (0 skips the dense vs "
                   "pruned measurement; default: 10)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads for the latency measurement (default: 1, the most "
                   "repeatable on a shared machine)")
    p.add_argument("--latency-backend", choices=BACKENDS, default="torch",
                   help="what runs the timed passes: torch eager on the CPU, onnxruntime on "
                   "each model exported to ONNX (needs kcp-plugin[deploy]), or cuda (eager on "
                   "a GPU, CUDA events); it also sets the default channel multiple of a MACs "
                   "target (8 on the CPU, 32 on cuda) (default: torch)")
    p.add_argument("--device", default=None, metavar="DEVICE",
                   help="GPU of --latency-backend cuda: cuda or cuda:N (default: cuda)")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32",
                   help="dtype the latency is measured in (cuda: fp32/fp16/bf16; torch: "
                   "fp32/bf16; onnxruntime: fp32) (default: fp32)")
    p.add_argument("--batch", type=int, default=None, metavar="N",
                   help="batch size the latency is measured at (default: that of "
                   "--input-shape); pruning traces the model at --input-shape")
    p.add_argument("--latency-allocation", choices=ALLOCATIONS, default=None,
                   help="how --target-latency chooses widths: table (per-group widths from "
                   "a latency table measured on the backend) or uniform (one channel ratio "
                   "searched on measured latency) (default: table; uniform with --round-to)")
    p.add_argument("--seed", type=int, default=0, help="seed for the random initial weights")
    p.add_argument("--out", default=None, metavar="PATH",
                   help="write the pruning plan + weights here (torch.load(weights_only=True))")
    p.add_argument("--onnx", default=None, metavar="PATH",
                   help="write the pruned model as ONNX here (dynamic batch), checked against "
                   "torch in onnxruntime (needs kcp-plugin[deploy])")
    p.add_argument("--json", default=None, metavar="PATH", help="write the report as JSON")
    p.add_argument("--plot", default=None, metavar="PATH",
                   help="write a PNG of the fraction of channels each layer kept")
    p.add_argument("--list-importances", action="store_true",
                   help="list the registered criteria and exit")
    p.add_argument("--list-models", action="store_true", help="list builtin models and exit")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.add_argument("--version", action="version", version=f"kcp-plugin {__version__}")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``kcp-prune``; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list_importances:
        for name in list_importances():
            info = importance_info(name)
            needs = (" (needs gradients)" if info.requires_grad else
                     " (needs data)" if info.requires_data else "")
            print(f"{name:<12} {info.summary}{needs}")
        return EXIT_OK
    if args.list_models:
        from .models import list_models

        print("\n".join(f"builtin:{n}" for n in list_models()))
        return EXIT_OK
    if args.pruning_ratio is not None and not 0.0 <= args.pruning_ratio < 1.0:
        parser.error(f"--pruning-ratio must be in [0, 1), got {args.pruning_ratio}")
    if args.iterative_steps < 1:
        parser.error("--iterative-steps must be >= 1")
    if args.latency_runs < 0:
        parser.error("--latency-runs must be >= 0")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    for flag, path in (("--out", args.out), ("--onnx", args.onnx), ("--json", args.json),
                       ("--plot", args.plot)):
        folder = os.path.dirname(os.path.abspath(path)) if path else None
        if folder and not os.path.isdir(folder):
            parser.error(f"{flag} {path}: folder {folder} does not exist (create it first)")
        if path and os.path.isdir(path):
            parser.error(f"{flag} {path} is a folder; give a file path")
    try:
        info = importance_info(args.importance)
    except ValueError as exc:
        parser.error(str(exc))
    if not info.data_free:
        free = [n for n in list_importances() if importance_info(n).data_free]
        parser.error(f"{info.name!r} scores channels from training data, which kcp-prune does "
                     "not have: use the Python API (kcp_plugin.prune(..., data=batches) or "
                     f"loss_fn=...) or a data-free criterion: {', '.join(free)}")
    if args.onnx or (args.latency_backend == "onnxruntime"
                     and (args.latency_runs or args.target_latency is not None)):
        from .deploy.export import require_deploy

        try:
            require_deploy()
        except ImportError as exc:
            parser.error(str(exc))
    if args.round_to == "auto" and args.target_latency is None:
        parser.error("--round-to auto measures latency: it needs --target-latency")
    if args.latency_allocation is None:
        args.latency_allocation = "uniform" if args.round_to is not None else "table"
    elif args.latency_allocation == "table" and args.round_to is not None \
            and args.target_latency is not None:
        parser.error("--latency-allocation table keeps the backend's channel multiple itself: "
                     "drop --round-to, or use --latency-allocation uniform")
    if args.batch is not None and args.batch < 1:
        parser.error("--batch must be >= 1")
    if args.target_latency is not None and args.pruning_ratio is not None:
        parser.error("--target-latency replaces --pruning-ratio: give one target")
    try:
        backend = Backend(args.latency_backend, device=args.device, dtype=args.dtype,
                          batch=args.batch, threads=args.threads or 1,
                          runs=max(args.latency_runs, 3))
        check_backend(backend, imports=args.target_latency is not None)
    except (ValueError, TypeError, ImportError) as exc:
        parser.error(str(exc))
    if args.pruning_ratio is None and args.target_macs is None and args.target_latency is None:
        args.target_macs = 0.3
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    torch.manual_seed(args.seed)
    try:
        model = build_from_spec(args.model, **dict(args.model_arg))
    except ModelSpecError as exc:
        print(f"kcp-prune: error: {exc}", file=sys.stderr)
        return EXIT_MODEL
    except Exception as exc:
        print(f"kcp-prune: error: building {args.model} failed: {type(exc).__name__}: {exc}",
              file=sys.stderr)
        return EXIT_MODEL
    shapes = args.input_shape or [(1, 3, 128, 128)]
    inputs = [torch.randn(*s) for s in shapes]
    example = inputs[0] if len(inputs) == 1 else tuple(inputs)
    try:  # before anything is timed or pruned: a clear error for inputs the model cannot take
        check_runs(model, example)
    except ValueError as exc:
        print(f"kcp-prune: error: --input-shape {' '.join(','.join(map(str, s)) for s in shapes)}"
              f": {exc}", file=sys.stderr)
        return EXIT_USAGE

    # timed next to the pruned one (a latency target or a MACs target on a named backend is
    # measured by prune itself)
    dense = copy.deepcopy(model) if args.latency_runs else None
    try:  # timm models: the core applies the timm integration itself (kcp_plugin.hosts)
        report = prune(
            model, example, args.importance,
            importance_kwargs=dict(args.importance_arg) or None,
            target_macs_ratio=args.target_macs, pruning_ratio=args.pruning_ratio,
            ignored_layers=args.ignore or None, iterative_steps=args.iterative_steps,
            round_to=args.round_to, global_pruning=args.global_pruning,
            max_pruning_ratio=args.max_pruning_ratio, progress=False if args.quiet else None,
            target_latency_ratio=args.target_latency,
            latency_backend=backend if args.latency_runs or args.target_latency else None,
            latency_allocation=args.latency_allocation,
        )
    except UnprunableError as exc:  # a target out of reach: pruning failed, model restored
        print(f"kcp-prune: error: pruning failed: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except (ValueError, TypeError) as exc:
        print(f"kcp-prune: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:  # a failure inside torch-pruning: the model was restored
        print(f"kcp-prune: error: pruning failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    code = EXIT_OK
    if dense is not None and report.latency_stats is None and unavailable(backend) is None:
        try:
            before, after = compare_latency([dense, model], example, backend=backend)
            fill_latency(report, backend, before, after)
        except ExportError as exc:  # the pruned model is still saved below
            print(f"kcp-prune: error: {args.latency_backend} latency: {exc}", file=sys.stderr)
            code = EXIT_ERROR

    print(f"model: {args.model}  inputs: {' + '.join('x'.join(map(str, s)) for s in shapes)}")
    print(report.table())
    if report.latency_stats:
        before, after = (LatencyStats(**s) for s in report.latency_stats)
        print(f"latency ({report.latency_setting}): median of {before.runs} passes each, dense "
              f"and pruned interleaved; dense {before.describe()}, pruned {after.describe()} "
              "(interquartile range)")
    if args.out:
        save_pruned(model, args.out, extra={
            "model": args.model, "model_kwargs": dict(args.model_arg),
            "input_shapes": [list(s) for s in shapes], "importance": args.importance,
        })
        print(f"saved plan + weights to {args.out}")
    if args.onnx:
        from .deploy.export import export_onnx

        try:
            onnx = export_onnx(model, example, args.onnx)
            print(f"saved ONNX (opset {onnx.opset}, dynamic batch) to {args.onnx}; onnxruntime "
                  f"agrees with torch to {onnx.max_abs_diff:.2g}")
        except ExportError as exc:
            print(f"kcp-prune: error: {exc}", file=sys.stderr)
            code = EXIT_ERROR
    if (args.onnx or args.latency_backend == "onnxruntime") and report.round_to is None \
            and args.target_latency is None:
        print("note: onnxruntime's fast convolution kernels need channel counts that are "
              "multiples of 8; pruned to odd widths a model can run slower than dense there "
              "(docs/deploy.md): consider --round-to 8 (or --round-to auto with "
              "--target-latency)")
    if args.json:
        with open(args.json, "w") as fh:
            # strict JSON: a NaN or infinity (nothing measured) is written as null
            json.dump(_finite({"model": args.model, **report.to_dict()}), fh, indent=2,
                      allow_nan=False)
    if args.plot:
        report.plot_widths(args.plot, title=f"{args.model}: channels kept per layer")
    return code


def _finite(obj: Any) -> Any:
    """``obj`` with every float NaN or infinity replaced by None (JSON has neither)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
