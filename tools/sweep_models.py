#!/usr/bin/env python
"""Prunability sweep: prune many timm / torchvision models to half their MACs and check them.

For every model spec and criterion, a freshly built (random-weight) model is pruned with
``kcp_plugin.prune(model, x, criterion, target_macs_ratio=0.5)`` and checked:

* every output keeps its shape (dict / tuple outputs: each value) and stays finite;
* the MACs kept are within ``--tolerance`` of the target;
* ``save_pruned`` then ``load_pruned(builder, path, x)`` rebuilds a model whose eval-mode outputs
  are ``torch.equal`` to the pruned model's.

Exceptions are caught per model and criterion; the error type, message and the last traceback
frame inside kcp_plugin / torch_pruning are recorded. A spec may carry its own input size as
``SPEC@SIZE`` (e.g. ``timm:vit_tiny_patch16_224@224``); others use ``--size``.

By default (``--path core``) every model, timm's included, is pruned as a user of the core API
would: ``kcp_plugin.prune`` (which applies the timm integration's knowledge itself) and
``save_pruned`` / ``load_pruned`` with the plain builder. With ``--path timm``, timm models go
through the timm integration (``prune_timm_model``) and their round trip is the timm user's
one: the state dict (which carries the plan) is saved as a timm checkpoint and reloaded with
``timm.create_model("kcp_pruned", base=NAME, checkpoint_path=...)``. For timm models
``reset_classifier`` is checked as well. Each row is classified ``ok``, ``refused`` (a
ValueError / TypeError raised by kcp_plugin, model untouched), ``crash`` (any other exception),
``timeout`` or ``check failed``.

``--timm-registry`` sweeps a built-in selection of timm architectures across families (see
``--list-timm``), with a baseline row per model: torch-pruning's own magnitude pruner used the
way its timm examples do (uniform channel ratio 0.3, classifier ignored, qkv head counts given
and head attributes updated), with no kcp_plugin code involved.

Three more libraries have their own spec prefixes and a built-in selection (``--registry``, see
``--list-registry``), all built with random weights and nothing downloaded:

* ``smp:ARCH/ENCODER`` (segmentation-models-pytorch, ``encoder_weights=None``), e.g.
  ``smp:FPN/mobilenet_v2``; kwargs go to the architecture's constructor;
* ``hf:CLASS`` (transformers), e.g. ``hf:ViTForImageClassification``, built from its
  ``*Config`` class with the kwargs (a nested ``backbone_config`` is a dict with its
  ``model_type``; a pretrained backbone is never requested); the outputs checked and protected
  are ``logits`` (and ``pred_boxes`` / ``pred_masks`` where the model returns them);
* ``yolo:NAME.yaml`` (Ultralytics, AGPL-3.0) from its packaged model YAML
  (``YOLO(NAME).model``, ``RTDETR(NAME).model`` for ``rtdetr-*``); the predictions
  ``model(x)[0]`` are the outputs.

None of them is a dependency of kcp_plugin, and none is installed in the project's environment:
``--install-extras DIR`` pip-installs the pinned packages the selected specs need into ``DIR``
(``pip install --no-deps --target DIR``, with tokenizers for transformers; every other
dependency is the environment's own) and puts
``DIR`` on ``sys.path`` for this run only; ``--extras-path DIR`` reuses such a folder.

    python tools/sweep_models.py --threads 2 --json sweep.json
    python tools/sweep_models.py --models torchvision:resnet18,timm:convnext_atto --criteria kcp
    python tools/sweep_models.py --timm-registry all --json timm.json --markdown timm.md
    python tools/sweep_models.py --timm-registry vit,swin,resnet --criteria kcp
    python tools/sweep_models.py --registry smp,hf,yolo --criteria kcp --threads 1 \
        --install-extras /tmp/sweep_extras --json extras.json --markdown extras.md
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import importlib
import importlib.metadata
import inspect
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
import torch_pruning as tp

import kcp_plugin
from kcp_plugin.zoo import ModelSpecError, build_from_spec

DEFAULT_MODELS = (
    "torchvision:resnet18",
    "torchvision:resnext50_32x4d",
    "torchvision:mobilenet_v2",
    "torchvision:mobilenet_v3_small",
    "torchvision:efficientnet_b0",
    "torchvision:regnet_x_400mf",
    "torchvision:convnext_tiny",
    "torchvision:shufflenet_v2_x0_5",
    "torchvision:lraspp_mobilenet_v3_large",
    "torchvision:fcn_resnet50",
    "torchvision:deeplabv3_resnet50",
    "timm:resnet18",
    "timm:resnext26ts",
    "timm:efficientnet_b0",
    "timm:mobilenetv3_small_100",
    "timm:convnext_atto",
    "timm:regnetx_002",
    "timm:vit_tiny_patch16_224@224",
    "timm:deit_tiny_patch16_224@224",
    "timm:swin_tiny_patch4_window7_224@224",
    "timm:edgenext_xx_small",
)
# Slow (~5 min for l2 + kcp on 2 shared cores: every dense layer consumes all earlier channels,
# so each group has dozens of members); run with --models default,extra.
EXTRA_MODELS = ("torchvision:densenet121",)
ALIASES = {"default": DEFAULT_MODELS, "extra": EXTRA_MODELS}
DEFAULT_CRITERIA = ("l2", "kcp")
OUR_CODE = ("kcp_plugin", "torch_pruning")
BASELINE = "tp"  # pseudo-criterion: torch-pruning's own magnitude pruner, no kcp_plugin code
BASELINE_RATIO = 0.3  # uniform channel ratio: about half the MACs on most models

# (family, timm name, input side, model kwargs). The smallest variant of each family; small
# inputs where the architecture allows (img_size for fixed-size transformers), which changes
# no layer width, only the cost of tracing.
TIMM_REGISTRY: tuple[tuple[str, str, int, dict[str, Any]], ...] = (
    ("resnet", "resnet18", 64, {}),
    ("resnet", "resnet50", 64, {}),
    ("resnext", "resnext26ts", 64, {}),
    ("resnext", "seresnext26d_32x4d", 64, {}),
    ("regnet", "regnetx_002", 64, {}),
    ("regnet", "regnety_002", 64, {}),
    ("efficientnet", "efficientnet_b0", 64, {}),
    ("efficientnet", "efficientnetv2_rw_t", 64, {}),
    ("efficientnet", "mixnet_s", 64, {}),
    ("mobilenet", "mobilenetv2_050", 64, {}),
    ("mobilenet", "mobilenetv3_small_050", 64, {}),
    ("mobilenet", "mobilenetv4_conv_small", 64, {}),
    ("mobilenet", "lcnet_050", 64, {}),
    ("convnext", "convnext_atto", 64, {}),
    ("convnext", "convnextv2_atto", 64, {}),
    ("vit", "vit_tiny_patch16_224", 64, {"img_size": 64}),
    ("vit", "vit_small_patch16_224", 64, {"img_size": 64}),
    ("deit", "deit_tiny_patch16_224", 64, {"img_size": 64}),
    ("deit", "deit_tiny_distilled_patch16_224", 64, {"img_size": 64}),
    ("swin", "swin_tiny_patch4_window7_224", 128, {"img_size": 128, "window_size": 4}),
    ("swin", "swinv2_tiny_window8_256", 128, {"img_size": 128, "window_size": 4}),
    ("edgenext", "edgenext_xx_small", 64, {}),
    ("densenet", "densenet121", 64, {}),
    ("dla", "dla34", 64, {}),
    ("dpn", "dpn48b", 64, {}),
    ("ghostnet", "ghostnet_050", 64, {}),
    ("hgnet", "hgnetv2_b0", 64, {}),
    ("cspnet", "cspresnet50", 64, {}),
    ("vovnet", "ese_vovnet19b_dw", 64, {}),
    ("rexnet", "rexnet_100", 64, {}),
    ("res2net", "res2net50_14w_8s", 64, {}),
    ("resnest", "resnest14d", 64, {}),
    ("sknet", "skresnet18", 64, {}),
    ("selecsls", "selecsls42b", 64, {}),
    ("byobnet", "repvgg_a0", 64, {}),
    ("byobnet", "mobileone_s0", 64, {}),
    ("fastvit", "fastvit_t8", 64, {}),
    ("levit", "levit_128s", 64, {"img_size": 64}),
    ("efficientformer", "efficientformerv2_s0", 64, {"img_size": 64}),
    ("metaformer", "poolformerv2_s12", 64, {}),
    ("metaformer", "convformer_s18", 64, {}),
    ("mobilevit", "mobilevit_xxs", 64, {}),
    ("mobilevit", "mobilevitv2_050", 64, {}),
    ("pvt", "pvt_v2_b0", 64, {}),
    ("cait", "cait_xxs24_224", 64, {"img_size": 64}),
    ("xcit", "xcit_nano_12_p16_224", 64, {"img_size": 64}),
    ("mlp_mixer", "mixer_s32_224", 64, {"img_size": 64}),
    ("mlp_mixer", "resmlp_12_224", 64, {"img_size": 64}),
    ("mlp_mixer", "gmlp_ti16_224", 64, {"img_size": 64}),
    ("efficientvit", "efficientvit_b0", 64, {}),
    ("efficientvit", "efficientvit_m0", 64, {"img_size": 64}),
    ("maxxvit", "coatnet_nano_rw_224", 64, {"img_size": 64}),
    ("pit", "pit_ti_224", 64, {"img_size": 64}),
    ("visformer", "visformer_tiny", 64, {"img_size": 64}),
    ("nfnet", "nf_regnet_b0", 64, {}),
    ("inception", "inception_v3", 96, {}),
    ("hrnet", "hrnet_w18_small", 64, {}),
    ("byobnet", "gernet_s", 64, {}),
    ("focalnet", "focalnet_tiny_srf", 64, {}),
    ("davit", "davit_tiny", 64, {}),
    ("inception_next", "inception_next_atto", 64, {}),
    ("starnet", "starnet_s050", 64, {}),
    ("repvit", "repvit_m0_9", 64, {}),
    ("fasternet", "fasternet_t0", 64, {}),
    ("mambaout", "mambaout_femto", 64, {}),
    ("eva", "eva02_tiny_patch14_224", 56, {"img_size": 56, "num_classes": 10}),
    ("convit", "convit_tiny", 64, {"img_size": 64}),
    ("tresnet", "tresnet_m", 64, {}),
    # At their full input size: the nets issue 25 (kind 6) timed at minutes per prune.
    ("tnt", "tnt_s_patch16_224", 224, {}),
    ("twins", "twins_svt_small", 224, {}),
    ("crossvit", "crossvit_tiny_240", 240, {}),
    # from a newcomer trial (issue 25): refused (NextViT) and 80 s (Sequencer2D) before
    ("nextvit", "nextvit_small", 64, {}),
    ("sequencer", "sequencer2d_s", 64, {}),
)


class ExtraLibrary(NamedTuple):
    """A model library the sweep can use without it being a dependency of kcp_plugin."""

    module: str  # what ``import`` needs
    packages: tuple[str, ...]  # pip requirements, pinned to the versions swept
    license: str


# Pinned to the versions the documented sweep ran with. Installed with --no-deps: every
# dependency they import (torch, torchvision, timm, huggingface_hub, safetensors, numpy,
# opencv-python, matplotlib, pyyaml, requests, psutil...) is already in the project's
# environment, except tokenizers, which transformers imports for any model class. Installing
# transformers with its dependencies would replace filelock with a version nni refuses.
EXTRA_LIBRARIES: dict[str, ExtraLibrary] = {
    "smp": ExtraLibrary("segmentation_models_pytorch",
                        ("segmentation-models-pytorch==0.6.0",), "MIT"),
    "hf": ExtraLibrary("transformers", ("transformers==5.25.0", "tokenizers==0.23.3"),
                       "Apache-2.0"),
    "yolo": ExtraLibrary("ultralytics", ("ultralytics==8.4.190",), "AGPL-3.0"),
}
AGPL_NOTICE = (
    "NOTE: Ultralytics is licensed under AGPL-3.0. It is installed into {dir} for this sweep "
    "only and is never a dependency of kcp_plugin; using it in your own work brings in the "
    "AGPL-3.0 terms."
)

_SMP_ARCHS = ("FPN", "Unet", "DeepLabV3Plus")
_SMP_ENCODERS = ("resnet18", "mobilenet_v2", "efficientnet-b0", "tu-convnext_atto", "mit_b0")
_HF_RESNET = {"embedding_size": 32, "hidden_sizes": [32, 64, 128, 256], "depths": [1, 1, 1, 1],
              "layer_type": "basic"}

# (library, spec, input side, kwargs, note). smp: every architecture with every encoder, 5
# classes. transformers: small configs (a few layers, narrow), the smallest input the
# architecture allows without changing a width. YOLO: the packaged YAMLs, 80 classes.
EXTRA_REGISTRY: tuple[tuple[str, str, int, dict[str, Any], str], ...] = (
    *(("smp", f"smp:{arch}/{enc}", 64, {"classes": 5}, "")
      for arch in _SMP_ARCHS for enc in _SMP_ENCODERS),
    ("hf", "hf:ResNetForImageClassification", 64, {**_HF_RESNET, "num_labels": 10},
     "basic blocks, widths 32-256, depths 1-1-1-1"),
    ("hf", "hf:ViTForImageClassification", 64,
     {"image_size": 64, "patch_size": 8, "hidden_size": 96, "num_hidden_layers": 4,
      "num_attention_heads": 4, "intermediate_size": 384, "num_labels": 10},
     "patch 8, hidden 96, 4 layers x 4 heads"),
    ("hf", "hf:ConvNextForImageClassification", 64,
     {"hidden_sizes": [32, 64, 128, 256], "depths": [1, 1, 2, 1], "num_labels": 10},
     "widths 32-256, depths 1-1-2-1"),
    ("hf", "hf:SwinForImageClassification", 128,
     {"image_size": 128, "patch_size": 4, "embed_dim": 32, "depths": [1, 1, 2, 1],
      "num_heads": [1, 2, 4, 8], "window_size": 4, "num_labels": 10},
     "embed 32, depths 1-1-2-1, window 4"),
    ("hf", "hf:DetrForObjectDetection", 128,
     {"use_timm_backbone": False, "use_pretrained_backbone": False,
      "backbone_config": {"model_type": "resnet", **_HF_RESNET, "out_features": ["stage4"]},
      "d_model": 64, "encoder_layers": 2, "decoder_layers": 2, "encoder_attention_heads": 4,
      "decoder_attention_heads": 4, "encoder_ffn_dim": 128, "decoder_ffn_dim": 128,
      "num_queries": 10, "num_labels": 5},
     "transformers ResNet backbone (32-256), d_model 64, 2+2 layers, 10 queries"),
    ("hf", "hf:SegformerForSemanticSegmentation", 64,
     {"hidden_sizes": [16, 32, 64, 128], "depths": [1, 1, 1, 1],
      "num_attention_heads": [1, 2, 4, 8], "decoder_hidden_size": 64, "num_labels": 5},
     "widths 16-128, depths 1-1-1-1, decoder 64"),
    ("hf", "hf:MobileViTForImageClassification", 64,
     {"image_size": 64, "hidden_sizes": [64, 80, 96],
      "neck_hidden_sizes": [16, 16, 24, 48, 64, 80, 320], "num_labels": 10},
     "XXS widths"),
    ("hf", "hf:Dinov2ForImageClassification", 56,
     {"image_size": 56, "patch_size": 14, "hidden_size": 96, "num_hidden_layers": 4,
      "num_attention_heads": 4, "num_labels": 10},
     "patch 14, hidden 96, 4 layers x 4 heads"),
    ("yolo", "yolo:yolov8n.yaml", 128, {}, "detect"),
    ("yolo", "yolo:yolov8n-seg.yaml", 128, {}, "segment"),
    ("yolo", "yolo:yolov8n-pose.yaml", 128, {}, "pose"),
    ("yolo", "yolo:yolov8n-cls.yaml", 64, {}, "classify"),
    ("yolo", "yolo:yolov8n-obb.yaml", 128, {}, "oriented boxes"),
    ("yolo", "yolo:yolo11n.yaml", 128, {}, "detect"),
    ("yolo", "yolo:yolov10n.yaml", 128, {}, "detect, NMS-free"),
    ("yolo", "yolo:yolov6n.yaml", 128, {}, "detect"),
    ("yolo", "yolo:yolo12n.yaml", 128, {}, "detect, area attention"),
    ("yolo", "yolo:yolo26n.yaml", 128, {}, "detect"),
    ("yolo", "yolo:rtdetr-l.yaml", 128, {}, "RT-DETR detect"),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Prune each model to a MACs target with each criterion; check output "
        "shapes, finiteness, MACs and the save/load round trip.",
    )
    p.add_argument("--models", default=None,
                   help="comma-separated specs (SOURCE:NAME[@SIZE]) or the aliases 'default' "
                   f"({len(DEFAULT_MODELS)} torchvision and timm models) and 'extra' "
                   f"({', '.join(EXTRA_MODELS)}); default: default, unless --timm-registry "
                   "or --registry")
    p.add_argument("--timm-registry", metavar="FAMILIES", default=None,
                   help="sweep the built-in timm selection: 'all', or comma-separated families "
                   "and/or model names (see --list-timm)")
    p.add_argument("--list-timm", action="store_true",
                   help="print the built-in timm selection (family, model, input, kwargs)")
    p.add_argument("--registry", metavar="LIBS", default=None,
                   help="sweep the built-in smp / transformers / Ultralytics selection: 'all', "
                   "or comma-separated libraries (smp, hf, yolo) and/or specs (see "
                   "--list-registry)")
    p.add_argument("--list-registry", action="store_true",
                   help="print the built-in smp / transformers / Ultralytics selection")
    p.add_argument("--install-extras", metavar="DIR", default=None,
                   help="pip-install the libraries the selected smp: / hf: / yolo: specs need "
                   "(pinned, --no-deps) into DIR and use them for this run only; Ultralytics "
                   "is AGPL-3.0 and never a dependency of kcp_plugin")
    p.add_argument("--extras-path", metavar="DIR", default=None,
                   help="put DIR (filled by an earlier --install-extras) on sys.path, without "
                   "installing anything")
    p.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=None,
                   help=f"add the '{BASELINE}' row (torch-pruning alone, uniform ratio "
                   f"{BASELINE_RATIO}); default: on for --timm-registry")
    p.add_argument("--path", choices=("core", "timm"), default="core",
                   help="how timm models are pruned: 'core' (default) as a user of the core "
                   "API would (kcp_plugin.prune, save_pruned / load_pruned with the plain "
                   "builder), 'timm' through the timm integration (prune_timm_model, a "
                   "train.py-style checkpoint reloaded with timm.create_model('kcp_pruned', "
                   "checkpoint_path=...))")
    p.add_argument("--criteria", default=",".join(DEFAULT_CRITERIA),
                   help=f"comma-separated registry names (default: {','.join(DEFAULT_CRITERIA)})")
    p.add_argument("--size", type=int, default=64,
                   help="input side for specs without @SIZE (default: 64)")
    p.add_argument("--batch", type=int, default=1, help="input batch size (default: 1)")
    p.add_argument("--target", type=float, default=0.5,
                   help="target_macs_ratio (default: 0.5)")
    p.add_argument("--tolerance", type=float, default=0.02,
                   help="allowed |MACs kept - target| (default: 0.02)")
    p.add_argument("--timeout", type=int, default=300,
                   help="seconds per model and criterion before giving up (default: 300)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads(N)")
    p.add_argument("--seed", type=int, default=0, help="seed for weights and inputs")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--markdown", metavar="PATH", help="also write the markdown table to PATH")
    p.add_argument("--show-warnings", action="store_true",
                   help="show torch-pruning's 'Unwrapped parameters detected' warnings "
                   "(hidden by default: convnext layer_scale triggers one per trial)")
    return p.parse_args(argv)


def expand_models(value: str) -> list[str]:
    items = []
    for item in (m.strip() for m in value.split(",")):
        if item:
            items.extend(ALIASES.get(item, (item,)))
    return items


def parse_spec(item: str, size: int) -> tuple[str, int]:
    """``SOURCE:NAME@SIZE`` -> ``(SOURCE:NAME, SIZE)``; without ``@SIZE`` the default size."""
    spec, sep, s = item.strip().partition("@")
    return spec, int(s) if sep else size


def extra_source(spec: str) -> str | None:
    """The extra library prefix of a spec (``smp``, ``hf``, ``yolo``), or None."""
    source = spec.partition(":")[0]
    return source if source in EXTRA_LIBRARIES else None


def split_extra_spec(spec: str) -> tuple[str, tuple[str, ...]]:
    """Check an ``smp:`` / ``hf:`` / ``yolo:`` spec's form without importing anything.

    Args:
        spec: ``smp:ARCH/ENCODER``, ``hf:CLASS`` or ``yolo:NAME.yaml``.

    Returns:
        ``(source, parts)``: ``("smp", (ARCH, ENCODER))``, ``("hf", (CLASS,))`` or
        ``("yolo", (NAME.yaml,))``.

    Raises:
        ModelSpecError: not one of these prefixes, or a malformed name.
    """
    source, _, name = spec.partition(":")
    if source == "smp":
        arch, _, encoder = name.partition("/")
        if not arch or not encoder or "/" in encoder:
            raise ModelSpecError(f"smp spec {spec!r} must look like smp:ARCH/ENCODER "
                                 "(e.g. smp:FPN/mobilenet_v2)")
        return source, (arch, encoder)
    if source == "hf":
        if not name.isidentifier():
            raise ModelSpecError(f"transformers spec {spec!r} must look like hf:CLASS "
                                 "(e.g. hf:ViTForImageClassification)")
        return source, (name,)
    if source == "yolo":
        if not name.endswith((".yaml", ".yml")) or "/" in name:
            raise ModelSpecError(
                f"Ultralytics spec {spec!r} must name a packaged model YAML, e.g. "
                "yolo:yolov8n.yaml (a .pt name would download weights)")
        return source, (name,)
    raise ModelSpecError(f"{spec!r} is not an extra-library spec; prefixes: "
                         f"{', '.join(s + ':' for s in EXTRA_LIBRARIES)}")


def require_extra(source: str) -> Any:
    """Import an extra library, or raise a ``ModelSpecError`` saying how to get it."""
    lib = EXTRA_LIBRARIES[source]
    try:
        return importlib.import_module(lib.module)
    except ImportError as exc:
        raise ModelSpecError(
            f"{source}: specs need {lib.module}, which is not installed (it is no dependency "
            f"of kcp_plugin; {lib.license}): run the sweep with --install-extras DIR, which "
            f"pip-installs {' '.join(lib.packages)} into DIR for the sweep only") from exc


def _build_smp(arch: str, encoder: str, kwargs: dict[str, Any]) -> torch.nn.Module:
    smp = require_extra("smp")
    cls = getattr(smp, arch, None)
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        raise ModelSpecError(f"segmentation_models_pytorch has no architecture {arch!r}")
    return cls(encoder_name=encoder, **{**kwargs, "encoder_weights": None})


def _build_hf(name: str, kwargs: dict[str, Any]) -> torch.nn.Module:
    transformers = require_extra("hf")
    try:
        cls = getattr(transformers, name)
    except (AttributeError, ImportError) as exc:
        raise ModelSpecError(f"transformers has no model class {name!r}: {exc}") from exc
    config_cls = getattr(cls, "config_class", None)
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)) or config_cls is None:
        raise ModelSpecError(f"transformers.{name} is not a model class with a config_class")
    kwargs = dict(kwargs)
    backbone = kwargs.get("backbone_config")
    if isinstance(backbone, dict):
        backbone = dict(backbone)
        model_type = backbone.pop("model_type", None)
        if model_type not in transformers.CONFIG_MAPPING:
            raise ModelSpecError(f"backbone_config needs a known model_type, not {model_type!r}")
        kwargs["backbone_config"] = transformers.CONFIG_MAPPING[model_type](**backbone)
    config = config_cls(**kwargs)
    if getattr(config, "use_pretrained_backbone", False):
        config.use_pretrained_backbone = False  # nothing downloaded
    return cls(config)


def _build_yolo(name: str, kwargs: dict[str, Any]) -> torch.nn.Module:
    if kwargs:
        raise ModelSpecError(f"yolo:{name} takes no kwargs (the YAML defines the model)")
    # Before ultralytics is imported: no online checks, settings not written to ~/.config.
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_VERBOSE", "False")
    os.environ.setdefault("YOLO_CONFIG_DIR", os.path.join(tempfile.gettempdir(),
                                                          "kcp_sweep_ultralytics"))
    ultralytics = require_extra("yolo")
    cls = ultralytics.RTDETR if name.startswith("rtdetr") else ultralytics.YOLO
    try:
        return cls(name).model
    except FileNotFoundError as exc:
        raise ModelSpecError(f"Ultralytics packages no model YAML {name!r}: {exc}") from exc


def build_model(entry: dict[str, Any]) -> torch.nn.Module:
    """A fresh random-weight model for a sweep entry, in eval mode (any spec prefix)."""
    spec, kwargs = entry["spec"], entry["kwargs"]
    if extra_source(spec) is None:
        return build_from_spec(spec, **kwargs)
    source, parts = split_extra_spec(spec)
    if source == "smp":
        model = _build_smp(*parts, kwargs)
    elif source == "hf":
        model = _build_hf(*parts, kwargs)
    else:
        model = _build_yolo(*parts, kwargs)
    return model.eval()


HF_OUTPUTS = ("logits", "pred_boxes", "pred_masks")


def hf_outputs(model: torch.nn.Module, x: torch.Tensor) -> Any:
    """A transformers model's predictions: ``logits`` (and boxes / masks where returned)."""
    out = model(pixel_values=x)
    found = tuple(out[k] for k in HF_OUTPUTS if out.get(k) is not None)
    return found[0] if len(found) == 1 else found


