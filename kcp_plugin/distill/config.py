"""``DistillConfig``: the one record of distillation settings every recipe passes around.

The scheduler, the mmseg hook, timm's training script and the NNI search all take the same
fields, as a record, a dict (configs) or the name of an output loss; :meth:`DistillConfig.build`
checks them before anything is trained.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..hints import did_you_mean
from .losses import OUTPUT_LOSSES

__all__ = ["DistillConfig", "DEFAULT_TEMPERATURE"]

# Temperatures (Hinton et al. tune T; Shu et al. use 4 for channel-wise distillation). KL keeps
# 1: T=4 measured better on the benchmark (docs/benchmarks.md, "Distillation": segmentation at
# 50% / 30% of the MACs, 3 seeds: 30.37 vs 29.74 and 28.09 vs 26.57 mIoU; MNIST at 50%: 95.87
# vs 95.67), but as a default it made a short mmseg run diverge (tests/test_mmseg_distill.py,
# a pruned checkpoint trained further: non-finite outputs) and was not studied further; pass
# temperature=4 where it helps. Regression losses take none.
DEFAULT_TEMPERATURE = {"kl": 1.0, "cwd": 4.0, "l1": 1.0, "mse": 1.0}


@dataclass
class DistillConfig:
    """What to distil from the dense teacher, and how much each term weighs.

    Attributes:
        output: Output loss, one of ``kl`` (per-sample / per-pixel KL), ``cwd`` (channel-wise,
            Shu et al. 2021), ``l1``, ``mse`` (regression), or ``None`` for no output term.
        temperature: Softening temperature of ``kl`` / ``cwd`` (default 1 for ``kl``, 4 for
            ``cwd``; 4 measured better for ``kl`` on the segmentation benchmark).
        weight: Weight of the output term (added to the task loss).
        layers: Module names whose outputs are distilled feature to feature. The student's
            channels are compared with the teacher's **kept** channels (the pruning plan says
            which); a container module is compared at the last layer inside it that owns its
            output channels.
        layer_weight: Weight of the feature term (mean squared error, averaged over layers).
            Its scale depends on the features' (post-ReLU stage outputs are small next to a
            task loss: x10 measured best on the segmentation benchmark); tune it.
        adapter: Compare through a learned 1x1 adapter (student width -> teacher width)
            instead of the kept channels; its parameters must join the optimizer
            (``Distiller.parameters()``).
        dca_layers: Module names distilled in the discriminant subspace of CDC (Liu et al.,
            ICPR 2022): the DCA projection (Kung, 2015) is estimated on the teacher's features
            with the labels, and student and teacher are compared there.
        dca_weight: Weight of the DCA term.
        dca_batches: Labelled batches of teacher features collected before the DCA term
            starts (the projection is then fixed; it is re-cut to the kept channels after
            every prune).
        dca_dim: Dimensions of the DCA subspace (default: classes - 1, DCA's signal subspace).
        num_classes: Classes of the labels (default: the largest label seen + 1).
        ignore_index: Label value left out of the DCA statistics (dense tasks' void label).
    """

    output: str | None = "kl"
    temperature: float | None = None
    weight: float = 1.0
    layers: list[str] = field(default_factory=list)
    layer_weight: float = 1.0
    adapter: bool = False
    dca_layers: list[str] = field(default_factory=list)
    dca_weight: float = 1.0
    dca_batches: int = 8
    dca_dim: int | None = None
    num_classes: int | None = None
    ignore_index: int = 255

    def __post_init__(self) -> None:
        if isinstance(self.output, str):
            self.output = self.output.lower()  # "KL" is "kl"
        if self.output is not None and self.output not in OUTPUT_LOSSES:
            raise ValueError(f"unknown output distillation {self.output!r}"
                             f"{did_you_mean(str(self.output), OUTPUT_LOSSES)}; choose one of "
                             f"{', '.join(OUTPUT_LOSSES)}, or None for no output term")
        if self.temperature is None:
            self.temperature = DEFAULT_TEMPERATURE.get(self.output or "kl", 1.0)
        for name in ("temperature", "weight", "layer_weight", "dca_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 \
                    or (name == "temperature" and value == 0):
                raise ValueError(f"distillation {name} must be a number "
                                 f"{'> 0' if name == 'temperature' else '>= 0'}, got {value!r}")
        for name in ("layers", "dca_layers"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"distillation {name} must be a list of module names, got "
                                 f"{value!r}")
            setattr(self, name, list(value))
        if not isinstance(self.dca_batches, int) or self.dca_batches < 1:
            raise ValueError(f"dca_batches must be an integer >= 1, got {self.dca_batches!r}")
        if self.dca_dim is not None and (not isinstance(self.dca_dim, int) or self.dca_dim < 1):
            raise ValueError(f"dca_dim must be None or an integer >= 1, got {self.dca_dim!r}")
        if self.num_classes is not None and (not isinstance(self.num_classes, int)
                                             or self.num_classes < 2):
            raise ValueError(f"num_classes must be None or an integer >= 2, got "
                             f"{self.num_classes!r}")
        if self.output is None and not self.layers and not self.dca_layers:
            raise ValueError("this distillation has no term: give an output loss "
                             f"({', '.join(OUTPUT_LOSSES)}), layers or dca_layers")

    @classmethod
    def from_value(cls, value: Any) -> DistillConfig | None:
        """A record from what a config holds: ``None``, a record, the name of an output loss,
        or a dict of the fields (``type`` is accepted for ``output``, mmengine's habit).

        Raises:
            ValueError / TypeError: an unknown field (with the valid ones) or an invalid value.
        """
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, str):
            return cls(output=value)
        if not isinstance(value, dict):
            raise TypeError("distill must be None, a DistillConfig, the name of an output loss "
                            f"or a dict of its fields, got {type(value).__name__}")
        value = dict(value)
        if "type" in value:
            if "output" in value:
                raise ValueError("distill: give 'type' or 'output' (the same field), not both")
            value["output"] = value.pop("type")
        names = [f.name for f in dataclasses.fields(cls)]
        for key in value:
            if key not in names:
                raise ValueError(f"unknown distillation setting {key!r}"
                                 f"{did_you_mean(key, names)}; valid: {', '.join(names)}")
        return cls(**value)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (what a checkpoint or a log records)."""
        return dataclasses.asdict(self)
