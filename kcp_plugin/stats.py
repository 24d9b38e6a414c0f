"""Statistics collection for data-driven criteria (Fisher, CDC, CaP...): one mechanism for all.

A data-driven criterion is a :class:`StatsImportance`: it watches the *inputs of the layers that
consume channels* (conv / linear layers), where a channel's post-activation map and, after a
backward pass, its gradient are visible, and accumulates sums there. Sums are what make the
mechanism work everywhere:

* any training loop can drive it (:class:`collecting` is a context manager that only installs
  hooks), or :func:`collect` runs the batches itself, with a progress bar;
* under DDP, :class:`collecting` all-reduces the sums on exit, so every rank scores (and prunes)
  identically;
* statistics are stored by layer *name*, so they also score deep copies of the model (the MACs
  search of :func:`kcp_plugin.prune` prunes copies).

Statistics describe the model they were collected on: once channels are removed, collect again
(``prune(..., data=loader)`` does so before every pruning step).
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp

from .graph import ForwardFn, default_forward, preserved_modes
from .progress import progress_bar

__all__ = ["StatsImportance", "RecentBatches", "collecting", "collect", "unwrap_model",
           "default_step", "check_batches"]

StepFn = Callable[[nn.Module, Any], torch.Tensor | None]


class RecentBatches:
    """The last ``maxlen`` batches of a training loop, as ``data`` for a data-driven criterion
    pruned during training (each pruning point collects on the batches of its own time).

    Iterable any number of times (``prune`` collects again before every iterative step); an
    optional ``transform`` runs on each batch when iterated, so raw batches are kept and
    prepared only at a pruning point. Batches are kept as given (detach them; on the device).

    Args:
        maxlen: Number of batches kept (>= 1).
        transform: ``transform(batch) -> batch`` applied when iterating.
        owner: Name used in the error when a pruning point comes before any batch.
    """

    def __init__(self, maxlen: int, transform: Callable[[Any], Any] | None = None,
                 owner: str = "the training loop"):
        if not isinstance(maxlen, int) or isinstance(maxlen, bool) or maxlen < 1:
            raise ValueError(f"maxlen must be an integer >= 1, got {maxlen!r}")
        self._batches: collections.deque = collections.deque(maxlen=maxlen)
        self.transform = transform
        self.owner = owner

    def add(self, batch: Any) -> None:
        """Keep ``batch`` (the oldest one drops out)."""
        self._batches.append(batch)

    def clear(self) -> None:
        """Forget every batch."""
        self._batches.clear()

    def __len__(self) -> int:
        return len(self._batches)

    def __iter__(self) -> Iterator[Any]:
        if not self._batches:
            raise ValueError(f"{self.owner}: a data-driven criterion needs training batches, "
                             "and none were seen before this pruning point")
        for batch in list(self._batches):
            yield self.transform(batch) if self.transform is not None else batch


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside DDP / DataParallel wrappers (anything with a ``module`` attribute that
    wraps the whole model)."""
    while isinstance(getattr(model, "module", None), nn.Module) and len(model._modules) == 1:
        model = model.module
    return model


