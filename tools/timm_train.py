#!/usr/bin/env python
"""Train a timm model while pruning it with KCP (iterative, training-time): timm's recipe, no fork.

timm's training loop has no callbacks, so pruning during training needs a wrapper. This one runs
timm's own training code with a :class:`~kcp_plugin.integrations.timm.TimmPruningSchedule`
attached to the optimizer (an optimizer step post-hook advances it; at each pruning point the
model is pruned in place, the optimizer re-pointed with its state carried, EMA copies pruned
alike). Two ways to run timm's code:

* ``--train-script PATH/TO/train.py`` (or ``$KCP_TIMM_TRAIN_SCRIPT``): **your** timm
  ``train.py``, unchanged. timm's pip package does not ship ``train.py`` (it lives in the
  pytorch-image-models repository), so it is loaded from the path you give. The wrapper
  captures the model from ``train.py``'s ``create_model`` call and the optimizer at its first
  step, then calls ``train.main()`` with the remaining arguments. Checkpoints written by
  ``train.py`` carry the pruning plan in their state dict, so they reload with
  ``timm.create_model("kcp_pruned", base=..., checkpoint_path=...)``. ``--resume`` of a pruned
  run is not supported in this mode (``train.py`` builds its optimizer before loading).
* without it: a compact single-process loop built from timm's library pieces
  (``timm.data.create_dataset/create_loader``, ``timm.optim.create_optimizer_v2``,
  ``timm.scheduler.create_scheduler_v2``, ``timm.loss``, ``timm.utils.ModelEmaV3``,
  ``accuracy``), taking ``train.py``'s argument names and YAML config for the common options
  (listed by ``--help``). It saves ``last.pth.tar`` every epoch (state dict with plan,
  optimizer, LR scheduler, pruning schedule, EMA, random generators) and resumes exactly with
  ``--resume``.

Pruning options (``--kcp-*``) can also be set as ``kcp_*`` keys in the same YAML file
(``--config``); command-line flags win. ``start`` / ``every`` count optimizer steps.

Distillation from the dense model during the schedule (``--distill kl|cwd|l1|mse|features``,
``--distill-weight``, ``--distill-temperature``, ``--distill-layers``, ``--distill-layer-weight``,
``--distill-dca-layers``, ``--distill-config`` for any other
:class:`kcp_plugin.distill.DistillConfig` field; YAML keys ``distill``, ``distill_layers``...),
one ``DistillConfig`` for both modes. The teacher is the model before the first prune, frozen:
never in the optimizer, the EMA copy, the DDP wrapper or the checkpoints. The built-in loop
saves it once as ``teacher.pth.tar`` in the output folder and reloads it from beside the
checkpoint on ``--resume``. With ``--train-script`` the script's ``ClassificationTask`` (timm's
training task, which computes ``train.py``'s loss) is replaced in the loaded script by one that
adds the distillation terms; the teacher is copied at the first training step (after
pretrained weights and DDP's broadcast), one replica per rank. That mode refuses ``--resume``
(``train.py``'s checkpoints do not hold the teacher) and ``--kd-model-name`` (timm's own
distillation).

A latency target (``--kcp-target-latency 0.5 --kcp-latency-backend cuda --kcp-latency-dtype
bf16 --kcp-latency-batch 64``) is reached at the last pruning point; the earlier points follow
the MACs ramp (to ``--kcp-target-macs``, or to the latency ratio read as a MACs fraction), and
``--kcp-target-macs`` given as well caps the last point's MACs.

    python tools/timm_train.py --config configs/timm/resnet50_kcp.yaml --data-dir /data/imagenet
    python tools/timm_train.py --train-script ~/pytorch-image-models/train.py \\
        --config configs/timm/resnet50_kcp.yaml /data/imagenet
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import time
from typing import Any

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

_logger = logging.getLogger("timm_train")


# ---------------------------------------------------------------------- pruning options
def kcp_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("KCP pruning during training (also as kcp_* keys in the YAML)")
    g.add_argument("--train-script", default=os.environ.get("KCP_TIMM_TRAIN_SCRIPT"),
                   help="path to timm's train.py to run (default: the built-in loop)")
    g.add_argument("--kcp-importance", default="kcp", help="registered criterion (default: kcp)")
    g.add_argument("--kcp-target-macs", type=float, default=None,
                   help="fraction of MACs kept at the end; unset: train without pruning")
    g.add_argument("--kcp-num-prunes", type=int, default=4, help="pruning points (default: 4)")
    g.add_argument("--kcp-start", type=int, default=0,
                   help="optimizer step of the first pruning point (default: 0)")
    g.add_argument("--kcp-every", type=int, default=100,
                   help="optimizer steps between pruning points (default: 100)")
    g.add_argument("--kcp-ramp", default="linear",
                   help="linear | exponential | agp | asfp (default: linear)")
    g.add_argument("--kcp-mode", default="hard", help="hard | soft | decay, or SFP | SRFP | ASRFP "
                   "(default: hard)")
    g.add_argument("--kcp-importance-kwargs", default=None,
                   help="criterion arguments as a JSON / Python dict literal")
    g.add_argument("--kcp-prune-kwargs", default=None,
                   help="further kcp_plugin.prune arguments (round_to, global_pruning...) as a "
                   "dict literal")
    g.add_argument("--kcp-input-size", type=int, nargs="+", default=None,
                   help="tracing input size (C H W or one side); default: the model's")
    g.add_argument("--kcp-data-steps", type=int, default=8,
                   help="data-driven criteria (fisher, cdc, cap): training batches, the last "
                   "ones before each pruning point, to collect on (default: 8; built-in loop)")
    g.add_argument("--kcp-target-latency", type=float, default=None,
                   help="fraction of the dense latency kept at the end, measured on "
                   "--kcp-latency-backend: reached at the last pruning point, the earlier ones "
                   "follow the MACs ramp (--kcp-target-macs, if given, caps the last point's "
                   "MACs)")
    g.add_argument("--kcp-latency-backend", default=None,
                   help="where latency is measured: torch (CPU eager; default), onnxruntime, "
                   "cuda, or a dict literal of kcp_plugin.Backend fields; with "
                   "--kcp-target-macs alone, widths are rounded to its channel multiple and "
                   "each pruning point is measured")
    g.add_argument("--kcp-latency-dtype", default=None, help="fp32 | fp16 | bf16 (cuda)")
    g.add_argument("--kcp-latency-batch", type=int, default=None,
                   help="batch the latency is measured at (default: 1)")
    g.add_argument("--kcp-latency-device", default=None, help="cuda or cuda:N (cuda backend)")
    g.add_argument("--kcp-latency-threads", type=int, default=None,
                   help="CPU threads while measuring (CPU backends; default 1)")
    g.add_argument("--kcp-latency-runs", type=int, default=None,
                   help="timed passes per measurement (default 10)")
    g.add_argument("--kcp-latency-allocation", default="table",
                   help="table (per-layer widths from a latency table; default) | uniform")
    d = p.add_argument_group(
        "distillation from the dense model during the pruning schedule (also as distill* keys "
        "in the YAML)")
    d.add_argument("--distill", default=None, metavar="LOSS",
                   help="output loss: kl | cwd | l1 | mse; features (feature terms only); none "
                   "(off, whatever the other --distill-* options and the YAML say). The "
                   "teacher is the model before the first prune, frozen")
    d.add_argument("--distill-weight", type=float, default=None,
                   help="weight of the output term (default 1)")
    d.add_argument("--distill-temperature", type=float, default=None,
                   help="temperature of kl / cwd (default 1 for kl, 4 for cwd)")
    d.add_argument("--distill-layers", default=None, metavar="NAMES",
                   help="comma-separated module names distilled feature to feature, on the "
                   "teacher's kept channels (e.g. layer3,layer4)")
    d.add_argument("--distill-layer-weight", type=float, default=None,
                   help="weight of the feature term (default 1)")
    d.add_argument("--distill-dca-layers", default=None, metavar="NAMES",
                   help="comma-separated module names distilled in CDC's DCA subspace (needs "
                   "class labels)")
    d.add_argument("--distill-config", default=None, metavar="DICT",
                   help="any kcp_plugin.distill.DistillConfig fields as a JSON / Python dict "
                   "literal (dca_batches, dca_dim, num_classes...); the flags above win")
    return p


# YAML spellings of the options that match kcp_plugin.prune's argument names
_ALIASES = {"kcp_target_macs_ratio": "kcp_target_macs",
            "kcp_target_latency_ratio": "kcp_target_latency"}
_LATENCY_FIELDS = ("dtype", "batch", "device", "threads", "runs")
# the --distill* options (YAML keys of the same names) and the DistillConfig fields they set
_DISTILL_FIELDS = {"distill_weight": "weight", "distill_temperature": "temperature",
                   "distill_layers": "layers", "distill_layer_weight": "layer_weight",
                   "distill_dca_layers": "dca_layers"}
_DISTILL_DESTS = ("distill", "distill_config", *_DISTILL_FIELDS)
DISTILL_CHOICES = ("kl", "cwd", "l1", "mse", "features", "none")
"""Values of ``--distill``: an output loss, ``features`` (the feature / DCA terms alone) or
``none``."""
TEACHER_FILE = "teacher.pth.tar"
"""The teacher's weights, saved once in a distilling run's output folder (resume reads them)."""


def _literal(value: Any, what: str) -> dict[str, Any] | None:
    if value is None or isinstance(value, dict):
        return value
    try:
        out = json.loads(value)
    except ValueError:
        try:
            out = ast.literal_eval(value)
        except (ValueError, SyntaxError) as exc:
            raise SystemExit(f"{what}: not a dict literal: {value!r}") from exc
    if not isinstance(out, dict):
        raise SystemExit(f"{what}: expected a dict, got {value!r}")
    return out


def _config_path(argv: list[str]) -> str | None:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("-c", "--config", default="")
    known, _ = p.parse_known_args(argv)
    return known.config or None


def read_yaml(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    import yaml

    with open(path) as f:
        cfg = yaml.safe_load(f) or {}
    if not isinstance(cfg, dict):
        raise SystemExit(f"{path}: a YAML mapping of argument names is expected")
    return cfg


def parse_kcp(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Our options (YAML ``kcp_*`` keys as defaults), and the arguments left for timm."""
    parser = kcp_parser()
    cfg = read_yaml(_config_path(argv))
    valid = {a.dest for a in parser._actions}
    defaults = {}
    for key, value in cfg.items():
        dest = _ALIASES.get(key.replace("-", "_"), key.replace("-", "_"))
        if dest in _DISTILL_DESTS:  # not distill_loss_weight & co: train.py's own distillation
            defaults[dest] = value
        elif dest.startswith("kcp_"):
            if dest not in valid:
                raise SystemExit(f"{key}: unknown pruning option; valid: "
                                 f"{', '.join(sorted(d for d in valid if d.startswith('kcp_')))}")
            defaults[dest] = value
    parser.set_defaults(**defaults)
    kcp, rest = parser.parse_known_args(argv)
    kcp.kcp_importance_kwargs = _literal(kcp.kcp_importance_kwargs, "--kcp-importance-kwargs")
    kcp.kcp_prune_kwargs = _literal(kcp.kcp_prune_kwargs, "--kcp-prune-kwargs")
    if kcp.kcp_target_macs is not None and not 0 < kcp.kcp_target_macs <= 1:
        raise SystemExit(f"--kcp-target-macs must be in (0, 1], got {kcp.kcp_target_macs}")
    kcp.kcp_latency = latency_backend(kcp)
    kcp.distill = distill_config(kcp)
    if kcp.kcp_data_steps < 1:
        raise SystemExit(f"--kcp-data-steps must be >= 1, got {kcp.kcp_data_steps}")
    from kcp_plugin import importance_info

    try:
        importance_info(kcp.kcp_importance)
    except (KeyError, ValueError) as exc:  # the message lists the registered criteria
        raise SystemExit(f"--kcp-importance: {exc}") from None
    if kcp.kcp_input_size is not None:
        kcp.kcp_input_size = kcp.kcp_input_size[0] if len(kcp.kcp_input_size) == 1 \
            else tuple(kcp.kcp_input_size)
    return kcp, rest


