"""The ``kcp_pruned`` timm entrypoint, and pruning plans carried inside state dicts.

``timm.create_model("kcp_pruned", base="resnet50", target_macs_ratio=0.5)`` builds timm's
``resnet50`` and prunes it with KCP at creation time; ``plan=...`` replays a saved plan instead.
The result is the base timm model itself (same class, ``pretrained_cfg`` with its input size,
mean/std and classifier name, working ``reset_classifier``), only narrower.

timm loads ``checkpoint_path=`` strictly *after* the entrypoint returns, and the entrypoint
never sees that path. So a model built here carries its pruning plan in its own state dict (one
``uint8`` tensor of JSON under the key :data:`PLAN_KEY`): every checkpoint timm writes
(``train.py``'s saver, ``save_for_hf``, safetensors) contains the plan, and loading such a
state dict first rebuilds the pruned structure, then copies the weights. Loading never unpickles
code: the plan is plain JSON data.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from ...deploy.backends import Backend
from ...hints import did_you_mean
from ...plan import CARRIED_PLAN_KEY as PLAN_KEY
from ...plan import carried_plan as _plan_from_state_dict
from ...plan import (
    decode_plan,
    encode_plan,
    get_plan,
    load_plain,
    read_checkpoint,
    validate_plan,
)
from ...pruning import check_latency_arguments, resolve_importance
from .pruning import apply_timm_plan, prune_timm_model
from .support import check_supported

__all__ = ["kcp_pruned", "PLAN_KEY", "check_rebuildable", "dense_copy", "dense_macs", "read_plan",
           "install_plan_hooks", "encode_plan", "decode_plan"]

_BUILD = "_kcp_timm_build"
_HOOKED = "_kcp_timm_hooks"
ENTRYPOINT = "kcp_pruned"


# ---------------------------------------------------------------------- reading plans
def read_plan(source: str | os.PathLike | dict[str, Any]) -> dict[str, Any]:
    """A pruning plan from a plan dict, a JSON file, or any checkpoint that carries one.

    Accepted files: a JSON plan; a checkpoint written by :func:`kcp_plugin.save_pruned`; a timm
    checkpoint (``train.py``'s ``state_dict`` / ``state_dict_ema``, a bare state dict, or
    ``.safetensors``) of a model built by ``kcp_pruned``. Files are read with
    ``weights_only=True``: no pickled code runs.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the source holds no plan, or a malformed one.
    """
    if isinstance(source, dict):
        if "kcp_plugin" in source and "state_dict" in source:  # a loaded save_pruned payload
            return validate_plan(source["kcp_plugin"])
        found = _plan_from_state_dict(source)
        return found if found is not None else validate_plan(source)
    path = os.fspath(source)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"plan file {path!r} does not exist")
    if path.endswith(".json"):
        with open(path) as f:
            return validate_plan(json.load(f))
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        found = _plan_from_state_dict(load_file(path))
    else:
        try:
            return read_checkpoint(path)["kcp_plugin"]
        except ValueError:
            pass
        payload = load_plain(path, "a checkpoint or plan file")
        found = None
        if isinstance(payload, dict):
            for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
                found = found or _plan_from_state_dict(payload.get(key))
            found = found or _plan_from_state_dict(payload)
    if found is None:
        raise ValueError(
            f"{path} carries no kcp_plugin pruning plan (neither a kcp_plugin.save_pruned "
            f"checkpoint, nor a state dict with a {PLAN_KEY!r} entry, nor a JSON plan)"
        )
    return found


# ---------------------------------------------------------------------- state-dict hooks
def _add_plan(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    state_dict[prefix + PLAN_KEY] = encode_plan(get_plan(module))


def _same_plan(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def _rebuild(module: nn.Module, plan: dict[str, Any]) -> None:
    """Give ``module`` (pruned differently) the structure of its base with ``plan`` applied."""
    import timm

    build = module.__dict__.get(_BUILD)
    if not build:
        raise RuntimeError("the model is already pruned with a different plan and does not "
                           "record how it was built, so it cannot be rebuilt")
    fresh = timm.create_model(build["base"], pretrained=False, **copy.deepcopy(build["kwargs"]))
    apply_timm_plan(fresh, plan, input_size=build.get("input_size"))
    for key in ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"):
        module.__dict__[key] = fresh.__dict__[key]
    for key, value in fresh.__dict__.items():
        if not key.startswith("_") and isinstance(value, (bool, int, float, str, type(None))):
            module.__dict__[key] = value  # num_features & co. as the fresh build has them
        elif key.startswith("_kcp_"):
            module.__dict__[key] = value  # plan and head map
    module.__dict__[_BUILD] = build


def dense_macs(model: nn.Module, example_inputs: torch.Tensor) -> int:
    """MACs of ``model``'s unpruned architecture on ``example_inputs``: the dense baseline.

    A model never pruned is counted as it is; a pruned one (``kcp_pruned`` with a target or a
    plan, or a model resumed from a pruned checkpoint) through a fresh build of its base with
    the arguments recorded by :func:`install_plan_hooks`, so "MACs kept" is relative to the
    dense network, not to the pruned model itself.

    Raises:
        ValueError: the model is pruned but does not record how it was built.
    """
    from ...graph import count_macs_params

    if not get_plan(model)["history"]:
        return count_macs_params(model, example_inputs)[0]
    return count_macs_params(dense_copy(model), example_inputs.detach().cpu())[0]


def check_rebuildable(model: nn.Module) -> None:
    """Raise unless :func:`dense_copy` can give ``model``'s unpruned architecture.

    Raises:
        ValueError: the model is pruned but does not record how it was built.
    """
    build = model.__dict__.get(_BUILD)
    if get_plan(model)["history"] and (not build or not build.get("base")):
        raise ValueError("the model is pruned and does not record its base architecture; "
                         "build it with kcp_pruned or call install_plan_hooks(model, base=...)")


def dense_copy(model: nn.Module) -> nn.Module:
    """A new module with ``model``'s unpruned architecture, on the CPU, in eval mode: a deep
    copy of a model never pruned, else a fresh build of its base with the arguments recorded
    by :func:`install_plan_hooks` (random weights: a reference for MACs and latency).

    Raises:
        ValueError: the model is pruned but does not record how it was built.
    """
    import timm

    if not get_plan(model)["history"]:
        return copy.deepcopy(model).cpu().eval()
    check_rebuildable(model)
    build = model.__dict__[_BUILD]
    fresh = timm.create_model(build["base"], pretrained=False, **copy.deepcopy(build["kwargs"]))
    return fresh.eval()


def _apply_carried_plan(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any,
                        strict: bool, missing_keys: list, unexpected_keys: list,
                        error_msgs: list) -> None:
    key = prefix + PLAN_KEY
    if key not in state_dict:
        return
    try:
        plan = decode_plan(state_dict.pop(key))
        current = get_plan(module)
        if _same_plan(plan, current):
            return
        if not current["history"] and not current["attrs"]:
            build = module.__dict__.get(_BUILD) or {}
            apply_timm_plan(module, plan, input_size=build.get("input_size"))
        else:
            _rebuild(module, plan)
    except Exception as exc:  # reported by load_state_dict with the other errors
        error_msgs.append(f"could not apply the pruning plan carried by the state dict "
                          f"({type(exc).__name__}: {exc})")


def install_plan_hooks(model: nn.Module, base: str | None = None,
                       base_kwargs: dict[str, Any] | None = None,
                       input_size: int | Sequence[int] | None = None) -> nn.Module:
    """Make ``model`` carry its pruning plan in its state dict and apply a carried one on load.

    ``kcp_pruned`` models have this already; call it on any other timm model (e.g. one pruned
    with :func:`prune_timm_model` or by a training schedule) so that its checkpoints reload with
    ``timm.create_model("kcp_pruned", base=..., checkpoint_path=...)``.

    Args:
        model: A timm model.
        base: Its timm model name (default: ``model.pretrained_cfg["architecture"]``).
        base_kwargs: Arguments it was built with (default: timm's record of them); used to
            rebuild it when a state dict with a different plan is loaded into a pruned model.
        input_size: Input size used to trace the model when a plan is replayed.
    """
    if base is None:
        base = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    if base_kwargs is None:
        base_kwargs = {k: v for k, v in (getattr(model, "_model_args", None) or {}).items()
                       if k not in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")}
    model.__dict__[_BUILD] = {"base": base, "kwargs": dict(base_kwargs),
                              "input_size": input_size}
    if not model.__dict__.get(_HOOKED):
        # module-level functions taking the module: deep copies (EMA) get working hooks too
        model.register_state_dict_post_hook(_add_plan)
        model.register_load_state_dict_pre_hook(_apply_carried_plan)
        model.__dict__[_HOOKED] = True
    return model


# ---------------------------------------------------------------------- the entrypoint
_TIMM_ARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def _check_fraction(name: str, value: Any, allow_zero: bool) -> None:
    if value is None:
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"kcp_pruned: {name} must be a number, got {value!r}")
    if not (0 <= value < 1 if allow_zero else 0 < value <= 1):
        raise ValueError(f"kcp_pruned: {name} must be in {'[0, 1)' if allow_zero else '(0, 1]'}"
                         f", got {value}")


def _timm_checkpoint_path() -> str | None:
    """The ``checkpoint_path`` timm's ``create_model`` loads once this entrypoint returns.

    timm pops ``checkpoint_path`` before calling an entrypoint (timm/models/_factory.py
    ``create_model``), so it is read from that caller's frame, to check the file first.
    """
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "create_model" \
                and frame.f_globals.get("__name__") == "timm.models._factory":
            path = frame.f_locals.get("checkpoint_path")
            return str(path) if path else None
        frame = frame.f_back
    return None


def _check_timm_checkpoint(path: str | None) -> None:
    """Refuse a ``checkpoint_path`` that is not a plain-data torch file before building.

    timm's loader would fail only after the model is built, with torch's advice to retry with
    ``weights_only=False`` (wrong advice for a file of unknown origin). safetensors / npz files
    are left to timm's own loaders.
    """
    if path is None or str(path).endswith((".safetensors", ".npz")):
        return
    if not os.path.isfile(path):
        raise FileNotFoundError(f"kcp_pruned: checkpoint_path {path} does not exist")
    load_plain(path, what="a timm / kcp_plugin checkpoint")


def kcp_pruned(
    pretrained: bool = False,
    *,
    base: str = "resnet50",
    importance: str = "kcp",
    target_macs_ratio: float | None = None,
    pruning_ratio: float | None = None,
    plan: str | os.PathLike | dict[str, Any] | None = None,
    input_size: int | Sequence[int] | None = None,
    importance_kwargs: dict[str, Any] | None = None,
    prune_kwargs: dict[str, Any] | None = None,
    target_latency_ratio: float | None = None,
    latency_backend: str | dict[str, Any] | Backend | None = None,
    latency_allocation: str = "table",
    **kwargs: Any,
) -> nn.Module:
    """timm entrypoint: any timm architecture, pruned with a registered criterion or a plan.

    Use it like any timm model name (``--model kcp_pruned --model-kwargs base=resnet50
    target_macs_ratio=0.5`` in timm's scripts, after importing this module, e.g. with
    ``--device-modules kcp_plugin.integrations.timm``).

    Args:
        pretrained: Load the base model's pretrained weights (timm's usual download / cache /
            ``pretrained_cfg_overlay=dict(file=...)``) before pruning.
        base: Name of the timm architecture to build.
        importance: Registered, data-free criterion used at creation time (``kcp``, ``l2``,
            ``fpgm``...). Gradient criteria need data: prune during training instead.
        target_macs_ratio: Fraction of MACs to keep; prunes at creation time.
        pruning_ratio: Channel pruning ratio instead of a MACs target.
        plan: A saved plan to replay instead of pruning: a plan dict, a JSON plan, a
            ``kcp_plugin.save_pruned`` checkpoint, or a timm checkpoint of a ``kcp_pruned``
            model. Only the structure is taken from it; weights come from ``pretrained`` /
            ``checkpoint_path``.
        input_size: Input size used to trace the model (int, ``(H, W)`` or ``(C, H, W)``);
            default: the model's own. Convolutional models give the same widths at any size,
            so a small one (e.g. 64) makes creation faster.
        importance_kwargs: Arguments of the criterion.
        prune_kwargs: Further :func:`kcp_plugin.prune` arguments (``round_to``,
            ``global_pruning``, ``ignored_layers``, ``macs_tolerance``,
            ``latency_tolerance``...).
        target_latency_ratio: Fraction of the dense latency to keep, measured on
            ``latency_backend`` at ``input_size`` (and the backend's batch); prunes at
            creation time. May be combined with ``target_macs_ratio``, a MACs cap
            (``latency_allocation="table"``).
        latency_backend: Where latency is measured: ``"torch"`` (CPU eager, the default),
            ``"onnxruntime"`` or ``"cuda"``, a dict of :class:`kcp_plugin.Backend` fields
            (``{"name": "cuda", "dtype": "bf16", "batch": 64}``) or a record. With a MACs
            target alone it sets the channel multiple and the pruned model is measured against
            the dense one (a warning if slower).
        latency_allocation: ``"table"`` (per-group widths from a latency table) or
            ``"uniform"`` (one channel ratio searched on measured latency).
        **kwargs: Arguments of the base model (``num_classes``, ``img_size``, ``drop_path_rate``
            ...), passed to ``timm.create_model(base, ...)``.

    With none of ``target_macs_ratio``, ``pruning_ratio``, ``target_latency_ratio`` and
    ``plan`` the model is the dense base: ready for pruning during training, or for
    ``checkpoint_path=`` of a pruned ``kcp_pruned`` checkpoint (whose plan is applied before
    its weights are loaded).

    Raises:
        ValueError / TypeError: invalid arguments, raised before anything is built.
        UnsupportedModelError: the base architecture cannot be pruned correctly.
    """
    import timm

    # ------------------------------------------------------------ validation, nothing built
    if not isinstance(base, str) or not base:
        raise TypeError(f"kcp_pruned: base must be a timm model name, got {base!r}")
    if base == ENTRYPOINT:
        raise ValueError("kcp_pruned: base must be a timm architecture, not kcp_pruned itself")
    if not timm.is_model(base.split(".")[0]):
        hint = did_you_mean(base, timm.list_models(), otherwise=" (see timm.list_models())")
        raise ValueError(f"kcp_pruned: timm has no model {base!r}{hint}")
    _check_fraction("target_macs_ratio", target_macs_ratio, allow_zero=False)
    _check_fraction("pruning_ratio", pruning_ratio, allow_zero=True)
    _check_fraction("target_latency_ratio", target_latency_ratio, allow_zero=False)
    given = [n for n, v in (("target_macs_ratio", target_macs_ratio),
                            ("pruning_ratio", pruning_ratio), ("plan", plan),
                            ("target_latency_ratio", target_latency_ratio)) if v is not None]
    # a latency target may carry a MACs cap; every other pair is a conflict
    if len(given) > 1 and set(given) != {"target_macs_ratio", "target_latency_ratio"}:
        raise ValueError(f"kcp_pruned: give at most one of target_macs_ratio, pruning_ratio, "
                         f"target_latency_ratio (which target_macs_ratio may cap) and plan; got "
                         f"{', '.join(given)}")
    if prune_kwargs is not None and not isinstance(prune_kwargs, dict):
        raise TypeError(f"kcp_pruned: prune_kwargs must be a dict, got {prune_kwargs!r}")
    if latency_backend is not None and not {"target_macs_ratio", "pruning_ratio",
                                            "target_latency_ratio"} & set(given):
        raise ValueError("kcp_pruned: latency_backend applies when the model is pruned at "
                         "creation (target_latency_ratio, or target_macs_ratio / pruning_ratio "
                         "measured against the dense model); nothing is measured here")
    # the runtime is checked too (a GPU for "cuda"): the model is measured right after building
    backend = check_latency_arguments(
        target_latency_ratio, latency_backend, latency_allocation,
        target_macs_ratio=target_macs_ratio, pruning_ratio=pruning_ratio,
        prune_kwargs=prune_kwargs, owner="kcp_pruned", imports=True)
    for reserved in ("target_macs_ratio", "pruning_ratio", "importance_kwargs",
                     "example_inputs", "dry_run", "loss_fn"):
        if reserved in (prune_kwargs or {}):
            raise ValueError(f"kcp_pruned: {reserved!r} is not accepted in prune_kwargs")
    _, imp_name, needs_grad = resolve_importance(importance, importance_kwargs)
    if needs_grad and (target_macs_ratio is not None or pruning_ratio is not None
                       or target_latency_ratio is not None):
        raise ValueError(
            f"kcp_pruned: importance {imp_name!r} reads gradients, which need a loss_fn on "
            "training batches, which timm.create_model cannot pass; at creation time use a "
            "data-free criterion (kcp, l1, l2, fpgm, lamp, bn, ...), or prune during training "
            "(tools/timm_train.py, or TimmPruningSchedule(..., loss_fn=...))"
        )
    saved_plan = read_plan(plan) if plan is not None else None
    _check_timm_checkpoint(_timm_checkpoint_path())

    # ------------------------------------------------------------ build, then prune / replay
    timm_args = {k: kwargs.pop(k) for k in _TIMM_ARGS if kwargs.get(k) is not None}
    cfg = timm_args.get("pretrained_cfg")
    if isinstance(cfg, dict) and cfg.get("architecture") == ENTRYPOINT:
        # an exported kcp_pruned config (save_for_hf / local-dir): describes the base's data
        timm_args["pretrained_cfg"] = {**cfg, "architecture": base.split(".")[0]}
    for key in _TIMM_ARGS:
        kwargs.pop(key, None)
    model = timm.create_model(base, pretrained=pretrained, **timm_args, **kwargs)
    check_supported(model)
    if saved_plan is not None:
        apply_timm_plan(model, saved_plan, input_size=input_size)
    elif given:
        prune_timm_model(model, importance, input_size=input_size,
                         target_macs_ratio=target_macs_ratio, pruning_ratio=pruning_ratio,
                         target_latency_ratio=target_latency_ratio, latency_backend=backend,
                         latency_allocation=latency_allocation,
                         importance_kwargs=importance_kwargs, **(prune_kwargs or {}))
    # The base's data config (input size, mean/std, interpolation, classifier name) stays;
    # only the architecture names this entrypoint, so that timm's exports rebuild it here.
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    cfg["architecture"] = ENTRYPOINT
    model.pretrained_cfg = cfg
    model.default_cfg = cfg
    install_plan_hooks(model, base, kwargs, input_size)
    return model
