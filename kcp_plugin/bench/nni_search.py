"""NNI experiment: search pruning settings on the benchmark tasks.

An NNI hyper-parameter experiment (local mode, built-in tuners such as TPE) whose trials prune a
dense benchmark model (:mod:`kcp_plugin.bench` tasks), fine-tune it and report accuracy with
MACs. The search space (``configs/nni/search_space*.json``) may contain:

* ``criterion``: a registered criterion (:func:`kcp_plugin.list_importances`);
* ``target_macs``: fraction of MACs kept (:func:`kcp_plugin.prune` searches the channel ratio),
  **or** ``ratio_<stage>``: the channel pruning ratio of every conv / linear layer under the
  model's top-level module ``<stage>`` (:func:`task_stages` lists them); MACs then follow;
* ``target_latency``: fraction of the dense model's *latency* kept, measured on the
  experiment's latency backend (``SearchSettings.latency``, or the ``latency:`` section of the
  experiment config): each trial prunes to it with :func:`kcp_plugin.prune`'s latency target
  instead of a MACs target (``target_macs`` beside it is a MACs budget on top);
* ``finetune_lr``, ``finetune_steps``: fine-tuning after the prune (AdamW, cosine schedule);
* ``distill``: distillation from the trial's dense model during the fine-tuning
  (:func:`distill_config`): ``none``, an output loss (``kl``, ``cwd``, ``l1``, ``mse``), and /
  or ``features`` (kept-channel feature MSE) and ``dca`` (CDC's DCA subspace) at the
  experiment's ``distill_layers`` (default: the stage before the output layer), joined by
  ``+``: ``kl+features``; with ``distill_weight`` / ``distill_temperature`` (output term).

Each trial reports the task metric every ``report_every`` fine-tuning steps (intermediate
results, so NNI's assessors can stop bad trials early) and a final result
``{"default": metric, "macs_ratio": ..., "distill": ..., ...}``. With a latency backend (or
a latency target) every trial also measures its pruned model against the dense one on that
backend (:func:`kcp_plugin.compare_latency`, through :func:`kcp_plugin.prune`) and reports
``latency_ratio`` (latency kept) with the setting that measured it
(:meth:`kcp_plugin.Backend.describe`: hardware, runtime, dtype, batch, threads); trials then run
one at a time by default, since concurrent trials would slow each other's measurements.
:func:`run_search` trains the dense model once, runs the experiment and writes
``results.json``, ``summary.md`` (best trials and the accuracy-vs-MACs Pareto front, and the
accuracy-vs-latency front when latency was measured), ``accuracy_vs_macs.png`` and
``accuracy_vs_latency.png``. With ``log`` (``tools/nni_search.py``
passes one) it reports as it goes: dense-training progress (a tqdm bar on a terminal, otherwise a
line every tenth of the steps), the dense model against a constant prediction
(:func:`constant_baseline`: background everywhere, for segmentation), and one line per finished
trial (:func:`format_trial`: NNI's trial number and id, status, metric, MACs kept, parameters),
the table NNI's web UI shows. :func:`quick_settings` is the smallest search whose trials can be
ranked (``tools/nni_search.py --quick``).

Trials run ``python -m kcp_plugin.bench.nni_search --settings ...`` with the interpreter
running the search (``sys.executable``), so they work wherever ``kcp_plugin`` is importable
(installed, not only from a checkout); with another Python the trials would fail without any
message. This is an experiment over the benchmark (:mod:`kcp_plugin.bench`), not an NNI
adapter: the adapters are :mod:`kcp_plugin.integrations.nni`.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shlex
import socket
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from ..hints import did_you_mean

if TYPE_CHECKING:
    from ..deploy.backends import Backend, Timer

__all__ = [
    "DISTILL_PARTS",
    "LATENCY_KEYS",
    "LATENCY_SECTION",
    "PARAM_KEYS",
    "QUICK_CONCURRENCY",
    "QUICK_DENSE_STEPS",
    "QUICK_SETTINGS",
    "QUICK_TRIALS",
    "SearchSettings",
    "TunerConnectionError",
    "check_dense",
    "check_latency",
    "check_latency_options",
    "check_search_space",
    "config_latency",
    "constant_baseline",
    "distill_config",
    "distill_layers",
    "format_trial",
    "latency_backend",
    "launch_experiment",
    "measures_latency",
    "pareto_front",
    "parse_distill",
    "quick_concurrency",
    "quick_settings",
    "run_search",
    "run_trial",
    "summarize",
    "task_stages",
    "train_dense",
]

PARAM_KEYS = ("criterion", "target_macs", "target_latency", "finetune_lr", "finetune_steps",
              "distill", "distill_weight", "distill_temperature")
DISTILL_PARTS = ("kl", "cwd", "l1", "mse", "features", "dca")
"""Parts of a ``distill`` value, joined by ``+`` (at most one output loss), or ``none``:
output losses (:data:`kcp_plugin.distill.OUTPUT_LOSSES`), ``features`` (kept-channel feature
MSE at :func:`distill_layers`) and ``dca`` (the same layers in CDC's DCA subspace)."""
LATENCY_SECTION = "latency"
"""The experiment config's own section (not NNI's) holding :attr:`SearchSettings.latency`."""
LATENCY_KEYS = ("backend", "device", "dtype", "batch", "threads", "runs", "warmup",
                "channels_last", "allocation", "target")
"""Keys of :attr:`SearchSettings.latency`: ``backend`` (the runtime: ``"torch"``,
``"onnxruntime"``, ``"cuda"``) and the other :class:`kcp_plugin.Backend` fields, ``allocation``
(``"table"`` or ``"uniform"``: how a latency target chooses widths) and ``target`` (a fixed
latency target of every trial, when the search space has no ``target_latency``)."""
TRIAL_MODULE = "kcp_plugin.bench.nni_search"
FINISHED = ("SUCCEEDED", "FAILED", "USER_CANCELED", "SYS_CANCELED", "EARLY_STOPPED")
"""NNI trial statuses of a trial that will not run again."""


class TunerConnectionError(RuntimeError):
    """NNI's tuner (dispatcher) process did not connect to the manager in time."""


@dataclass
class SearchSettings:
    """What stays fixed across the trials of one experiment (passed to every trial as JSON).

    Attributes:
        task: Benchmark task (:data:`kcp_plugin.bench.TASKS`).
        dense: Path of the dense model's state dict (written by :func:`train_dense`).
        seed: Data split and initialisation seed.
        n_train / n_val / batch_size: Data.
        finetune_steps / finetune_lr: Defaults when the search space does not set them.
        target_macs / criterion: Defaults likewise.
        report_every: Fine-tuning steps between intermediate results.
        data_steps: Batches of statistics for data-driven criteria.
        threads: torch CPU threads of every trial and of the dense training (0: leave torch's
            default). On a busy machine one thread can be several times faster than two (the
            threads wait for each other): 0.044 s against 0.46 s per segmentation step here.
        distill: Every trial's distillation when the search space has no ``distill`` key
            (:data:`DISTILL_PARTS` joined by ``+``, or ``"none"``).
        distill_layers: Module names of the ``features`` / ``dca`` parts (default: the stage
            before the output layer, :func:`distill_layers`).
        distill_weight / distill_temperature: Weight and temperature of the output term when
            the search space does not set them (temperature None: the loss's default, 1 for
            ``kl``, 4 for ``cwd``).
        latency: Where every trial measures latency (:data:`LATENCY_KEYS`), e.g.
            ``"torch"`` (a runtime's name), ``{"backend": "torch", "threads": 1}`` or
            ``{"backend": "cuda", "dtype": "fp16", "batch": 32, "target": 0.5}``; missing
            :class:`kcp_plugin.Backend` fields take its defaults (torch, fp32, 1 thread, 10
            timed passes), a missing batch the task's example batch. None: no latency is
            measured, unless the search space has ``target_latency`` (then the default torch
            backend measures it).

    Raises:
        ValueError: ``n_train`` below ``batch_size`` (training drops incomplete batches, so
            there would be none), ``batch_size`` / ``n_val`` below 1, bad ``latency``
            settings (an unknown key, backend, dtype or allocation, a target out of (0, 1]),
            or bad distillation settings (an unknown part, a weight below 0).
    """

    task: str = "segmentation"
    dense: str = ""
    seed: int = 0
    n_train: int = 256
    n_val: int = 64
    batch_size: int = 16
    finetune_steps: int = 100
    finetune_lr: float = 1e-3
    target_macs: float = 0.5
    criterion: str = "kcp"
    report_every: int = 25
    data_steps: int = 4
    threads: int = 0
    distill: str = "none"
    distill_layers: list[str] | None = None
    distill_weight: float = 1.0
    distill_temperature: float | None = None
    latency: dict[str, Any] | str | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.n_val < 1:
            raise ValueError(f"batch_size and n_val must be >= 1, got {self.batch_size} and "
                             f"{self.n_val}")
        if self.n_train < self.batch_size:
            # the training loader drops incomplete batches: no batch at all, and
            # kcp_plugin.bench.train would wait for one forever
            raise ValueError(f"n_train ({self.n_train}) must be at least batch_size "
                             f"({self.batch_size}): training drops incomplete batches")
        if isinstance(self.latency, str):  # a runtime's name: its defaults
            self.latency = {"backend": self.latency}
        if self.latency is not None:
            check_latency_options(self.latency)
        self.distill = _spec_text(parse_distill(self.distill))
        if isinstance(self.distill_layers, str):
            self.distill_layers = [self.distill_layers]
        if self.distill_layers is not None and (
                not isinstance(self.distill_layers, (list, tuple)) or not self.distill_layers
                or not all(isinstance(n, str) for n in self.distill_layers)):
            raise ValueError(f"distill_layers must be a non-empty list of module names, got "
                             f"{self.distill_layers!r}")
        _check_number("distill_weight", self.distill_weight, positive=False)
        if self.distill_temperature is not None:
            _check_number("distill_temperature", self.distill_temperature, positive=True)

    @classmethod
    def load(cls, path: str | os.PathLike) -> SearchSettings:
        """Settings from the JSON file :func:`launch_experiment` writes for the trials."""
        return cls(**json.loads(Path(path).read_text()))


# ---------------------------------------------------------------------------- quick search
QUICK_SETTINGS: dict[str, Any] = {
    "n_train": 1024, "n_val": 64, "batch_size": 8, "finetune_steps": 60, "report_every": 20,
    "data_steps": 2, "threads": 1,
}
"""What :func:`quick_settings` changes. Measured on segmentation (2 busy cores, one thread):
with 32 images and 20 dense steps (the earlier quick search) the dense model predicted
background only (15.1 mIoU, the background-only value), so every trial tied at 15.1; 32 images
are memorised (training loss 0.3, validation still background). With 1024 generated images
(generating them takes about 3 s) and 600 steps of batch 8 it reaches 32.3 mIoU (seed 1: 27.3)
against 15.5 for background-only, in 24 to 40 s; 60 fine-tuning steps then separate the trials
by up to 15 mIoU (15.5 to 30.2 at 29-60 % of the MACs) while rerunning one trial with other
data seeds moves it by a standard deviation of 0.5 to 1.4 (docs/nni.md, "The quick search")."""
QUICK_DENSE_STEPS = 600
"""Dense training iterations of the quick search (with 512 images, 300: 21.1 mIoU, 100: 16.3)."""
QUICK_TRIALS = 4
"""Trials of the quick search (NNI's ``maxTrialNumber``)."""
QUICK_CONCURRENCY = 2
"""Concurrent trials of the quick search: one thread each on two cores (1 when the trials
measure latency: :func:`quick_concurrency`)."""


def quick_settings(settings: SearchSettings) -> SearchSettings:
    """``settings`` changed to the quick search's data and budget (:data:`QUICK_SETTINGS`).

    Task, seed, dense checkpoint, criterion, MACs target and latency settings are kept. Use
    with :data:`QUICK_DENSE_STEPS`, :data:`QUICK_TRIALS` and :func:`quick_concurrency`.
    """
    return replace(settings, **QUICK_SETTINGS)


def quick_concurrency(search_space: dict[str, Any], settings: SearchSettings) -> int:
    """Concurrent trials of the quick search: :data:`QUICK_CONCURRENCY`, or 1 when the trials
    measure latency (:func:`measures_latency`), so that no trial is timed while another one
    trains on the same cores."""
    return 1 if measures_latency(search_space, settings) else QUICK_CONCURRENCY


# ---------------------------------------------------------------------------- latency
def measures_latency(search_space: dict[str, Any], settings: SearchSettings) -> bool:
    """Whether the trials measure latency: a latency backend is set
    (:attr:`SearchSettings.latency`), or the search space (or a trial's parameters) has
    ``target_latency``."""
    return settings.latency is not None or "target_latency" in search_space


def _latency_target(params: dict[str, Any], settings: SearchSettings) -> float | None:
    """A trial's latency target: its ``target_latency`` parameter, else the settings' fixed
    ``latency["target"]``, else None (a MACs target or per-stage ratios)."""
    if "target_latency" in params:
        return float(params["target_latency"])
    target = (settings.latency or {}).get("target")
    return None if target is None else float(target)


def latency_backend(settings: SearchSettings, timer: Timer | None = None,
                    example_inputs: Any = None) -> Backend:
    """The :class:`kcp_plugin.Backend` of :attr:`SearchSettings.latency`.

    Args:
        settings: The experiment's settings (``latency`` None: the default backend).
        timer: A stand-in clock (``timer(model, call) -> ms``; tests), else the backend's own.
        example_inputs: When given and no batch is set, the batch becomes theirs, so every
            latency figure names its batch (``"batch 1"`` rather than ``"example batch"``).

    Raises:
        ValueError: an unknown key (:data:`LATENCY_KEYS`) or a field of the wrong type.
    """
    return _backend_of(settings.latency or {}, timer, example_inputs)


def _backend_of(options: dict[str, Any], timer: Timer | None = None,
                example_inputs: Any = None) -> Backend:
    """:func:`latency_backend` of the latency settings themselves."""
    from ..deploy.backends import as_backend, first_tensor

    opts = dict(options)
    unknown = [k for k in opts if k not in LATENCY_KEYS]
    if unknown:
        raise ValueError(f"unknown latency setting {unknown[0]!r}; valid: "
                         f"{', '.join(LATENCY_KEYS)}" + did_you_mean(unknown[0], LATENCY_KEYS))
    fields = {k: v for k, v in opts.items() if k not in ("backend", "allocation", "target")}
    if "backend" in opts:
        fields["name"] = opts["backend"]
    try:
        backend = as_backend(fields)
    except TypeError as exc:  # every key is a field: only the record's own checks fail here
        raise ValueError(f"latency settings: {exc}") from exc
    if timer is not None:
        backend = replace(backend, timer=timer)
    if backend.batch is None and example_inputs is not None:
        first = first_tensor(example_inputs)
        if first is not None and first.dim() > 0:
            backend = replace(backend, batch=int(first.shape[0]))
    return backend


def check_latency_options(options: Any) -> None:
    """Check :attr:`SearchSettings.latency` on its own (without importing runtimes).

    Raises:
        ValueError: not a mapping, an unknown key, backend, dtype, device or allocation, a
            count out of range, or a target out of (0, 1]; each message names the valid
            choices.
    """
    from ..deploy.backends import check_backend
    from ..deploy.search import ALLOCATIONS

    if not isinstance(options, dict):
        raise ValueError(f"latency settings must be a mapping with keys among "
                         f"{', '.join(LATENCY_KEYS)}, got {options!r}")
    backend = _backend_of(options)
    allocation = options.get("allocation", "table")
    if allocation not in ALLOCATIONS:
        raise ValueError(f"unknown latency allocation {allocation!r}; valid: "
                         f"{', '.join(ALLOCATIONS)}" + did_you_mean(str(allocation), ALLOCATIONS))
    target = options.get("target")
    if target is not None and (not isinstance(target, (int, float)) or isinstance(target, bool)
                               or not 0 < target <= 1):
        raise ValueError(f"latency target must be a fraction of the dense latency in (0, 1], "
                         f"got {target!r}")
    check_backend(backend, imports=False)


def check_latency(search_space: dict[str, Any], settings: SearchSettings,
                  imports: bool = True) -> Backend | None:
    """Check the latency settings against the search space before an experiment starts.

    Args:
        search_space: The NNI search space (checked by :func:`check_search_space` too).
        settings: The experiment's settings.
        imports: Also check that the backend's runtime is there (onnx / onnxruntime for
            ``"onnxruntime"``, a visible GPU for ``"cuda"``).

    Returns:
        The backend every trial measures on (batch left as set), or None when the trials
        measure no latency.

    Raises:
        ValueError: bad latency settings (:func:`check_latency_options`), ``"cuda"`` without a
            GPU, a latency target combined with ``ratio_<stage>`` keys, a MACs budget
            (``target_macs``) with the ``"uniform"`` allocation, or fewer than 3 timed passes
            for a latency target.
        ImportError: ``"onnxruntime"`` without the ``deploy`` extra.
    """
    from ..deploy.backends import check_backend
    from ..deploy.search import LatencyTarget, check_latency_target

    if not measures_latency(search_space, settings):
        return None
    options = settings.latency or {}
    check_latency_options(options)
    backend = latency_backend(settings)
    allocation = options.get("allocation", "table")
    targets: list[float] = []
    if "target_latency" in search_space:
        spec = search_space["target_latency"]
        values = _values(spec, "target_latency")
        targets = list(values if spec["_type"] == "choice" else values[:2])
    elif options.get("target") is not None:
        targets = [options["target"]]
    if targets:
        if any(k.startswith("ratio_") for k in search_space):
            raise ValueError("a latency target (target_latency, or the latency settings' "
                             "target) chooses every layer's width itself: search it or "
                             "ratio_<stage> keys, not both")
        if allocation == "uniform" and "target_macs" in search_space:
            raise ValueError("target_macs beside a latency target is a MACs budget, which only "
                             "the 'table' latency allocation takes; drop target_macs or use "
                             "allocation 'table'")
        for ratio in targets:
            check_latency_target(LatencyTarget(ratio, backend=backend, allocation=allocation),
                                 imports=imports)
    else:
        check_backend(backend, imports=imports)
    return backend


def config_latency(config_path: str | os.PathLike | None) -> dict[str, Any] | None:
    """The ``latency:`` section (:data:`LATENCY_SECTION`) of an experiment config, or None."""
    if config_path is None:
        return None
    section = _read_config(config_path).get(LATENCY_SECTION)
    if section is not None and not isinstance(section, dict):
        raise ValueError(f"{config_path}: the {LATENCY_SECTION!r} section must be a mapping "
                         f"with keys among {', '.join(LATENCY_KEYS)}, got {section!r}")
    return section


def _read_config(config_path: str | os.PathLike) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(Path(config_path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"cannot read the experiment config {config_path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"the experiment config {config_path} is not a YAML mapping")
    return data


def _experiment_config(config_path: str | os.PathLike) -> Any:
    """NNI's ``ExperimentConfig`` of a config file, without this package's own section
    (what ``ExperimentConfig.load`` does, which refuses keys it does not know)."""
    from nni.experiment import ExperimentConfig
    from nni.experiment.config import utils

    data = _read_config(config_path)
    data.pop(LATENCY_SECTION, None)
    utils.set_base_path(Path(config_path).parent)  # relative paths: from the config's folder
    try:
        return ExperimentConfig(**data)
    finally:
        utils.unset_base_path()


# ---------------------------------------------------------------------------- distillation
def parse_distill(spec: Any) -> tuple[str | None, bool, bool] | None:
    """A ``distill`` value as ``(output loss or None, features, dca)``, or None for ``"none"``.

    Raises:
        ValueError: not a string, an unknown or repeated part, two output losses; the message
            lists :data:`DISTILL_PARTS`.
    """
    choices = (f"none, or parts joined by '+': {', '.join(DISTILL_PARTS[:4])} (an output "
               "loss, at most one), features, dca; e.g. kl+features")
    if spec is None:
        return None
    if not isinstance(spec, str):
        raise ValueError(f"distill must be a string ({choices}), got {spec!r}")
    if spec.strip().lower() in ("", "none"):
        return None
    parts = [p.strip().lower() for p in spec.split("+")]
    for part in parts:
        if part not in DISTILL_PARTS:
            raise ValueError(f"unknown distillation {part!r} in {spec!r}"
                             f"{did_you_mean(part, DISTILL_PARTS)}; valid: {choices}")
    if len(set(parts)) != len(parts):
        raise ValueError(f"distill {spec!r} repeats a part; valid: {choices}")
    outputs = [p for p in parts if p in DISTILL_PARTS[:4]]
    if len(outputs) > 1:
        raise ValueError(f"distill {spec!r} has two output losses ({', '.join(outputs)}); "
                         f"valid: {choices}")
    return (outputs[0] if outputs else None, "features" in parts, "dca" in parts)


def _spec_text(parsed: tuple[str | None, bool, bool] | None) -> str:
    """The canonical spelling of a parsed ``distill`` value (``"kl+features"``, ``"none"``)."""
    if parsed is None:
        return "none"
    output, features, dca = parsed
    return "+".join([*([output] if output else []), *(["features"] if features else []),
                     *(["dca"] if dca else [])])


def _check_number(name: str, value: Any, positive: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or (value <= 0 if positive else value < 0):
        raise ValueError(f"{name} must be a number {'> 0' if positive else '>= 0'}, got "
                         f"{value!r}")


def distill_layers(task_name: str) -> list[str]:
    """Default layers of the ``features`` / ``dca`` parts: the model's last stage before its
    output layer (:func:`task_stages`): ``head`` for segmentation, ``layer3`` for the
    classification ResNet, ``aggregate`` for stereo."""
    stages = task_stages(task_name)
    return [stages[-2] if len(stages) > 1 else stages[-1]]


def distill_config(spec: Any, task_name: str, layers: list[str] | None = None,
                   weight: float = 1.0, temperature: float | None = None,
                   steps: int | None = None) -> Any:
    """The :class:`kcp_plugin.distill.DistillConfig` of a ``distill`` value on a task, or None.

    Args:
        spec: ``"none"`` or :data:`DISTILL_PARTS` joined by ``+``.
        task_name: Benchmark task (its outputs and labels decide what can be distilled).
        layers: Layers of ``features`` / ``dca`` (default :func:`distill_layers`).
        weight / temperature: Of the output term.
        steps: Fine-tuning steps: DCA collects its statistics over the first quarter of
            them (1 to 8 batches) before its term starts.

    Raises:
        ValueError: a bad value (:func:`parse_distill`), a part the task cannot take (the
            task rules of :func:`kcp_plugin.bench.protocol.distill_config`: ``kl`` / ``cwd`` or
            ``dca`` on stereo, ``cwd`` on classification), a bad weight.
    """
    from . import get_task
    from .protocol import distill_config as task_distill_config

    parsed = parse_distill(spec)
    if parsed is None:
        return None
    output, features, dca = parsed
    layers = list(layers) if layers else distill_layers(task_name)
    return task_distill_config(get_task(task_name), dict(
        output=output, temperature=temperature, weight=weight,
        layers=layers if features else [], dca_layers=layers if dca else [],
        dca_batches=8 if steps is None else max(1, min(8, steps // 4))))


def _check_distill(space: dict[str, Any], task_name: str, settings: SearchSettings | None) -> None:
    """Every ``distill`` value of the space (or the settings' fixed one) on the task, with
    the settings' layers resolved on the task's model."""
    from ..distill.channels import resolve_feature_layers
    from . import get_task
    from .protocol import forward_for

    specs = _values(space["distill"], "distill") if "distill" in space else []
    if "distill" in space and space["distill"].get("_type") != "choice":
        raise ValueError("'distill' must be a choice")
    if not specs and settings is not None:
        specs = [settings.distill]
    layers = settings.distill_layers if settings is not None else None
    configs = [distill_config(spec, task_name, layers) for spec in specs]
    names = sorted({n for c in configs if c is not None for n in (*c.layers, *c.dca_layers)})
    if names:
        task = get_task(task_name)
        resolve_feature_layers(task.build(0), names, task.example_inputs(), forward_for(task))


# ---------------------------------------------------------------------------- search space
def task_stages(task_name: str) -> list[str]:
    """Top-level modules of a task's model that hold prunable conv / linear layers."""
    from . import get_task

    model = get_task(task_name).build(0)
    stages = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)) and "." in name:
            stages.append(name.split(".")[0])
        elif isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
            stages.append(name)
    return list(dict.fromkeys(stages))


def _values(spec: Any, key: str) -> list[Any]:
    if not isinstance(spec, dict) or "_type" not in spec or "_value" not in spec:
        raise ValueError(f"search space entry {key!r} must be {{'_type': ..., '_value': [...]}}, "
                         f"got {spec!r}")
    if not isinstance(spec["_value"], list) or not spec["_value"]:
        raise ValueError(f"search space entry {key!r}: '_value' must be a non-empty list")
    return spec["_value"]


def check_search_space(space: Any, task_name: str,
                       settings: SearchSettings | None = None) -> None:
    """Check a search space against the task before an experiment starts.

    The latency settings are checked against the space by :func:`check_latency`.

    Args:
        space: The NNI search space.
        task_name: Benchmark task.
        settings: The experiment's settings, when known: their fixed ``distill`` (if the
            space has none) and their ``distill_layers`` are checked too.

    Raises:
        ValueError: unknown keys or stages, unregistered criteria (or ones the task cannot
            feed, e.g. label-based criteria on stereo), ratios out of range,
            ``ratio_*`` keys beside ``target_macs`` or ``target_latency``, or a distillation
            the task cannot take (an unknown part, ``cwd`` on classification, ``dca`` on
            stereo, a layer the model does not have).
    """
    from ..registry import get_importance, importance_info
    from . import get_task

    task = get_task(task_name)
    if not isinstance(space, dict) or not space:
        raise ValueError("the search space must be a non-empty JSON object")
    stages = task_stages(task_name)
    ratio_keys = [k for k in space if k.startswith("ratio_")]
    for key in space:
        if key not in PARAM_KEYS and key not in ratio_keys:
            raise ValueError(f"unknown search-space key {key!r}; valid keys: "
                             f"{', '.join(PARAM_KEYS)}, ratio_<stage> with <stage> one of "
                             f"{', '.join(stages)}")
    if ratio_keys and "target_macs" in space:
        raise ValueError("search either target_macs or per-stage ratio_<stage> keys, not both")
    if ratio_keys and "target_latency" in space:
        raise ValueError("search either target_latency or per-stage ratio_<stage> keys, not "
                         "both: a latency target chooses every layer's width itself")
    for key in ratio_keys:
        if key[len("ratio_"):] not in stages:
            raise ValueError(f"{key!r}: {task_name} models have no stage "
                             f"{key[len('ratio_'):]!r}; stages: {', '.join(stages)}")
    for key, spec in space.items():
        values = _values(spec, key)
        kind = spec["_type"]
        if key == "distill":
            continue  # _check_distill, below
        if key == "criterion":
            if kind != "choice":
                raise ValueError("'criterion' must be a choice")
            for name in values:
                info = importance_info(name)
                imp = get_importance(info.name) if info.requires_data else None
                if imp is not None and getattr(imp, "needs_labels", False) \
                        and task.name == "stereo":
                    raise ValueError(f"criterion {name!r} needs class labels, which the stereo "
                                     "task does not have")
            continue
        numbers = values if kind == "choice" else values[:2]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers):
            raise ValueError(f"search space entry {key!r}: values must be numbers, got {values}")
        if key in ("target_macs", "target_latency") or key.startswith("ratio_"):
            fraction = key in ("target_macs", "target_latency")
            ok = all((0.0 < v <= 1.0) if fraction else (0.0 <= v < 1.0) for v in numbers)
            if not ok:
                raise ValueError(f"search space entry {key!r}: values must be in "
                                 f"{'(0, 1]' if fraction else '[0, 1)'}, got {values}")
        if key == "finetune_steps" and not all(float(v) >= 0 for v in numbers):
            raise ValueError("finetune_steps must be >= 0")
        if key == "finetune_lr" and not all(float(v) > 0 for v in numbers):
            raise ValueError("finetune_lr must be > 0")
        if key in ("distill_weight", "distill_temperature"):
            for v in numbers:
                _check_number(key, v, positive=key == "distill_temperature")
    _check_distill(space, task_name, settings)


# ---------------------------------------------------------------------------- dense model
class _ConstantLabel(nn.Module):
    """Logits that pick one class everywhere: ``[B, C]``, or ``[B, C, H, W]`` for a
    ``[B, 3, H, W]`` input when ``dense``."""

    def __init__(self, label: int, num_classes: int, dense: bool):
        super().__init__()
        self.label, self.num_classes, self.dense = label, num_classes, dense

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (x.shape[0], self.num_classes, *(x.shape[2:] if self.dense else ()))
        out = x.new_zeros(shape)
        out[:, self.label] = 1.0
        return out


def constant_baseline(task_name: str, train_ds: Any, val_ds: Any,
                      batch_size: int = 64) -> dict[str, Any] | None:
    """The task metric of predicting the most frequent training label everywhere.

    A dense model that does not beat it has learnt nothing its trials could lose, so they tie
    (segmentation: background everywhere, 15.5 mIoU with five classes, the background's IoU
    over five).

    Args:
        task_name: Benchmark task (:data:`kcp_plugin.bench.TASKS`).
        train_ds / val_ds: ``(input, label, ...)`` datasets of the task (``Task.splits``).
        batch_size: Evaluation batch size.

    Returns:
        ``{"label": most frequent class, "value": metric on val_ds}``, or ``None`` for tasks
        without class labels (stereo).
    """
    from . import get_task, make_loader

    task = get_task(task_name)
    if task.name not in ("segmentation", "classification"):
        return None
    num_classes = int(task.model_kwargs["num_classes"])
    counts = torch.zeros(num_classes, dtype=torch.long)
    for batch in make_loader(train_ds, batch_size, 0, shuffle=False):
        counts += torch.bincount(batch[1].flatten().clamp(0, num_classes - 1),
                                 minlength=num_classes)
    label = int(counts.argmax())
    model = _ConstantLabel(label, num_classes, dense=task.name == "segmentation")
    value = task.evaluate(model, make_loader(val_ds, batch_size, 0, shuffle=False))[task.metric]
    return {"label": label, "value": value}


def check_dense(meta: dict[str, Any], higher_is_better: bool = True,
                margin: float = 1.0) -> str | None:
    """A warning when the dense model is not ``margin`` (metric units) better than
    :func:`constant_baseline`, else ``None`` (also when the task has no baseline)."""
    base = meta.get("baseline")
    if not base:
        return None
    gain = (meta["value"] - base["value"]) * (1.0 if higher_is_better else -1.0)
    if gain >= margin:
        return None
    return (f"the dense model ({meta['metric']} {meta['value']:.2f}) is not {margin:g} better "
            f"than a constant prediction ({_baseline_text(meta)}): pruned trials will tie. "
            "Train it longer or on more images (--dense-steps, --n-train), or use --quick's "
            "settings")


def _baseline_text(meta: dict[str, Any]) -> str:
    """``predicting background everywhere: 15.49`` for a dense meta with a baseline, or ``""``."""
    base = meta.get("baseline")
    if not base:
        return ""
    what = ("background" if str(meta.get("task", "")).startswith("segmentation")
            and base["label"] == 0 else f"class {base['label']}")
    return f"predicting {what} everywhere: {base['value']:.2f}"


def _bar_shown(progress: bool | None) -> bool:
    # what progress_bar will show: tqdm installed, and enabled or (None) stderr a terminal
    import importlib.util

    if progress is False or importlib.util.find_spec("tqdm") is None:
        return False
    return bool(progress) or sys.stderr.isatty()


def _step_lines(steps: int, desc: str, log: Callable[[str], None],
                lines: int = 10) -> Callable[[], bool]:
    """An ``on_step`` for :func:`kcp_plugin.bench.train` that logs ``lines`` progress lines."""
    every = max(1, math.ceil(steps / lines))
    state = {"step": 0, "start": time.perf_counter()}

    def on_step() -> bool:
        state["step"] += 1
        step = state["step"]
        if step % every == 0 or step == steps:
            spent = time.perf_counter() - state["start"]
            left = spent / step * (steps - step)
            log(f"{desc}: step {step}/{steps} ({100 * step / steps:.0f} %), {spent:.0f} s, "
                f"about {left:.0f} s left")
        return False

    return on_step


def train_dense(settings: SearchSettings, steps: int, lr: float, path: str | os.PathLike,
                progress: bool | None = None,
                log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train the task's dense model once and save its state dict with its metrics.

    Runs with ``settings.threads`` torch threads (restored afterwards).

    Args:
        settings: Task, data and threads.
        steps / lr: Training iterations and AdamW learning rate (cosine schedule).
        path: Where the checkpoint is written.
        progress: tqdm bar (``None``: only when stderr is a terminal).
        log: When no bar is shown, receives a progress line every tenth of the steps.

    Returns:
        ``{"task", "seed", "metric", "value", "macs", "params", "steps", "train_s",
        "baseline"}``; ``baseline`` is :func:`constant_baseline` (``None`` for stereo).
    """
    from ..graph import count_macs_params
    from . import get_task, make_loader, train
    from .protocol import forward_for

    task = get_task(settings.task)
    threads = torch.get_num_threads()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    try:
        train_ds, val_ds = task.splits(settings.seed, settings.n_train, settings.n_val)
        model = task.build(settings.seed)
        desc = f"dense {task.name}"
        start = time.perf_counter()
        if steps:
            on_step = (_step_lines(steps, desc, log)
                       if log is not None and not _bar_shown(progress) else None)
            train(model, task, make_loader(train_ds, settings.batch_size, settings.seed), steps,
                  lr, desc=desc, progress=progress, on_step=on_step)
        train_s = time.perf_counter() - start
        model.eval()
        value = task.evaluate(model, make_loader(val_ds, settings.batch_size, settings.seed,
                                                 shuffle=False))[task.metric]
        macs, params = count_macs_params(model, task.example_inputs(), forward_for(task))
        baseline = constant_baseline(settings.task, train_ds, val_ds, settings.batch_size)
    finally:
        torch.set_num_threads(threads)
    meta = {"task": settings.task, "seed": settings.seed, "metric": task.metric, "value": value,
            "macs": macs, "params": params, "steps": steps, "train_s": train_s,
            "baseline": baseline}
    torch.save({"state_dict": model.state_dict(), "meta": meta}, path)
    return meta


def _load_dense(path: str | os.PathLike) -> dict[str, Any]:
    from ..plan import load_plain

    payload = load_plain(path, "a dense checkpoint written by train_dense")
    if not isinstance(payload, dict) or "state_dict" not in payload:
        raise ValueError(f"{path} is not a dense checkpoint written by train_dense")
    return payload


# ---------------------------------------------------------------------------- one trial
def _stage_ratios(model: nn.Module, ratios: dict[str, float]) -> dict[str, float]:
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
            stage = name.split(".")[0]
            if stage in ratios and ratios[stage] > 0:
                out[name] = float(ratios[stage])
    return out


def run_trial(params: dict[str, Any], settings: SearchSettings,
              report: Callable[[str, Any], None] | None = None, *,
              timer: Timer | None = None) -> dict[str, Any]:
    """Prune the dense model with ``params``, fine-tune, evaluate; return the final result.

    The prune applies the ``ratio_<stage>`` parameters when there are any, else keeps
    ``target_latency`` of the dense latency (a trial parameter, or the latency settings'
    ``target``) when there is one, else ``target_macs`` of the MACs. With ``distill`` (a
    trial parameter, or the settings' fixed one) the fine-tuning distils from the trial's
    dense model (a frozen copy of it, taken before the prune, :func:`distill_config`).
    When the trials measure latency (:func:`measures_latency`), :func:`kcp_plugin.prune` is
    given the backend (:func:`latency_backend`; a MACs target then rounds widths to its channel
    multiple) and times the pruned model against the dense one on it
    (:func:`kcp_plugin.compare_latency`, passes interleaved), before the fine-tuning (which
    changes weights, not widths).

    Args:
        params: Search-space values (missing keys take ``settings``' defaults).
        settings: The experiment's fixed settings.
        report: ``report(kind, value)`` with kind ``"intermediate"`` or ``"final"`` (NNI's
            ``report_intermediate_result`` / ``report_final_result`` in a trial).
        timer: A stand-in clock for the latency measurements (``timer(model, call) -> ms``,
            e.g. tests' cost model); None: the backend's own clock.

    Returns:
        The final result: ``default`` (the task metric), ``macs_ratio``, ``params_ratio``,
        ``after_prune`` (metric before fine-tuning), ``dense`` and timing; when latency is
        measured also ``latency_ratio`` (pruned / dense median), ``latency_ms``,
        ``latency_q1_ms`` / ``latency_q3_ms`` (the pruned model's quartiles),
        ``dense_latency_ms`` and ``latency_setting`` (:meth:`kcp_plugin.Backend.describe`),
        and for a latency target ``target_latency`` and ``latency_allocation``; ``distill``
        (``"none"``, or what was distilled: ``"kl+features"``) and, when distilling,
        ``distill_layers`` (of ``features`` / ``dca``) and ``distill_loss``, each weighted
        term's mean over the fine-tuning steps (``{"out": ..., "feat": ..., "dca": ...}``;
        DCA's is 0 while its statistics are collected).

    Raises:
        ValueError: a latency target beside ``ratio_<stage>`` parameters, bad latency
            settings, or a distillation the task cannot take (before the model is touched).
    """
    from ..pruning import prune
    from ..registry import criterion_arguments, importance_info
    from . import get_task, make_loader, train
    from .protocol import forward_for

    start = time.perf_counter()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    task = get_task(settings.task)
    criterion = str(params.get("criterion", settings.criterion))
    info = importance_info(criterion)
    ratios = {k[len("ratio_"):]: float(v) for k, v in params.items() if k.startswith("ratio_")}
    steps = int(round(float(params.get("finetune_steps", settings.finetune_steps))))
    lr = float(params.get("finetune_lr", settings.finetune_lr))
    distill = distill_config(
        params.get("distill", settings.distill), settings.task, settings.distill_layers,
        float(params.get("distill_weight", settings.distill_weight)),
        params.get("distill_temperature", settings.distill_temperature), steps)
    torch.manual_seed(settings.seed)
    train_ds, val_ds = task.splits(settings.seed, settings.n_train, settings.n_val)
    train_loader = make_loader(train_ds, settings.batch_size, settings.seed)
    val_loader = make_loader(val_ds, settings.batch_size, settings.seed, shuffle=False)
    model = task.build(settings.seed)
    dense = _load_dense(settings.dense)
    model.load_state_dict(dense["state_dict"])
    model.eval()
    fwd = forward_for(task)
    batch = next(iter(train_loader))
    batches = ([b for _, b in zip(range(settings.data_steps), train_loader)]
               if info.requires_data else None)
    kwargs: dict[str, Any] = criterion_arguments(
        info, lambda m, b, reduction: task.loss(task.forward(m, b), b, reduction),
        batch=batch, batches=batches)
    x = task.example_inputs()
    target_latency = _latency_target(params, settings)
    backend = (latency_backend(settings, timer, x) if measures_latency(params, settings)
               else None)
    if ratios and target_latency is not None:
        raise ValueError("a latency target chooses every layer's width itself: give it or "
                         "ratio_<stage> parameters, not both")
    if ratios:
        kwargs["pruning_ratio_dict"] = _stage_ratios(model, ratios)
    elif target_latency is not None:
        kwargs["target_latency_ratio"] = target_latency
        kwargs["latency_allocation"] = (settings.latency or {}).get("allocation", "table")
        if "target_macs" in params:  # a MACs budget on top (table allocation)
            kwargs["target_macs_ratio"] = float(params["target_macs"])
    else:
        kwargs["target_macs_ratio"] = float(params.get("target_macs", settings.target_macs))
    if backend is not None:
        kwargs["latency_backend"] = backend
    teacher = copy.deepcopy(model) if distill is not None else None  # the trial's dense model
    t0 = time.perf_counter()
    pruned = prune(model, x, criterion, forward_fn=fwd, progress=False, **kwargs)
    prune_s = time.perf_counter() - t0
    latency = _latency_result(pruned) if backend is not None else {}
    after_prune = task.evaluate(model, val_loader)[task.metric]
    history: list[dict[str, float]] = []
    state = {"step": 0}

    def on_step() -> bool:
        state["step"] += 1
        if settings.report_every and state["step"] % settings.report_every == 0 \
                and state["step"] < steps:
            value = task.evaluate(model, val_loader)[task.metric]
            history.append({"step": state["step"], "value": value})
            if report:
                report("intermediate", {"default": value, "macs_ratio": pruned.macs_ratio,
                                        **({"latency_ratio": latency["latency_ratio"]}
                                           if latency else {}),
                                        "step": state["step"]})
        return False

    distiller = None
    terms: dict[str, list[float]] = {}
    if teacher is not None:
        from ..distill import Distiller

        distiller = Distiller(teacher, model, distill, x, forward_fn=fwd)

        def record(_module: nn.Module, _inputs: Any, out: dict[str, torch.Tensor]) -> None:
            for name, value in out.items():
                terms.setdefault(name, []).append(float(value.detach()))

        distiller.register_forward_hook(record)
    if steps:
        train(model, task, train_loader, steps, lr, desc="fine-tune", progress=False,
              on_step=on_step, distiller=distiller)
    if distiller is not None:
        distiller.remove()
    final = task.evaluate(model, val_loader)
    result = {
        "default": final[task.metric], **{k: v for k, v in final.items() if k != task.metric},
        "metric": task.metric, "macs_ratio": pruned.macs_ratio, "macs": pruned.macs_after,
        "params_ratio": pruned.params_ratio, "after_prune": after_prune, **latency,
        "distill": _spec_text(parse_distill(params.get("distill", settings.distill))),
        **({"distill_layers": sorted({*distill.layers, *distill.dca_layers})}
           if distill is not None and (distill.layers or distill.dca_layers) else {}),
        **({"distill_loss": {k[len("loss_distill_"):]: statistics.fmean(v)
                             for k, v in terms.items()}} if terms else {}),
        "dense": dense["meta"]["value"], "prune_s": prune_s,
        "trial_s": time.perf_counter() - start, "history": history,
        "params": dict(params),
    }
    if report:
        # NNI's final metric must be plain data; "metric" names the task metric
        report("final", result)
    return result


def _latency_result(report: Any) -> dict[str, Any]:
    """A trial's latency figures from :func:`kcp_plugin.prune`'s report: the dense-vs-pruned
    measurement it made on the backend it was given (:func:`kcp_plugin.compare_latency`)."""
    if not report.latency_stats:
        raise RuntimeError("kcp_plugin.prune was given a latency backend but reported no "
                           "latency measurement")
    dense, pruned = report.latency_stats
    out = {"latency_ratio": pruned["median_ms"] / dense["median_ms"],
           "latency_ms": pruned["median_ms"], "latency_q1_ms": pruned["q1_ms"],
           "latency_q3_ms": pruned["q3_ms"], "dense_latency_ms": dense["median_ms"],
           "latency_setting": report.latency_setting}
    if report.target_latency_ratio is not None:
        out["target_latency"] = report.target_latency_ratio
        out["latency_allocation"] = report.latency_allocation
    return out


def trial_main(argv: list[str] | None = None) -> dict[str, Any]:
    """Entry point of a trial (``python -m kcp_plugin.bench.nni_search``, or
    ``tools/nni_trial.py``): read settings, get NNI's parameters, run."""
    import argparse

    import nni

    parser = argparse.ArgumentParser(description="one trial of tools/nni_search.py")
    parser.add_argument("--settings", required=True, help="SearchSettings JSON")
    parser.add_argument("--params", default=None,
                        help="JSON parameters (standalone runs, outside an experiment)")
    args = parser.parse_args(argv)
    settings = SearchSettings.load(args.settings)
    params = json.loads(args.params) if args.params else (nni.get_next_parameter() or {})

    def report(kind: str, value: Any) -> None:
        if kind == "intermediate":
            nni.report_intermediate_result(value)
        else:
            nni.report_final_result(value)

    result = run_trial(params, settings, report)
    out_dir = os.environ.get("NNI_OUTPUT_DIR")
    if out_dir:
        Path(out_dir, "trial.json").write_text(json.dumps({"params": params, **result},
                                                          indent=1))
    return result


# ---------------------------------------------------------------------------- experiment
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _check_status(port: int, log_dir: Path) -> str:
    from nni.experiment import rest

    status = rest.get(port, "/check-status")
    if status["status"] == "ERROR":
        errors = "; ".join(status.get("errors") or []) or "no message"
        if "did not connect" in errors:
            raise TunerConnectionError(
                "NNI's tuner process did not connect to the experiment manager within NNI's "
                f"fixed 10 s ({errors}). The machine is probably too busy to start it: retry "
                "when fewer processes run, or with fewer concurrent trials. Dispatcher log: "
                f"{log_dir / 'log' / 'dispatcher.log'}"
            )
        raise RuntimeError(f"the NNI experiment failed: {errors} (logs in {log_dir / 'log'})")
    return status["status"]


def launch_experiment(
    search_space: dict[str, Any],
    settings: SearchSettings,
    out_dir: str | os.PathLike,
    *,
    config_path: str | os.PathLike | None = None,
    max_trials: int | None = None,
    concurrency: int | None = None,
    port: int | None = None,
    timeout_s: float | None = None,
    higher_is_better: bool = True,
    progress: bool | None = None,
    on_trial: Callable[[dict[str, Any], int, int | None], None] | None = None,
) -> list[dict[str, Any]]:
    """Run an NNI experiment in local mode and return one row per trial.

    The experiment config (``configs/nni/experiment.yml`` format; its ``latency:`` section,
    this package's own, is left out of NNI's config) gives the tuner and limits;
    the search space, trial command (this interpreter, ``-m kcp_plugin.bench.nni_search``), code and
    working directories are set here. The web server listens on ``port`` (a free one by
    default); this function talks to it on localhost, polling every second.

    Args:
        progress: tqdm bar of finished trials (``None``: only when stderr is a terminal).
        on_trial: ``on_trial(row, finished, limit)`` for each trial as soon as NNI lists it as
            finished (:data:`FINISHED`; a succeeded trial once its final result arrived), in
            order of finishing, once per trial; ``finished`` counts them (from 1), ``limit`` is
            the experiment's ``maxTrialNumber`` (``None``: unlimited).

    Returns:
        Rows ``{"trial" (NNI's trial id), "number" (NNI's trial number, from 0), "status",
        "params", "final", "intermediate", "log", "duration_s"}``, by trial number.

    Raises:
        TunerConnectionError: the tuner did not connect within NNI's 10 s.
        RuntimeError: the experiment failed, or timed out.
    """
    from nni.experiment import Experiment, ExperimentConfig

    from ..progress import progress_bar

    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    settings_path = out_dir / "settings.json"
    settings_path.write_text(json.dumps(asdict(settings), indent=1))
    if config_path is not None:
        config = _experiment_config(config_path)
    else:
        config = ExperimentConfig("local")
        config.tuner.name = "TPE"
    config.search_space = search_space
    config.search_space_file = None
    config.trial_command = (f"{shlex.quote(sys.executable)} -m {TRIAL_MODULE} "
                            f"--settings {shlex.quote(str(settings_path))}")
    config.trial_code_directory = str(out_dir)
    config.experiment_working_directory = str(out_dir / "nni-experiments")
    if config.training_service is None or not hasattr(config.training_service, "platform"):
        config.training_service = "local"
    elif config.training_service.platform != "local":
        raise ValueError("the pruning search runs in NNI's local mode (trainingService: local)")
    if max_trials is not None:
        config.max_trial_number = max_trials
    if concurrency is not None:
        config.trial_concurrency = concurrency
    config.trial_concurrency = config.trial_concurrency or 1
    for algo in (config.tuner, config.assessor):
        # built-in tuners and assessors follow the task's metric direction
        if algo is not None and getattr(algo, "name", None) not in (None, "_none_"):
            args = dict(algo.class_args or {})
            args["optimize_mode"] = "maximize" if higher_is_better else "minimize"
            algo.class_args = args
    experiment = Experiment(config)
    port = port or _free_port()
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    experiment.start(port)  # NNI prints its lines (web UI address) before the bar appears
    bar = progress_bar(enabled=progress, total=config.max_trial_number, desc="NNI trials")
    log_dir = Path(config.experiment_working_directory, experiment.id)
    announced: set[str] = set()
    waits: dict[str, int] = {}

    def announce(job: Any, metrics: dict[str, Any], last: bool) -> None:
        row = _trial_row(job, metrics)
        if row["status"] == "SUCCEEDED" and row["final"] is None and not last \
                and waits.get(row["trial"], 0) < 5:
            waits[row["trial"]] = waits.get(row["trial"], 0) + 1  # its final result is on the way
            return
        announced.add(row["trial"])
        bar.update(1)
        if on_trial is not None:
            on_trial(row, len(announced), config.max_trial_number)

    try:
        while True:
            status = _check_status(port, log_dir)
            fresh = [j for j in experiment.list_trial_jobs()
                     if j.status in FINISHED and j.trialJobId not in announced]
            if fresh:
                metrics = experiment.get_job_metrics()
                for job in sorted(fresh, key=lambda j: (j.endTime or 0, j.sequenceId)):
                    announce(job, metrics, last=False)
            if status in ("DONE", "STOPPED"):
                break
            if deadline is not None and time.monotonic() > deadline:
                raise RuntimeError(f"the NNI experiment did not finish within {timeout_s} s "
                                   f"(status {status}); logs in {log_dir / 'log'}")
            time.sleep(1.0)
        metrics = experiment.get_job_metrics()
        jobs = sorted(experiment.list_trial_jobs(), key=lambda j: j.sequenceId)
        for job in jobs:
            if job.trialJobId not in announced:
                announce(job, metrics, last=True)
        rows = [_trial_row(job, metrics) for job in jobs]
    finally:
        bar.close()
        experiment.stop()
    return rows


def _trial_row(job: Any, metrics: dict[str, Any]) -> dict[str, Any]:
    """One trial of NNI's listing (``TrialJob``) with its metrics, as plain data."""
    final = [m.data for m in metrics.get(job.trialJobId, []) if m.type == "FINAL"]
    inter = [m.data for m in metrics.get(job.trialJobId, []) if m.type == "PERIODICAL"]
    final_value = _decode(final[-1]) if final else None
    # the trial reports the parameters it received: NNI 3.0's trial-job listing can pair
    # concurrent trials with each other's parameters
    params = None
    if isinstance(final_value, dict):  # a copy: rows are built more than once from metrics
        final_value = dict(final_value)
        params = final_value.pop("params", None)
    if params is None:
        params = job.hyperParameters[0].parameters if job.hyperParameters else {}
    start, end = getattr(job, "startTime", None), getattr(job, "endTime", None)
    duration = (end - start) / 1000.0 if start and end and end > 0 else None
    row = {"trial": job.trialJobId, "number": job.sequenceId, "status": job.status,
           "params": params, "final": final_value,
           "intermediate": [_decode(v) for v in inter], "log": job.logPath,
           "duration_s": duration}
    if job.status == "FAILED":
        error = _trial_error(job.logPath)
        if error:
            row["error"] = error
    return row


def _trial_error(log: Any) -> str | None:
    """The exception that ended a failed trial: the first line after the last traceback of
    its ``trial.stderr`` (e.g. ``kcp_plugin.errors.TargetUnreachable: target_latency_ratio=0.4
    is out of reach ...``), or None when the log is not a local folder with one."""
    from urllib.parse import urlparse

    if not isinstance(log, str) or not log:
        return None
    folder = Path(urlparse(log).path if log.startswith("file://") else log)
    try:
        lines = (folder / "trial.stderr").read_text(errors="replace").splitlines()
    except OSError:
        return None
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent")]
    if not starts:
        return None
    for line in lines[starts[-1] + 1:]:
        if line.strip() and not line[0].isspace():
            return line.strip()
    return None


def _decode(value: Any) -> Any:
    # NNI hands metrics back as JSON strings (sometimes twice encoded)
    for _ in range(2):
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                break
    return value


# ---------------------------------------------------------------------------- summary
def _value(row: dict[str, Any]) -> float:
    final = row.get("final")
    if isinstance(final, dict):
        return float(final.get("default", math.nan))
    return float(final) if isinstance(final, (int, float)) else math.nan


def pareto_front(rows: list[dict[str, Any]], higher_is_better: bool = True,
                 cost: str = "macs_ratio") -> list[dict[str, Any]]:
    """Trials no other trial beats on both cost (lower) and metric; by cost.

    Args:
        rows: Rows of :func:`launch_experiment`.
        higher_is_better: The metric's direction.
        cost: The final result's key that is better lower: ``"macs_ratio"`` (MACs kept) or
            ``"latency_ratio"`` (latency kept); trials without it are left out.
    """
    ok = [r for r in rows if isinstance(r.get("final"), dict)
          and not math.isnan(_value(r)) and cost in r["final"]]
    sign = 1.0 if higher_is_better else -1.0
    front = []
    for r in ok:
        m, v = r["final"][cost], sign * _value(r)
        dominated = any(o["final"][cost] <= m and sign * _value(o) >= v
                        and (o["final"][cost] < m or sign * _value(o) > v) for o in ok)
        if not dominated:
            front.append(r)
    return sorted(front, key=lambda r: r["final"][cost])


def _describe(params: dict[str, Any]) -> str:
    parts = []
    for key, value in params.items():
        if isinstance(value, float):
            value = f"{value:.3g}"
        parts.append(f"{key}={value}")
    return ", ".join(parts)


def format_trial(row: dict[str, Any], metric: str, *, done: int | None = None,
                 total: int | None = None) -> str:
    """One line for a finished trial: what NNI's web UI lists in its trial table.

    ``[trial 3/8] No. 2 Ab3xY SUCCEEDED  miou 24.44 (dense 32.33)  MACs kept 0.289  after prune
    15.49  34 s  criterion=kcp, target_macs=0.3`` (``done`` / ``total``: trials finished so far
    and the experiment's trial limit), with ``latency kept 0.512`` after the MACs when the
    trial measured latency (on the setting :func:`run_search` names once). An early-stopped
    trial shows its last intermediate result; a failed one, the exception that ended it (when
    its log is readable here: e.g. a latency target out of reach) and its log.

    Args:
        row: A row of :func:`launch_experiment`.
        metric: The task metric's name.
    """
    count = f"trial {done}/{total}" if done is not None and total else \
        f"trial {done}" if done is not None else "trial"
    parts = [f"[{count}] No. {row.get('number', '?')} {row['trial']} {row['status']}"]
    final = row.get("final")
    result = final if isinstance(final, dict) else None
    if result is None and row.get("intermediate"):
        last = row["intermediate"][-1]
        result = last if isinstance(last, dict) else {"default": last}
    if result is not None:
        value = _value({"final": result})
        dense = f" (dense {result['dense']:.2f})" if "dense" in result else ""
        step = "" if result is final else f" (last intermediate, step {result.get('step', '?')})"
        parts.append(f"{metric} {value:.2f}{dense}{step}")
        if "macs_ratio" in result:
            parts.append(f"MACs kept {result['macs_ratio']:.3f}")
        if "latency_ratio" in result:
            parts.append(f"latency kept {result['latency_ratio']:.3f}")
        if "after_prune" in result:
            parts.append(f"after prune {result['after_prune']:.2f}")
        if result.get("distill", "none") != "none" and "distill" not in (row.get("params")
                                                                         or {}):
            parts.append(f"distilled {result['distill']}")  # the experiment's fixed choice
    elif isinstance(final, (int, float)):
        parts.append(f"{metric} {final:.2f}")
    if row.get("duration_s") is not None:
        parts.append(f"{row['duration_s']:.0f} s")
    if row.get("error"):
        error = row["error"]
        parts.append(f"error {error if len(error) <= 300 else error[:297] + '...'}")
    if row["status"] != "SUCCEEDED" and row.get("log"):
        parts.append(f"log {row['log']}")
    parts.append(_describe(row.get("params") or {}) or "(no parameters)")
    return "  ".join(parts)


def summarize(rows: list[dict[str, Any]], out_dir: str | os.PathLike, *,
              metric: str, higher_is_better: bool = True,
              dense: dict[str, Any] | None = None, top: int = 10) -> str:
    """Write ``results.json``, ``summary.md`` and ``accuracy_vs_macs.png``; return the markdown.

    The table lists the best trials (by metric) and the Pareto front of metric against MACs.
    When the trials measured latency, the tables gain a latency-kept column, and the
    accuracy-vs-latency front follows (with ``accuracy_vs_latency.png``), both naming the
    setting that measured it (hardware, runtime, dtype, batch, threads) and the dense latency.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps({"dense": dense, "trials": rows}, indent=1))
    ok = [r for r in rows if isinstance(r.get("final"), dict)]
    failed = [r for r in rows if r not in ok]
    ranked = sorted(ok, key=_value, reverse=higher_is_better)
    front = pareto_front(ok, higher_is_better)
    timed = [r for r in ok if "latency_ratio" in r["final"]]
    lat = "latency kept | " if timed else ""
    head = f"| trial | {{m}} | MACs kept | {lat}after prune | intermediate | parameters |"
    sep = "|---|---|---|" + "---|" * bool(timed) + "---|---|---|"

    def line(r: dict[str, Any]) -> str:
        f = r["final"]
        inter = " ".join(f"{_value({'final': v}):.1f}" if isinstance(v, dict) else f"{v:.1f}"
                         for v in r["intermediate"])
        kept = (f"{f['latency_ratio']:.3f} | " if "latency_ratio" in f else "- | ") if timed \
            else ""
        return (f"| {r['trial']} | {_value(r):.2f} | {f.get('macs_ratio', math.nan):.3f} | "
                f"{kept}{f.get('after_prune', math.nan):.2f} | {inter or '-'} | "
                f"{_describe(r['params'])} |")

    lines = [f"# NNI pruning search: {len(ok)} trials finished, {len(failed)} failed", ""]
    if dense:
        base = _baseline_text(dense)
        lines += [f"Dense model: {metric} {dense['value']:.2f}{f' ({base})' if base else ''}, "
                  f"{dense['macs'] / 1e6:.2f} M MACs", ""]
    if timed:
        lines += [_latency_text(timed), ""]
    lines += [f"## Best trials ({metric}, {'higher' if higher_is_better else 'lower'} is "
              "better)", "", head.format(m=metric), sep] + [line(r) for r in ranked[:top]]
    lines += ["", f"## Accuracy-vs-MACs front ({len(front)} trials)", "",
              head.format(m=metric), sep] + [line(r) for r in front]
    if timed:
        latency_front = pareto_front(timed, higher_is_better, cost="latency_ratio")
        lines += ["", f"## Accuracy-vs-latency front ({len(latency_front)} trials; "
                  f"{'; '.join(_settings_of(timed))})", "", head.format(m=metric), sep]
        lines += [line(r) for r in latency_front]
    if failed:
        lines += ["", "## Failed trials", ""] + [
            f"- {r['trial']} ({r['status']}): {r['error'] + '; ' if r.get('error') else ''}log "
            f"in {r.get('log')}" for r in failed]
    text = "\n".join(lines) + "\n"
    (out_dir / "summary.md").write_text(text)
    _plot(ok, front, out_dir / "accuracy_vs_macs.png", metric, higher_is_better, dense)
    if timed:
        _plot(timed, latency_front, out_dir / "accuracy_vs_latency.png", metric,
              higher_is_better, dense, cost="latency_ratio",
              setting="; ".join(_settings_of(timed)))
    else:  # not an earlier search's plot beside this one's summary
        (out_dir / "accuracy_vs_latency.png").unlink(missing_ok=True)
    return text


def _settings_of(rows: list[dict[str, Any]]) -> list[str]:
    """The latency settings (:meth:`kcp_plugin.Backend.describe`) the trials measured on."""
    return list(dict.fromkeys(str(r["final"].get("latency_setting", "unnamed setting"))
                              for r in rows))


def _latency_text(rows: list[dict[str, Any]]) -> str:
    """What the latency figures of a summary are: setting, method and the dense latency."""
    dense_ms = sorted(r["final"]["dense_latency_ms"] for r in rows
                      if "dense_latency_ms" in r["final"])
    dense = (f"; the dense model: {statistics.median(dense_ms):.2f} ms (median over the "
             f"trials' measurements, {dense_ms[0]:.2f} to {dense_ms[-1]:.2f})" if dense_ms
             else "")
    return (f"Latency kept: the pruned model's median latency over the dense model's, timed in "
            f"the trial with their passes interleaved (kcp_plugin.compare_latency), on "
            f"{'; '.join(_settings_of(rows))}{dense}.")


def _plot(rows: list[dict[str, Any]], front: list[dict[str, Any]], path: Path, metric: str,
          higher_is_better: bool, dense: dict[str, Any] | None, cost: str = "macs_ratio",
          setting: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    by_criterion: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        crit = str(r["params"].get("criterion", "(fixed)"))
        by_criterion.setdefault(crit, []).append((r["final"][cost], _value(r)))
    for crit, pts in sorted(by_criterion.items()):
        xs, ys = zip(*pts)
        ax.scatter(xs, ys, label=crit, alpha=0.8)
    if front:
        ax.plot([r["final"][cost] for r in front], [_value(r) for r in front], "k--x",
                lw=1, label="front")
    if dense:
        ax.axhline(dense["value"], color="gray", ls=":", lw=1, label="dense")
    latency = cost == "latency_ratio"
    ax.set_xlabel("fraction of the dense latency kept" if latency else "fraction of MACs kept")
    ax.set_ylabel(metric + ("" if higher_is_better else " (lower is better)"))
    title = f"NNI pruning search: {metric} vs {'latency' if latency else 'MACs'}"
    if setting:
        import textwrap

        title += "\n" + textwrap.fill(setting, 80)
    ax.set_title(title, fontsize=10 if setting else None)
    if ax.get_legend_handles_labels()[0]:  # nothing to label when every trial failed
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_search(
    search_space: dict[str, Any],
    settings: SearchSettings,
    out_dir: str | os.PathLike,
    *,
    dense_steps: int = 300,
    dense_lr: float = 3e-3,
    config_path: str | os.PathLike | None = None,
    max_trials: int | None = None,
    concurrency: int | None = None,
    port: int | None = None,
    timeout_s: float | None = None,
    progress: bool | None = None,
    log: Callable[[str], None] | None = None,
) -> tuple[list[dict[str, Any]], str]:
    """Check the search space, train (or reuse) the dense model, run the experiment, summarise.

    Latency: the config's ``latency:`` section (:func:`config_latency`) fills the keys
    ``settings.latency`` does not set (``settings`` is updated). When the trials measure
    latency (:func:`measures_latency`) the backend is checked before anything runs
    (:func:`check_latency`: a ``"cuda"`` backend without a GPU, ``"onnxruntime"`` without the
    ``deploy`` extra), its setting is logged, and the trials run one at a time unless
    ``concurrency`` says otherwise (then a warning is logged: concurrent trials share the
    CPU, so one trial's training slows another's measurement).

    Args:
        concurrency: Trials at a time (``None``: the config's ``trialConcurrency``, or 1
            when latency is measured).
        progress: tqdm bars of the dense training and of the finished trials (``None``: only
            when stderr is a terminal).
        log: Receives the progress lines: dense training (every tenth of the steps when no
            bar is shown), the dense model against :func:`constant_baseline` (with
            :func:`check_dense`'s warning), and one :func:`format_trial` line per finished
            trial. ``None``: silent (NNI still prints its own lines).

    Returns:
        ``(rows, summary markdown)``; the files are in ``out_dir``.
    """
    from . import get_task

    task = get_task(settings.task)
    check_search_space(search_space, settings.task, settings)
    section = config_latency(config_path)
    if section is not None:
        check_latency_options(section)
        settings.latency = {**section, **(settings.latency or {})}
    backend = check_latency(search_space, settings)
    say = log or (lambda line: None)
    if backend is not None:
        concurrency = _latency_concurrency(concurrency, config_path, say)
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    if settings.dense:
        dense = _load_dense(settings.dense)["meta"]
        if dense.get("task") != settings.task:
            raise ValueError(f"{settings.dense} holds a dense {dense.get('task')} model, not "
                             f"{settings.task}")
        origin = f"reused from {settings.dense}"
    else:
        settings.dense = str(out_dir / "dense.pt")
        threads = settings.threads or torch.get_num_threads()
        say(f"dense {settings.task}: training {dense_steps} steps (batch {settings.batch_size}, "
            f"{settings.n_train} images, {threads} thread{'s' * (threads > 1)})")
        dense = train_dense(settings, dense_steps, dense_lr, settings.dense, progress, log)
        origin = f"{dense_steps} steps in {dense['train_s']:.0f} s"
    base = _baseline_text(dense)
    say(f"dense model: {task.metric} {dense['value']:.2f}{f' ({base})' if base else ''}, "
        f"{dense['macs'] / 1e6:.2f} M MACs; {origin}")
    warning = check_dense(dense, task.higher_is_better)
    if warning:
        say(f"warning: {warning}")
    if backend is not None:
        options = settings.latency or {}
        where = latency_backend(settings, example_inputs=task.example_inputs()).describe()
        goal = ("; each prunes to the target_latency it is given" if "target_latency" in
                search_space else f"; each prunes to {options['target']:g} of the dense latency"
                if options.get("target") is not None else "")
        how = f" (allocation {options.get('allocation', 'table')})" if goal else ""
        say(f"latency: every trial times its pruned model against the dense one on "
            f"{where}{goal}{how}")

    distilled = _values(search_space["distill"], "distill") if "distill" in search_space \
        else [settings.distill]
    if any(parse_distill(v) is not None for v in distilled):
        layers = settings.distill_layers or distill_layers(settings.task)
        what = ("each trial's distill parameter (" + ", ".join(map(str, distilled)) + ")"
                if "distill" in search_space else settings.distill)
        say(f"distillation: the fine-tuning distils from the trial's dense model, frozen: "
            f"{what}; features / dca at {', '.join(layers)}")

    def on_trial(row: dict[str, Any], finished: int, limit: int | None) -> None:
        say(format_trial(row, task.metric, done=finished, total=limit))

    rows = launch_experiment(search_space, settings, out_dir, config_path=config_path,
                             max_trials=max_trials, concurrency=concurrency, port=port,
                             timeout_s=timeout_s, higher_is_better=task.higher_is_better,
                             progress=progress, on_trial=on_trial if log else None)
    text = summarize(rows, out_dir, metric=task.metric, higher_is_better=task.higher_is_better,
                     dense=dense)
    return rows, text


def _latency_concurrency(concurrency: int | None, config_path: str | os.PathLike | None,
                         say: Callable[[str], None]) -> int:
    """Trials at a time when every trial measures latency: 1 unless asked for more (then a
    warning), also overriding a larger ``trialConcurrency`` of the config (said)."""
    if concurrency is not None:
        if concurrency > 1:
            say(f"warning: {concurrency} trials at a time, each measuring latency: they share "
                "the CPU, so one trial's training slows another's timed passes and the latency "
                "figures carry that load; run one trial at a time (concurrency 1) for figures "
                "to compare")
        return concurrency
    configured = _read_config(config_path).get("trialConcurrency") if config_path else None
    if isinstance(configured, int) and configured > 1:
        say(f"latency: trials run one at a time (the config's trialConcurrency {configured} is "
            "overridden: concurrent trials would slow each other's latency measurements; "
            "pass a concurrency to keep it)")
    return 1


if __name__ == "__main__":  # a trial, started by NNI (see launch_experiment)
    result = trial_main()
    print({k: v for k, v in result.items() if k != "history"})