def latency_backend(kcp: argparse.Namespace) -> Any:
    """The ``kcp_plugin.Backend`` of the ``--kcp-latency-*`` options (None: none given),
    checked with the latency target (the runtime itself is checked before training)."""
    from kcp_plugin.deploy.backends import as_backend
    from kcp_plugin.pruning import check_latency_arguments

    spec = kcp.kcp_latency_backend
    if isinstance(spec, str) and spec.lstrip().startswith("{"):  # fields as a dict literal
        spec = _literal(spec, "--kcp-latency-backend")
    overrides = {f: getattr(kcp, f"kcp_latency_{f}") for f in _LATENCY_FIELDS}
    given = spec is not None or any(v is not None for v in overrides.values())
    if given and not prunes(kcp):
        raise SystemExit("--kcp-latency-* options apply to a pruning run: add "
                         "--kcp-target-latency (or --kcp-target-macs)")
    try:
        backend = as_backend(spec, **overrides) if given else None
        return check_latency_arguments(
            kcp.kcp_target_latency, backend, kcp.kcp_latency_allocation,
            target_macs_ratio=kcp.kcp_target_macs, prune_kwargs=kcp.kcp_prune_kwargs,
            owner="--kcp-target-latency / --kcp-latency-*")
    except (TypeError, ValueError) as exc:
        raise SystemExit(str(exc)) from None


