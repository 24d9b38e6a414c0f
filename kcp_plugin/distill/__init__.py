"""Distillation from the dense model: win back what pruning costs (see docs/distill.md).

* :class:`DistillConfig`: the settings record every recipe takes;
* :class:`Distiller`: the frozen teacher and the loss terms added to the task loss;
* :mod:`.losses` (output losses: KL, channel-wise, L1 / MSE), :mod:`.channels` (the teacher's
  kept channels, from the pruning plan), :mod:`.dca` (CDC's discriminant subspace).
"""

from .config import DistillConfig
from .distiller import Distiller, frozen_teacher, main_output
from .losses import OUTPUT_LOSSES

__all__ = ["DistillConfig", "Distiller", "OUTPUT_LOSSES", "frozen_teacher", "main_output"]