def yolo_outputs(model: torch.nn.Module, x: torch.Tensor) -> Any:
    """An Ultralytics model's predictions in eval mode (not the feature maps beside them)."""
    return model(x)[0]


def forward_fn_for(spec: str) -> Callable[[torch.nn.Module, Any], Any] | None:
    """The ``forward_fn`` passed to ``prune`` and used for the checks (None: ``model(x)``)."""
    return {"hf": hf_outputs, "yolo": yolo_outputs}.get(extra_source(spec) or "")


def pip_command(target: str, sources: Sequence[str]) -> list[str]:
    """The pip command that installs the given extra libraries into ``target``."""
    packages = [p for s in EXTRA_LIBRARIES if s in sources for p in EXTRA_LIBRARIES[s].packages]
    return [sys.executable, "-m", "pip", "install", "--no-deps", "--upgrade", "--target",
            os.path.abspath(target), *packages]


def use_extras_path(target: str) -> None:
    """Put ``target`` first on ``sys.path`` (it holds only the extra libraries)."""
    path = os.path.abspath(target)
    if not os.path.isdir(path):
        raise SystemExit(f"--extras-path: {path} is not a folder")
    if path not in sys.path:
        sys.path.insert(0, path)
    importlib.invalidate_caches()


def install_extras(target: str, sources: Sequence[str],
                   run: Callable[..., Any] | None = None) -> list[str] | None:
    """pip-install the libraries for ``sources`` into ``target`` and put it on ``sys.path``.

    Args:
        target: Folder for ``pip install --target``; created by pip if missing.
        sources: Extra-library prefixes the sweep needs (``smp``, ``hf``, ``yolo``).
        run: Runs the command (default: ``subprocess.run``, looked up at call time).

    Returns:
        The pip command run, or None if no selected spec needs an extra library.
    """
    if not sources:
        print("--install-extras: no smp: / hf: / yolo: spec selected, nothing installed",
              file=sys.stderr)
        return None
    if "yolo" in sources:
        print(AGPL_NOTICE.format(dir=os.path.abspath(target)), file=sys.stderr)
    cmd = pip_command(target, sources)
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    (run or subprocess.run)(cmd, check=True)
    os.makedirs(target, exist_ok=True)
    use_extras_path(target)
    return cmd