def _names(value: Any, what: str) -> list[str]:
    """Module names from a comma-separated string (flags) or a list (YAML)."""
    if isinstance(value, str):
        return [n.strip() for n in value.split(",") if n.strip()]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise SystemExit(f"{what}: module names, comma-separated or a YAML list, got {value!r}")


def distill_config(kcp: argparse.Namespace) -> Any:
    """The :class:`kcp_plugin.distill.DistillConfig` of the ``--distill*`` options (None: no
    distillation), checked before anything is built."""
    from kcp_plugin.distill import DistillConfig
    from kcp_plugin.hints import did_you_mean

    name = kcp.distill
    given = [f"--{dest.replace('_', '-')}" for dest in _DISTILL_FIELDS
             if getattr(kcp, dest) is not None]
    fields = dict(_literal(kcp.distill_config, "--distill-config") or {})
    if name is not None:
        name = str(name).lower()
        if name not in DISTILL_CHOICES:
            raise SystemExit(f"--distill: unknown distillation {kcp.distill!r}"
                             f"{did_you_mean(name, DISTILL_CHOICES)}; choose one of "
                             f"{', '.join(DISTILL_CHOICES)} (features: the feature terms of "
                             "--distill-layers / --distill-dca-layers alone)")
        if name == "none":  # off, whatever the other options (a YAML's, say) hold
            return None
        fields.pop("type", None)
        fields["output"] = None if name == "features" else name
    elif not fields:
        if given:
            raise SystemExit(f"{', '.join(given)} refine --distill: add --distill "
                             f"{' | '.join(DISTILL_CHOICES[:-1])}")
        return None
    for dest, field in _DISTILL_FIELDS.items():
        value = getattr(kcp, dest)
        if value is not None:
            fields[field] = _names(value, f"--{dest.replace('_', '-')}") \
                if field.endswith("layers") else value
    try:
        config = DistillConfig.from_value(fields)
    except (TypeError, ValueError) as exc:
        raise SystemExit(f"--distill: {exc}") from None
    if config.adapter:
        raise SystemExit("--distill: adapters (adapter=True) need a student of fixed width, and "
                         "the pruning schedule narrows it during training: distil the teacher's "
                         "kept channels (leave adapter out)")
    if not prunes(kcp):
        raise SystemExit("--distill distils the dense model into the model the schedule prunes: "
                         "add --kcp-target-macs or --kcp-target-latency")
    return config


def describe_distill(config: Any) -> str:
    """One line for the log: ``kl (T 1, weight 1) + features of layer4 (weight 1)``."""
    parts = []
    if config.output is not None:
        temperature = f"T {config.temperature:g}, " if config.output in ("kl", "cwd") else ""
        parts.append(f"{config.output} ({temperature}weight {config.weight:g})")
    if config.layers:
        parts.append(f"features of {', '.join(config.layers)} (weight {config.layer_weight:g})")
    if config.dca_layers:
        parts.append(f"DCA of {', '.join(config.dca_layers)} (weight {config.dca_weight:g}, "
                     f"after {config.dca_batches} batches)")
    return " + ".join(parts)


def prunes(kcp: argparse.Namespace) -> bool:
    """Whether a pruning target (MACs or latency) was asked for."""
    return kcp.kcp_target_macs is not None or kcp.kcp_target_latency is not None


def needs_batches(kcp: argparse.Namespace) -> bool:
    """Whether the criterion reads gradients or data, so the loop must hand it batches."""
    from kcp_plugin import importance_info

    return not importance_info(kcp.kcp_importance).data_free


def make_schedule(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                  kcp: argparse.Namespace, emas: list[Any], input_size: Any = None,
                  recent: Any = None, loss_fn: Any = None, ddp: Any = (),
                  teacher: torch.nn.Module | None = None) -> Any:
    """The pruning schedule; ``recent`` (a :class:`kcp_plugin.RecentBatches` of ``(inputs,
    target)``) and the training ``loss_fn`` feed gradient and data-driven criteria; with
    ``--distill`` it distils from ``teacher`` (the dense model, frozen)."""
    from kcp_plugin import criterion_arguments, importance_info
    from kcp_plugin.integrations.timm import TimmPruningSchedule, default_inputs

    x = default_inputs(model, kcp.kcp_input_size or input_size)
    x = x.to(next(model.parameters()).device)
    info = importance_info(kcp.kcp_importance)

    def loss(m: torch.nn.Module, batch: Any, reduction: str) -> torch.Tensor:
        inputs, target = batch
        if reduction == "none":  # per sample (Hessian): the training loss has no reduction
            return torch.nn.functional.cross_entropy(m(inputs), target, reduction="none")
        mean = loss_fn(m(inputs), target)
        return mean * inputs.shape[0] if reduction == "sum" else mean

    feed = criterion_arguments(info, loss, batch=lambda: list(recent)[-1],  # the latest batch
                               batches=recent, data_steps=kcp.kcp_data_steps)
    grad_loss = feed.pop("loss_fn", None)
    prune_kwargs = {**(kcp.kcp_prune_kwargs or {}), **feed}

    return TimmPruningSchedule(
        model, optimizer, kcp.kcp_importance, target_macs_ratio=kcp.kcp_target_macs,
        num_prunes=kcp.kcp_num_prunes, start=kcp.kcp_start, every=kcp.kcp_every,
        ramp=kcp.kcp_ramp, mode=kcp.kcp_mode, example_inputs=x,
        importance_kwargs=kcp.kcp_importance_kwargs, prune_kwargs=prune_kwargs,
        loss_fn=grad_loss, emas=emas, ddp=ddp, target_latency_ratio=kcp.kcp_target_latency,
        latency_backend=kcp.kcp_latency, latency_allocation=kcp.kcp_latency_allocation,
        distill=kcp.distill, teacher=teacher if kcp.distill is not None else None,
    )


