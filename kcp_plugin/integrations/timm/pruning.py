"""Prune a timm model, or replay a plan on one, with the timm-specific setup applied.

:func:`kcp_plugin.prune` handles any model torch-pruning can trace. timm models add three
things this module takes care of, so that the result is still a working timm model:

* layers torch-pruning cannot map channels through get custom pruners, and architectures that
  cannot be pruned correctly are refused before the model is touched (:mod:`.support`);
* the same custom pruners are used when a saved plan is replayed, so the replay maps channels
  exactly as the prune did;
* the model's head bookkeeping (``num_features``, ``head_hidden_size``, ``embed_dim``, the
  head module's ``in_features``...) is set to the pruned widths and recorded in the plan, so
  ``reset_classifier`` builds a classifier of the right width and timm's export code reports the
  right feature size.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch_pruning as tp

from ...deploy.backends import Backend
from ...graph import preserved_modes
from ...plan import apply_plan, get_plan, sync_plan, validate_plan
from ...pruning import prune
from ...report import PruneReport
from .support import check_supported

__all__ = [
    "check_latency_device",
    "default_inputs",
    "prune_timm_model",
    "apply_timm_plan",
    "sync_head_attrs",
    "check_reset_classifier",
    "replay_new_entries",
]

# Head bookkeeping attributes: (attribute, which measured width it follows). "features" is the
# width of forward_features' output, "classifier" the input width of get_classifier().
_ROOT_ATTRS = (("num_features", "features"), ("embed_dim", "features"),
               ("head_hidden_size", "classifier"))
_HEAD_ATTRS = (("in_features", "features"), ("in_chs", "features"),
               ("num_features", "classifier"), ("hidden_size", "classifier"))
_HEAD_MAP = "_kcp_timm_head_map"


def default_inputs(
    model: nn.Module, input_size: int | Sequence[int] | None = None, batch: int = 1
) -> torch.Tensor:
    """A seeded random example batch of the model's input size, for tracing.

    Args:
        model: A timm model.
        input_size: ``C, H, W``, ``H, W`` or a side length; default: the size timm's data
            pipeline would use for this model (its ``img_size`` if built with one, else its
            ``pretrained_cfg``).
        batch: Batch size of the example.
    """
    import timm.data

    if input_size is None:
        # resolve_input_data_config (timm >= 1.0.2x) honours a model built with img_size=...;
        # resolve_model_data_config only reads pretrained_cfg.
        resolve = getattr(timm.data, "resolve_input_data_config", None) \
            or timm.data.resolve_model_data_config
        size = tuple(resolve(model)["input_size"])
    elif isinstance(input_size, int):
        size = (3, input_size, input_size)
    else:
        size = tuple(int(s) for s in input_size)
        if len(size) == 2:
            size = (3, *size)
    if len(size) != 3 or min(size) < 1:
        raise ValueError(f"input_size must be an int, (H, W) or (C, H, W); got {input_size!r}")
    # Random rather than zero values: some blocks (e.g. softmax over equal logits) behave
    # degenerately on constant inputs, which hides shape bugs. Seeded: tracing is deterministic.
    return torch.randn(batch, *size, generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------------- head bookkeeping
def _measure(model: nn.Module, x: torch.Tensor) -> dict[str, int | tuple[int, int]]:
    """Widths of forward_features' output and of the classifier input (with their shapes)."""
    seen: dict[str, Any] = {}
    clf = model.get_classifier() if hasattr(model, "get_classifier") else None
    handle = None
    if isinstance(clf, nn.Module) and not isinstance(clf, nn.Identity):
        def hook(module, args):
            if args and isinstance(args[0], torch.Tensor):
                seen["classifier_in"] = tuple(args[0].shape)
        handle = clf.register_forward_pre_hook(hook)
    try:
        with torch.no_grad(), preserved_modes(model):
            model.eval()
            if hasattr(model, "forward_features"):
                feats = model.forward_features(x)
                if isinstance(feats, torch.Tensor):
                    seen["features"] = tuple(feats.shape)
            model(x)
    finally:
        if handle is not None:
            handle.remove()
    if isinstance(clf, nn.Linear) and "classifier_in" in seen:
        seen["classifier"] = seen["classifier_in"][-1]
    elif isinstance(clf, nn.modules.conv._ConvNd) and "classifier_in" in seen:
        seen["classifier"] = seen["classifier_in"][1]
    return seen