def named_tensors(out: Any, prefix: str = "out") -> dict[str, torch.Tensor]:
    """Flatten a model output (tensor, dict, tuple/list, nested) into named tensors."""
    if isinstance(out, torch.Tensor):
        return {prefix: out}
    items: list[tuple[Any, Any]] = []
    if isinstance(out, dict):
        items = list(out.items())
    elif isinstance(out, (tuple, list)):
        items = list(enumerate(out))
    found: dict[str, torch.Tensor] = {}
    for k, v in items:
        found.update(named_tensors(v, f"{prefix}[{k!r}]"))
    return found


def _frame(f: traceback.FrameSummary) -> str:
    name = f.filename
    if not os.path.relpath(name).startswith(".."):
        name = os.path.relpath(name)
    for p in (*OUR_CODE, "timm", "torchvision", "torch"):
        i = name.rfind(f"{os.sep}{p}{os.sep}")
        if i >= 0:
            name = name[i + 1:]
            break
    return f"{name}:{f.lineno} in {f.name}"


def last_frame(exc: BaseException, ours_only: bool = True) -> str | None:
    """``file:line in function`` of the innermost frame (in kcp_plugin or torch_pruning)."""
    frames = traceback.extract_tb(exc.__traceback__)
    if ours_only:
        frames = [f for f in frames if any(f"{os.sep}{p}{os.sep}" in f.filename for p in OUR_CODE)]
    return _frame(frames[-1]) if frames else None