def check_runtime(kcp: argparse.Namespace) -> None:
    """Before training: a latency target's runtime is there (a GPU for cuda, onnxruntime; with
    a MACs target only, kcp_plugin.prune skips the timing with a warning)."""
    if kcp.kcp_latency is None or kcp.kcp_target_latency is None:
        return
    from kcp_plugin.deploy.backends import check_backend

    try:
        check_backend(kcp.kcp_latency, imports=True)
    except (ImportError, ValueError) as exc:
        raise SystemExit(f"--kcp-latency-backend: {exc}") from None


# ---------------------------------------------------------------------- mode 1: timm's train.py
@contextlib.contextmanager
def _capture_emas(found: list[Any]):
    """Record every timm EMA wrapper created while active."""
    from timm.utils import model_ema

    classes = [getattr(model_ema, n) for n in ("ModelEma", "ModelEmaV2", "ModelEmaV3")
               if hasattr(model_ema, n)]
    originals = {cls: cls.__init__ for cls in classes}

    def wrap(cls, init):
        def __init__(self, *args, **kwargs):
            init(self, *args, **kwargs)
            if type(self) is cls:
                found.append(self)
        return __init__

    for cls, init in originals.items():
        cls.__init__ = wrap(cls, init)
    try:
        yield
    finally:
        for cls, init in originals.items():
            cls.__init__ = init


@contextlib.contextmanager
def _capture_ddp(found: list[Any], module: Any):
    """Record every ``DistributedDataParallel`` wrapper ``train.py`` creates while active.

    timm builds its wrapper inside ``ClassificationTask.prepare_distributed`` (timm 1.0.2x+;
    ``NativeDDP`` at ``train.py``'s module level before), which reads
    ``torch.nn.parallel.DistributedDataParallel`` when called, so a subclass put there sees it.
    The subclass also works around an upstream defect: timm passes ``device_ids=[device]``
    also for ``--device cpu``, which torch's DDP rejects for CPU modules (timm/task/
    classification.py ``prepare_distributed``); for CPU devices it passes none.
    """
    from torch.nn.parallel import DistributedDataParallel

    from kcp_plugin.distributed import DDP_KWARGS_ATTR

    class RecordedDDP(DistributedDataParallel):
        def __init__(self, model: torch.nn.Module, device_ids: Any = None, *args: Any,
                     **kwargs: Any):
            if device_ids and all(torch.device(d).type == "cpu" for d in device_ids):
                device_ids = None
            if args:
                raise TypeError("RecordedDDP takes DDP's options as keywords")
            super().__init__(model, device_ids, **kwargs)
            self.__dict__[DDP_KWARGS_ATTR] = {"device_ids": device_ids, **kwargs}
            found.append(self)

    parallel = torch.nn.parallel
    saved = parallel.DistributedDataParallel, getattr(module, "NativeDDP", None)
    parallel.DistributedDataParallel = RecordedDDP
    if saved[1] is not None:
        module.NativeDDP = RecordedDDP
    try:
        yield
    finally:
        parallel.DistributedDataParallel = saved[0]
        if saved[1] is not None:
            module.NativeDDP = saved[1]


def _script_args(module: Any, argv: list[str]) -> argparse.Namespace:
    """``train.py``'s own arguments, parsed as its ``_parse_args`` does (its ``parser``, YAML
    defaults from ``--config``), to refuse combinations before ``main()`` runs."""
    parser, config_parser = getattr(module, "parser", None), getattr(module, "config_parser", None)
    if not isinstance(parser, argparse.ArgumentParser):
        return argparse.Namespace()
    rest = argv
    if isinstance(config_parser, argparse.ArgumentParser):
        known, rest = config_parser.parse_known_args(argv)
        if getattr(known, "config", None):
            parser.set_defaults(**read_yaml(known.config))  # what train.py does itself
    return parser.parse_known_args(rest)[0]


def check_script_distill(module: Any, path: str, argv: list[str]) -> None:
    """Refuse ``--distill`` with a ``train.py`` it cannot serve, before ``main()`` runs.

    Raises:
        SystemExit: a ``train.py`` without timm's training tasks (``ClassificationTask``,
            timm's task API, as in 1.0.31), ``--kd-model-name`` (timm's own distillation:
            one or the other), or ``--resume`` (the teacher is not in ``train.py``'s
            checkpoints).
    """
    if not isinstance(getattr(module, "ClassificationTask", None), type):
        raise SystemExit(f"--distill with --train-script needs a train.py that computes its loss "
                         f"in timm's ClassificationTask (its task API); {path} does not: use "
                         "the built-in loop (no --train-script), or a newer train.py")
    args = _script_args(module, argv)
    if getattr(args, "kd_model_name", None):
        raise SystemExit("--distill and train.py's --kd-model-name both distil into the model; "
                         "choose one (--distill's teacher is the dense model before pruning and "
                         "follows its pruned channels)")
    if getattr(args, "resume", ""):
        raise SystemExit("--resume with --distill is not supported with --train-script: "
                         "train.py's checkpoints do not hold the teacher (the dense model before "
                         "the first prune). Run the built-in loop (no --train-script), which "
                         f"saves it as {TEACHER_FILE} and resumes exactly")


