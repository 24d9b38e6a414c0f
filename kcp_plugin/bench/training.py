"""Training and fine-tuning loops of the benchmark (the same budget for every criterion)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from ..distill import Distiller
from ..optim import rebuild_optimizer
from ..progress import progress_bar
from .tasks import Task

__all__ = ["train", "make_loader", "task_inputs"]


def make_loader(ds: Dataset, batch_size: int, seed: int, shuffle: bool = True) -> DataLoader:
    """A single-process loader whose shuffling is seeded (runs are reproducible)."""
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=gen,
                      drop_last=shuffle)


def task_inputs(task: Task, batch: tuple[torch.Tensor, ...]) -> Any:
    """The model inputs of a batch (what ``default_forward`` takes): the image, or the
    stereo pair as a tuple."""
    return (batch[0], batch[1]) if task.name == "stereo" else batch[0]


def train(
    model: nn.Module,
    task: Task,
    loader: DataLoader,
    steps: int,
    lr: float,
    weight_decay: float = 1e-4,
    desc: str = "train",
    progress: bool | None = None,
    on_step: Callable[[], bool] | None = None,
    distiller: Distiller | None = None,
) -> list[float]:
    """Train ``model`` for ``steps`` iterations with AdamW and a cosine learning rate.

    ``on_step()`` runs after every optimizer step (a pruning scheduler's ``step``); when it
    returns ``True`` the model was pruned and the optimizer is re-pointed, state carried.
    ``distiller`` (built with :func:`task_inputs` as its inputs) adds its terms to the task
    loss of every step; the returned losses are the task loss alone, comparable across runs.

    Returns:
        The loss of every step (the caller checks that it went down).

    Raises:
        ValueError: the loader yields no batch (fewer samples than a batch with
            ``drop_last``), which would otherwise loop forever.
    """
    if steps > 0 and len(loader) == 0:
        raise ValueError(f"{desc}: the training loader yields no batch ({len(loader.dataset)} "
                         f"samples, batch size {loader.batch_size}, drop_last="
                         f"{loader.drop_last}); give more samples or a smaller batch")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / max(steps, 1)))
    )
    losses = []
    batches = itertools.chain.from_iterable(itertools.repeat(loader))
    bar = progress_bar(range(steps), enabled=progress, desc=desc)
    for _, batch in zip(bar, batches):
        out = task.forward(model, batch)
        loss = task.loss(out, batch)
        total = loss
        if distiller is not None:
            labels = batch[1] if task.name != "stereo" else None
            total = loss + sum(distiller(task_inputs(task, batch), out, labels).values())
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if on_step is not None and on_step():
            rebuild_optimizer(opt, model)
    model.eval()
    return losses
