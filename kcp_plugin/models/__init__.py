"""Small benchmark models and a tiny name registry.

==================  ==============================  =================================
name                model                           ``forward`` returns
==================  ==============================  =================================
``deeplabv3_lite``  :class:`DeepLabV3Lite`          logits ``[B, num_classes, H, W]``
``fcn_lite``        :class:`FCNLite`                logits ``[B, num_classes, H, W]``
``stereo_lite``     :class:`StereoNetLite`          disparity ``[B, H, W]``
``resnet20``        :func:`cifar_resnet` depth 20   logits ``[B, num_classes]``
``resnet56``        :func:`cifar_resnet` depth 56   logits ``[B, num_classes]``
==================  ==============================  =================================

:func:`final_layer` returns the output layer of a model (the module to pass to a pruner's
``ignored_layers``) and :func:`example_inputs` a tracing input (a tuple ``(left, right)``
for the stereo model, so trace it with ``forward_fn=lambda m, x: m(*x)``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from .classification import CifarResNet, cifar_resnet
from .mtcnn import ONet, PNet, RNet, load_mtcnn, mtcnn_normalize
from .segmentation import ASPP, BasicBlock, DeepLabV3Lite, FCNLite
from .stereo import StereoNetLite

__all__ = [
    "ASPP",
    "BasicBlock",
    "CifarResNet",
    "DeepLabV3Lite",
    "FCNLite",
    "ONet",
    "PNet",
    "RNet",
    "StereoNetLite",
    "build_model",
    "cifar_resnet",
    "example_inputs",
    "final_layer",
    "list_models",
    "load_mtcnn",
    "model_task",
    "mtcnn_normalize",
]

_REGISTRY: dict[str, tuple[Callable[..., nn.Module], str, dict]] = {
    "deeplabv3_lite": (DeepLabV3Lite, "segmentation", {"num_classes": 5}),
    "fcn_lite": (FCNLite, "segmentation", {"num_classes": 5}),
    "stereo_lite": (StereoNetLite, "stereo", {}),
    "resnet20": (cifar_resnet, "classification", {"depth": 20}),
    "resnet56": (cifar_resnet, "classification", {"depth": 56}),
}

_DEFAULT_SIZES = {
    "segmentation": (64, 64),
    "stereo": (64, 128),
    "classification": (32, 32),
}


def list_models() -> list[str]:
    """Return the registered model names, sorted."""
    return sorted(_REGISTRY)


def _entry(name: str) -> tuple[Callable[..., nn.Module], str, dict]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown model {name!r}; valid names: {', '.join(list_models())}"
        ) from None


def model_task(name: str) -> str:
    """Return the task of a registered model.

    Args:
        name: A name from :func:`list_models`.

    Returns:
        ``"segmentation"``, ``"stereo"`` or ``"classification"``.

    Raises:
        ValueError: If ``name`` is not registered.
    """
    return _entry(name)[1]


def build_model(name: str, **kwargs) -> nn.Module:
    """Instantiate a registered model.

    Args:
        name: A name from :func:`list_models`.
        **kwargs: Constructor arguments overriding the registry defaults (segmentation
            models default to ``num_classes=5``; ``resnet20`` / ``resnet56`` fix ``depth``).

    Returns:
        The freshly initialised model (in training mode).

    Raises:
        ValueError: If ``name`` is not registered.
    """
    factory, _, defaults = _entry(name)
    if "depth" in defaults and "depth" in kwargs:
        raise ValueError(f"{name!r} has a fixed depth; use cifar_resnet() for other depths")
    return factory(**{**defaults, **kwargs})


def example_inputs(
    name: str,
    batch: int = 1,
    size: int | tuple[int, int] | None = None,
    in_chans: int = 3,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Random example input suitable for tracing / op counting a registered model.

    Args:
        name: A name from :func:`list_models`.
        batch: Batch size.
        size: ``(H, W)`` or a single int for square inputs; defaults to 64x64 for
            segmentation, 64x128 for stereo and 32x32 for classification.
        in_chans: Image channels (must match the model's ``in_chans``).

    Returns:
        A ``[batch, in_chans, H, W]`` tensor, or a ``(left, right)`` tuple of such tensors
        for the stereo model.

    Raises:
        ValueError: If ``name`` is not registered.
    """
    task = _entry(name)[1]
    if size is None:
        size = _DEFAULT_SIZES[task]
    elif isinstance(size, int):
        size = (size, size)
    gen = torch.Generator().manual_seed(0)
    shape = (batch, in_chans, int(size[0]), int(size[1]))
    if task == "stereo":
        return torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    return torch.randn(shape, generator=gen)


def final_layer(model: nn.Module) -> nn.Module:
    """Return the output layer of a benchmark model.

    This is the layer whose output channels are the classes (or the single score channel
    of the stereo model), i.e. the one to put in a pruner's ``ignored_layers``.

    Args:
        model: A model built by :func:`build_model` (or one of the model classes).

    Returns:
        ``model.classifier`` for segmentation and stereo models, ``model.fc`` for ResNets.

    Raises:
        ValueError: If the model has neither attribute.
    """
    for attr in ("classifier", "fc"):
        layer = getattr(model, attr, None)
        if isinstance(layer, nn.Module):
            return layer
    raise ValueError(f"{type(model).__name__} has no 'classifier' or 'fc' output layer")