def _distilling_task(base: type, config: Any) -> type:
    """``base`` (timm's ``ClassificationTask``) whose loss also distils from the dense model.

    The teacher is copied from the student at the first training forward: after ``train.py``
    loaded pretrained weights and wrapped the model in DDP (whose construction broadcast rank
    0's weights, so every rank copies the same teacher), before the first optimizer step (so
    before any prune). It is kept in the instance's ``__dict__``: no submodule of the task,
    never in the optimizer, the EMA copy, the DDP wrapper or a checkpoint.
    """
    from kcp_plugin.distill import Distiller
    from kcp_plugin.plan import get_plan
    from kcp_plugin.stats import unwrap_model

    train_logger = logging.getLogger("train")

    class DistillingTask(base):
        def _distiller_for(self, inputs: Any) -> Any:
            distiller = self.__dict__.get("_kcp_distiller")
            if distiller is not None:
                return distiller
            if not isinstance(inputs, torch.Tensor):
                raise ValueError("--distill with --train-script distils batches of images; this "
                                 f"run feeds {type(inputs).__name__} batches (NaFlex): use the "
                                 "fixed-size loader")
            student = unwrap_model(self.get_trainable_module())
            if get_plan(student)["history"]:
                raise ValueError("--distill: the model is pruned before training; the teacher "
                                 "must be the dense model")
            import copy

            teacher = copy.deepcopy(student)
            distiller = Distiller(teacher, student, config, inputs[:1].detach())
            self.__dict__["_kcp_distiller"] = distiller
            train_logger.info("kcp_plugin: distilling from the dense model (frozen; not in the "
                              "optimizer, the EMA, DDP or the checkpoints): %s",
                              describe_distill(config))
            return distiller

        def forward(self, input: torch.Tensor, target: torch.Tensor) -> dict[str, Any]:
            distiller = self._distiller_for(input)  # its hooks before the student's forward
            result = super().forward(input, target)
            labels = None
            if config.dca_layers:
                if target.is_floating_point():
                    raise ValueError("--distill-dca-layers needs class indices; mixup / cutmix "
                                     "give soft targets: drop one or the other")
                labels = target
            terms = distiller(input, result["output"], labels)
            if terms:
                result["loss_task"] = result["loss"]
                result["loss"] = result["loss"] + sum(terms.values())
                result.update({k: v.detach() for k, v in terms.items()})
            return result

    DistillingTask.__name__ = DistillingTask.__qualname__ = f"Distilling{base.__name__}"
    return DistillingTask


def run_train_script(path: str, kcp: argparse.Namespace, argv: list[str]) -> Any:
    """Run timm's own ``train.py`` (``main()``) with the pruning schedule attached.

    Works single-process and under ``torchrun`` (the DDP wrapper ``train.py`` makes is re-made
    around the pruned model at each pruning point; every rank prunes at the same step). With
    ``--distill`` the script's ``ClassificationTask`` is replaced (in the loaded script only) by
    one that adds the distillation terms to its loss (:func:`_distilling_task`).
    """
    import kcp_plugin.integrations.timm as kt
    from kcp_plugin.plan import get_plan

    if not os.path.isfile(path):
        raise SystemExit(f"--train-script: {path} does not exist (timm's train.py is in the "
                         "pytorch-image-models repository, not in the pip package)")
    check_runtime(kcp)
    if prunes(kcp) and needs_batches(kcp):
        from kcp_plugin import importance_info, list_importances

        free = [n for n in list_importances() if importance_info(n).data_free]
        raise SystemExit(f"--kcp-importance {kcp.kcp_importance} reads gradients or data, which "
                         "the wrapper cannot take from train.py's loop; use the built-in loop "
                         f"(no --train-script) or a data-free criterion: {', '.join(free)}")
    spec = importlib.util.spec_from_file_location("timm_train_script", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    if not hasattr(module, "main") or not hasattr(module, "create_model"):
        raise SystemExit(f"{path} does not look like timm's train.py (needs main() and "
                         "create_model imported at module level)")
    original_task = getattr(module, "ClassificationTask", None)
    if kcp.distill is not None:
        check_script_distill(module, path, argv)
    state: dict[str, Any] = {}
    emas: list[Any] = []
    wrappers: list[Any] = []
    original_create = module.create_model
    original_resolve = getattr(module, "resolve_data_config", None)

    def create_model(*args: Any, **kwargs: Any) -> torch.nn.Module:
        model = original_create(*args, **kwargs)
        if "model" not in state:
            state["model"] = model
            if not model.__dict__.get("_kcp_timm_hooks"):
                name = args[0] if args else kwargs.get("model_name")
                kt.install_plan_hooks(model, base=name)
            if kcp.distill is not None and get_plan(model)["history"]:
                raise SystemExit("--distill: the model is created pruned (kcp_pruned with a "
                                 "target or plan), so the dense teacher is not there; create "
                                 "the dense model and prune during training (--kcp-target-macs)")
        return model

    def resolve_data_config(*args: Any, **kwargs: Any) -> dict[str, Any]:
        config = original_resolve(*args, **kwargs)  # the training input size traces the model
        state.setdefault("input_size", tuple(config["input_size"]))
        return config

    def on_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        model = state.get("model")
        if "schedule" in state or model is None or not prunes(kcp):
            return
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        if not any(id(p) in held for p in model.parameters()):
            return
        mine = [w for w in wrappers if any(m is model for m in w.module.modules())]
        schedule = make_schedule(model, optimizer, kcp, emas,
                                 input_size=state.get("input_size"), ddp=mine)
        schedule.attach()
        state["schedule"] = schedule
        schedule.step()  # this step counts too

    module.create_model = create_model
    if original_resolve is not None:
        module.resolve_data_config = resolve_data_config
    if kcp.distill is not None:
        module.ClassificationTask = _distilling_task(original_task, kcp.distill)
    from torch.optim.optimizer import register_optimizer_step_post_hook

    handle = register_optimizer_step_post_hook(on_step)
    argv0 = sys.argv
    sys.argv = [path, *argv]
    try:
        with _capture_emas(emas), _capture_ddp(wrappers, module):
            module.main()
    finally:
        sys.argv = argv0
        handle.remove()
        if original_task is not None:
            module.ClassificationTask = original_task
    return state.get("schedule")


# ---------------------------------------------------------------------- mode 2: built-in loop
def builtin_parser() -> argparse.ArgumentParser:
    """The subset of timm train.py's arguments the built-in loop understands (same names)."""
    from timm.utils import ParseKwargs

    p = argparse.ArgumentParser(
        description="Train a timm model with KCP pruning during training (built-in loop; "
        "pass --train-script to run timm's train.py instead).",
        parents=[kcp_parser()],
    )
    p.add_argument("-c", "--config", default="", help="YAML file of argument defaults")
    p.add_argument("data", nargs="?", default=None, metavar="DIR", help="dataset root")
    g = p.add_argument_group("timm train.py arguments")
    g.add_argument("--data-dir", default=None)
    g.add_argument("--dataset", default="", help="timm dataset name ('' = image folder)")
    g.add_argument("--train-split", default="train")
    g.add_argument("--val-split", default="validation")
    g.add_argument("--model", default="resnet50")
    g.add_argument("--pretrained", action="store_true")
    g.add_argument("--model-kwargs", nargs="*", default={}, action=ParseKwargs)
    g.add_argument("--num-classes", type=int, default=None)
    g.add_argument("--img-size", type=int, default=None)
    g.add_argument("--input-size", type=int, nargs=3, default=None)
    g.add_argument("--crop-pct", type=float, default=None)
    g.add_argument("--mean", type=float, nargs="+", default=None)
    g.add_argument("--std", type=float, nargs="+", default=None)
    g.add_argument("--interpolation", default="")
    g.add_argument("-b", "--batch-size", type=int, default=128)
    g.add_argument("-vb", "--validation-batch-size", type=int, default=None)
    g.add_argument("--opt", default="sgd")
    g.add_argument("--opt-eps", type=float, default=None)
    g.add_argument("--opt-betas", type=float, nargs="+", default=None)
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight-decay", type=float, default=2e-5)
    g.add_argument("--clip-grad", type=float, default=None)
    g.add_argument("--sched", default="cosine")
    g.add_argument("--sched-on-updates", action="store_true")
    g.add_argument("--lr", type=float, default=None)
    g.add_argument("--lr-base", type=float, default=0.1)
    g.add_argument("--lr-base-size", type=int, default=256)
    g.add_argument("--warmup-lr", type=float, default=1e-5)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--epochs", type=int, default=300)
    g.add_argument("--warmup-epochs", type=int, default=5)
    g.add_argument("--cooldown-epochs", type=int, default=0)
    g.add_argument("--decay-epochs", type=float, default=90)
    g.add_argument("--decay-rate", type=float, default=0.1)
    g.add_argument("--smoothing", type=float, default=0.1)
    g.add_argument("--no-aug", action="store_true")
    g.add_argument("--hflip", type=float, default=0.5)
    g.add_argument("--drop", type=float, default=0.0)
    g.add_argument("--drop-path", type=float, default=None)
    g.add_argument("--model-ema", action="store_true")
    g.add_argument("--model-ema-decay", type=float, default=0.9998)
    g.add_argument("-j", "--workers", type=int, default=4)
    g.add_argument("--output", default="")
    g.add_argument("--experiment", default="")
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--log-interval", type=int, default=50)
    g.add_argument("--resume", default="")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--device-modules", default=None, nargs="+",
                   help="Python modules to import before creating the model (as train.py)")
    g.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many optimizer steps (smoke tests)")
    return p