class StatsImportance(tp.importance.Importance):
    """Base of criteria scored from statistics collected on data.

    Subclasses set :attr:`needs_backward` / :attr:`needs_labels` and implement
    :meth:`_observe` (a consumer layer's input during forward), optionally :meth:`_observe_grad`
    (that input's gradient during backward) and :meth:`_end_batch`, and store running sums with
    :meth:`_add`. Scoring reads them back with :meth:`_stat`.

    Attributes:
        samples: Number of batches folded into the statistics.
    """

    needs_backward: bool = False
    needs_labels: bool = False
    layer_types: tuple[type, ...] = (nn.modules.conv._ConvNd, nn.Linear)

    def __init__(self) -> None:
        self._sums: dict[str, dict[str, torch.Tensor]] = {}
        self._names: dict[nn.Module, str] = {}
        self._handles: list[Any] = []
        self._labels: torch.Tensor | None = None
        self.samples = 0

    # ------------------------------------------------------------------ collection protocol
    @property
    def collected(self) -> bool:
        """Whether statistics from at least one batch are present."""
        return self.samples > 0 and bool(self._sums)

    def reset(self) -> None:
        """Forget all statistics."""
        self._sums.clear()
        self.samples = 0

    def attach(self, model: nn.Module, example_inputs: Any = None,
               forward_fn: ForwardFn | None = None) -> None:
        """Install the hooks on ``model``'s consumer layers (``example_inputs`` is for criteria
        that need the dependency graph)."""
        self.detach()
        self.bind(model)
        self._explicit_batches = False
        self._handles.append(model.register_forward_pre_hook(self._new_forward))
        for name, module in model.named_modules():
            if isinstance(module, self.layer_types) and self._wants(name, module):
                self._handles.append(module.register_forward_pre_hook(self._make_hook(name)))

    def detach(self) -> None:
        """Remove the hooks and fold the last batch in."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._flush()

    def set_labels(self, labels: torch.Tensor | None) -> None:
        """Labels of the next forward pass (class per sample, or per pixel for dense tasks)."""
        self._labels = None if labels is None else labels.detach()

    def bind(self, model: nn.Module) -> None:
        """Score ``model`` (the one collected on, or a deep copy of it) by layer name."""
        self._names = {m: n for n, m in model.named_modules()}

    def state_tensors(self) -> list[torch.Tensor]:
        """The running sums, in a rank-independent order (all-reduced under DDP)."""
        return [self._sums[n][k] for n in sorted(self._sums) for k in sorted(self._sums[n])]

    def all_reduce(self) -> None:
        """Sum the statistics over the ranks of the default process group, if there is one."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        dist = torch.distributed
        world = dist.get_world_size()
        names = [None] * world
        dist.all_gather_object(names, sorted((n, k, tuple(t.shape)) for n in self._sums
                                             for k, t in self._sums[n].items()))
        if any(n != names[0] for n in names):
            raise RuntimeError("ranks collected statistics on different layers or shapes: every "
                               "rank must run the same model on the same number of batches")
        tensors = self.state_tensors()
        for tensor in tensors:
            dist.all_reduce(tensor)
        # on the statistics' device: NCCL reduces CUDA tensors only (gloo takes either)
        device = tensors[0].device if tensors else torch.device("cpu")
        count = torch.tensor([self.samples], dtype=torch.long, device=device)
        dist.all_reduce(count)
        self.samples = int(count)

    # ------------------------------------------------------------------ for subclasses
    def _wants(self, name: str, module: nn.Module) -> bool:
        return True

    def _observe(self, name: str, module: nn.Module, x: torch.Tensor) -> None:
        """Called with a consumer layer's input during forward."""

    def _observe_grad(self, name: str, module: nn.Module, x: torch.Tensor,
                      grad: torch.Tensor) -> None:
        """Called with that input and its gradient during backward (``needs_backward``)."""

    def _end_batch(self) -> None:
        """Called once per batch, after its backward (at the next forward or on detach)."""

    def _add(self, name: str, key: str, value: torch.Tensor) -> None:
        slot = self._sums.setdefault(name, {})
        value = value.detach()
        if key in slot and slot[key].shape == value.shape:
            slot[key] += value
        elif key in slot:
            raise RuntimeError(
                f"statistics of {name!r} changed shape ({tuple(slot[key].shape)} -> "
                f"{tuple(value.shape)}): reset() after pruning before collecting again"
            )
        else:
            slot[key] = value.clone()

    def _stat(self, module: nn.Module, key: str) -> torch.Tensor | None:
        """A stored sum of a layer of the bound model, or None if that layer was not seen."""
        name = self._names.get(module)
        return None if name is None else self._sums.get(name, {}).get(key)

    def _nothing_collected_reason(self) -> str | None:
        """Why the batches seen left no statistics, if the criterion knows (e.g. labels whose
        shape fits no hooked layer); None if it does not."""
        return None

    def _require_data(self) -> None:
        if not self.collected:
            reason = self._nothing_collected_reason()
            raise RuntimeError(
                f"{type(self).__name__} scores channels from data, and none was collected"
                + (f" ({reason})" if reason else "") + ": pass data=<batches> to "
                "kcp_plugin.prune(), or run kcp_plugin.collect(model, batches, importance) (or "
                "`with kcp_plugin.collecting(model, importance): <train steps>`) first"
            )

    def begin_batch(self) -> None:
        """Mark the start of a batch, for loops that know their batches (``collect`` does).

        Without it, batches are counted per top-level ``model(...)`` call, which is all the
        ``collecting`` context can see; a step that goes through another method (mmseg's
        ``model.loss(...)``) or calls the model twice per batch would be miscounted.
        """
        self._explicit_batches = True
        self._flush()
        self._pending = True

    # ------------------------------------------------------------------ hooks
    def _new_forward(self, module: nn.Module, args: Any) -> None:
        if getattr(self, "_explicit_batches", False):
            return
        self._flush()
        self._pending = True

    def _flush(self) -> None:
        if getattr(self, "_pending", False):
            self._end_batch()
            self.samples += 1
            self._pending = False

    def _make_hook(self, name: str) -> Callable:
        def hook(module: nn.Module, args: Any) -> Any:
            if not args or not isinstance(args[0], torch.Tensor):
                return None
            x = args[0]
            with torch.no_grad():
                self._observe(name, module, x.detach())
            if self.needs_backward and x.requires_grad:
                # A fresh view of the input, so its gradient is this layer's share only (the
                # input may also feed a skip path or other layers).
                view = x.view_as(x)
                view.register_hook(lambda g: self._observe_grad(name, module, x.detach(), g))
                return (view, *args[1:])
            return None

        return hook


