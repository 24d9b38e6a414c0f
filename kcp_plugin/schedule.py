"""Training-time pruning: a scheduler any training loop can drive (hard, SFP-soft, SRFP-decay).

KCP removes kernel clusters iteratively with training in between. :class:`PruningScheduler`
decides, step by step, when to prune and how far: the target (fraction of MACs kept) is reached
along a ramp (linear, exponential or AGP's cubic) over ``num_prunes`` pruning points. At each
point it either

* ``mode="hard"``: physically removes channels with :func:`kcp_plugin.prune` and rebuilds the
  optimizer with its state carried (:func:`kcp_plugin.rebuild_optimizer`);
* ``mode="soft"`` (SFP): zeroes the producers of the selected channels and lets them regrow;
* ``mode="decay"`` (SRFP / ASRFP): multiplies them by a factor ``alpha`` that decreases from 1
  to 0 over the schedule (linear or exponential),

and the last point of a soft schedule is a hard prune to the final target. Its state (the step
counter) is saved and restored with ``state_dict`` / ``load_state_dict``; together with the
model's pruning plan (kept on the model and saved by :func:`kcp_plugin.save_pruned`) a resumed
run prunes exactly as an uninterrupted one, provided training is deterministic.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch_pruning as tp

from .graph import ForwardFn, count_macs_params, default_forward
from .optim import rebuild_optimizer
from .pruning import prune, resolve_importance

__all__ = ["PruningScheduler", "ramp_targets", "resolve_mode", "RAMPS", "MODES", "MODE_ALIASES"]

RAMPS = ("linear", "exponential", "agp", "asfp")
MODES = ("hard", "soft", "decay")
# The papers' names for the modes: SFP (He et al. 2018) is "soft"; SRFP / ASRFP (Cai et al.
# 2021, soft filter pruning with decaying, asymptotic rates) are "decay", ASRFP with the
# "asfp" ramp.
MODE_ALIASES = {"sfp": ("soft", None), "srfp": ("decay", None), "asrfp": ("decay", "asfp")}


def resolve_mode(mode: str, ramp: str = "linear") -> tuple[str, str]:
    """``(mode, ramp)`` for a mode or its paper name (``"SFP"``, ``"SRFP"``, ``"ASRFP"``,
    any case); ASRFP sets the ``"asfp"`` ramp.

    Raises:
        ValueError: an unknown mode (the message lists modes and names), or ASRFP with a ramp
            other than ``"asfp"`` (or the default ``"linear"``).
    """
    if not isinstance(mode, str):
        raise ValueError(f"mode must be a string, got {mode!r}")
    key = mode.lower()
    if key in MODES:
        return key, ramp
    if key not in MODE_ALIASES:
        raise ValueError(f"mode must be one of {', '.join(MODES)} (or the papers' names "
                         f"{', '.join(n.upper() for n in MODE_ALIASES)}); got {mode!r}")
    canonical, fixed_ramp = MODE_ALIASES[key]
    if fixed_ramp is not None and ramp not in ("linear", fixed_ramp):
        raise ValueError(f"mode {mode!r} is decay with the {fixed_ramp!r} ramp; got "
                         f"ramp={ramp!r}")
    return canonical, fixed_ramp or ramp


def ramp_targets(
    target: float, num_prunes: int, ramp: str = "linear", asfp_k: float = 4.0
) -> list[float]:
    """Fraction of MACs kept after each of ``num_prunes`` pruning points; the last is ``target``.

    ``linear`` removes MACs in equal amounts; ``exponential`` keeps an equal fraction at every
    point (``target ** (i / n)``); ``agp`` follows Zhu & Gupta's cubic ramp (fast first, then
    slower: ``1 - (1 - target) * (1 - (1 - i / n) ** 3)``); ``asfp`` is ASFP's asymptotic rate
    ``P_t = a e^{-k t} + b`` pinned to 0 at the start and the target at the end (removed fraction
    ``(1 - target) * (1 - e^{-k i / n}) / (1 - e^{-k})``), used with ``mode="decay"`` for ASRFP.
    """
    if ramp not in RAMPS:
        raise ValueError(f"ramp must be one of {', '.join(RAMPS)}; got {ramp!r}")
    if num_prunes < 1:
        raise ValueError(f"num_prunes must be >= 1, got {num_prunes}")
    out = []
    for i in range(1, num_prunes + 1):
        f = i / num_prunes
        if ramp == "linear":
            out.append(1 - (1 - target) * f)
        elif ramp == "exponential":
            out.append(target**f)
        elif ramp == "asfp":
            out.append(1 - (1 - target) * (1 - math.exp(-asfp_k * f)) / (1 - math.exp(-asfp_k)))
        else:
            out.append(1 - (1 - target) * (1 - (1 - f) ** 3))
    out[-1] = target
    return out


class PruningScheduler:
    """Prune a model during training at scheduled steps.

    Call :meth:`step` once per training iteration (or epoch: ``start``/``every`` count calls),
    after ``optimizer.step()``. It returns ``True`` on the calls where it pruned.

    Args:
        model: The model being trained (pruned in place).
        example_inputs: Inputs for tracing and MACs counting.
        importance: Registry name or ``Importance``.
        target_macs_ratio: Fraction of MACs kept at the end, in (0, 1].
        num_prunes: Number of pruning points.
        start: Call index of the first pruning point.
        every: Calls between pruning points.
        ramp: ``"linear"``, ``"exponential"`` or ``"agp"`` (see :func:`ramp_targets`).
        mode: ``"hard"``, ``"soft"`` (SFP) or ``"decay"`` (SRFP); the papers' names
            ``"SFP"``, ``"SRFP"`` and ``"ASRFP"`` (decay on the ``"asfp"`` ramp) work too.
        decay: For ``mode="decay"``: ``"linear"`` or ``"exponential"`` decrease of ``alpha``.
        decay_rate: Rate of the exponential decay, ``alpha_i = exp(-rate * (i + 1) / n)``
            (the linear decay is ``1 - (i + 1) / n``; the last point is a hard prune).
        optimizer: Rebuilt after every hard prune (state carried), if given.
        forward_fn: How to call the model on ``example_inputs``.
        importance_kwargs: Arguments of a registered criterion.
        loss_fn: ``loss_fn(model) -> loss`` for gradient-based criteria.
        prune_kwargs: Further arguments for :func:`kcp_plugin.prune` (``ignored_layers``,
            ``round_to``, ``global_pruning``, ``macs_tolerance``...). Intermediate points use
            a 5% MACs tolerance unless ``macs_tolerance`` is given; the last one 2%.
        on_prune: ``on_prune(scheduler)`` after every pruning point (e.g. rebuild EMA copies).
    """

    def __init__(
        self,
        model: nn.Module,
        example_inputs: Any,
        importance: str | tp.importance.Importance = "kcp",
        *,
        target_macs_ratio: float,
        num_prunes: int = 4,
        start: int = 0,
        every: int = 1,
        ramp: str = "linear",
        mode: str = "hard",
        decay: str = "linear",
        decay_rate: float = 3.0,
        optimizer: torch.optim.Optimizer | None = None,
        forward_fn: ForwardFn | None = None,
        importance_kwargs: dict[str, Any] | None = None,
        loss_fn: Callable[[nn.Module], torch.Tensor] | None = None,
        prune_kwargs: dict[str, Any] | None = None,
        on_prune: Callable[[PruningScheduler], None] | None = None,
    ):
        if not isinstance(target_macs_ratio, (int, float)) or not 0 < target_macs_ratio <= 1:
            raise ValueError(f"target_macs_ratio must be in (0, 1], got {target_macs_ratio!r}")
        mode, ramp = resolve_mode(mode, ramp)
        if decay not in ("linear", "exponential"):
            raise ValueError(f"decay must be 'linear' or 'exponential'; got {decay!r}")
        for name, value, low in (("num_prunes", num_prunes, 1), ("start", start, 0),
                                 ("every", every, 1)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        self.targets = ramp_targets(target_macs_ratio, num_prunes, ramp)  # validates ramp
        resolve_importance(importance, importance_kwargs)  # validates the criterion now
        self.model = model
        self.example_inputs = example_inputs
        self.importance = importance
        self.importance_kwargs = importance_kwargs
        self.target_macs_ratio = float(target_macs_ratio)
        self.num_prunes, self.start, self.every = num_prunes, start, every
        self.ramp, self.mode, self.decay, self.decay_rate = ramp, mode, decay, decay_rate
        self.optimizer = optimizer
        self.forward_fn = forward_fn or default_forward
        self.loss_fn = loss_fn
        self.prune_kwargs = dict(prune_kwargs or {})
        self.on_prune = on_prune
        self.intermediate_tolerance = 0.05
        self.calls = 0
        self.macs_dense = count_macs_params(model, example_inputs, self.forward_fn)[0]

    # ------------------------------------------------------------------ schedule arithmetic
    def point_at(self, call: int) -> int | None:
        """Index of the pruning point at call ``call`` (0-based), or ``None``."""
        offset = call - self.start
        if offset < 0 or offset % self.every:
            return None
        point = offset // self.every
        return point if point < self.num_prunes else None

    @property
    def last_call(self) -> int:
        """Call index of the final pruning point."""
        return self.start + (self.num_prunes - 1) * self.every

    @property
    def finished(self) -> bool:
        """Whether every pruning point has been applied."""
        return self.calls > self.last_call

    def alpha(self, point: int) -> float:
        """Factor applied to selected channels at a soft point (0 for SFP)."""
        if self.mode == "soft":
            return 0.0
        f = (point + 1) / self.num_prunes  # reaches 0 at the last point (the hard prune)
        if self.decay == "linear":
            return 1.0 - f
        return math.exp(-self.decay_rate * f) if f < 1 else 0.0

    # ------------------------------------------------------------------ driving
    def step(self) -> bool:
        """Advance one call; prune if a pruning point falls on it. Returns whether it pruned."""
        point = self.point_at(self.calls)
        self.calls += 1
        if point is None:
            return False
        final = point == self.num_prunes - 1
        if self.mode == "hard" or final:
            self._hard(self.targets[point], final)
        else:
            self._soft(self.targets[point], self.alpha(point))
        if self.on_prune is not None:
            self.on_prune(self)
        return True

    def _hard(self, target_abs: float, final: bool) -> None:
        current = count_macs_params(self.model, self.example_inputs, self.forward_fn)[0]
        relative = min(1.0, target_abs * self.macs_dense / current)
        kwargs = dict(self.prune_kwargs)
        if not final:  # intermediate points only need to be roughly on the ramp
            kwargs.setdefault("macs_tolerance", self.intermediate_tolerance)
        if relative < 1.0:
            prune(self.model, self.example_inputs, self.importance,
                  target_macs_ratio=relative, forward_fn=self.forward_fn,
                  importance_kwargs=self.importance_kwargs, loss_fn=self.loss_fn,
                  progress=False, **kwargs)
        if self.optimizer is not None:
            rebuild_optimizer(self.optimizer, self.model)

    def _soft(self, target_abs: float, alpha: float) -> None:
        """Select what a hard prune to ``target_abs`` would remove, scale it by ``alpha``."""
        kwargs = {"macs_tolerance": self.intermediate_tolerance, **self.prune_kwargs}
        report = prune(self.model, self.example_inputs, self.importance,
                       target_macs_ratio=target_abs, forward_fn=self.forward_fn,
                       importance_kwargs=self.importance_kwargs, loss_fn=self.loss_fn,
                       progress=False, dry_run=True, **kwargs)
        modules = dict(self.model.named_modules())
        with torch.no_grad():
            for name, idxs in report.selected.items():
                # filters only, as SFP does: zeroing norm scales too would also zero their
                # gradients and the channel could never regrow
                if isinstance(modules[name], (nn.modules.conv._ConvNd, nn.Linear)):
                    scale_output_channels(modules[name], torch.tensor(sorted(set(idxs))), alpha)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Plain-data state; the model's structure is in its pruning plan."""
        return {"calls": self.calls, "targets": list(self.targets), "mode": self.mode,
                "macs_dense": self.macs_dense}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the step counter (after the model's plan has been re-applied)."""
        if [round(t, 9) for t in state["targets"]] != [round(t, 9) for t in self.targets] \
                or state["mode"] != self.mode:
            raise ValueError("scheduler state was saved with a different schedule "
                             f"(targets {state['targets']}, mode {state['mode']!r})")
        self.calls = int(state["calls"])
        # MACs of the model before the first prune: a resumed model may already be pruned
        self.macs_dense = int(state["macs_dense"])


def scale_output_channels(module: nn.Module, idxs: torch.Tensor, alpha: float) -> None:
    """Multiply the filters (and biases) that write output channels ``idxs`` by ``alpha``.

    For a conv/linear layer the channel's pre-activation becomes ``alpha`` times what it was
    (0 for ``alpha = 0``: SFP's zeroing).
    """
    if len(idxs) == 0:
        return
    w = module.weight
    if isinstance(module, nn.modules.conv._ConvNd) and module.transposed:
        # [C_in, N/g, k...]: output channel c is column c % (N/g) of input group c // (N/g)
        g, per = module.groups, w.shape[1]
        rows = w.shape[0] // g
        for c in idxs.tolist():
            gi, local = divmod(c, per)
            w[gi * rows:(gi + 1) * rows, local] *= alpha
    else:
        w[idxs] *= alpha
    if getattr(module, "bias", None) is not None:
        module.bias[idxs] *= alpha