def _feature_dim(shape: tuple[int, ...], width: int) -> int | None:
    """Which dim of a forward_features output holds ``width`` channels (NCHW, NHWC or NLC)."""
    order = {4: (1, 3), 3: (2, 1), 2: (1,)}.get(len(shape), ())
    for d in order:
        if shape[d] == width:
            return d
    return None


def _head_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules above the classifier (e.g. timm's ClassifierHead), innermost last."""
    clf = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(clf, nn.Module):
        return []
    name = next((n for n, m in model.named_modules() if m is clf), None)
    if not name:
        return []
    parts = name.split(".")
    modules = dict(model.named_modules())
    return [(".".join(parts[:i]), modules[".".join(parts[:i])]) for i in range(1, len(parts))]


def head_map(model: nn.Module, x: torch.Tensor) -> dict[str, Any]:
    """Which head attributes follow which width, found once on the unpruned model."""
    found = model.__dict__.get(_HEAD_MAP)
    if found is not None:
        return found
    seen = _measure(model, x)
    entries = []
    feat_dim = None
    num_features = getattr(model, "num_features", None)
    if "features" in seen and isinstance(num_features, int):
        feat_dim = _feature_dim(seen["features"], num_features)
    widths = {"classifier": seen.get("classifier")}
    if feat_dim is not None:
        widths["features"] = seen["features"][feat_dim]
    for owner, module, attrs in [("", model, _ROOT_ATTRS)] + [
        (n, m, _HEAD_ATTRS) for n, m in _head_modules(model)
    ]:
        for attr, follows in attrs:
            value = getattr(module, attr, None)
            if isinstance(value, int) and not isinstance(value, bool) \
                    and widths.get(follows) == value:
                entries.append([owner, attr, follows])
    found = {"feature_dim": feat_dim, "entries": entries}
    model.__dict__[_HEAD_MAP] = found  # plain data; deep copies carry it
    return found


def sync_head_attrs(model: nn.Module, x: torch.Tensor) -> dict[str, dict[str, int]]:
    """Set the head bookkeeping attributes of a pruned timm model to its real widths.

    timm's ``reset_classifier`` builds the new classifier from ``num_features`` /
    ``head_hidden_size`` / ``embed_dim`` (or the head module's ``in_features``), and timm's
    export reports ``num_features``: after pruning these must describe the pruned widths.
    Which attribute follows which width is decided on the unpruned model (call this once before
    pruning too, which :func:`prune_timm_model` does) by matching values, so unrelated
    attributes are never touched.

    Returns:
        ``{module_name: {attr: value}}`` of the attributes that changed (for the plan).
    """
    hm = head_map(model, x)
    if not hm["entries"]:
        return {}
    seen = _measure(model, x)
    widths: dict[str, int] = {}
    if "classifier" in seen:
        widths["classifier"] = seen["classifier"]
    if hm["feature_dim"] is not None and "features" in seen:
        widths["features"] = seen["features"][hm["feature_dim"]]
    modules = dict(model.named_modules())
    changed: dict[str, dict[str, int]] = {}
    for owner, attr, follows in hm["entries"]:
        if follows in widths and getattr(modules[owner], attr) != widths[follows]:
            setattr(modules[owner], attr, widths[follows])
            changed.setdefault(owner, {})[attr] = widths[follows]
    return changed


def check_reset_classifier(model: nn.Module, x: torch.Tensor, num_classes: int = 7) -> None:
    """Check that ``reset_classifier`` works on (a copy of) a pruned model.

    Raises:
        RuntimeError: the copy with a reset classifier does not produce ``num_classes`` logits.
    """
    clone = copy.deepcopy(model).eval()
    clone.reset_classifier(num_classes)
    with torch.no_grad():
        out = clone(x)
    if not isinstance(out, torch.Tensor) or out.shape[-1] != num_classes:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise RuntimeError(f"reset_classifier({num_classes}) gives outputs of shape {shape}")


# ---------------------------------------------------------------------- prune / replay
def prune_timm_model(
    model: nn.Module,
    importance: str | tp.importance.Importance = "kcp",
    *,
    example_inputs: torch.Tensor | None = None,
    input_size: int | Sequence[int] | None = None,
    **prune_kwargs: Any,
) -> PruneReport:
    """:func:`kcp_plugin.prune` for timm models: custom pruners, refusals, head attributes.

    Args:
        model: A timm model (pruned in place).
        importance: Registry name or ``Importance``.
        example_inputs: Inputs for tracing; default: :func:`default_inputs` (``input_size``).
        input_size: Size of the default example inputs.
        **prune_kwargs: Everything :func:`kcp_plugin.prune` takes (``target_macs_ratio``,
            ``pruning_ratio``, ``ignored_layers``, ``round_to``, ``loss_fn``...). Custom
            pruners and unwrapped parameters given here are merged with the timm ones.

    Raises:
        UnsupportedModelError: the architecture cannot be pruned correctly; raised before the
            model is touched, naming the cause.
        ValueError / TypeError: invalid arguments (the model is untouched).
    """
    check_supported(model)
    x = example_inputs if example_inputs is not None else default_inputs(model, input_size)
    # the core applies the timm adapter (pruners, protected blocks, head attributes) itself
    return prune(model, x, importance, **prune_kwargs)


def apply_timm_plan(
    model: nn.Module,
    plan: dict[str, Any],
    example_inputs: torch.Tensor | None = None,
    input_size: int | Sequence[int] | None = None,
) -> nn.Module:
    """Replay a pruning plan on a freshly built timm model (same architecture and arguments).

    The timm custom pruners are used for the replay, as they were for the prune; head
    attributes recorded in the plan are restored with it.
    """
    validate_plan(plan)
    x = example_inputs if example_inputs is not None else default_inputs(model, input_size)
    return apply_plan(model, plan, x)  # the core adds the timm pruners (kcp_plugin.hosts)


def replay_new_entries(copy_model: nn.Module, model: nn.Module,
                       example_inputs: torch.Tensor) -> bool:
    """Bring a structural copy (an EMA model, another DDP rank) up to ``model``'s plan.

    :func:`kcp_plugin.sync_plan` with ``model``'s plan: the copy keeps its own values for the
    surviving channels (e.g. EMA averages).

    Returns:
        Whether anything was replayed.

    Raises:
        ValueError: the copy's plan is not a prefix of ``model``'s (it was not copied from it).
    """
    return sync_plan(copy_model, get_plan(model), example_inputs)


# ---------------------------------------------------------------------- latency targets
def check_latency_device(owner: str, model: nn.Module, backend: Backend | None) -> None:
    """Refuse a model on a GPU for the CPU runtimes, which time the model where it is.

    Raises:
        ValueError: ``backend`` is ``"torch"`` / ``"onnxruntime"`` and ``model`` is not on the
            CPU (the message names what works).
    """
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    if backend is None or backend.is_cuda or backend.timer is not None or device.type == "cpu":
        return
    raise ValueError(
        f"{owner}: latency_backend {backend.name!r} times the model on the CPU, but it is on "
        f"{device}: measure on this GPU with latency_backend=dict(name='cuda', dtype=..., "
        "batch=...), or prune on the CPU (kcp_pruned / kcp-prune) and fine-tune the result (for "
        f"the channel multiple alone: round_to={backend.channel_multiple()} and no "
        "latency_backend)")