def _raised_in_plugin(exc: BaseException) -> bool:
    """Whether the innermost frame of ``exc`` is kcp_plugin's own code."""
    frames = traceback.extract_tb(exc.__traceback__)
    marker = f"{os.sep}kcp_plugin{os.sep}"
    return bool(frames) and marker in os.path.abspath(frames[-1].filename)


def describe_error(exc: BaseException, stage: str) -> dict[str, Any]:
    err = {
        "stage": stage,
        "type": type(exc).__name__,
        "message": str(exc).strip().splitlines()[0][:300] if str(exc).strip() else "",
        "where": last_frame(exc),
        "innermost": last_frame(exc, ours_only=False),
        "raised_in_plugin": _raised_in_plugin(exc),
        "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
    }
    cause = exc.__cause__ or exc.__context__
    if cause is not None:
        err["cause"] = {
            "type": type(cause).__name__,
            "message": str(cause).strip()[:300],
            "where": last_frame(cause),
        }
    return err


class TimeLimitExceeded(BaseException):
    """A row ran past ``--timeout``.

    A ``BaseException``, as ``KeyboardInterrupt``: ``kcp_plugin.prune`` treats any
    ``Exception`` raised while pruning as a broken prune and bisects for the responsible group
    before re-raising, which would run well past the limit.
    """