def per_channel_sum(x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """``[N, C]``: a consumer input summed over everything but batch and channel."""
    if isinstance(module, nn.Linear):
        return x.reshape(x.shape[0], -1, x.shape[-1]).sum(1)
    return x.flatten(2).sum(2)


def channels_last(x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """``[N, positions, C]`` view of a consumer input."""
    if isinstance(module, nn.Linear):
        return x.reshape(x.shape[0], -1, x.shape[-1])
    return x.flatten(2).transpose(1, 2)


def resize_labels(labels: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Nearest-neighbour resize of per-pixel labels ``[N, *S]`` to a feature map's size."""
    if tuple(labels.shape[1:]) == tuple(size):
        return labels
    if len(size) != labels.dim() - 1:
        raise ValueError(f"per-pixel labels of shape {tuple(labels.shape)} do not match a "
                         f"{len(size)}-d feature map")
    out = F.interpolate(labels[:, None].float(), size=size, mode="nearest")
    return out[:, 0].long()


@contextlib.contextmanager
def collecting(
    model: nn.Module,
    importance: StatsImportance,
    example_inputs: Any = None,
    *,
    forward_fn: ForwardFn | None = None,
    reset: bool = True,
) -> Iterator[StatsImportance]:
    """Collect ``importance``'s statistics while the block runs the model (any training loop).

    For criteria that need gradients, the block must call ``loss.backward()``; for criteria that
    need labels, call ``importance.set_labels(y)`` before each forward. A batch is one
    top-level ``model(...)`` call unless the block calls ``importance.begin_batch()`` at the
    start of each batch (needed when it runs the model through another method). On exit the
    hooks are removed and, under ``torch.distributed``, the sums are all-reduced so every rank
    decides the same. DDP wrappers are looked through.

    Args:
        model: The model (or its DDP wrapper).
        importance: A :class:`StatsImportance`.
        example_inputs: Inputs for criteria that need the dependency graph (``fisher``).
        forward_fn: How to call the model on ``example_inputs``.
        reset: Start from empty statistics (else add to the present ones).
    """
    if not isinstance(importance, StatsImportance):
        raise TypeError(f"{type(importance).__name__} does not collect statistics; data-driven "
                        "criteria are StatsImportance subclasses")
    inner = unwrap_model(model)
    if reset:
        importance.reset()
    importance.attach(inner, example_inputs, forward_fn)
    try:
        yield importance
    finally:
        importance.detach()
    importance.all_reduce()


def split_batch(batch: Any) -> tuple[Any, Any]:
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    if isinstance(batch, dict) and "inputs" in batch:
        return batch["inputs"], batch.get("labels", batch.get("targets"))
    return batch, None


def check_batches(data: Any) -> None:
    """Refuse ``data`` that is one batch instead of an iterable of batches.

    A tensor (or an ``(inputs, targets)`` pair of tensors) given as ``data`` would be iterated
    row by row (item by item), each row taken as a batch, and fail deep inside the model with a
    shape error; this names the mistake instead. Used by :func:`kcp_plugin.prune` (before the
    model is touched) and :func:`collect`.

    Raises:
        TypeError: ``data`` is a tensor, or a tuple / list of exactly two tensors of different
            ranks (one ``(inputs, targets)`` batch; batches of one model share their rank).
    """
    what = ("data must be an iterable of batches (a DataLoader, or a list of (inputs, targets) "
            "tuples)")
    if isinstance(data, torch.Tensor):
        raise TypeError(
            f"{what}, got a tensor of shape {tuple(data.shape)}: iterating it would yield its "
            "rows, one unbatched sample each, as batches; for a single batch pass "
            "data=[(inputs, targets)] (or data=[inputs] with a step_fn)")
    if isinstance(data, (tuple, list)) and len(data) == 2 \
            and all(isinstance(t, torch.Tensor) for t in data) and data[0].dim() != data[1].dim():
        raise TypeError(
            f"{what}, got one (inputs, targets) batch (tensors of shapes "
            f"{tuple(data[0].shape)} and {tuple(data[1].shape)}): pass data=[(inputs, targets)]")


def _describe(value: Any) -> str:
    """A batch or model output in a few words, for error messages."""
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, dict):
        return f"a dict with keys {list(value)}"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)} item(s)"
    return f"a {type(value).__name__}"


