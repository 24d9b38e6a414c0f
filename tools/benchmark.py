#!/usr/bin/env python
"""Dense-labeling benchmark: every registered criterion at equal MACs, fine-tuned equally.

Writes results.json (every row), results.md (tables), accuracy-vs-MACs PNGs per task and the
per-layer widths of the KCP-pruned models. Partial results are saved after every row, and
Ctrl-C stops cleanly with what was done so far.

    python tools/benchmark.py --quick                 # minutes: smoke test of the pipeline
    python tools/benchmark.py --profile full          # the study in docs/benchmarks.md
    python tools/benchmark.py --summarize run_s0/results.json run_s1/results.json --out all
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from kcp_plugin.bench import PROFILES, merge_results, write_summary
from kcp_plugin.bench.protocol import run_benchmark


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", choices=sorted(PROFILES), default="full",
                   help="size of the study (default: full)")
    p.add_argument("--quick", action="store_true", help="same as --profile quick")
    p.add_argument("--tasks", nargs="+", help="override the profile's tasks")
    p.add_argument("--criteria", nargs="+", help="override the profile's criteria")
    p.add_argument("--seeds", nargs="+", type=int, help="override the profile's seeds")
    p.add_argument("--targets", nargs="+", type=float, help="fractions of MACs kept")
    p.add_argument("--iterative", nargs="*", help="criteria also run iteratively")
    p.add_argument("--soft", nargs="*", help="criteria also run with the SFP (soft) and SRFP "
                   "(decay) schedules")
    p.add_argument("--comp", nargs="*", help="criteria also run one-shot + compensation "
                   "(least-squares repair of the pruned layers' consumers, docs/cap.md)")
    p.add_argument("--scratch", nargs="*", help="criteria whose pruned architecture is also "
                   "trained from scratch (re-initialised; dense + fine-tuning steps at the dense "
                   "learning rate): does the criterion's choice of weights matter, or only the "
                   "widths?")
    p.add_argument("--dense-steps", type=int, help="dense training iterations")
    p.add_argument("--finetune-steps", type=int, help="fine-tuning iterations after pruning")
    p.add_argument("--n-train", type=int, help="training images (pairs) per seed")
    p.add_argument("--n-val", type=int, help="validation images (pairs) per seed")
    p.add_argument("--dense-cache", metavar="DIR", help="reuse dense models trained with the "
                   "same settings and code from DIR (and save new ones there), so that a "
                   "later run with other criteria, targets or fine-tuning skips dense training")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default="outputs/benchmark", help="output folder")
    p.add_argument("--summarize", metavar="JSON", nargs="+", help="only rebuild results.md "
                   "and the plots from results.json / partial.json files (e.g. of an interrupted "
                   "run, or of seeds run in parallel: their rows are merged into one table)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    profile = dataclasses.replace(PROFILES["quick" if args.quick else args.profile])
    for field, value in (("tasks", args.tasks), ("criteria", args.criteria),
                         ("seeds", args.seeds), ("targets", args.targets),
                         ("iterative_criteria", args.iterative),
                         ("soft_criteria", args.soft),
                         ("comp_criteria", args.comp),
                         ("scratch_criteria", args.scratch),
                         ("dense_steps", args.dense_steps),
                         ("finetune_steps", args.finetune_steps),
                         ("n_train", args.n_train), ("n_val", args.n_val),
                         ("dense_cache", args.dense_cache)):
        if value is not None:
            setattr(profile, field, value)
    if args.criteria is not None:
        # the profile's own schedule lists follow a --criteria override; lists given on the
        # command line are checked as given
        for field, given in (("iterative_criteria", args.iterative), ("soft_criteria", args.soft),
                             ("comp_criteria", args.comp), ("scratch_criteria", args.scratch)):
            if given is None:
                setattr(profile, field, [c for c in getattr(profile, field)
                                         if c in args.criteria])
    if any(not 0 < t <= 1 for t in profile.targets):
        print("benchmark: error: --targets must be fractions in (0, 1]", file=sys.stderr)
        return 2
    for name in ("dense_steps", "finetune_steps", "n_train", "n_val"):
        positive = name.startswith("n_")
        if getattr(profile, name) < (1 if positive else 0):
            print(f"benchmark: error: --{name.replace('_', '-')} must be "
                  f"{'positive' if positive else 'non-negative'}", file=sys.stderr)
            return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.summarize:
        try:
            result = merge_results([Path(f) for f in args.summarize])
        except ValueError as exc:
            print(f"benchmark: error: {exc}", file=sys.stderr)
            return 2
        write_summary(result, out)
        (out / "merged.json").write_text(json.dumps(result, indent=1))
        return 0
    state = {"rows": 0}

    def save_partial(row: dict, result: dict) -> None:
        state["rows"] += 1
        (out / "partial.json").write_text(json.dumps(result, indent=1))

    try:
        result = run_benchmark(profile, on_row=save_partial)
    except ValueError as exc:  # bad criteria names: raised before any training
        print(f"benchmark: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted: {state['rows']} rows saved in {out / 'partial.json'}; "
              f"tables from them: --summarize {out / 'partial.json'}", file=sys.stderr)
        return 130
    (out / "results.json").write_text(json.dumps(result, indent=1))
    write_summary(result, out)
    print(f"results in {out}/ (results.json, results.md, *.png)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
