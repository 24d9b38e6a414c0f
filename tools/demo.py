#!/usr/bin/env python
"""End-to-end demo on the embedded default: train a small DeepLabV3 on generated scenes, prune it
with KCP to 30% of its MACs, fine-tune, and compare dense vs pruned (mIoU, MACs, params, CPU
latency). The pruned model is fine-tuned twice with the same steps: on the task loss alone, and
distilling from the dense model (the benchmark's best setting, docs/benchmarks.md); both mIoUs
are printed. Saves the pruned checkpoint (plan + weights; the distilled one) and PNG plots. A
few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

import kcp_plugin
from kcp_plugin.bench import get_task, make_loader, train
from kcp_plugin.bench.protocol import DISTILL_SETTINGS, distill_config
from kcp_plugin.distill import Distiller

# the distillation the benchmark found best on this model (docs/benchmarks.md, "Distillation")
BEST_DISTILL = "cwd+feat+dca"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--target-macs", type=float, default=0.3, help="fraction of MACs kept")
    p.add_argument("--importance", default="kcp", help="criterion (default: kcp)")
    p.add_argument("--train-steps", type=int, default=1500, help="dense training iterations")
    p.add_argument("--finetune-steps", type=int, default=500, help="fine-tuning iterations")
    p.add_argument("--distill", default=BEST_DISTILL, choices=list(DISTILL_SETTINGS),
                   help="distillation setting of the second fine-tuning (default: "
                   f"{BEST_DISTILL}, the benchmark's best; none: fine-tune once, no "
                   "distillation)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: "
                   "torch's; 1 keeps a machine busy with other jobs from stalling the run, and "
                   "the numbers differ slightly with the thread count)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="outputs/demo", help="output folder")
    args = p.parse_args(argv)
    if not 0 < args.target_macs <= 1:
        p.error("--target-macs must be in (0, 1]")
    if args.threads is not None:
        if args.threads < 1:
            p.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    task = get_task("segmentation")
    train_ds, val_ds = task.splits(args.seed, 384, 96)
    train_loader = make_loader(train_ds, 16, args.seed)
    val_loader = make_loader(val_ds, 16, args.seed, shuffle=False)
    x = task.example_inputs()

    steps = 4 if args.distill != "none" else 3
    print(f"1/{steps} training the dense {task.model} on generated scenes "
          f"({args.train_steps} steps)")
    dense = task.build(args.seed)
    train(dense, task, train_loader, args.train_steps, lr=3e-3, desc="dense")
    dense_miou = task.evaluate(dense, val_loader)["miou"]

    print(f"2/{steps} pruning with {args.importance} to {args.target_macs:.0%} of the MACs")
    model = copy.deepcopy(dense)
    report = kcp_plugin.prune(model, x, args.importance, target_macs_ratio=args.target_macs)
    pruned_miou = task.evaluate(model, val_loader)["miou"]

    pruned = copy.deepcopy(model)
    print(f"3/{steps} fine-tuning the pruned model ({args.finetune_steps} steps)")
    train(model, task, make_loader(train_ds, 16, args.seed), args.finetune_steps, lr=1e-3,
          desc="fine-tune")
    tuned_miou = task.evaluate(model, val_loader)["miou"]
    kd_miou = None
    if args.distill != "none":
        config = distill_config(task, DISTILL_SETTINGS[args.distill])
        print(f"4/{steps} fine-tuning it again, distilling from the dense model "
              f"({args.distill}: the same {args.finetune_steps} steps)")
        model = pruned
        distiller = Distiller(copy.deepcopy(dense), model, config, x)
        train(model, task, make_loader(train_ds, 16, args.seed), args.finetune_steps, lr=1e-3,
              desc="fine-tune + KD", distiller=distiller)
        distiller.remove()
        kd_miou = task.evaluate(model, val_loader)["miou"]
    # the CLI's method: one thread, dense and pruned passes interleaved, median
    latency = kcp_plugin.compare_latency([dense, model], x, runs=30, threads=1)
    report.latency_before_ms, report.latency_after_ms = (s.median_ms for s in latency)

    ckpt = out / "pruned.pt"
    kcp_plugin.save_pruned(model, ckpt, extra={"model": f"builtin:{task.model}",
                                               "model_kwargs": task.model_kwargs,
                                               "input_shapes": [list(x.shape)]})
    report.plot_widths(out / "widths.png", title=f"{task.model}: channels kept per layer "
                       f"({args.importance}, {report.macs_ratio:.0%} of MACs kept)")
    _plot_summary(out / "summary.png", dense_miou, pruned_miou, tuned_miou, report, kd_miou,
                  args.distill)
    (out / "report.json").write_text(json.dumps({
        **report.to_dict(), "dense_miou": dense_miou, "pruned_miou": pruned_miou,
        "finetuned_miou": tuned_miou, "distill": args.distill,
        "distilled_miou": kd_miou}, indent=1))

    print()
    print(f"{'':<14} {'dense':>10} {'pruned':>10}")
    print(f"{'mIoU (%)':<14} {dense_miou:>10.2f} {tuned_miou:>10.2f}   "
          f"(right after pruning: {pruned_miou:.2f})")
    if kd_miou is not None:
        print(f"{'+ distilled':<14} {'':>10} {kd_miou:>10.2f}   (same {args.finetune_steps} "
              f"fine-tuning steps, distilling from the dense model: {args.distill}; the saved "
              "model)")
    print(report.table())
    print(f"\nsaved {ckpt} (reload: kcp_plugin.zoo.load_spec_checkpoint), {out}/widths.png, "
          f"{out}/summary.png; total {time.perf_counter() - start:.0f} s")
    return 0


def _plot_summary(path: Path, dense: float, pruned: float, tuned: float, report,
                  distilled: float | None = None, setting: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    names, values = ["dense", "pruned", "pruned +\nfine-tuned"], [dense, pruned, tuned]
    colours = ["#8395a7", "#ee5253", "#2e86de"]
    if distilled is not None:
        names.append(f"+ distilled\n({setting})")
        values.append(distilled)
        colours.append("#10ac84")
    axes[0].bar(names, values, color=colours)
    axes[0].tick_params(axis="x", labelsize=8)
    axes[0].set_ylabel("mIoU (%)")
    axes[1].bar(["MACs", "params", "latency"],
                [report.macs_ratio, report.params_ratio,
                 report.latency_after_ms / report.latency_before_ms], color="#2e86de")
    axes[1].axhline(1.0, color="k", lw=1, ls=":")
    axes[1].set_ylabel("pruned / dense")
    fig.suptitle("KCP demo: DeepLabV3-lite on generated scenes")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
