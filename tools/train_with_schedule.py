#!/usr/bin/env python
"""Plain-PyTorch example: train a benchmark model while KCP prunes it iteratively.

The loop is an ordinary PyTorch loop; pruning is three lines: build a PruningScheduler, call
``scheduler.step()`` after ``optimizer.step()``, and (optionally) add a regularizer's
gradients between ``backward()`` and ``step()``. The optimizer is re-pointed after every hard
prune with its momentum carried.

    python tools/train_with_schedule.py --mode hard --target-macs 0.3 --steps 600
    python tools/train_with_schedule.py --mode soft      # SFP, final hard prune
    python tools/train_with_schedule.py --regularizer greg1
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

import kcp_plugin
from kcp_plugin.bench import get_task, make_loader
from kcp_plugin.regularizers import GReg1, IncReg
from kcp_plugin.schedule import MODE_ALIASES, MODES, RAMPS, PruningScheduler


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="segmentation", help="benchmark task (default: segmentation)")
    p.add_argument("--importance", default="kcp", help="criterion from the registry")
    p.add_argument("--target-macs", type=float, default=0.3, help="fraction of MACs kept")
    p.add_argument("--mode", choices=[*MODES, *MODE_ALIASES], type=str.lower, default="hard",
                   help="hard, soft (SFP), decay (SRFP), or the papers' names sfp, srfp, asrfp")
    p.add_argument("--ramp", choices=RAMPS, default="linear", help="how the target is approached")
    p.add_argument("--num-prunes", type=int, default=4, help="pruning points")
    p.add_argument("--steps", type=int, default=600, help="training iterations")
    p.add_argument("--start", type=int, default=100, help="iteration of the first pruning point")
    p.add_argument("--regularizer", choices=["none", "greg1", "increg"], default="none",
                   help="sparsity regularizer applied between backward and step")
    p.add_argument("--out", default="outputs/schedule", help="output folder")
    args = p.parse_args(argv)
    if args.start >= args.steps:
        p.error("--start must be smaller than --steps")

    task = get_task(args.task)
    train_ds, val_ds = task.splits(0, 512, 128)
    loader = make_loader(train_ds, 16, 0)
    model = task.build(0)
    x = task.example_inputs()
    fwd = (lambda m, inp: m(*inp)) if task.name == "stereo" else None
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    every = max(1, (args.steps - args.start) // (args.num_prunes + 1))
    scheduler = PruningScheduler(model, x, args.importance, target_macs_ratio=args.target_macs,
                                 num_prunes=args.num_prunes, start=args.start, every=every,
                                 ramp=args.ramp, mode=args.mode, optimizer=opt, forward_fn=fwd)
    reg = None
    if args.regularizer != "none":
        cls = GReg1 if args.regularizer == "greg1" else IncReg
        reg = cls(model, x, pruning_ratio=0.3, forward_fn=fwd, interval=5)

    batches = itertools.chain.from_iterable(itertools.repeat(loader))
    for it, batch in zip(range(args.steps), batches):
        loss = task.loss(task.forward(model, batch), batch)
        opt.zero_grad()
        loss.backward()
        if reg is not None and scheduler.calls <= scheduler.start:
            reg.apply()  # regularize until pruning starts (groups change shape after it)
        opt.step()
        if reg is not None:
            reg.step()
        if scheduler.step():
            macs = kcp_plugin.count_macs_params(model, x, fwd)[0] / scheduler.macs_dense
            print(f"iter {it}: pruned ({args.mode}), MACs kept {macs:.1%}, loss {loss.item():.3f}")
    metrics = task.evaluate(model, make_loader(val_ds, 32, 0, shuffle=False))
    macs = kcp_plugin.count_macs_params(model, x, fwd)[0] / scheduler.macs_dense
    print(f"final: {task.metric} {metrics[task.metric]:.2f}, MACs kept {macs:.1%}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    kcp_plugin.save_pruned(model, out / "pruned.pt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
