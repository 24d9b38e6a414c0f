"""Model specs (``timm:resnet50``, ``torchvision:deeplabv3_resnet50``, ``module:function``,
``builtin:deeplabv3_lite``) resolved to freshly built, randomly initialised models.

Nothing is downloaded: pretrained weights are never requested. A pruned checkpoint saved by the
CLI records its spec, so :func:`load_spec_checkpoint` can rebuild the architecture and replay the
plan without any code from the checkpoint.
"""

from __future__ import annotations

import importlib
import inspect
import os
from typing import Any

import torch
import torch.nn as nn

from .plan import apply_plan, read_checkpoint

__all__ = ["build_from_spec", "SOURCES", "load_spec_checkpoint", "ModelSpecError"]

SOURCES = ("builtin", "timm", "torchvision", "module")
DEFAULT_SPEC = "builtin:deeplabv3_lite"


class ModelSpecError(ValueError):
    """A model spec that cannot be resolved or built."""


def _split(spec: str) -> tuple[str, str]:
    if ":" not in spec:
        raise ModelSpecError(
            f"model spec {spec!r} needs a source prefix: one of "
            f"{', '.join(s + ':NAME' for s in SOURCES)} (e.g. timm:resnet50)"
        )
    source, name = spec.split(":", 1)
    if source not in SOURCES:
        raise ModelSpecError(
            f"unknown model source {source!r}; valid sources: {', '.join(SOURCES)}"
        )
    if not name:
        raise ModelSpecError(f"model spec {spec!r} has no model name after {source + ':'!r}")
    return source, name


def _require(module: str, extra: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ModelSpecError(
            f"{module} is not installed; install it with: pip install 'kcp-plugin[{extra}]'"
        ) from exc


def build_from_spec(spec: str, **kwargs: Any) -> nn.Module:
    """Build the model a spec names, with random weights, in eval mode.

    Args:
        spec: ``builtin:NAME`` (kcp_plugin.models), ``timm:NAME``, ``torchvision:NAME`` or
            ``package.module:function``.
        **kwargs: Passed to the model's constructor.

    Raises:
        ModelSpecError: malformed spec, unknown model, or missing library.
    """
    source, name = _split(spec)
    if source == "builtin":
        from .models import build_model, list_models

        if name not in list_models():
            raise ModelSpecError(
                f"unknown builtin model {name!r}; valid: {', '.join(list_models())}"
            )
        model = build_model(name, **kwargs)
    elif source == "timm":
        timm = _require("timm", "timm")
        if not timm.is_model(name):
            raise ModelSpecError(f"timm has no model {name!r} (see timm.list_models())")
        model = timm.create_model(name, pretrained=False, **kwargs)
    elif source == "torchvision":
        tv = _require("torchvision.models", "torchvision")
        try:
            builder = tv.get_model_builder(name)
        except ValueError as exc:
            raise ModelSpecError(f"torchvision has no model {name!r}") from exc
        params = inspect.signature(builder).parameters
        defaults = {"weights": None}
        if "weights_backbone" in params:
            defaults["weights_backbone"] = None
        model = builder(**{**defaults, **kwargs})
    else:
        module_name, _, attr = name.partition(":")
        if not attr:
            raise ModelSpecError(f"module spec {spec!r} must look like module:package.mod:function")
        try:
            fn = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ModelSpecError(f"cannot import {module_name}:{attr}: {exc}") from exc
        model = fn(**kwargs)
        if not isinstance(model, nn.Module):
            raise ModelSpecError(f"{module_name}:{attr} returned {type(model).__name__}, "
                                 "not a torch.nn.Module")
    return model.eval()


def load_spec_checkpoint(
    path: str | os.PathLike, example_inputs: Any | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model saved by ``kcp-prune --out`` from its recorded spec and plan.

    Returns:
        ``(model, meta)`` with the pruned structure and saved weights, in eval mode.
    """
    payload = read_checkpoint(path)
    meta = payload.get("meta", {})
    if "model" not in meta:
        raise ValueError(f"{path} records no model spec; use kcp_plugin.load_pruned instead")
    model = build_from_spec(meta["model"], **meta.get("model_kwargs", {}))
    if example_inputs is None:
        shapes = meta.get("input_shapes") or []
        inputs = [torch.zeros(*s) for s in shapes]
        example_inputs = inputs[0] if len(inputs) == 1 else tuple(inputs)
    apply_plan(model, payload["kcp_plugin"], example_inputs)  # host knowledge: kcp_plugin.hosts
    model.load_state_dict(payload["state_dict"], strict=True)
    return model.eval(), meta
