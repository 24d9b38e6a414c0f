"""The benchmark's tasks: data, model, loss and metric of segmentation, stereo, classification.

Each task bundles what the protocol needs so that pruning, fine-tuning and evaluation are the
same code for every criterion. Data are generated (or shipped with scikit-learn), never
downloaded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset

__all__ = ["Task", "TASKS", "get_task"]


@dataclass
class Task:
    """One benchmark task.

    Attributes:
        name: ``segmentation``, ``stereo`` or ``classification``.
        model: Name in :mod:`kcp_plugin.models`.
        model_kwargs: Constructor arguments (width etc.).
        metric: Primary metric name (``miou``, ``epe``, ``top1``).
        higher_is_better: Direction of the primary metric.
        data_kwargs: Arguments of the split builder (sizes, counts).
    """

    name: str
    model: str
    model_kwargs: dict[str, Any]
    metric: str
    higher_is_better: bool
    data_kwargs: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ data / model
    def splits(self, seed: int, n_train: int, n_val: int) -> tuple[Dataset, Dataset]:
        """Train and validation datasets for ``seed``."""
        from .. import data

        if self.name == "segmentation":
            return data.make_segmentation_splits(n_train, n_val, seed=seed, **self.data_kwargs)
        if self.name == "stereo":
            return data.make_stereo_splits(n_train, n_val, seed=seed, **self.data_kwargs)
        train, val = data.make_digits_splits(seed=seed, **self.data_kwargs)
        return _head(train, n_train), _head(val, n_val)

    def build(self, seed: int) -> nn.Module:
        """A freshly initialised model (initialisation seeded)."""
        from ..models import build_model

        torch.manual_seed(seed)
        return build_model(self.model, **self.model_kwargs)

    def example_inputs(self, batch: int = 1) -> Any:
        """Inputs for tracing, MACs counting and latency."""
        from ..models import example_inputs

        size = self.data_kwargs.get("size")
        return example_inputs(self.model, batch=batch, size=size)

    # ------------------------------------------------------------------ step pieces
    def forward(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Model output for a batch from this task's dataset."""
        if self.name == "stereo":
            return model(batch[0], batch[1])
        return model(batch[0])

    def loss(self, out: torch.Tensor, batch: tuple[torch.Tensor, ...],
             reduction: str = "mean") -> torch.Tensor:
        """Training loss, reduced over samples by ``"mean"``, ``"sum"`` or ``"none"`` (per
        sample, for Hessian)."""
        if self.name == "stereo":
            target = batch[2]
            valid = torch.isfinite(target)
            err = F.smooth_l1_loss(out, target.nan_to_num(), reduction="none") * valid
            per = err.flatten(1).sum(1) / valid.flatten(1).sum(1).clamp_min(1)
        elif self.name == "segmentation":
            per = F.cross_entropy(out, batch[1], reduction="none").flatten(1).mean(1)
        else:
            per = F.cross_entropy(out, batch[1], reduction="none")
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        return per if reduction == "none" else per.sum() if reduction == "sum" else per.mean()

    def loss_fn(self, batch: tuple[torch.Tensor, ...], per_sample: bool = False) -> Callable:
        """``loss_fn(model)`` on a fixed batch, for gradient-based criteria."""
        return lambda model: self.loss(self.forward(model, batch), batch,
                                       "none" if per_sample else "mean")

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: Any) -> dict[str, float]:
        """Metrics on a loader: ``miou`` / ``epe`` + ``bad1`` / ``top1`` (percent for rates)."""
        from ..data import metrics

        was = model.training
        model.eval()
        try:
            if self.name == "segmentation":
                n = self.model_kwargs.get("num_classes", 5)
                cm = torch.zeros(n, n, dtype=torch.long)
                for batch in loader:
                    cm += metrics.confusion_matrix(self.forward(model, batch), batch[1], n)
                return {"miou": 100.0 * float(metrics.iou_from_confusion(cm).nanmean())}
            if self.name == "stereo":
                err_sum, bad_sum, count = 0.0, 0.0, 0
                for batch in loader:
                    out, target = self.forward(model, batch), batch[2]
                    valid = torch.isfinite(target)
                    err = (out - target.nan_to_num()).abs()[valid]
                    err_sum += float(err.sum())
                    bad_sum += float((err > 1.0).sum())
                    count += int(valid.sum())
                return {"epe": err_sum / max(count, 1), "bad1": 100.0 * bad_sum / max(count, 1)}
            correct, total = 0, 0
            for batch in loader:
                correct += int((self.forward(model, batch).argmax(1) == batch[1]).sum())
                total += len(batch[1])
            return {"top1": 100.0 * correct / max(total, 1)}
        finally:
            model.train(was)


def _head(ds: Any, n: int) -> Any:
    if n >= len(ds):
        return ds
    return torch.utils.data.TensorDataset(*(t[:n] for t in ds.tensors))


TASKS: dict[str, Task] = {
    "segmentation": Task(
        "segmentation", "deeplabv3_lite", {"num_classes": 5, "width": 8}, "miou", True,
        {"size": (64, 64), "num_classes": 5},
    ),
    # twice the channels (4x the MACs): how much of the pruning gap is a lack of redundancy?
    "segmentation_wide": Task(
        "segmentation", "deeplabv3_lite", {"num_classes": 5, "width": 16}, "miou", True,
        {"size": (64, 64), "num_classes": 5},
    ),
    "segmentation_fcn": Task(
        "segmentation", "fcn_lite", {"num_classes": 5, "width": 8}, "miou", True,
        {"size": (64, 64), "num_classes": 5},
    ),
    "stereo": Task(
        "stereo", "stereo_lite", {"max_disp": 16, "width": 8}, "epe", False,
        {"size": (64, 128), "max_disp": 16},
    ),
    "classification": Task(
        "classification", "resnet20", {"num_classes": 10, "width": 16}, "top1", True,
        {"size": 32},
    ),
}


def get_task(name: str) -> Task:
    """The task registered as ``name``.

    Raises:
        ValueError: unknown name; the message lists the valid ones.
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}")
    return TASKS[name]