@contextlib.contextmanager
def time_limit(seconds: int):
    """Raise ``TimeLimitExceeded`` in the main thread after ``seconds`` (POSIX; else no limit)."""
    if seconds <= 0 or not hasattr(signal, "SIGALRM"):
        yield
        return

    def handler(signum, frame):
        raise TimeLimitExceeded(f"gave up after {seconds} s")

    old = signal.signal(signal.SIGALRM, handler)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def registry_entries(selection: str) -> list[dict[str, Any]]:
    """Entries of :data:`TIMM_REGISTRY` selected by family or model name (or ``all``)."""
    wanted = {w.strip() for w in selection.split(",") if w.strip()}
    families = {f for f, *_ in TIMM_REGISTRY}
    names = {n for _, n, *_ in TIMM_REGISTRY}
    unknown = sorted(wanted - families - names - {"all"})
    if unknown:
        raise SystemExit(f"--timm-registry: unknown {', '.join(unknown)}; valid: all, families "
                         f"{', '.join(sorted(families))}, or model names (see --list-timm)")
    return [
        {"spec": f"timm:{name}", "size": size, "kwargs": dict(kwargs), "family": family}
        for family, name, size, kwargs in TIMM_REGISTRY
        if "all" in wanted or family in wanted or name in wanted
    ]


