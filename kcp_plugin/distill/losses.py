"""Output distillation losses: what the student's output should match in the teacher's.

* ``kl``: Hinton et al. (2015) temperature-scaled KL divergence of the class distributions,
  per sample for a classifier ``[N, K]`` and per pixel for dense labelling ``[N, K, *S]``
  (the class dimension is 1), times ``T^2`` so gradients keep their scale across temperatures;
* ``cwd``: channel-wise distillation (Shu et al., "Channel-wise Knowledge Distillation for Dense
  Prediction", ICCV 2021): each class channel's map becomes a distribution over the spatial
  positions (softmax at temperature ``T``), and the KL divergence of the teacher's from the
  student's is summed over positions, averaged over channels and samples, times ``T^2`` (the
  paper uses ``T = 4`` on Cityscapes);
* ``mse`` / ``l1``: regression outputs (stereo disparity, depth), where there is no distribution
  to match.

Every loss takes the student's and the teacher's output tensors of the same shape and returns a
scalar; non-finite teacher values (a void disparity) are left out of the regression losses.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = ["OUTPUT_LOSSES", "kl_divergence", "channel_wise", "regression"]


def kl_divergence(student: torch.Tensor, teacher: torch.Tensor,
                  temperature: float = 1.0) -> torch.Tensor:
    """Temperature-scaled KL(teacher || student) over dim 1 (classes), mean over samples and
    pixels, times ``T^2``.

    Args:
        student: Logits ``[N, K]`` or ``[N, K, *S]``.
        teacher: Logits of the same shape.
        temperature: ``T`` > 0.
    """
    t = temperature
    log_p = F.log_softmax(student / t, dim=1)
    log_q = F.log_softmax(teacher / t, dim=1)
    per = (log_q.exp() * (log_q - log_p)).sum(1)  # [N, *S]
    return per.mean() * t * t


def channel_wise(student: torch.Tensor, teacher: torch.Tensor,
                 temperature: float = 4.0) -> torch.Tensor:
    """Channel-wise distillation (Shu et al., ICCV 2021) of dense maps ``[N, C, *S]``.

    Raises:
        ValueError: an output without spatial dimensions (use ``kl`` for classifiers).
    """
    if student.dim() < 3:
        raise ValueError("output distillation 'cwd' compares spatial maps [N, C, H, W]; this "
                         f"output has shape {tuple(student.shape)}: use 'kl' for classifiers")
    t = temperature
    log_p = F.log_softmax(student.flatten(2) / t, dim=2)
    log_q = F.log_softmax(teacher.flatten(2) / t, dim=2)
    per = (log_q.exp() * (log_q - log_p)).sum(2)  # [N, C]
    return per.mean() * t * t


def regression(student: torch.Tensor, teacher: torch.Tensor, kind: str = "l1") -> torch.Tensor:
    """L1 (``kind="l1"``) or squared error (``"mse"``) to the teacher's output, over the
    positions where the teacher's value is finite."""
    valid = torch.isfinite(teacher)
    diff = student - teacher.nan_to_num()
    err = diff.abs() if kind == "l1" else diff.pow(2)
    return (err * valid).sum() / valid.sum().clamp_min(1)


# name -> loss(student, teacher, temperature); temperature is ignored by the regression losses
OUTPUT_LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]] = {
    "kl": kl_divergence,
    "cwd": channel_wise,
    "l1": lambda s, t, _: regression(s, t, "l1"),
    "mse": lambda s, t, _: regression(s, t, "mse"),
}
