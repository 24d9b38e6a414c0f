"""Class-discriminative channel scores (CDC, Liu et al., ICPR 2022) as a data-driven importance.

For each channel, its post-activation values are compared between samples of class ``k`` and
the rest (one-vs-rest means ``mu+, mu-``, variances ``var+, var-``, counts ``n+, n-``):

* ``ttest``: ``|mu+ - mu-| / sqrt(var+/n+ + var-/n- + 1e-4)``;
* ``symdiv`` (default): ``0.5 (var+/(var- + r) + var-/(var+ + r))
  + 0.5 (mu+ - mu-)^2 / (var+ + var- + r) - 1`` with ``r = 0.05``,

averaged over the classes present. A channel whose response does not separate classes is pruned
first. Statistics are streamed as per-class sums at every layer that reads the channel (its input
is the post-activation map): for classifiers a sample is an image (its spatially averaged map),
for dense labelling a sample is a pixel of the feature map, labelled by the nearest-neighbour
resized per-pixel labels (our extension; 255 and negative labels are ignored). Scores of a
channel's consumers are averaged.

Labels are ``(N,)`` class indices per sample or ``(N, *S)`` per pixel; a singleton channel
dimension (``(N, 1)``, or ``(N, 1, H, W)`` as mmseg's stacked ``gt_sem_seg`` is) is squeezed.
Per-pixel labels feed the layers whose inputs have ``len(S)`` spatial dimensions; labels that
fit no hooked layer are an error naming their shape.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ..registry import register_importance
from ..stats import StatsImportance, channels_last, resize_labels
from ..views import CONSUMER_FNS, scatter_mean

TESTS = ("symdiv", "ttest")


@register_importance("cdc", requires_data=True,
                     summary="Class-discriminative channel scores (SymDiv / T-test) from labels")
class CDCImportance(StatsImportance):
    """Class-discriminative channel importance.

    Args:
        test: ``"symdiv"`` or ``"ttest"``.
        num_classes: Number of classes (inferred from the labels seen if None; give it under
            DDP so every rank keeps sums of the same shape).
        r: SymDiv's regulariser.
        ignore_index: Label value that is skipped (dense tasks' void label).
    """

    needs_labels = True

    def __init__(self, test: str = "symdiv", num_classes: int | None = None, r: float = 0.05,
                 ignore_index: int = 255):
        super().__init__()
        if test not in TESTS:
            raise ValueError(f"test must be one of {', '.join(TESTS)}; got {test!r}")
        if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 2):
            raise ValueError(f"num_classes must be None or an integer >= 2, got {num_classes!r}")
        self.test, self.num_classes, self.r, self.ignore_index = test, num_classes, r, ignore_index
        # labels that fitted no layer input: (labels shape, an input shape, its layer)
        self._misfit: tuple[tuple[int, ...], tuple[int, ...], str] | None = None

    def set_labels(self, labels: torch.Tensor | None) -> None:
        """Labels of the next forward pass: ``(N,)`` class indices, or ``(N, *S)`` per pixel
        (a singleton dimension 1, ``(N, 1)`` or ``(N, 1, H, W)``, is squeezed).

        Raises:
            ValueError: labels that are not an integer tensor of at least one dimension.
        """
        if labels is not None:
            labels = class_labels(labels)
        super().set_labels(labels)

    def _nothing_collected_reason(self) -> str | None:
        if self._misfit is None:
            return None
        labels, inputs, layer = self._misfit
        return (f"cdc's labels of shape {labels} fit none of the hooked layers (e.g. {layer!r}, "
                f"input of shape {inputs}): labels are (N,) class indices per sample, or "
                "(N, *S) per pixel for layers whose inputs have len(S) spatial dimensions "
                "((N, 1, H, W) is accepted)")

    def _observe(self, name: str, module: nn.Module, x: torch.Tensor) -> None:
        if self._labels is None:
            raise RuntimeError("cdc needs labels: call importance.set_labels(y) before each "
                               "forward (collect() does this from (inputs, labels) batches)")
        labels = self._labels
        per_pixel = labels.dim() > 1
        if per_pixel and (isinstance(module, nn.Linear) or x.dim() - 2 != labels.dim() - 1):
            # no spatial map to align the labels with (a head's linear layer, a 3-D conv next
            # to 2-D labels): fine if other layers take them; else collect() says so
            self._misfit = (tuple(labels.shape), tuple(x.shape), name)
            return
        feats = channels_last(x, module).double()  # [N, P, C]
        if labels.shape[0] != feats.shape[0]:
            raise ValueError(f"cdc got labels of shape {tuple(labels.shape)} for a batch of "
                             f"{feats.shape[0]} (input of {name!r}: {tuple(x.shape)})")
        if not per_pixel:  # one label per sample: the spatially averaged map
            values = feats.mean(1)
        else:  # per-pixel labels, resized to this feature map
            labels = resize_labels(labels, tuple(x.shape[2:]))
            values, labels = feats.reshape(-1, feats.shape[-1]), labels.reshape(-1)
        keep = (labels >= 0) & (labels != self.ignore_index)
        values, labels = values[keep], labels[keep].long().cpu()
        if not len(labels):
            return
        k = self.num_classes or int(labels.max()) + 1
        if self.num_classes is None:  # grow to the largest class seen so far
            k = max(k, self._classes(name))
            self._grow(name, k)
        elif int(labels.max()) >= k:
            raise ValueError(f"label {int(labels.max())} >= num_classes={k}")
        onehot = torch.zeros(len(labels), k, dtype=torch.float64)
        onehot[torch.arange(len(labels)), labels] = 1
        values = values.cpu()
        self._add(name, "n", onehot.sum(0))
        self._add(name, "s1", onehot.t() @ values)
        self._add(name, "s2", onehot.t() @ values.pow(2))

    def reset(self) -> None:
        super().reset()
        self._misfit = None

    def _classes(self, name: str) -> int:
        n = self._sums.get(name, {}).get("n")
        return 0 if n is None else n.shape[0]

    def _grow(self, name: str, k: int) -> None:
        slot = self._sums.get(name)
        if not slot or slot["n"].shape[0] >= k:
            return
        pad = k - slot["n"].shape[0]
        slot["n"] = torch.cat([slot["n"], torch.zeros(pad, dtype=torch.float64)])
        for key in ("s1", "s2"):
            slot[key] = torch.cat([slot[key], slot[key].new_zeros(pad, slot[key].shape[1])])

    def channel_scores(self, n: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
        """Per-channel score from per-class counts ``n [K]`` and sums ``s1, s2 [K, C]``."""
        total_n, total_s1, total_s2 = n.sum(), s1.sum(0), s2.sum(0)
        present = (n > 0) & (n < total_n)
        if not present.any():
            return torch.zeros(s1.shape[1], dtype=torch.float64)
        n_pos = n[present, None]
        n_neg = total_n - n_pos
        mu_pos, mu_neg = s1[present] / n_pos, (total_s1 - s1[present]) / n_neg
        var_pos = (s2[present] / n_pos - mu_pos.pow(2)).clamp_min(0)
        var_neg = ((total_s2 - s2[present]) / n_neg - mu_neg.pow(2)).clamp_min(0)
        if self.test == "ttest":
            score = (mu_pos - mu_neg).abs() / (var_pos / n_pos + var_neg / n_neg + 1e-4).sqrt()
        else:
            r = self.r
            score = (0.5 * (var_pos / (var_neg + r) + var_neg / (var_pos + r))
                     + 0.5 * (mu_pos - mu_neg).pow(2) / (var_pos + var_neg + r) - 1)
        return score.mean(0)

    @torch.no_grad()
    def __call__(self, group: Any) -> torch.Tensor | None:
        self._require_data()
        n_root = len(group[0].idxs)
        parts = []
        for i, (dep, idxs) in enumerate(group):
            if dep.pruning_fn not in CONSUMER_FNS:
                continue
            n = self._stat(dep.target.module, "n")
            root_idxs = group[i].root_idxs
            if n is None or None in root_idxs:
                continue
            s1, s2 = self._stat(dep.target.module, "s1"), self._stat(dep.target.module, "s2")
            if s1.shape[1] <= max(idxs):
                continue
            scores = self.channel_scores(n, s1, s2)
            parts.append((scores[torch.as_tensor(list(idxs))], root_idxs, 1.0))
        if not parts:
            return None
        return scatter_mean(parts, n_root)


def class_labels(labels: Any) -> torch.Tensor:
    """CDC's labels, checked: an integer tensor ``(N,)`` or ``(N, *S)``, with a singleton
    dimension 1 squeezed (``(N, 1)`` -> ``(N,)``, ``(N, 1, H, W)`` -> ``(N, H, W)``: mmseg
    stacks ``gt_sem_seg`` that way).

    Raises:
        ValueError: not a tensor, a scalar, or floating-point (regression targets: CDC scores
            class separation and has no classes there).
    """
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"cdc needs class labels as a tensor, got a {type(labels).__name__}")
    if labels.is_floating_point():
        raise ValueError(f"cdc needs class labels (integers), got floating-point targets of "
                         f"shape {tuple(labels.shape)}")
    if labels.dim() == 0:
        raise ValueError("cdc needs one label per sample (N,) or per pixel (N, H, W), got a "
                         "scalar")
    if labels.dim() >= 2 and labels.shape[1] == 1:
        labels = labels.squeeze(1)
    return labels