def parse_builtin(argv: list[str]) -> argparse.Namespace:
    parser = builtin_parser()
    cfg = read_yaml(_config_path(argv))
    valid = {a.dest for a in parser._actions}
    defaults = {}
    for key, value in cfg.items():
        dest = _ALIASES.get(key.replace("-", "_"), key.replace("-", "_"))
        if dest in valid:
            defaults[dest] = value
        else:
            _logger.warning("config key %r is not used by the built-in loop (run timm's "
                            "train.py with --train-script for its full option set)", key)
    parser.set_defaults(**defaults)
    args = parser.parse_args(argv)
    args.data_dir = args.data_dir or args.data
    if not args.data_dir:
        parser.error("a dataset root is required (DIR or --data-dir)")
    return args


def _checkpoint(args: argparse.Namespace, model, optimizer, lr_scheduler, schedule, model_ema,
                epoch: int, step: int, metric: float | None, distill: Any = None
                ) -> dict[str, Any]:
    """Everything a resumed run needs but the teacher, which is saved once apart
    (:data:`TEACHER_FILE`): ``kcp_distill`` names it and records the distillation settings."""
    return {
        "epoch": epoch, "step": step, "arch": args.model, "metric": metric,
        "state_dict": model.state_dict(),
        "state_dict_ema": model_ema.module.state_dict() if model_ema is not None else None,
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": lr_scheduler.state_dict() if lr_scheduler is not None else None,
        "kcp_schedule": schedule.state_dict() if schedule is not None else None,
        "kcp_distill": ({"config": distill.to_dict(), "teacher": TEACHER_FILE}
                        if distill is not None else None),
        "rng": _rng_state(),
    }


def _rng_state() -> dict[str, Any]:
    """The random generators' states (shuffling, augmentation, drop path), so that a resumed
    run draws what the uninterrupted one would have drawn."""
    import random

    import numpy as np

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any] | None) -> None:
    """Inverse of :func:`_rng_state` (checkpoints without it are left alone)."""
    if not state:
        return
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _resume_teacher(model: torch.nn.Module, path: str, resume: dict[str, Any],
                    distill: Any) -> torch.nn.Module:
    """The teacher of a resumed distilling run: the dense model (``model`` as created, before
    the checkpoint's plan is applied) with the weights saved next to the checkpoint.

    Raises:
        SystemExit: the checkpoint's run did not distil, or its teacher file is missing.
    """
    import copy

    record = resume.get("kcp_distill") or {}
    teacher_path = os.path.join(os.path.dirname(os.path.abspath(path)),
                                record.get("teacher", TEACHER_FILE))
    if not record or not os.path.isfile(teacher_path):
        why = ("its run did not distil" if not record
               else f"{teacher_path} (the teacher's weights) is missing")
        raise SystemExit(f"--resume {path} with --distill: {why}. A distilling run saves its "
                         f"teacher, the dense model before the first prune, as {TEACHER_FILE} "
                         "next to its checkpoints; resume without --distill, or put that file "
                         "back")
    if record.get("config") != distill.to_dict():
        _logger.warning("the distillation settings differ from the checkpoint's (%s): the "
                        "resumed run is not the interrupted one", record.get("config"))
    teacher = copy.deepcopy(model)
    teacher.load_state_dict(torch.load(teacher_path, map_location="cpu",
                                       weights_only=True)["state_dict"])
    return teacher


