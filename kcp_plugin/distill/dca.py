"""Discriminant component analysis of labelled features: CDC's distillation subspace.

CDC (Liu et al., "Class-Discriminative CNN Compression", ICPR 2022) prunes by class
discrimination and distils the teacher's intermediate representations in the subspace found by
discriminant component analysis (DCA, Kung, "Discriminant component analysis for
privacy protection and visualization of big data", 2015). DCA keeps the directions that
maximise between-class scatter against ridge-regularised within-class scatter: the leading
generalised eigenvectors of ``S_B w = lambda (S_W + rho I) w``; only ``classes - 1`` of them carry
signal (``S_B`` has that rank), the default dimension here.

Statistics are streamed per class over the samples a feature map holds (a sample is an image
for ``[N, C]`` features, a pixel for ``[N, C, *S]`` maps with per-pixel labels resized to the
map, as the ``cdc`` criterion reads them), over all of the teacher's channels: cutting the
projection to the channels a prune kept needs no new data.
"""

from __future__ import annotations

import torch

from ..importance.cdc import class_labels
from ..stats import resize_labels

__all__ = ["DCAStats"]


class DCAStats:
    """Per-class counts and sums and the total Gram matrix of one layer's features.

    Args:
        channels: Feature channels ``C``.
        num_classes: Classes (None: grown to the largest label seen).
        ignore_index: Label value skipped.
    """

    def __init__(self, channels: int, num_classes: int | None = None, ignore_index: int = 255):
        self.channels, self.num_classes, self.ignore_index = channels, num_classes, ignore_index
        k = num_classes or 0
        self.n = torch.zeros(k, dtype=torch.float64)
        self.s1 = torch.zeros(k, channels, dtype=torch.float64)
        self.gram = torch.zeros(channels, channels, dtype=torch.float64)
        self.batches = 0

    @torch.no_grad()
    def add(self, feature: torch.Tensor, labels: torch.Tensor, axis: int = 1) -> None:
        """Add one batch: ``feature`` ``[N, C, *S]`` (channels on ``axis``) and labels ``(N,)``
        or ``(N, *S')`` (per pixel, resized to ``S``).

        Raises:
            ValueError: regression targets (floating point) or labels that fit no sample of
                this feature: DCA needs classes.
        """
        labels = class_labels(labels).to(feature.device)
        x = feature.detach().movedim(axis, -1)  # [N, *S, C]
        if labels.dim() == 1:
            if labels.shape[0] != x.shape[0]:
                raise ValueError(f"DCA got {labels.shape[0]} labels for a batch of {x.shape[0]}")
            values = x.reshape(x.shape[0], -1, x.shape[-1]).mean(1)
        else:
            spatial = tuple(x.shape[1:-1])
            if labels.shape[0] != x.shape[0] or len(spatial) != labels.dim() - 1:
                raise ValueError(f"DCA's per-pixel labels of shape {tuple(labels.shape)} do not "
                                 f"fit a feature map of shape {tuple(feature.shape)}")
            labels = resize_labels(labels, spatial)
            values = x.reshape(-1, x.shape[-1])
        labels = labels.reshape(-1)
        keep = (labels >= 0) & (labels != self.ignore_index)
        values, labels = values[keep].double().cpu(), labels[keep].long().cpu()
        if not len(labels):
            return
        k = int(labels.max()) + 1
        if self.num_classes is not None and k > self.num_classes:
            raise ValueError(f"label {k - 1} >= num_classes={self.num_classes}")
        if k > self.n.shape[0]:
            pad = k - self.n.shape[0]
            self.n = torch.cat([self.n, self.n.new_zeros(pad)])
            self.s1 = torch.cat([self.s1, self.s1.new_zeros(pad, self.channels)])
        onehot = torch.zeros(len(labels), self.n.shape[0], dtype=torch.float64)
        onehot[torch.arange(len(labels)), labels] = 1
        self.n += onehot.sum(0)
        self.s1 += onehot.t() @ values
        self.gram += values.t() @ values
        self.batches += 1

    def projection(self, channels: torch.Tensor | None = None, dim: int | None = None,
                   ridge: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
        """DCA projection of the features restricted to ``channels`` (default: all).

        ``ridge`` is DCA's regulariser ``rho`` relative to the mean within-class variance (it
        keeps near-constant channels of a trained net from dominating the directions).

        Returns:
            ``(mean [C'], W [C', d])`` (float32): a feature ``x`` maps to ``(x - mean) @ W``,
            most discriminant direction first, each direction scaled to unit variance over
            the samples seen.

        Raises:
            ValueError: fewer than two classes seen (no between-class scatter).
        """
        present = self.n > 0
        if int(present.sum()) < 2:
            raise ValueError(f"DCA needs samples of at least two classes; it has seen "
                             f"{int(present.sum())} (after {self.batches} batches)")
        idx = torch.arange(self.channels) if channels is None else channels.long().cpu()
        n, s1 = self.n[present], self.s1[present][:, idx]
        gram = self.gram[idx][:, idx]
        total = n.sum()
        mean = s1.sum(0) / total
        means = s1 / n[:, None]
        between = ((means - mean).t() * n) @ (means - mean) / total
        within = gram / total - (means.t() * n) @ means / total
        within = 0.5 * (within + within.t())
        c = len(idx)
        total_scatter = within + between
        within = within + (ridge * within.diagonal().mean().clamp_min(1e-12)) * torch.eye(
            c, dtype=torch.float64)
        chol = torch.linalg.cholesky(within)
        inv = torch.linalg.solve_triangular(chol, torch.eye(c, dtype=torch.float64), upper=False)
        m = inv @ between @ inv.t()
        values, vectors = torch.linalg.eigh(0.5 * (m + m.t()))
        d = min(dim or int(present.sum()) - 1, c)
        w = inv.t() @ vectors[:, values.argsort(descending=True)[:d]]
        # each direction scaled to unit total variance: the loss is then in units of the
        # teacher's own spread along it, whatever the features' scale or the ridge
        total_var = ((total_scatter @ w) * w).sum(0).clamp_min(1e-12)
        w = w / total_var.sqrt()
        return mean.float(), w.float()

    def state_dict(self) -> dict[str, torch.Tensor | int]:
        """Tensors and counters (a resumed run restores them)."""
        return {"n": self.n, "s1": self.s1, "gram": self.gram, "batches": self.batches}

    def load_state_dict(self, state: dict) -> None:
        """Inverse of :meth:`state_dict`."""
        self.n, self.s1, self.gram = state["n"], state["s1"], state["gram"]
        self.batches = int(state["batches"])
