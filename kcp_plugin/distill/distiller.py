"""``Distiller``: the dense teacher and the distillation loss added to a pruned student's task
loss.

The teacher is the model before the prune, frozen (no gradients, eval mode) and kept on the
side: it is not a submodule of anything the optimizer or a DDP wrapper sees, so under DDP every
rank holds its own replica and distils its own batch. Each training step costs one teacher
forward under ``torch.no_grad``; forward hooks on the student hold only the chosen layers'
outputs, and only while the student is in training mode (nothing happens at inference;
:meth:`Distiller.remove` drops the hooks).

Terms (each weighted, returned separately so a trainer logs them like any loss):

* ``loss_distill_out``: the output loss of :mod:`.losses` (``kl``, ``cwd``, ``l1``, ``mse``);
* ``loss_distill_feat``: mean squared error between the student's feature and the teacher's
  kept channels (:mod:`.channels`), or through a learned 1x1 adapter;
* ``loss_distill_dca``: the same in the DCA subspace of the teacher's labelled features
  (:mod:`.dca`, CDC's distillation). It starts after ``dca_batches`` labelled batches.

The kept channels are re-read from the student's pruning plan whenever the plan grows (a
scheduler pruned again), so one distiller serves a whole schedule.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..graph import ForwardFn, default_forward
from ..plan import get_plan
from ..stats import unwrap_model
from .channels import (
    FeatureLayer,
    channel_axis,
    kept_channels,
    layer_hint,
    owner_dim,
    resolve_feature_layers,
)
from .config import DistillConfig
from .dca import DCAStats
from .losses import OUTPUT_LOSSES

__all__ = ["Distiller", "main_output", "frozen_teacher"]

OutputFn = Callable[[Any], torch.Tensor]


def main_output(out: Any) -> torch.Tensor:
    """The tensor a model's output is judged by: the tensor itself, ``out["out"]`` (torchvision
    segmentation), ``.logits`` (Hugging Face), or the first tensor of a tuple / list.

    Raises:
        TypeError: none of those; pass ``output_fn`` to say which tensor.
    """
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict) and isinstance(out.get("out"), torch.Tensor):
        return out["out"]
    if isinstance(getattr(out, "logits", None), torch.Tensor):
        return out.logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"cannot tell which tensor of a {type(out).__name__} output to distil; "
                    "pass output_fn (output -> tensor)")


def frozen_teacher(model: nn.Module) -> nn.Module:
    """``model`` frozen in place as a teacher: eval mode, no parameter requires gradients."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class Distiller(nn.Module):
    """Distillation from ``teacher`` (dense) into ``student`` (pruned from it, or to be).

    Call it after the student's forward of a training step, with the same inputs and the
    student's output; add the returned terms to the task loss::

        distiller = Distiller(copy.deepcopy(model), model, DistillConfig("kl"), example)
        prune(model, example, "kcp", target_macs_ratio=0.3)
        for x, y in loader:
            out = model(x)
            loss = task_loss(out, y) + sum(distiller(x, out, labels=y).values())

    Args:
        teacher: The dense model (frozen here: eval mode, ``requires_grad=False``). It must be
            the student before its prunes: the student's pruning plan starts with the teacher's.
        student: The model being trained (may be wrapped in DDP).
        config: A :class:`DistillConfig`, a dict of its fields or an output loss name.
        example_inputs: Inputs of one forward (tracing layers and replaying plans).
        forward_fn: How to call either model on inputs (default: ``model(inputs)``).
        output_fn: Which tensor of an output is distilled (default: :func:`main_output`).

    Raises:
        ValueError: a layer missing in the teacher or the student (close matches named), a
            layer whose channels cannot be matched, teacher and student outputs of different
            shapes: all before any training step.
    """

    def __init__(self, teacher: nn.Module, student: nn.Module,
                 config: DistillConfig | dict[str, Any] | str, example_inputs: Any,
                 forward_fn: ForwardFn | None = None, output_fn: OutputFn | None = None):
        super().__init__()
        config = DistillConfig.from_value(config)
        if config is None:
            raise ValueError("Distiller needs a distillation config")
        self.config = config
        self.forward_fn = forward_fn or default_forward
        self.output_fn = output_fn or main_output
        self.example_inputs = example_inputs
        # not submodules: the optimizer, DDP and the state dict never see them
        self.__dict__["teacher"] = frozen_teacher(teacher)
        self.__dict__["student"] = student
        plain = unwrap_model(student)
        for name in (*config.layers, *config.dca_layers):
            if name not in dict(plain.named_modules()):
                raise ValueError(f"distillation layer {name!r} does not exist in the student"
                                 f"{layer_hint(name, dict(plain.named_modules()))}")
        if config.adapter:
            self.feature_layers = [FeatureLayer(n, n) for n in config.layers]
        else:
            self.feature_layers = resolve_feature_layers(teacher, config.layers, example_inputs,
                                                         self.forward_fn)
        self.dca_layers = resolve_feature_layers(teacher, config.dca_layers, example_inputs,
                                                 self.forward_fn)
        if config.output is not None:
            self._check_outputs(plain)
        self.adapters = nn.ModuleDict()
        self._plan_length = -1
        self._kept: dict[str, torch.Tensor] = {}
        self._projections: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        t_modules = dict(teacher.named_modules())
        self.dca_stats = {
            layer.name: DCAStats(
                t_modules[layer.owner].weight.shape[owner_dim(t_modules[layer.owner])],
                config.num_classes, config.ignore_index)
            for layer in self.dca_layers}
        self._student_feats: dict[str, torch.Tensor] = {}
        self._teacher_feats: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []
        # the student's plan must extend the teacher's (read now: a student that was not
        # pruned from this teacher is refused before training, not at the first step)
        try:
            self._refresh()
        except ValueError as exc:
            raise ValueError(f"teacher and student do not fit: {exc} (the teacher is the "
                             "student's model before its prunes: same architecture, same "
                             "arguments)") from exc
        names = {layer.name for layer in (*self.feature_layers, *self.dca_layers)}
        s_modules, self._t_modules = dict(plain.named_modules()), t_modules
        for name in sorted(names):
            self._handles.append(s_modules[name].register_forward_hook(self._hook(name, True)))
            self._handles.append(t_modules[name].register_forward_hook(self._hook(name, False)))

    # ------------------------------------------------------------------ set-up checks
    @torch.no_grad()
    def _check_outputs(self, student: nn.Module) -> None:
        shapes = []
        for model in (self.teacher, student):
            was = model.training
            model.eval()
            try:
                shapes.append(tuple(self.output_fn(
                    self.forward_fn(model, self.example_inputs)).shape))
            finally:
                model.train(was)
        if shapes[0] != shapes[1]:
            raise ValueError(f"the teacher's output has shape {shapes[0]} and the student's "
                             f"{shapes[1]}: output distillation compares them element by "
                             "element (same classes, same resolution)")

    def _hook(self, name: str, student: bool) -> Callable:
        store = self._student_feats if student else self._teacher_feats

        def hook(module: nn.Module, _inputs: Any, out: Any) -> None:
            if isinstance(out, torch.Tensor) and (not student or module.training):
                store[name] = out
        return hook

    def remove(self) -> None:
        """Drop the forward hooks on both models (after training)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._student_feats.clear()
        self._teacher_feats.clear()

    # ------------------------------------------------------------------ kept channels
    def _refresh(self) -> None:
        plain = unwrap_model(self.student)
        length = len(get_plan(plain)["history"])
        if length == self._plan_length:
            return
        owners = [layer.owner for layer in (*self.feature_layers, *self.dca_layers)
                  if not (self.config.adapter and layer in self.feature_layers)]
        self._kept = kept_channels(self.teacher, plain, owners, self.example_inputs,
                                   self.forward_fn) if owners else {}
        self._projections.clear()
        self._plan_length = length

    # ------------------------------------------------------------------ the loss
    def forward(self, inputs: Any, student_output: Any, labels: Any = None
                ) -> dict[str, torch.Tensor]:
        """The distillation terms of one training step, weighted (add them to the task loss).

        Args:
            inputs: The step's inputs (what the student's forward was given).
            student_output: The student's output of that forward.
            labels: Class labels ``(N,)`` or ``(N, *S)``; needed by ``dca_layers``.

        Returns:
            ``{"loss_distill_out", "loss_distill_feat", "loss_distill_dca"}``, those configured;
            the DCA term is 0 until ``dca_batches`` labelled batches were seen.

        Raises:
            ValueError: outputs of different shapes, a feature missing (the student's forward
                did not run the layer in training mode), or labels DCA cannot use.
        """
        cfg = self.config
        self._refresh()
        with torch.no_grad():
            t_out = self.forward_fn(self.teacher, inputs)
        losses: dict[str, torch.Tensor] = {}
        if cfg.output is not None:
            s, t = self.output_fn(student_output), self.output_fn(t_out).detach()
            if s.shape != t.shape:
                raise ValueError(f"student output {tuple(s.shape)} and teacher output "
                                 f"{tuple(t.shape)} differ")
            losses["loss_distill_out"] = cfg.weight * OUTPUT_LOSSES[cfg.output](
                s, t.to(s.dtype), cfg.temperature)
        if self.feature_layers:
            terms = [self._feature_term(layer) for layer in self.feature_layers]
            losses["loss_distill_feat"] = cfg.layer_weight * torch.stack(terms).mean()
        if self.dca_layers:
            if labels is None:
                raise ValueError("dca_layers need the step's class labels: call the distiller "
                                 "with labels=")
            terms = [self._dca_term(layer, labels) for layer in self.dca_layers]
            losses["loss_distill_dca"] = cfg.dca_weight * torch.stack(terms).mean()
        self._student_feats.clear()
        self._teacher_feats.clear()
        return losses

    def _pair(self, layer: FeatureLayer) -> tuple[torch.Tensor, torch.Tensor]:
        if layer.name not in self._student_feats:
            raise ValueError(f"no student feature at {layer.name!r}: call the distiller after "
                             "the student's forward of this step, in training mode")
        return self._student_feats[layer.name], self._teacher_feats[layer.name].detach()

    def _feature_term(self, layer: FeatureLayer) -> torch.Tensor:
        s, t = self._pair(layer)
        axis = channel_axis(self._t_modules[layer.owner], t)
        if self.config.adapter:
            s = self._adapter(layer.name, s, t, axis)
        else:
            t = t.index_select(axis, self._kept[layer.owner].to(t.device))
        if s.shape != t.shape:
            raise ValueError(f"feature {layer.name!r}: student {tuple(s.shape)} and teacher's "
                             f"kept channels {tuple(t.shape)} differ")
        return F.mse_loss(s, t.to(s.dtype))

    def _adapter(self, name: str, s: torch.Tensor, t: torch.Tensor, axis: int) -> torch.Tensor:
        key = name.replace(".", "/")
        c_in, c_out = s.shape[axis], t.shape[axis]
        adapter = self.adapters[key] if key in self.adapters else None
        if adapter is None or adapter.in_features != c_in:
            if adapter is not None:
                raise ValueError(f"the adapter of {name!r} was made for {adapter.in_features} "
                                 f"student channels, the student has {c_in} now: adapters need "
                                 "a student that is not pruned further (use kept channels)")
            adapter = nn.Linear(c_in, c_out, bias=False).to(s.device, s.dtype)
            with torch.no_grad():  # start as the kept-channel selection where widths allow
                adapter.weight.zero_()
                adapter.weight[:min(c_in, c_out), :min(c_in, c_out)].fill_diagonal_(1)
            self.adapters[key] = adapter
        return adapter(s.movedim(axis, -1)).movedim(-1, axis)

    def _dca_term(self, layer: FeatureLayer, labels: Any) -> torch.Tensor:
        s, t = self._pair(layer)
        axis = channel_axis(self._t_modules[layer.owner], t)
        stats = self.dca_stats[layer.name]
        if stats.batches < self.config.dca_batches:
            stats.add(t, labels, axis)
            if stats.batches < self.config.dca_batches:
                return s.sum() * 0.0
        if layer.name not in self._projections:
            self._projections[layer.name] = stats.projection(
                self._kept[layer.owner], self.config.dca_dim)
        mean, w = (v.to(s.device, s.dtype) for v in self._projections[layer.name])
        t = t.index_select(axis, self._kept[layer.owner].to(t.device)).to(s.dtype)
        ps = (s.movedim(axis, -1) - mean) @ w
        pt = (t.movedim(axis, -1) - mean) @ w
        return F.mse_loss(ps, pt)

    # ------------------------------------------------------------------ state
    def get_extra_state(self) -> dict[str, Any]:
        """The DCA statistics (a resumed run continues with the same projection)."""
        return {"dca": {name: st.state_dict() for name, st in self.dca_stats.items()}}

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """Restore adapters (made again at their saved shapes) and DCA statistics."""
        for key, value in state_dict.items():
            if key.startswith("adapters.") and key.endswith(".weight"):
                name = key[len("adapters."):-len(".weight")]
                if name not in self.adapters:
                    self.adapters[name] = nn.Linear(value.shape[1], value.shape[0], bias=False)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def set_extra_state(self, state: dict[str, Any]) -> None:
        for name, st in state.get("dca", {}).items():
            if name in self.dca_stats:
                self.dca_stats[name].load_state_dict(st)
        self._projections.clear()

