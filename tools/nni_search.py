#!/usr/bin/env python
"""Search pruning settings with an NNI experiment on a benchmark task (local mode).

Trains the task's dense model once (or reuses --dense), then NNI's tuner (TPE by default, from
configs/nni/experiment.yml) proposes criterion, MACs target, latency target or per-stage
ratios, and fine-tuning settings (configs/nni/search_space*.json); every trial prunes,
fine-tunes and reports accuracy with MACs. Writes results.json, summary.md (best trials,
accuracy-vs-MACs front) and accuracy_vs_macs.png to --out.

Latency, as an objective: with --latency-backend (or a `latency:` section in the config)
every trial times its pruned model against the dense one on that backend (hardware, runtime,
dtype, batch and threads named in the output), and summary.md / accuracy_vs_latency.png add
the accuracy-vs-latency front. As a constraint: `target_latency` in the search space
(configs/nni/search_space_latency.json) or --target-latency makes every trial prune to that
fraction of the dense latency instead of a MACs target. While latency is measured the trials
run one at a time (unless --concurrency says otherwise), so that no trial is timed while
another trains on the same cores; the backend measures on 1 thread by default.

Distillation, as a searched choice: `distill` in the search space (a choice among `none`, an
output loss `kl` / `cwd` / `l1` / `mse`, `features`, `dca`, or parts joined by `+` such as
`kl+features`; `distill_weight`, `distill_temperature` beside it) makes every trial's fine-tuning
distil from the trial's dense model, frozen; --distill fixes one for every trial instead, and
--distill-layers names the layers of `features` / `dca` (default: the stage before the output
layer). The trial lines and results.json name what each trial distilled.

It prints its progress to stdout: dense training (a bar on a terminal, otherwise a line every
tenth of the steps), the dense model against predicting the most frequent class everywhere,
and one line per finished trial (NNI's trial number and id, status, metric, MACs kept,
parameters), next to NNI's own lines (web UI address).

    python tools/nni_search.py --task segmentation --max-trials 20
    python tools/nni_search.py --search-space configs/nni/search_space_stages.json
    python tools/nni_search.py --quick          # 4 small trials that rank (about 2 min here)
    python tools/nni_search.py --config configs/nni/experiment_latency.yml \
        --search-space configs/nni/search_space_latency.json   # latency targets, torch CPU
    python tools/nni_search.py --quick --latency-backend onnxruntime   # + latency kept
    python tools/nni_search.py --quick --distill kl+features   # every trial distils

Exit codes: 0 done, 1 the experiment failed, 2 invalid arguments, search space or latency
settings (e.g. --latency-backend cuda without a GPU), 3 NNI's tuner could not start in time
(busy machine; retry).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

try:
    import kcp_plugin  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kcp_plugin.bench import TASKS
from kcp_plugin.bench.nni_search import (
    QUICK_CONCURRENCY,
    QUICK_DENSE_STEPS,
    QUICK_SETTINGS,
    QUICK_TRIALS,
    SearchSettings,
    TunerConnectionError,
    config_latency,
    quick_concurrency,
    run_search,
)

ROOT = Path(__file__).resolve().parents[1]


def _say(line: str) -> None:
    """Print a progress line to stdout above any tqdm bar (tqdm.write), flushed."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        print(line, flush=True)
        return
    tqdm.write(line, file=sys.stdout)
    sys.stdout.flush()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=sorted(TASKS), default="segmentation")
    p.add_argument("--search-space", default=str(ROOT / "configs/nni/search_space.json"),
                   help="NNI search space JSON (default: configs/nni/search_space.json)")
    p.add_argument("--config", default=str(ROOT / "configs/nni/experiment.yml"),
                   help="NNI experiment config (tuner, assessor, limits)")
    p.add_argument("--out", default="outputs/nni_search", help="output directory")
    p.add_argument("--max-trials", type=int, help="override the config's maxTrialNumber")
    p.add_argument("--concurrency", type=int, help="override the config's trialConcurrency")
    p.add_argument("--port", type=int, help="web UI port (default: a free one)")
    p.add_argument("--timeout", type=float, help="give up after this many seconds")
    p.add_argument("--dense", help="reuse a dense checkpoint written by an earlier search")
    p.add_argument("--dense-steps", type=int,
                   help=f"dense training iterations (default 300; --quick: {QUICK_DENSE_STEPS})")
    p.add_argument("--dense-lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=int, default=256)
    p.add_argument("--n-val", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--finetune-steps", type=int, default=100,
                   help="default when the search space does not set finetune_steps")
    p.add_argument("--report-every", type=int, default=25,
                   help="fine-tuning steps between intermediate results")
    p.add_argument("--threads", type=int,
                   help="torch threads of the dense training and of every trial (default: "
                   f"torch's; --quick: {QUICK_SETTINGS['threads']})")
    p.add_argument("--quick", action="store_true",
                   help=f"the smallest search that ranks: {QUICK_TRIALS} trials, "
                   f"{QUICK_CONCURRENCY} at a time (1 when latency is measured), "
                   f"{QUICK_DENSE_STEPS} dense steps on "
                   f"{QUICK_SETTINGS['n_train']} images, {QUICK_SETTINGS['finetune_steps']} "
                   "fine-tuning steps (overrides --n-train, --n-val, --batch-size, "
                   "--finetune-steps, --report-every)")
    dis = p.add_argument_group(
        "distillation", "every trial's distillation from its dense model during the "
        "fine-tuning, when the search space has no `distill` key (it may search one)")
    dis.add_argument("--distill", metavar="SPEC",
                     help="none (default), kl, cwd, l1 or mse (output loss), features, dca, or "
                     "parts joined by '+': kl+features")
    dis.add_argument("--distill-layers", metavar="NAMES",
                     help="comma-separated layers of features / dca (default: the stage "
                     "before the output layer, e.g. head for segmentation)")
    dis.add_argument("--distill-weight", type=float, metavar="W",
                     help="weight of the output term (default 1; searchable as distill_weight)")
    dis.add_argument("--distill-temperature", type=float, metavar="T",
                     help="temperature of kl / cwd (default 1 / 4; searchable as "
                     "distill_temperature)")
    lat = p.add_argument_group(
        "latency", "where every trial times its pruned model against the dense one (these "
        "override the config's `latency:` section; any of them turns the measurement on). "
        "While latency is measured the trials run one at a time unless --concurrency is given")
    lat.add_argument("--latency-backend", metavar="NAME",
                     help="torch (eager CPU), onnxruntime (exported, CPU; extra 'deploy') or "
                     "cuda (eager GPU)")
    lat.add_argument("--latency-dtype", metavar="DTYPE",
                     help="fp32 (default), bf16 (torch, cuda) or fp16 (cuda)")
    lat.add_argument("--latency-batch", type=int, metavar="N",
                     help="batch size timed (default: the task's example batch, 1)")
    lat.add_argument("--latency-threads", type=int, metavar="N",
                     help="CPU threads of the measurement (default 1)")
    lat.add_argument("--latency-runs", type=int, metavar="N",
                     help="timed passes per model (default 10; a latency target needs >= 3)")
    lat.add_argument("--latency-device", metavar="DEVICE", help="cuda or cuda:N (cuda only)")
    lat.add_argument("--latency-allocation", metavar="HOW",
                     help="how a latency target chooses widths: table (default: per-group "
                     "widths from a latency table) or uniform (one ratio)")
    lat.add_argument("--target-latency", type=float, metavar="R",
                     help="every trial prunes to this fraction of the dense latency instead "
                     "of a MACs target (unless the search space has target_latency)")
    return p


LATENCY_FLAGS = {"latency_backend": "backend", "latency_dtype": "dtype",
                 "latency_batch": "batch", "latency_threads": "threads",
                 "latency_runs": "runs", "latency_device": "device",
                 "latency_allocation": "allocation", "target_latency": "target"}
"""Command-line flags and the latency settings' keys they set."""


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        space = json.loads(Path(args.search_space).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        print(f"error: cannot read the search space {args.search_space}: {exc}", file=sys.stderr)
        return 2
    latency = {key: getattr(args, flag) for flag, key in LATENCY_FLAGS.items()
               if getattr(args, flag) is not None}
    chosen = dict(
        task=args.task, dense=args.dense or "", seed=args.seed, n_train=args.n_train,
        n_val=args.n_val, batch_size=args.batch_size, finetune_steps=args.finetune_steps,
        report_every=args.report_every, threads=args.threads or 0,
        distill=args.distill or "none",
        distill_layers=([n.strip() for n in args.distill_layers.split(",") if n.strip()]
                        if args.distill_layers else None),
        distill_weight=1.0 if args.distill_weight is None else args.distill_weight,
        distill_temperature=args.distill_temperature,
    )
    if args.quick:
        chosen.update(QUICK_SETTINGS)
        if args.threads is not None:
            chosen["threads"] = args.threads
    try:
        section = config_latency(args.config)  # the flags override the config's section
        if section is not None or latency:
            chosen["latency"] = {**(section or {}), **latency}
        settings = SearchSettings(**chosen)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    dense_steps, max_trials, concurrency = args.dense_steps, args.max_trials, args.concurrency
    if args.quick:
        dense_steps = QUICK_DENSE_STEPS if dense_steps is None else dense_steps
        max_trials = max_trials or QUICK_TRIALS
        space = {k: v for k, v in space.items() if k != "finetune_steps"}
        concurrency = concurrency or quick_concurrency(space, settings)
    try:
        rows, text = run_search(
            space, settings, args.out, dense_steps=300 if dense_steps is None else dense_steps,
            dense_lr=args.dense_lr, config_path=args.config, max_trials=max_trials,
            concurrency=concurrency, port=args.port, timeout_s=args.timeout, log=_say,
        )
    except TunerConnectionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except (ValueError, TypeError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(text)
    print(f"results in {Path(args.out).resolve()}")
    return 0 if any(isinstance(r.get("final"), dict) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