def extra_registry_entries(selection: str) -> list[dict[str, Any]]:
    """Entries of :data:`EXTRA_REGISTRY` selected by library, spec (or ``all``)."""
    wanted = {w.strip() for w in selection.split(",") if w.strip()}
    specs = {spec for _, spec, *_ in EXTRA_REGISTRY}
    unknown = sorted(wanted - set(EXTRA_LIBRARIES) - specs - {"all"})
    if unknown:
        raise SystemExit(f"--registry: unknown {', '.join(unknown)}; valid: all, libraries "
                         f"{', '.join(EXTRA_LIBRARIES)}, or specs (see --list-registry)")
    return [
        {"spec": spec, "size": size, "kwargs": copy.deepcopy(kwargs), "family": lib,
         "note": note}
        for lib, spec, size, kwargs, note in EXTRA_REGISTRY
        if "all" in wanted or lib in wanted or spec in wanted
    ]


def model_entries(args: argparse.Namespace) -> list[dict[str, Any]]:
    """What to sweep: ``--models`` specs, then ``--timm-registry``, then ``--registry``."""
    entries = []
    registry = getattr(args, "registry", None)
    models = args.models if args.models is not None else (
        None if args.timm_registry or registry else "default")
    if models:
        for item in expand_models(models):
            spec, size = parse_spec(item, args.size)
            entries.append({"spec": spec, "size": size, "kwargs": {}, "family": None})
    if args.timm_registry:
        entries.extend(registry_entries(args.timm_registry))
    if registry:
        entries.extend(extra_registry_entries(registry))
    return entries


def label(entry: dict[str, Any]) -> str:
    """``timm:vit_tiny_patch16_224 (img_size=64)``; an entry's note replaces long kwargs."""
    if entry.get("note"):
        return f"{entry['spec']} ({entry['note']})"
    kw = ", ".join(f"{k}={v}" for k, v in entry["kwargs"].items())
    return f"{entry['spec']} ({kw})" if kw else entry["spec"]


def _timm_name(spec: str) -> str | None:
    return spec.split(":", 1)[1] if spec.startswith("timm:") else None


def baseline_prune(model: torch.nn.Module, x: torch.Tensor) -> float:
    """torch-pruning alone, as its timm examples use it; returns the fraction of MACs kept.

    Magnitude (L2) importance, uniform channel ratio, the classifier ignored, qkv layers
    registered with their head counts and the attention modules' head attributes updated
    afterwards. No kcp_plugin code is involved.
    """
    heads = {m.qkv: m.num_heads for m in model.modules()
             if isinstance(getattr(m, "qkv", None), torch.nn.Linear)
             and isinstance(getattr(m, "num_heads", None), int)}
    clf = model.get_classifier() if hasattr(model, "get_classifier") else None
    ignored = [clf] if isinstance(clf, torch.nn.Module) else []
    macs0 = tp.utils.count_ops_and_params(model, x)[0]
    pruner = tp.pruner.MetaPruner(
        model, x, importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=BASELINE_RATIO, ignored_layers=ignored, num_heads=heads,
        in_channel_groups={}, out_channel_groups={},
    )
    pruner.step()
    for m in model.modules():
        qkv = getattr(m, "qkv", None)
        if qkv in pruner.num_heads:
            m.num_heads = pruner.num_heads[qkv]
            head_dim = qkv.out_features // (3 * m.num_heads)
            for attr, value in (("head_dim", head_dim), ("scale", head_dim**-0.5),
                                ("attn_dim", head_dim * m.num_heads)):
                if hasattr(m, attr):
                    setattr(m, attr, value)
    model.eval()
    return tp.utils.count_ops_and_params(model, x)[0] / macs0


def check_one(base: torch.nn.Module, entry: dict[str, Any], x: torch.Tensor, criterion: str,
              args: argparse.Namespace, workdir: str) -> dict[str, Any]:
    """Prune a copy of ``base`` with ``criterion`` and run every check."""
    timm_name = _timm_name(entry["spec"])
    forward_fn = forward_fn_for(entry["spec"])
    outputs = forward_fn or (lambda m, inputs: m(inputs))
    row: dict[str, Any] = {"criterion": criterion, "ok": False}
    stage = "forward (original)"
    t0 = time.perf_counter()
    try:
        with time_limit(args.timeout):
            model = copy.deepcopy(base).eval()
            with torch.no_grad():
                before = named_tensors(outputs(model, x))
            stage = "prune"
            if criterion == BASELINE:
                row["macs_ratio"] = baseline_prune(model, x)
            elif timm_name is not None and args.path == "timm":
                from kcp_plugin.integrations.timm import prune_timm_model

                report = prune_timm_model(model, criterion, example_inputs=x,
                                          target_macs_ratio=args.target,
                                          macs_tolerance=args.tolerance, progress=False)
            else:
                report = kcp_plugin.prune(model, x, criterion, target_macs_ratio=args.target,
                                          macs_tolerance=args.tolerance, progress=False,
                                          forward_fn=forward_fn)
            row["prune_s"] = time.perf_counter() - t0
            if criterion != BASELINE:
                row["macs_ratio"] = report.macs_ratio
                row["params_ratio"] = report.params_ratio
                row["pruning_ratio"] = report.pruning_ratio
                row["search_trials"] = len(report.search)
                row["protected"] = len(report.protected)
                row["macs_ok"] = abs(report.macs_ratio - args.target) <= args.tolerance
            stage = "forward (pruned)"
            model.eval()
            with torch.no_grad():
                after = named_tensors(outputs(model, x))
            row["shape_ok"] = list(before) == list(after) and all(
                before[k].shape == after[k].shape for k in before
            )
            if not row["shape_ok"]:
                row["shapes"] = {
                    k: [list(before[k].shape), list(after[k].shape) if k in after else None]
                    for k in before
                }
            row["finite_ok"] = all(bool(torch.isfinite(v).all()) for v in after.values())
            checks = ["shape_ok", "finite_ok"]
            if criterion != BASELINE:
                stage = "save/load"
                loaded = _round_trip(model, entry, x, workdir, args.path)
                with torch.no_grad():
                    again = named_tensors(outputs(loaded, x))
                row["roundtrip_ok"] = list(after) == list(again) and all(
                    torch.equal(after[k], again[k]) for k in after
                )
                same_shapes = list(after) == list(again) and all(
                    after[k].shape == again[k].shape for k in after
                )
                if not row["roundtrip_ok"] and same_shapes:
                    row["roundtrip_max_abs_diff"] = max(
                        float((after[k] - again[k]).abs().max()) for k in after
                    )
                checks += ["macs_ok", "roundtrip_ok"]
                if timm_name is not None:
                    stage = "reset_classifier"
                    from kcp_plugin.integrations.timm import check_reset_classifier

                    check_reset_classifier(model, x)
                    row["reset_ok"] = True
            row["ok"] = all(row[k] for k in checks)
    except (Exception, TimeLimitExceeded) as exc:
        row["error"] = describe_error(exc, stage)
        row["untouched"] = stage == "prune" and _same_state(base, model)
    row["time_s"] = time.perf_counter() - t0
    row["status"] = classify(row)
    return row


