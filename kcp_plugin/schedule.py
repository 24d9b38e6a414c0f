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

A latency target (``target_latency_ratio=r``, measured on ``latency_backend``) is reached at one
pruning point, the schedule's last: the earlier points follow the MACs ramp (to
``target_macs_ratio``, or to ``r`` read as a MACs fraction when no MACs target is given), and
the last one measures what they kept of the dense latency against a dense reference (a CPU copy
of the unpruned model taken when the schedule is made, or ``dense_model`` for a model pruned
already), then prunes with :func:`kcp_plugin.prune`'s latency target the rest of the way,
``r / kept`` of the model as it is then (capped by ``target_macs_ratio`` when both are given).
The integrations (the mmseg hook, timm's schedule) drive this one implementation.

With ``distill=`` the schedule also keeps the dense model as a frozen teacher (a copy taken when
the schedule is made, or ``teacher=``) and :meth:`PruningScheduler.distill_loss` gives the
distillation terms of a training step (:class:`kcp_plugin.distill.Distiller`: output, kept-channel
feature and DCA terms); they follow the student through every pruning point.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch_pruning as tp

from .deploy.backends import Backend
from .deploy.latency import compare_latency
from .distill import DistillConfig, Distiller
from .errors import TargetUnreachable
from .graph import ForwardFn, count_macs_params, default_forward
from .optim import rebuild_optimizer
from .plan import get_plan
from .pruning import check_latency_arguments, prune, resolve_importance

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
        example_inputs: Inputs for tracing, MACs counting and latency measurements.
        importance: Registry name or ``Importance``.
        target_macs_ratio: Fraction of MACs kept at the end, in (0, 1]; with
            ``target_latency_ratio``, optional: the earlier points' ramp and a MACs cap on the
            last point (``latency_allocation="table"`` only).
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
            ``round_to``, ``global_pruning``, ``macs_tolerance``...), not its latency
            arguments (this class's own). Intermediate points use a 5% MACs tolerance unless
            ``macs_tolerance`` is given; the last one 2%.
        on_prune: ``on_prune(scheduler)`` after every pruning point (e.g. rebuild EMA copies).
        target_latency_ratio: Fraction of the dense model's latency kept at the end, in
            (0, 1], measured on ``latency_backend`` with ``example_inputs`` (at the backend's
            batch), reached at the last pruning point (module docstring). Soft schedules
            select along the MACs ramp; their last, hard point is the latency point.
        latency_backend: Where latency is measured: a name (``"torch"``, ``"onnxruntime"``,
            ``"cuda"``), a dict of :class:`kcp_plugin.Backend` fields or a record. With a MACs
            target alone every point rounds widths to its channel multiple and measures the
            pruned model against the one before it (a warning if slower).
        latency_allocation: ``"table"`` or ``"uniform"`` (see :func:`kcp_plugin.prune`).
        dense_model: The latency target's reference for a model that is pruned already when
            the schedule is made (resumed from a pruned checkpoint): the unpruned
            architecture (weights do not matter), or a function without arguments that
            builds it, called at the latency point. Default: a CPU copy of ``model`` taken
            now; a pruned model without it is refused.
        distill: Distillation from the dense model during training (:class:`DistillConfig`,
            a dict of its fields or an output loss name such as ``"kl"``); add
            :meth:`distill_loss` to the task loss of every step. Adapters (``adapter=True``)
            are refused: the student is pruned again during the schedule.
        teacher: The teacher of ``distill`` (default: a copy of ``model`` taken now, frozen; a
            model pruned already needs it: its unpruned version with the dense weights).
        output_fn: Which tensor of the model's output is distilled (default:
            :func:`kcp_plugin.distill.main_output`).

    Attributes:
        latency: After the latency point (None before): ``target``, ``ratio`` (latency kept of
            the dense model's), ``ms``, ``dense_ms``, ``setting`` (the backend),
            ``allocation``, ``call`` (the point's call index) and ``earlier`` (what the
            earlier points had kept); saved in :meth:`state_dict`.
        distiller: The :class:`kcp_plugin.distill.Distiller` of ``distill`` (None without);
            ``distiller.teacher`` is the teacher.

    Raises:
        ValueError / TypeError: invalid schedule, criterion or latency arguments (before the
            model is touched; :func:`kcp_plugin.pruning.check_latency_arguments`).
        kcp_plugin.TargetUnreachable: at the latency point, a target out of reach, in the
            user's terms (the target of the dense model, what the earlier points kept, what
            the last point needed); the model and the call counter are left as they were.
    """

    def __init__(
        self,
        model: nn.Module,
        example_inputs: Any,
        importance: str | tp.importance.Importance = "kcp",
        *,
        target_macs_ratio: float | None = None,
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
        target_latency_ratio: float | None = None,
        latency_backend: str | dict[str, Any] | Backend | None = None,
        latency_allocation: str = "table",
        dense_model: nn.Module | Callable[[], nn.Module] | None = None,
        distill: DistillConfig | dict[str, Any] | str | None = None,
        teacher: nn.Module | None = None,
        output_fn: Callable[[Any], torch.Tensor] | None = None,
    ):
        if target_macs_ratio is None and target_latency_ratio is None:
            raise ValueError("give target_macs_ratio (fraction of the dense MACs kept) or "
                             "target_latency_ratio (fraction of the dense latency kept; "
                             "target_macs_ratio then caps its MACs)")
        if target_macs_ratio is not None and (
                not isinstance(target_macs_ratio, (int, float)) or not 0 < target_macs_ratio <= 1):
            raise ValueError(f"target_macs_ratio must be in (0, 1], got {target_macs_ratio!r}")
        backend = check_latency_arguments(
            target_latency_ratio, latency_backend, latency_allocation,
            target_macs_ratio=target_macs_ratio, prune_kwargs=prune_kwargs,
            owner="PruningScheduler", imports=True)
        if target_latency_ratio is not None and dense_model is None and get_plan(model)["history"]:
            raise ValueError("PruningScheduler: target_latency_ratio is a fraction of the dense "
                             "model's latency, and this model is pruned already: pass "
                             "dense_model= (its unpruned architecture, or a function that "
                             "builds it)")
        if dense_model is not None and not (isinstance(dense_model, nn.Module)
                                            or callable(dense_model)):
            raise TypeError("dense_model must be a module or a function that builds one, got "
                            f"{type(dense_model).__name__}")
        distill = DistillConfig.from_value(distill)
        if distill is not None and distill.adapter:
            raise ValueError("PruningScheduler: distillation adapters (adapter=True) need a "
                             "student of fixed width, and a schedule prunes it during "
                             "training: distil the teacher's kept channels (adapter=False)")
        if distill is not None and teacher is None and get_plan(model)["history"]:
            raise ValueError("PruningScheduler: distill needs the dense teacher, and this model "
                             "is pruned already: pass teacher= (the unpruned model with the "
                             "dense weights)")
        if teacher is not None and distill is None:
            raise ValueError("PruningScheduler: teacher= is given without distill= (what to "
                             "distil: e.g. distill='kl')")
        mode, ramp = resolve_mode(mode, ramp)
        if decay not in ("linear", "exponential"):
            raise ValueError(f"decay must be 'linear' or 'exponential'; got {decay!r}")
        for name, value, low in (("num_prunes", num_prunes, 1), ("start", start, 0),
                                 ("every", every, 1)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        # the MACs ramp of the points (a latency target replaces the last one)
        ramp_to = target_macs_ratio if target_macs_ratio is not None else target_latency_ratio
        self.targets = ramp_targets(ramp_to, num_prunes, ramp)  # validates ramp
        resolve_importance(importance, importance_kwargs)  # validates the criterion now
        self.model = model
        self.example_inputs = example_inputs
        self.importance = importance
        self.importance_kwargs = importance_kwargs
        self.target_macs_ratio = None if target_macs_ratio is None else float(target_macs_ratio)
        self.target_latency_ratio = target_latency_ratio
        self.latency_backend = backend  # None: nothing is measured
        self.latency_allocation = latency_allocation
        self.latency: dict[str, Any] | None = None
        # the latency target's reference: taken now, while the model is unpruned
        self._dense: nn.Module | Callable[[], nn.Module] | None = None
        if target_latency_ratio is not None:
            self._dense = dense_model if dense_model is not None else _cpu_copy(model)
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
        self.distiller: Distiller | None = None
        if distill is not None:
            self.distiller = Distiller(
                teacher if teacher is not None else copy.deepcopy(model), model, distill,
                example_inputs, self.forward_fn, output_fn)

    def distill_loss(self, inputs: Any, output: Any, labels: Any = None
                     ) -> dict[str, torch.Tensor]:
        """The distillation terms of one training step (empty without ``distill``): call it
        after the model's forward on ``inputs`` gave ``output``; ``labels`` feed DCA terms.
        Add ``sum(terms.values())`` to the task loss, or log each term."""
        if self.distiller is None:
            return {}
        return self.distiller(inputs, output, labels)

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
        """Advance one call; prune if a pruning point falls on it. Returns whether it pruned.

        A failed pruning point leaves the model (:func:`kcp_plugin.prune` restores it) and the
        call counter as they were.
        """
        call = self.calls
        point = self.point_at(call)
        self.calls += 1
        if point is None:
            return False
        final = point == self.num_prunes - 1
        try:
            if final and self.target_latency_ratio is not None:
                self._latency_point(call)
            elif self.mode == "hard" or final:
                self._hard(self.targets[point], final)
            else:
                self._soft(self.targets[point], self.alpha(point))
        except BaseException:
            self.calls = call
            raise
        if self.on_prune is not None:
            self.on_prune(self)
        return True

    def _ramp_kwargs(self) -> dict[str, Any]:
        """:func:`kcp_plugin.prune` arguments of the MACs points: the backend's channel
        multiple and measurement, ``round_to="auto"`` left to the latency point."""
        kwargs = dict(self.prune_kwargs)
        if kwargs.get("round_to") == "auto":
            del kwargs["round_to"]
        if self.latency_backend is not None:
            kwargs["latency_backend"] = self.latency_backend
        return kwargs

    def _hard(self, target_abs: float, final: bool) -> None:
        current = count_macs_params(self.model, self.example_inputs, self.forward_fn)[0]
        relative = min(1.0, target_abs * self.macs_dense / current)
        kwargs = self._ramp_kwargs()
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
        kwargs = {"macs_tolerance": self.intermediate_tolerance, **self._ramp_kwargs()}
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

    # ------------------------------------------------------------------ latency target
    def _dense_reference(self) -> nn.Module:
        if self._dense is None:
            raise RuntimeError("the latency target's dense reference is gone (the latency "
                               "point has run)")
        if not isinstance(self._dense, nn.Module):
            self._dense = self._dense()  # built once, at the latency point
        return self._dense

    def _latency_point(self, call: int) -> None:
        """The last point of a latency target: measure what the earlier points kept of the
        dense latency, then prune with :func:`kcp_plugin.prune`'s latency target for the rest
        (and the MACs cap, relative to the model as it is now)."""
        model, x, fwd = self.model, self.example_inputs, self.forward_fn
        backend = self.latency_backend
        assert backend is not None and self.target_latency_ratio is not None
        target = self.target_latency_ratio
        dense = self._dense_reference()
        pruned = bool(get_plan(model)["history"])
        kept, after_ms, dense_ms = 1.0, math.nan, math.nan
        if pruned:  # the earlier points (or a resumed checkpoint) pruned already
            d, p = compare_latency([dense, model], x, fwd, backend=backend)
            after_ms, dense_ms = p.median_ms, d.median_ms
            kept = after_ms / dense_ms
        cap = None  # the MACs cap, relative to the model as it is now
        if self.target_macs_ratio is not None:
            cap = self.target_macs_ratio * self.macs_dense / count_macs_params(model, x, fwd)[0]
            cap = cap if cap < 1.0 else None
        kwargs = dict(self.prune_kwargs, forward_fn=fwd, importance_kwargs=self.importance_kwargs,
                      loss_fn=self.loss_fn, latency_backend=backend, progress=False)
        ratio = target / kept
        report = None
        if ratio < 1.0 or cap is not None:
            # fast enough already, a MACs cap left: the table allocation applies it on the
            # backend's multiple, keeping the latency (a plain MACs target could slow it down)
            try:
                report = prune(model, x, self.importance, target_latency_ratio=min(ratio, 1.0),
                               target_macs_ratio=cap, latency_allocation=self.latency_allocation,
                               **kwargs)
            except TargetUnreachable as exc:
                if kept >= 1.0:
                    raise
                raise TargetUnreachable(
                    f"target_latency_ratio={target} of the dense model: the earlier pruning "
                    f"points kept {kept:.3f} of its latency, so the last point needed "
                    f"{ratio:.3f} of the model as it was then, and: {exc}",
                    exc.protected) from exc
        final = kept
        if report is not None and pruned:  # measured once more, against the dense model
            d, p = compare_latency([dense, model], x, fwd, backend=backend)
            after_ms, dense_ms = p.median_ms, d.median_ms
            final = after_ms / dense_ms
        elif report is not None and report.latency_before_ms is not None:
            after_ms, dense_ms = report.latency_after_ms, report.latency_before_ms
            final = after_ms / dense_ms
        if self.optimizer is not None:
            rebuild_optimizer(self.optimizer, model)
        self._dense = None  # the last point: the reference is not needed any more
        self.latency = {"target": target, "ratio": final, "ms": after_ms, "dense_ms": dense_ms,
                        "setting": backend.describe(), "allocation": self.latency_allocation,
                        "call": call, "earlier": kept}

    def describe_latency(self, unit: str = "call") -> str | None:
        """The latency point's outcome as one log line (None before it): ``"latency target at
        iter 2000: 0.497 of the dense model's latency (target 0.5; ... ms against ... ms,
        <backend>)"``; ``unit`` names what the schedule counts (``"iter"``, ``"epoch"``,
        ``"optimizer step"``)."""
        lat = self.latency
        if lat is None:
            return None
        text = (f"latency target at {unit} {lat['call']}: {lat['ratio']:.3f} of the dense "
                f"model's latency (target {lat['target']}; {lat['ms']:.3g} ms against "
                f"{lat['dense_ms']:.3g} ms, {lat['setting']})")
        if lat.get("earlier", 1.0) < 1.0 and lat["earlier"] <= lat["target"]:
            text += f"; the earlier points had reached it ({lat['earlier']:.3f})"
        return text

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Plain-data state, with the latency point's outcome and the distiller's statistics;
        the model's structure is in its pruning plan, the teacher's weights are saved apart
        (once: ``scheduler.distiller.teacher.state_dict()``)."""
        state = {"calls": self.calls, "targets": list(self.targets), "mode": self.mode,
                 "macs_dense": self.macs_dense,
                 "target_latency_ratio": self.target_latency_ratio, "latency": self.latency}
        if self.distiller is not None:  # DCA statistics (tensors); the teacher is saved apart
            state["distill"] = self.distiller.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the step counter (after the model's plan has been re-applied) and the
        latency point's outcome; a finished schedule drops its dense reference."""
        if [round(t, 9) for t in state["targets"]] != [round(t, 9) for t in self.targets] \
                or state["mode"] != self.mode \
                or state.get("target_latency_ratio", self.target_latency_ratio) \
                != self.target_latency_ratio:
            raise ValueError("scheduler state was saved with a different schedule "
                             f"(targets {state['targets']}, mode {state['mode']!r}, "
                             f"target_latency_ratio {state.get('target_latency_ratio')})")
        self.calls = int(state["calls"])
        # MACs of the model before the first prune: a resumed model may already be pruned
        self.macs_dense = int(state["macs_dense"])
        self.latency = state.get("latency")
        if self.distiller is not None and "distill" in state:
            self.distiller.load_state_dict(state["distill"])
        if self.finished:
            self._dense = None


def _cpu_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` on the CPU, in eval mode (a latency reference: weights unused)."""
    return copy.deepcopy(model).cpu().eval()


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
