"""Optimizer wrappers that apply kcp_plugin's sparsity regularizers between backward and step.

mmengine has no hook stage between ``loss.backward()`` and ``optimizer.step()`` (both happen
inside ``OptimWrapper.update_params``), which is exactly where GReg-1/2 and IncReg add their
penalty gradients. These wrappers do it there::

    optim_wrapper = dict(
        type='kcp_plugin.RegularizedOptimWrapper',   # or kcp_plugin.AmpRegularizedOptimWrapper
        optimizer=dict(type='SGD', lr=0.01, momentum=0.9, weight_decay=5e-4),
        regularizer=dict(type='greg1', pruning_ratio=0.5, delta=1e-4, interval=10))

The regularizer is built on the first training step, from the model being trained
(:func:`kcp_plugin.regularizers.channel_groups` on the traced segmentor, output convs
protected). With :class:`~kcp_plugin.integrations.mmseg.hooks.PruningHook` it is rebuilt on the
pruned model after every prune and dropped after the last one (its job, steering which channels
go, is done). Under AMP the gradients are unscaled before the penalty is added, so penalties do
not depend on the loss scale. Its schedule state is saved with the optimizer state.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn as nn
from mmengine.optim import AmpOptimWrapper, OptimWrapper

from kcp_plugin import regularizers as regs

from .registry import OPTIM_WRAPPERS
from .structure import example_inputs, output_convs, trace_forward, unwrap

__all__ = ["RegularizedOptimWrapper", "AmpRegularizedOptimWrapper", "REGULARIZERS"]

REGULARIZERS = {"greg1": regs.GReg1, "greg2": regs.GReg2, "increg": regs.IncReg,
                "orthoreg": regs.OrthoReg}
_STATE_KEY = "kcp_regularizer"


def _check_cfg(regularizer: Any) -> dict[str, Any]:
    if not isinstance(regularizer, dict) or "type" not in regularizer:
        raise ValueError("regularizer must be a dict with a 'type' "
                         f"({', '.join(REGULARIZERS)}) and its arguments; got {regularizer!r}")
    cfg = dict(regularizer)
    name = str(cfg.pop("type")).lower()
    if name not in REGULARIZERS:
        raise ValueError(f"unknown regularizer {name!r}; valid: {', '.join(REGULARIZERS)}")
    cls = REGULARIZERS[name]
    allowed: set[str] = set()
    for klass in cls.__mro__:  # GReg2 passes **kwargs on to GReg1
        if klass is object or "__init__" not in vars(klass):
            continue
        for n, p in inspect.signature(klass.__init__).parameters.items():
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
                allowed.add(n)
    allowed -= {"self", "model", "example_inputs", "forward_fn", "ignored_layers"}
    bad = sorted(set(cfg) - set(allowed))
    if bad:
        raise ValueError(f"regularizer {name!r} does not accept {', '.join(bad)}; accepted: "
                         f"{', '.join(sorted(allowed))}")
    return {"type": name, **cfg}


class RegularizerMixin:
    """The shared logic of both wrappers (kept apart from the AMP/fp32 base classes)."""

    optimizer: torch.optim.Optimizer

    def _init_regularizer(self, regularizer: dict | None, input_shape: Any,
                          ignored_layers: list[str] | None) -> None:
        self.regularizer_cfg = _check_cfg(regularizer) if regularizer is not None else None
        self.input_shape = input_shape
        self.ignored_layers = list(ignored_layers or [])
        self.regularizer: regs._GroupRegularizer | None = None
        self.regularizer_active = self.regularizer_cfg is not None
        self._pending_state: dict | None = None

    # ------------------------------------------------------------------ binding
    def bind_regularizer(self, model: nn.Module, inputs: torch.Tensor | None = None,
                         ignored_layers: list[str] | None = None) -> None:
        """Build the regularizer on ``model`` (its current structure)."""
        if not self.regularizer_active:
            return
        model = unwrap(model)
        inputs = example_inputs(model, self.input_shape) if inputs is None else inputs
        names = set(self.ignored_layers) | set(ignored_layers or []) | set(output_convs(model))
        modules = dict(model.named_modules())
        missing = sorted(n for n in names if n not in modules)
        if missing:
            raise ValueError(f"regularizer ignored_layers: the model has no layer "
                             f"{', '.join(missing)}")
        cfg = dict(self.regularizer_cfg)
        cls = REGULARIZERS[cfg.pop("type")]
        self.regularizer = cls(model, inputs, forward_fn=trace_forward,
                               ignored_layers=[modules[n] for n in sorted(names)], **cfg)
        if self._pending_state is not None:
            self.regularizer.load_state_dict(self._pending_state)
            self._pending_state = None

    def reset_regularizer(self, active: bool = True) -> None:
        """Forget the regularizer (after a prune); rebuilt at the next step if ``active``."""
        self.regularizer = None
        self._pending_state = None
        self.regularizer_active = active and self.regularizer_cfg is not None

    def optim_context(self, model: nn.Module):  # type: ignore[override]
        # train_step enters this context with the model being trained: bind lazily here.
        if self.regularizer_active and self.regularizer is None:
            self.bind_regularizer(model)
        return super().optim_context(model)  # type: ignore[misc]

    # ------------------------------------------------------------------ the update
    def _unscale(self) -> None:
        """Bring gradients to their true scale before penalties are added (AMP)."""

    def update_params(self, loss: torch.Tensor, step_kwargs: dict | None = None,
                      zero_kwargs: dict | None = None) -> None:
        """``backward`` (with OrthoReg's loss term), penalties, ``step``, ``zero_grad``."""
        reg = self.regularizer if self.regularizer_active else None
        if self.regularizer_active and reg is None:
            raise RuntimeError("the regularizer is not bound to a model: update_params was "
                               "called outside optim_context(model)")
        if reg is not None:
            loss = loss + reg.loss().to(loss.device)
        loss = self.scale_loss(loss)  # type: ignore[attr-defined]
        self.backward(loss)  # type: ignore[attr-defined]
        if self.should_update():  # type: ignore[attr-defined]
            if reg is not None:
                self._unscale()
                reg.apply()
            self.step(**(step_kwargs or {}))  # type: ignore[attr-defined]
            self.zero_grad(**(zero_kwargs or {}))  # type: ignore[attr-defined]
            if reg is not None:
                reg.step()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        state = super().state_dict()  # type: ignore[misc]
        state[_STATE_KEY] = {
            "active": self.regularizer_active,
            "state": self.regularizer.state_dict() if self.regularizer is not None else None,
        }
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        saved = state_dict.pop(_STATE_KEY, None)
        if saved is not None:
            self.regularizer_active = bool(saved["active"]) and self.regularizer_cfg is not None
            self.regularizer = None  # rebuilt on the (restored) model at the next step
            self._pending_state = saved["state"]
        super().load_state_dict(state_dict)  # type: ignore[misc]


@OPTIM_WRAPPERS.register_module()
class RegularizedOptimWrapper(RegularizerMixin, OptimWrapper):
    """``OptimWrapper`` that applies a kcp_plugin regularizer between backward and step.

    Args:
        regularizer: ``dict(type=<greg1|greg2|increg|orthoreg>, **arguments)``; ``None`` makes
            it a plain ``OptimWrapper``.
        input_shape: Input shape for tracing the model (default: the data preprocessor's size).
        ignored_layers: Names of layers never regularized (the heads' ``conv_seg`` always are).
        **kwargs: ``OptimWrapper`` arguments (``optimizer``, ``clip_grad``,
            ``accumulative_counts``).
    """

    def __init__(self, regularizer: dict | None = None, input_shape: Any = None,
                 ignored_layers: list[str] | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self._init_regularizer(regularizer, input_shape, ignored_layers)


@OPTIM_WRAPPERS.register_module()
class AmpRegularizedOptimWrapper(RegularizerMixin, AmpOptimWrapper):
    """``AmpOptimWrapper`` with a kcp_plugin regularizer; gradients are unscaled first.

    Arguments as :class:`RegularizedOptimWrapper`, plus ``AmpOptimWrapper``'s (``loss_scale``,
    ``dtype``...).
    """

    def __init__(self, regularizer: dict | None = None, input_shape: Any = None,
                 ignored_layers: list[str] | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self._init_regularizer(regularizer, input_shape, ignored_layers)

    def _unscale(self) -> None:
        self.loss_scaler.unscale_(self.optimizer)

    def step(self, **kwargs: Any) -> None:
        """As ``AmpOptimWrapper.step``, but gradients may already be unscaled (no second
        ``unscale_``, which GradScaler refuses)."""
        if self.clip_grad_kwargs:
            state = self.loss_scaler._per_optimizer_states[id(self.optimizer)]
            if state["stage"] is not torch.amp.grad_scaler.OptState.UNSCALED:
                self.loss_scaler.unscale_(self.optimizer)
            self._clip_grad()
        self.loss_scaler.step(self.optimizer, **kwargs)
        self.loss_scaler.update(self._scale_update_param)