_STEP_FN = "step_fn=lambda model, batch: <loss>"


def _check_targets(batch: Any, targets: Any) -> None:
    """The default step's conditions on the targets of ``batch``; a ``ValueError`` naming the
    one that fails."""
    if targets is None:
        raise ValueError(
            f"the default step computes cross-entropy from (inputs, targets) batches, and got "
            f"a batch without targets ({_describe(batch)}): pass batches of (inputs, class "
            f"targets) (a DataLoader, or a list of (inputs, targets) tuples), or {_STEP_FN}")
    if not isinstance(targets, torch.Tensor):
        raise ValueError(
            f"the default step computes cross-entropy, and got targets that are "
            f"{_describe(targets)}, not a tensor of class indices: pass tensor targets, or "
            f"{_STEP_FN}")
    if targets.is_floating_point():
        raise ValueError(
            f"the default step computes cross-entropy, and got floating-point targets of shape "
            f"{tuple(targets.shape)} ({targets.dtype}): class indices (integers) are needed; "
            f"for regression or soft targets pass {_STEP_FN} (e.g. F.mse_loss(model(batch[0]), "
            f"batch[1], reduction=\"sum\"))")


def _check_output(out: Any) -> None:
    """The default step's condition on the model output: a tensor of logits."""
    if isinstance(out, torch.Tensor):
        return
    if isinstance(out, dict) and out:
        pick = f"[{next(iter(out))!r}]".replace("'", '"')
    elif isinstance(out, (tuple, list)) and out:
        pick = "[0]"
    else:
        pick = None
    example = (f"step_fn=lambda model, batch: F.cross_entropy(model(batch[0]){pick}, batch[1], "
               f"reduction=\"sum\")" if pick else _STEP_FN)
    raise ValueError(
        f"the default step computes cross-entropy on the model's output, which must be a tensor "
        f"of logits, and the model returned {_describe(out)} (torchvision's segmentation "
        f"models return a dict): pass a step that picks the logits, e.g. {example}")


def default_step(model: nn.Module, batch: Any, forward_fn: ForwardFn | None = None,
                 need_loss: bool = True) -> torch.Tensor | None:
    """Run one ``(inputs, targets)`` batch; return the cross-entropy loss if ``need_loss``.

    The loss is summed over samples (and pixels), so each sample's gradient is that of its own
    loss, as Group Fisher's per-sample mask gradients are defined. Cross-entropy fits classifiers
    (``targets [N]``) and segmentation nets (``[N, K, H, W]`` logits, ``[N, H, W]`` targets, 255
    ignored). Other tasks pass their own ``step_fn``.

    Raises:
        ValueError: (with ``need_loss``) naming the condition that fails: a batch without
            targets, targets that are not an integer tensor (floating-point: regression or soft
            labels), an output that is not a tensor (a dict, as torchvision's segmentation models
            return), or cross-entropy's own error on mismatched shapes; each says which
            ``step_fn`` to pass instead.
    """
    inputs, targets = split_batch(batch)
    if need_loss:  # before the forward: a wrong batch layout is known without running the model
        _check_targets(batch, targets)
    out = (forward_fn or default_forward)(model, inputs)
    if not need_loss:
        return None
    _check_output(out)
    try:
        return F.cross_entropy(out, targets, ignore_index=255, reduction="sum")
    except (RuntimeError, IndexError, ValueError) as exc:
        raise ValueError(
            f"the default step's cross-entropy failed on an output of shape {tuple(out.shape)} "
            f"and targets of shape {tuple(targets.shape)} ({exc}); it fits classifiers ([N, K] "
            f"logits, [N] targets) and segmentation nets ([N, K, H, W] logits, [N, H, W] "
            f"targets): for other models or tasks pass {_STEP_FN}") from exc