# timm.data.dataset_factory's _EVAL_SYNONYM: the folder names create_dataset accepts for a
# validation split of an image folder
_EVAL_FOLDERS = ("val", "valid", "validation", "eval", "evaluation")


def _eval_root(args: argparse.Namespace) -> str | None:
    """The root to validate on, found as timm's ``create_dataset`` finds a split folder.

    A named timm dataset (``--dataset``) gets the data root and its split. An image folder
    gets ``<root>/<val-split>``, or the first of timm's synonyms of a validation split that
    exists; without one validation is skipped with a warning (``top1`` stays unset).
    """
    if not args.val_split:
        return None
    if args.dataset and not args.dataset.startswith(("folder", "image_folder")):
        return args.data_dir
    names = [args.val_split.split("[")[0]]
    if names[0] in _EVAL_FOLDERS:
        names += [n for n in _EVAL_FOLDERS if n != names[0]]
    for name in names:
        if os.path.isdir(os.path.join(args.data_dir, name)):
            return os.path.join(args.data_dir, name)
    _logger.warning("no validation folder in %s (looked for %s): training without validation, "
                    "top1 will not be reported", args.data_dir, ", ".join(names))
    return None


def run_builtin(argv: list[str]) -> dict[str, Any]:
    """Train with a loop made of timm's library pieces; returns a summary."""
    import timm
    import timm.data
    import yaml
    from timm.loss import LabelSmoothingCrossEntropy
    from timm.optim import create_optimizer_v2, optimizer_kwargs
    from timm.scheduler import create_scheduler_v2, scheduler_kwargs
    from timm.utils import (
        AverageMeter,
        ModelEmaV3,
        accuracy,
        dispatch_clip_grad,
        get_outdir,
        random_seed,
        update_summary,
    )

    import kcp_plugin
    import kcp_plugin.integrations.timm as kt

    args = parse_builtin(argv)
    kcp, _ = parse_kcp(argv)
    check_runtime(kcp)
    for name in args.device_modules or ():  # as train.py: e.g. a device or model plug-in
        importlib.import_module(name)
    random_seed(args.seed)  # as train.py: torch, numpy and random (timm augmentations)
    device = torch.device(args.device)
    model_kwargs = dict(args.model_kwargs or {})
    for key, value in (("num_classes", args.num_classes), ("drop_rate", args.drop),
                       ("drop_path_rate", args.drop_path), ("img_size", args.img_size)):
        if value is not None:
            model_kwargs.setdefault(key, value)
    model = timm.create_model(args.model, pretrained=args.pretrained, **model_kwargs)
    if not model.__dict__.get("_kcp_timm_hooks"):
        kt.install_plan_hooks(model, base=args.model, base_kwargs=model_kwargs,
                              input_size=kcp.kcp_input_size)
    distill, teacher, teacher_source = kcp.distill, None, None
    if distill is not None and kcp_plugin.get_plan(model)["history"]:
        raise SystemExit("--distill: the model is created pruned (kcp_pruned with a target or "
                         "plan), so the dense teacher is not there; create the dense model and "
                         "prune during training (--kcp-target-macs)")
    resume = None
    if args.resume:  # the plan in the state dict rebuilds the pruned structure first
        resume = torch.load(args.resume, map_location="cpu", weights_only=True)
        if distill is not None:  # the dense model, before the checkpoint prunes it
            teacher = _resume_teacher(model, args.resume, resume, distill)
            teacher_source = os.path.join(os.path.dirname(os.path.abspath(args.resume)),
                                          resume["kcp_distill"].get("teacher", TEACHER_FILE))
        elif resume.get("kcp_distill"):
            _logger.warning("the checkpoint's run distilled from its dense model; this one does "
                            "not (add the same --distill options to continue it)")
        model.load_state_dict(resume["state_dict"])
    elif distill is not None:  # the teacher: the dense model as it starts training
        import copy

        teacher = copy.deepcopy(model)
    if teacher is not None:
        from kcp_plugin.distill import frozen_teacher

        teacher = frozen_teacher(teacher.to(device))
    model.to(device)

    data_config = timm.data.resolve_data_config(vars(args), model=model)
    train_set = timm.data.create_dataset(args.dataset, root=args.data_dir,
                                         split=args.train_split, is_training=True,
                                         batch_size=args.batch_size)
    loader_kw = dict(input_size=data_config["input_size"], mean=data_config["mean"],
                     std=data_config["std"], interpolation=data_config["interpolation"],
                     num_workers=args.workers, device=device, use_prefetcher=False,
                     persistent_workers=False)
    train_loader = timm.data.create_loader(train_set, batch_size=args.batch_size,
                                           is_training=True, no_aug=args.no_aug,
                                           hflip=args.hflip, **loader_kw)
    val_loader = None
    val_root = _eval_root(args)
    if val_root is not None:
        val_set = timm.data.create_dataset(args.dataset, root=val_root,
                                           split=args.val_split, is_training=False,
                                           batch_size=args.batch_size)
        val_loader = timm.data.create_loader(
            val_set, batch_size=args.validation_batch_size or args.batch_size,
            is_training=False, crop_pct=data_config["crop_pct"], **loader_kw)

    if args.lr is None:  # train.py's rule: lr = lr_base * batch / lr_base_size
        args.lr = args.lr_base * args.batch_size / args.lr_base_size
    optimizer = create_optimizer_v2(model, **optimizer_kwargs(cfg=args))
    lr_scheduler, num_epochs = create_scheduler_v2(optimizer, **scheduler_kwargs(args),
                                                   updates_per_epoch=len(train_loader))
    model_ema = ModelEmaV3(model, decay=args.model_ema_decay) if args.model_ema else None
    loss_fn = (LabelSmoothingCrossEntropy(args.smoothing) if args.smoothing
               else torch.nn.CrossEntropyLoss()).to(device)
    schedule = None
    recent = None
    if prunes(kcp):
        if needs_batches(kcp):
            recent = kcp_plugin.RecentBatches(kcp.kcp_data_steps, owner="timm_train")
        schedule = make_schedule(model, optimizer, kcp, [model_ema] if model_ema else [],
                                 input_size=data_config["input_size"], recent=recent,
                                 loss_fn=loss_fn, teacher=teacher).attach()
    start_epoch, step = 0, 0
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        if resume.get("lr_scheduler") and lr_scheduler is not None:
            lr_scheduler.load_state_dict(resume["lr_scheduler"])
        if schedule is not None and resume.get("kcp_schedule"):
            schedule.load_state_dict(resume["kcp_schedule"])
        if model_ema is not None and resume.get("state_dict_ema"):
            model_ema.module.load_state_dict(resume["state_dict_ema"])
        start_epoch, step = int(resume["epoch"]) + 1, int(resume["step"])
        rng = resume.get("rng")

    x = kt.default_inputs(model, kcp.kcp_input_size or data_config["input_size"]).to(device)
    # the dense baseline is the unpruned architecture, also for a model pruned at creation
    # (kcp_pruned with target_macs_ratio / plan) or resumed pruned
    macs_dense = (schedule.scheduler.macs_dense if schedule is not None
                  else kt.dense_macs(model, x))
    exp_name = args.experiment or "-".join([
        time.strftime("%Y%m%d-%H%M%S"), args.model, str(data_config["input_size"][-1])])
    output = get_outdir(args.output or "./output/train", exp_name)
    with open(os.path.join(output, "args.yaml"), "w") as f:
        yaml.safe_dump(vars(args), f, default_flow_style=False)
    teacher_path = None
    if teacher is not None:  # saved once per run folder, never in the checkpoints
        teacher_path = os.path.join(output, TEACHER_FILE)
        if teacher_source is None or not (os.path.exists(teacher_path)
                                          and os.path.samefile(teacher_source, teacher_path)):
            torch.save({"state_dict": teacher.state_dict(), "arch": args.model,
                        "model_kwargs": model_kwargs, "distill": distill.to_dict()},
                       teacher_path)
        _logger.info("distilling from the dense model (%s, saved in %s): %s", args.model,
                     teacher_path, describe_distill(distill))
    if resume is not None:
        _set_rng_state(rng)  # the draws the uninterrupted run makes from here on
    top1 = best = None
    t_start = time.time()
    for epoch in range(start_epoch, num_epochs):
        model.train()
        losses = AverageMeter()
        distill_m = AverageMeter()
        for i, (inputs, target) in enumerate(train_loader):
            inputs, target = inputs.to(device), target.to(device)
            if recent is not None and not schedule.finished:
                recent.add((inputs.detach(), target.detach()))  # for the next pruning point
            logits = model(inputs)
            loss = loss_fn(logits, target)
            total = loss
            if teacher is not None:
                terms = schedule.distill_loss(inputs, logits, target)
                total = loss + sum(terms.values())
                distill_m.update(sum(float(v.detach()) for v in terms.values()), inputs.size(0))
            optimizer.zero_grad()
            total.backward()
            if args.clip_grad is not None:
                dispatch_clip_grad(model.parameters(), args.clip_grad)
            optimizer.step()  # the pruning schedule runs here (optimizer post-hook)
            step += 1
            if model_ema is not None:
                model_ema.update(model, step=step)
            lr_scheduler.step_update(num_updates=step)
            losses.update(loss.item(), inputs.size(0))
            if i % args.log_interval == 0:
                _logger.info("epoch %d [%d/%d] loss %.4f%s lr %.3g", epoch, i, len(train_loader),
                             losses.avg, f" distill {distill_m.avg:.4f}" if teacher is not None
                             else "", optimizer.param_groups[0]["lr"])
            if args.max_steps is not None and step >= args.max_steps:
                break
        if val_loader is not None:
            model.eval()
            meter = AverageMeter()
            with torch.no_grad():
                for inputs, target in val_loader:
                    inputs, target = inputs.to(device), target.to(device)
                    acc1 = accuracy(model(inputs), target, topk=(1,))[0]
                    meter.update(acc1.item(), inputs.size(0))
            top1 = meter.avg
        lr_scheduler.step(epoch + 1, top1)
        last = os.path.join(output, "last.pth.tar")
        torch.save(_checkpoint(args, model, optimizer, lr_scheduler, schedule, model_ema, epoch,
                               step, top1, distill), last)
        if top1 is not None and (best is None or top1 > best):  # timm's CheckpointSaver names
            best = top1
            shutil.copyfile(last, os.path.join(output, "model_best.pth.tar"))
        macs = kcp_plugin.count_macs_params(model, x)[0]
        train_row = {"loss": losses.avg, "macs_kept": macs / macs_dense}
        if teacher is not None:
            train_row["distill_loss"] = distill_m.avg
        update_summary(epoch, train_row,
                       {"top1": top1} if top1 is not None else {},
                       os.path.join(output, "summary.csv"),
                       lr=optimizer.param_groups[0]["lr"], write_header=epoch == start_epoch)
        _logger.info("epoch %d done: loss %.4f%s top1 %s MACs kept %.3f", epoch, losses.avg,
                     f" distill {distill_m.avg:.4f}" if teacher is not None else "",
                     f"{top1:.2f}" if top1 is not None else "-", macs / macs_dense)
        if args.max_steps is not None and step >= args.max_steps:
            break
    macs, params = kcp_plugin.count_macs_params(model, x)
    summary = {
        "model": args.model, "model_kwargs": model_kwargs, "steps": step,
        "pruned_at_steps": schedule.pruned_at if schedule is not None else [],
        "macs_dense": macs_dense, "macs": macs, "macs_ratio": macs / macs_dense,
        "params": params, "top1": top1, "best_top1": best,
        "latency": schedule.latency if schedule is not None else None,
        "distill": distill.to_dict() if distill is not None else None,
        "teacher": teacher_path,
        "checkpoint": os.path.join(output, "last.pth.tar"), "output": output,
        "seconds": time.time() - t_start,
    }
    with open(os.path.join(output, "kcp_summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    import kcp_plugin.integrations.timm  # noqa: F401  registers kcp_pruned for both modes

    kcp, rest = parse_kcp(argv)
    if kcp.train_script:
        # train.py sets up logging itself (utils.setup_default_logging): a handler of ours
        # as well would print every line twice
        run_train_script(kcp.train_script, kcp, rest)
    else:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        summary = run_builtin(argv)
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