def _same_state(base: torch.nn.Module, model: Any) -> bool:
    """Whether ``model`` (a copy of ``base``) still has exactly ``base``'s tensors."""
    if not isinstance(model, torch.nn.Module):
        return True  # failed before the copy existed
    a, b = base.state_dict(), model.state_dict()
    return a.keys() == b.keys() and all(
        a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)


def _plugin_error(exc_info: dict[str, Any]) -> bool:
    """Raised by kcp_plugin itself: a ValueError / TypeError (or subclass) whose raising frame
    is in kcp_plugin (not a torch / torch-pruning error passed through)."""
    plugin_types = {"ValueError", "TypeError", "UnprunableError", "TargetUnreachable",
                    "UnsupportedModelError"}
    return exc_info["type"] in plugin_types and bool(exc_info.get("raised_in_plugin"))


def classify(row: dict[str, Any]) -> str:
    """``ok``, ``refused`` (the plugin's own error, model untouched), ``timeout``, ``crash``
    (any other exception), ``check failed`` (it ran, a check did not pass) or ``not built``
    (the model could not be built: no row ran)."""
    if "error" in row:
        e = row["error"]
        if e["type"] == "TimeLimitExceeded":
            return "timeout"
        if e["stage"] == "build":
            return "not built"
        if e["stage"] == "prune" and row.get("untouched") and _plugin_error(e):
            return "refused"
        return "crash"
    return "ok" if row["ok"] else "check failed"


def _round_trip(model: torch.nn.Module, entry: dict[str, Any], x: torch.Tensor,
                workdir: str, how: str = "core") -> torch.nn.Module:
    """Save the pruned model and rebuild it the way its users would."""
    path = os.path.join(workdir, "pruned.pt")
    timm_name = _timm_name(entry["spec"])
    if timm_name is None or how == "core":
        kcp_plugin.save_pruned(model, path)
        # no forward_fn: the replay follows the saved plan (README, "Models that return ...")
        return kcp_plugin.load_pruned(lambda: build_model(entry), path, x).eval()
    import timm

    from kcp_plugin.integrations.timm import install_plan_hooks

    # A timm checkpoint as train.py writes it; the state dict carries the plan.
    install_plan_hooks(model, base=timm_name, base_kwargs=entry["kwargs"],
                       input_size=tuple(x.shape[1:]))
    torch.save({"state_dict": model.state_dict(), "arch": "kcp_pruned"}, path)
    return timm.create_model("kcp_pruned", base=timm_name, input_size=tuple(x.shape[1:]),
                             checkpoint_path=path, **entry["kwargs"]).eval()


def sweep(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if not args.show_warnings:
        warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
        warnings.filterwarnings("ignore", category=UserWarning, module="timm")
    criteria = [c.strip() for c in args.criteria.split(",") if c.strip()]
    for c in criteria:
        kcp_plugin.get_importance(c)  # fail fast on a typo
    entries = model_entries(args)
    baseline = args.baseline if args.baseline is not None else bool(args.timm_registry)
    with open(inspect.getsourcefile(kcp_plugin.KCPImportance), "rb") as f:
        fingerprint = hashlib.sha256(f.read()).hexdigest()[:12]  # which KCP version ran
    results: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    meta = {
        "target_macs_ratio": args.target, "tolerance": args.tolerance,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "torch_pruning": tp.__version__, "timm": _version("timm"),
        "python": platform.python_version(), "kcp_source_sha256": fingerprint,
        "criteria": criteria, "baseline": baseline, "baseline_ratio": BASELINE_RATIO,
        "path": args.path,
        "extras": {lib.module: _dist_version(lib.packages[0]) for s, lib in
                   EXTRA_LIBRARIES.items() if any(extra_source(e["spec"]) == s
                                                  for e in entries)},
    }
    with tempfile.TemporaryDirectory() as workdir:
        for entry in entries:
            spec, size = entry["spec"], entry["size"]
            out: dict[str, Any] = {"model": spec, "label": label(entry), "size": size,
                                   "kwargs": entry["kwargs"], "family": entry["family"],
                                   "source": spec.partition(":")[0], "rows": []}
            t0 = time.perf_counter()
            try:
                torch.manual_seed(args.seed)
                base = build_model(entry)
                out["params"] = sum(p.numel() for p in base.parameters())
            except Exception as exc:
                out["error"] = describe_error(exc, "build")
                base = None
            if base is not None:
                x = torch.randn(args.batch, 3, size, size,
                                generator=torch.Generator().manual_seed(args.seed))
                names = ([BASELINE] if baseline else []) + criteria
                for c in names:
                    out["rows"].append(check_one(base, entry, x, c, args, workdir))
                    print(f"  {out['label']} [{c}]: {summary(out['rows'][-1])}",
                          file=sys.stderr, flush=True)
            out["time_s"] = time.perf_counter() - t0
            results.append(out)
            # written after every model, so an interrupted sweep keeps what it measured
            write_outputs({**meta, "wall_s": time.perf_counter() - t_start,
                           "results": results}, args)
    return {**meta, "wall_s": time.perf_counter() - t_start, "results": results}


def write_outputs(result: dict[str, Any], args: argparse.Namespace) -> str:
    """Write ``--json`` / ``--markdown`` (if given); returns the markdown text."""
    text = markdown(result)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, default=str)
    return text


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def _dist_version(requirement: str) -> str | None:
    """Installed version of a pip requirement's distribution (found on ``sys.path``)."""
    name = requirement.split("==")[0]
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _mark(v: Any) -> str:
    return "-" if v is None else ("yes" if v else "**no**")


CHECKS = ("macs_ok", "shape_ok", "finite_ok", "roundtrip_ok")