def collect(
    model: nn.Module,
    data: Iterable[Any],
    importance: StatsImportance,
    *,
    steps: int | None = None,
    example_inputs: Any = None,
    forward_fn: ForwardFn | None = None,
    step_fn: StepFn | None = None,
    labels_fn: Callable[[Any], torch.Tensor] | None = None,
    progress: bool | None = None,
) -> StatsImportance:
    """Run up to ``steps`` batches of ``data`` through ``model`` and collect statistics.

    The model runs in eval mode (norm statistics untouched); for criteria that need gradients the
    loss is back-propagated and the parameter gradients are cleared afterwards. Weights never
    change.

    Args:
        model: The model (or its DDP wrapper).
        data: Iterable of batches, ``(inputs, targets)`` by default.
        importance: A :class:`StatsImportance`.
        steps: Number of batches (default: all of ``data``).
        example_inputs: Inputs for building the dependency graph; default: the first batch's.
        forward_fn: How to call the model on a batch's inputs.
        step_fn: ``step_fn(model, batch) -> loss`` (or None without backward), replacing the
            default cross-entropy step.
        labels_fn: ``labels_fn(batch) -> labels`` for criteria that need labels (default: the
            batch's second item).
        progress: Show a progress bar (default: only on a terminal).

    Returns:
        ``importance``, with its statistics.

    Raises:
        TypeError: ``data`` is one batch (a tensor), not an iterable of batches
            (:func:`check_batches`).
        ValueError: no batches, batches without the labels a criterion needs, the default
            step's errors (:func:`default_step`), or no statistics collected.
    """
    check_batches(data)
    if steps is not None and (not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps must be None or a positive integer, got {steps!r}")
    inner = unwrap_model(model)
    it = iter(data)
    try:
        first = next(it)
    except StopIteration:
        raise ValueError("data yielded no batches") from None
    if example_inputs is None:
        example_inputs = split_batch(first)[0]
    total = steps if steps is not None else (len(data) if hasattr(data, "__len__") else None)

    def batches() -> Iterator[Any]:
        yield first
        yield from it

    bar = progress_bar(enabled=progress, total=total,
                       desc=f"collecting {type(importance).__name__} statistics")
    with preserved_modes(inner):
        inner.eval()
        with collecting(model, importance, example_inputs, forward_fn=forward_fn):
            for i, batch in enumerate(batches()):
                if steps is not None and i >= steps:
                    break
                importance.begin_batch()
                if importance.needs_labels:
                    labels = labels_fn(batch) if labels_fn else split_batch(batch)[1]
                    if labels is None:
                        raise ValueError(_missing_labels(importance, batch, labels_fn))
                    importance.set_labels(labels)
                with torch.set_grad_enabled(importance.needs_backward):
                    if step_fn is not None:
                        loss = step_fn(model, batch)
                    else:
                        loss = default_step(model, batch, forward_fn, importance.needs_backward)
                    if importance.needs_backward:
                        if loss is None:
                            raise ValueError(f"{type(importance).__name__} needs gradients: "
                                             "step_fn must return a loss")
                        inner.zero_grad(set_to_none=True)
                        loss.sum().backward()
                        inner.zero_grad(set_to_none=True)
                bar.update(1)
            bar.close()
    if not importance.collected:
        reason = importance._nothing_collected_reason()
        raise ValueError(f"no statistics were collected: {reason}" if reason else
                         "no statistics were collected: the hooked layers never ran (step_fn "
                         "must run the model's layers on the batch)")
    return importance


def _missing_labels(importance: StatsImportance, batch: Any, labels_fn: Any) -> str:
    """The error for a batch without the labels ``importance`` needs: what works from
    :func:`kcp_plugin.prune` (which has no ``labels_fn``) and from :func:`collect`."""
    name = type(importance).__name__
    if labels_fn is not None:
        return f"{name} needs labels, and labels_fn returned None for a batch"
    return (f"{name} needs labels, and got a batch without them ({_describe(batch)}): pass "
            "batches of (inputs, labels) as data (a DataLoader, or a list of (inputs, labels) "
            "tuples; dict batches need 'inputs' and 'labels' keys); to read labels from another "
            "batch layout, collect first with kcp_plugin.collect(model, batches, importance, "
            "labels_fn=lambda batch: <labels>) and prune with that importance")