def summary(row: dict[str, Any]) -> str:
    if "error" in row:
        e = row["error"]
        status = row.get("status") or classify(row)
        return f"{status} at {e['stage']}: {e['type']}: {e['message'][:120]}"
    if row["ok"]:
        return f"ok (MACs {row['macs_ratio']:.3f}, {row['time_s']:.1f} s)"
    bad = [k[:-3] for k in CHECKS if k in row and not row[k]]
    return f"check failed: {', '.join(bad)} (MACs {row['macs_ratio']:.3f})"


def markdown(result: dict[str, Any]) -> str:
    extras = "".join(f", {k} {v or 'not installed'}"
                     for k, v in (result.get("extras") or {}).items())
    lines = [
        f"target_macs_ratio {result['target_macs_ratio']} (tolerance {result['tolerance']}), "
        f"{result['threads']} threads, torch {result['torch']}, "
        f"torch-pruning {result['torch_pruning']}, timm {result.get('timm')}{extras}, "
        f"kcp.py sha256 {result['kcp_source_sha256']}",
        "",
        "| model | input | criterion | result | MACs kept | params kept | shape | finite "
        "| round trip | reset head | time (s) |",
        "|---|---:|---|---|---:|---:|---|---|---|---|---:|",
    ]
    failures = []
    for entry in result["results"]:
        rows = entry["rows"] or [{"criterion": "-", "error": entry.get("error"), "time_s": 0.0}]
        for row in rows:
            status = row.get("status") or classify(row)
            if "error" in row:
                e = row["error"]
                if status == "crash":
                    status = f"**crash** ({e['stage']}): {e['type']}"
                elif status == "not built":
                    status = f"**not built**: {e['type']}"
                failures.append((entry.get("label", entry["model"]), row["criterion"], e))
            elif status != "ok":
                status = f"**{status}**"
            macs = f"{row['macs_ratio']:.3f}" if "macs_ratio" in row else "-"
            params = f"{row['params_ratio']:.3f}" if "params_ratio" in row else "-"
            lines.append(
                f"| {entry.get('label', entry['model'])} | {entry['size']} | {row['criterion']} "
                f"| {status} | {macs} | {params} | {_mark(row.get('shape_ok'))} "
                f"| {_mark(row.get('finite_ok'))} | {_mark(row.get('roundtrip_ok'))} "
                f"| {_mark(row.get('reset_ok'))} | {row['time_s']:.1f} |"
            )
    n_ok = sum(r.get("ok", False) for e in result["results"] for r in e["rows"]
               if r["criterion"] != BASELINE)
    n_all = sum(max(len([r for r in e["rows"] if r["criterion"] != BASELINE]), 1)
                for e in result["results"])
    counts: dict[str, int] = {}
    by_source: dict[str, dict[str, int]] = {}
    for e in result["results"]:
        rows = [r for r in e["rows"] if r["criterion"] != BASELINE]
        if not rows and e.get("error"):
            rows = [{"criterion": "-", "error": e["error"]}]
        source = by_source.setdefault(e.get("source") or e["model"].partition(":")[0], {})
        for r in rows:
            key = r.get("status") or classify(r)
            counts[key] = counts.get(key, 0) + 1
            source[key] = source.get(key, 0) + 1
    lines += ["", f"{n_ok}/{n_all} model-criterion pairs passed every check ("
              + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
              + f"); wall time {result.get('wall_s', 0):.0f} s"]
    if len(by_source) > 1:
        lines += [""] + [f"* {name}: " + ", ".join(f"{k} {v}" for k, v in sorted(c.items()))
                         for name, c in by_source.items()]
    if result.get("baseline"):
        lines += ["", floor_summary(result)]
    if failures:
        lines += ["", "Errors:", ""]
        for model, crit, e in failures:
            where = f" at `{e['where']}`" if e.get("where") else ""
            if e.get("innermost") and e["innermost"] != e.get("where"):
                where += f" (raised in `{e['innermost']}`)"
            lines.append(f"* {model} [{crit}], {e['stage']}: `{e['type']}: {e['message']}`"
                         f"{where}")
            cause = e.get("cause")
            if cause:
                cwhere = f" at `{cause['where']}`" if cause.get("where") else ""
                msg = cause["message"].splitlines()[0] if cause["message"] else ""
                lines.append(f"  * caused by `{cause['type']}: {msg}`{cwhere}")
    return "\n".join(lines)


def floor_summary(result: dict[str, Any]) -> str:
    """Models the baseline prunes, and whether every kcp_plugin criterion handles them too."""
    handled, regressions, fixed, refused = 0, [], [], []
    for entry in result["results"]:
        rows = {r["criterion"]: r for r in entry["rows"]}
        if BASELINE not in rows:
            continue
        ours = [r for c, r in rows.items() if c != BASELINE]
        base_ok = rows[BASELINE].get("ok", False)
        ours_ok = bool(ours) and all(r.get("ok", False) for r in ours)
        name = entry.get("label", entry["model"])
        if base_ok:
            handled += 1
            if not ours_ok:
                regressions.append(name)
        elif ours_ok:
            fixed.append(name)
        elif any((r.get("status") or classify(r)) == "refused" for r in ours):
            refused.append(name)
    lines = [f"torch-pruning alone handles {handled} models; kcp_plugin fails on "
             f"{len(regressions)} of them" + (f" ({', '.join(regressions)})" if regressions
                                              else ""),
             f"kcp_plugin handles {len(fixed)} models torch-pruning alone does not"
             + (f": {', '.join(fixed)}" if fixed else ""),
             f"refused with a stated cause: {len(refused)}"
             + (f" ({', '.join(refused)})" if refused else "")]
    return "\n".join(f"* {line}" for line in lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list_timm:
        for family, name, size, kwargs in TIMM_REGISTRY:
            print(f"{family:16s} {name:36s} {size:4d} {kwargs or ''}")
        return 0
    if args.list_registry:
        for lib, spec, size, kwargs, note in EXTRA_REGISTRY:
            print(f"{lib:5s} {spec:40s} {size:4d} {note + ': ' if note else ''}{kwargs}")
        return 0
    if not 0 < args.target <= 1 or math.isnan(args.target):
        raise SystemExit("--target must be in (0, 1]")
    if args.extras_path:
        use_extras_path(args.extras_path)
    if args.install_extras:
        needed = {extra_source(e["spec"]) for e in model_entries(args)} - {None}
        install_extras(args.install_extras, sorted(needed))
    result = sweep(args)
    print(write_outputs(result, args))
    ok = all(r.get("ok", False) for e in result["results"] for r in e["rows"]
             if r["criterion"] != BASELINE)
    ok = ok and all(e["rows"] for e in result["results"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
