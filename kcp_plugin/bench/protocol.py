"""The dense-labeling benchmark protocol: train once per seed, prune with every criterion at
equal MACs, fine-tune with the same budget, evaluate; plus criterion cost and similarity.

Fine-tuning can distil from the dense model (:mod:`kcp_plugin.distill`): a profile's ``distill``
names settings (:data:`DISTILL_SETTINGS`), every pruned row is fine-tuned once per setting with
the same steps and learning rate, and the dense model fine-tuned for those steps too is the
reference the gap is measured against (``dense_ft``).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..compensation import compensating
from ..deploy.latency import measure_latency
from ..distill import DistillConfig, Distiller
from ..graph import build_graph, count_macs_params
from ..pruning import prune
from ..registry import criterion_arguments, get_importance, importance_info
from ..report import layer_widths
from ..run import populate_gradients
from ..stats import StatsImportance, collect
from .tasks import Task, get_task
from .training import make_loader, train

__all__ = ["Profile", "PROFILES", "DISTILL_LAYERS", "DISTILL_SETTINGS", "NotApplicable",
           "criterion_analysis", "dense_finetune", "dense_model", "distill_config",
           "forward_for", "run_benchmark", "run_one", "task_profile"]


@dataclass
class Profile:
    """Everything that sets the benchmark's size. Numbers are per task and seed."""

    tasks: list[str]
    seeds: list[int]
    criteria: list[str]
    targets: list[float]  # fractions of MACs kept
    iterative_criteria: list[str] = field(default_factory=list)
    soft_criteria: list[str] = field(default_factory=list)  # also run with SFP and SRFP
    # also run one-shot followed by least-squares compensation of the consumers (CaP's repair)
    comp_criteria: list[str] = field(default_factory=list)
    # also train the pruned architecture from scratch (dense + fine-tuning steps, dense lr): is
    # what the criterion kept worth more than the widths it chose? (Liu et al., ICLR 2019)
    scratch_criteria: list[str] = field(default_factory=list)
    iterative_steps: int = 3
    n_train: int = 256
    n_val: int = 64
    batch_size: int = 16
    dense_steps: int = 300
    finetune_steps: int = 100
    lr: float = 3e-3
    finetune_lr: float = 1e-3
    latency_runs: int = 10
    data_steps: int = 8  # batches of statistics for data-driven criteria (fisher, cdc, cap)
    criterion_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)
    # folder of trained dense models, reused by later runs with the same training settings
    dense_cache: str | None = None
    # distillation settings of the fine-tuning, name -> spec (see distill_config; None: the task
    # loss alone); empty: no distillation and no "distill" field in the rows. Every pruned row
    # runs once per setting, and the dense model is fine-tuned for the same steps (dense_ft)
    distill: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    # per-task replacements of the fields above (budgets): one profile, each task at its own
    task_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)


# Layers distilled per model: "stages" (feature distillation on the teacher's kept channels: the
# backbone stages and the last feature map before the head) and "late" (DCA: the last feature
# map, where classes separate). The MTCNN study names its own (tools/real_study.py).
DISTILL_LAYERS: dict[str, dict[str, list[str]]] = {
    "deeplabv3_lite": {"stages": ["layer2", "layer3", "layer4", "aspp"], "late": ["aspp"]},
    "fcn_lite": {"stages": ["features.3", "features.6", "features.9", "head.0"],
                 "late": ["head.0"]},
    "resnet20": {"stages": ["layer1", "layer2", "layer3"], "late": ["layer3"]},
    "stereo_lite": {"stages": ["feature", "aggregate"]},
}

# Named distillation settings (specs of distill_config). "out" is the task's output loss: per
# pixel / per sample KL for classes, L1 to the teacher's disparity for stereo. Weights and
# temperatures: the distill_explore profile (segmentation, seed 0, 30% of the MACs; see
# docs/benchmarks.md): KL at T=4 beat T=1 (27.8 vs 25.4 mIoU), features at x10 beat x1 and x3,
# DCA at x3 beat x1 and x0.3 and x10 beat x3 next to the other terms.
_FEAT = {"layers": "stages", "layer_weight": 10.0}
DISTILL_SETTINGS: dict[str, dict[str, Any] | None] = {
    "none": None,
    "out": {"output": "auto"},
    "kl_T4": {"output": "kl", "temperature": 4.0},
    "cwd": {"output": "cwd", "temperature": 4.0},
    "out+feat": {"output": "auto", "temperature": 4.0, **_FEAT},
    "out+dca": {"output": "auto", "temperature": 4.0, "dca_layers": "late", "dca_weight": 3.0},
    "cwd+feat": {"output": "cwd", "temperature": 4.0, **_FEAT},
    "cwd+feat+dca": {"output": "cwd", "temperature": 4.0, **_FEAT, "dca_layers": "late",
                     "dca_weight": 10.0},
}


class NotApplicable(ValueError):
    """A distillation setting the task cannot take (the rows record why)."""


def distill_config(task: Task, spec: dict[str, Any] | None) -> DistillConfig | None:
    """The :class:`DistillConfig` of a setting's ``spec`` on ``task`` (None: no distillation).

    A spec holds :class:`DistillConfig` fields, where ``output="auto"`` is the task's output
    loss (``kl`` for classes, ``l1`` for stereo disparities), ``layers`` / ``dca_layers`` may
    name a layer set of :data:`DISTILL_LAYERS` (``"stages"``, ``"late"``), and ``num_classes``
    defaults to the task's.

    Raises:
        NotApplicable: a setting the task cannot take (``kl`` / ``cwd`` or DCA on stereo,
            which regresses disparities: no classes; ``cwd`` on a classifier: no maps).
        ValueError: a layer set the model does not have, an invalid field.
    """
    if spec is None:
        return None
    spec = dict(spec)
    regression = task.name == "stereo"
    if spec.get("output") == "auto":
        spec["output"] = "l1" if regression else "kl"
        if regression:
            spec.pop("temperature", None)  # regression losses take none
    if regression and spec.get("output") in ("kl", "cwd"):
        raise NotApplicable(f"output distillation {spec['output']!r} compares class "
                            "distributions; stereo regresses a disparity per pixel (use l1)")
    if task.name == "classification" and spec.get("output") == "cwd":
        raise NotApplicable("output distillation 'cwd' compares spatial maps per class; a "
                            "classifier outputs one score per class (use kl)")
    if regression and spec.get("dca_layers"):
        raise NotApplicable("DCA distils in the discriminant subspace of class labels: 'dca' "
                            "needs class labels; stereo regresses disparities and has no "
                            "classes (use features)")
    for key in ("layers", "dca_layers"):
        if isinstance(spec.get(key), str):
            sets = DISTILL_LAYERS.get(task.model, {})
            if spec[key] not in sets:
                raise ValueError(f"{task.model} has no distillation layer set {spec[key]!r} "
                                 f"(DISTILL_LAYERS has {', '.join(sets) or 'none'})")
            spec[key] = list(sets[spec[key]])
    if spec.get("dca_layers") and "num_classes" in task.model_kwargs:
        spec.setdefault("num_classes", task.model_kwargs["num_classes"])
    return DistillConfig.from_value(spec)


_STAGES = ["layer2", "layer3", "layer4", "aspp"]
_EXPLORE: dict[str, dict[str, Any] | None] = {
    "none": None,
    **{f"kl_T{t}_w{w:g}": {"output": "kl", "temperature": float(t), "weight": w}
       for t, w in ((1, 0.5), (1, 1.0), (1, 3.0), (2, 1.0), (4, 1.0), (4, 3.0))},
    **{f"cwd_T{t}_w{w:g}": {"output": "cwd", "temperature": float(t), "weight": w}
       for t, w in ((1, 1.0), (4, 1.0), (4, 3.0))},
    "feat_only": {"output": None, "layers": _STAGES},
    **{f"kl+feat_{name}_w{w:g}": {"output": "kl", "layers": layers, "layer_weight": w}
       for name, layers, w in (("stages", _STAGES, 1.0), ("stages", _STAGES, 3.0),
                               ("stages", _STAGES, 10.0), ("aspp", ["aspp"], 1.0),
                               ("backbone", ["layer2", "layer3", "layer4"], 1.0),
                               ("head", ["head"], 1.0))},
    "dca_only": {"output": None, "dca_layers": ["aspp"], "num_classes": 5},
    **{f"kl+dca_{name}_w{w:g}": {"output": "kl", "dca_layers": layers, "dca_weight": w,
                                  "num_classes": 5}
       for name, layers, w in (("aspp", ["aspp"], 1.0), ("aspp", ["aspp"], 3.0),
                               ("aspp", ["aspp"], 0.3), ("layer4", ["layer4"], 1.0))},
    "kl+feat+dca": {"output": "kl", "layers": _STAGES, "dca_layers": ["aspp"],
                    "num_classes": 5},
    # second round: the best of each (feature weight up, T=4 outputs, DCA x3) combined
    **{f"feat_stages_w{w:g}": {"output": None, "layers": _STAGES, "layer_weight": w}
       for w in (10.0, 30.0, 100.0)},
    "feat_all_w10": {"output": None, "layer_weight": 10.0,
                     "layers": ["stem", "layer1", *_STAGES, "head"]},
    "kl_T4+feat_w10": {"output": "kl", "temperature": 4.0, "layers": _STAGES,
                       "layer_weight": 10.0},
    "cwd_T4+feat_w10": {"output": "cwd", "temperature": 4.0, "layers": _STAGES,
                        "layer_weight": 10.0},
    "cwd_T4+feat_w30": {"output": "cwd", "temperature": 4.0, "layers": _STAGES,
                        "layer_weight": 30.0},
    "kl_T4+dca_w3": {"output": "kl", "temperature": 4.0, "dca_layers": ["aspp"],
                     "dca_weight": 3.0, "num_classes": 5},
    "cwd_T4+feat_w10+dca_w3": {"output": "cwd", "temperature": 4.0, "layers": _STAGES,
                               "layer_weight": 10.0, "dca_layers": ["aspp"],
                               "dca_weight": 3.0, "num_classes": 5},
    # third round: around the best so far
    "cwd_T4+feat_all_w10": {"output": "cwd", "temperature": 4.0, "layer_weight": 10.0,
                            "layers": ["stem", "layer1", *_STAGES, "head"]},
    "cwd_T4+feat_all_w10+dca_w3": {"output": "cwd", "temperature": 4.0, "layer_weight": 10.0,
                                   "layers": ["stem", "layer1", *_STAGES, "head"],
                                   "dca_layers": ["aspp"], "dca_weight": 3.0,
                                   "num_classes": 5},
    "cwd_T4+feat_w10+dca_w10": {"output": "cwd", "temperature": 4.0, "layers": _STAGES,
                                "layer_weight": 10.0, "dca_layers": ["aspp"],
                                "dca_weight": 10.0, "num_classes": 5},
    "cwd_T2+feat_w10": {"output": "cwd", "temperature": 2.0, "layers": _STAGES,
                        "layer_weight": 10.0},
    # stereo (--tasks stereo; its own budget): L1 to the teacher's disparity, feature weights
    **{f"l1_w{w:g}": {"output": "l1", "weight": w} for w in (1.0, 3.0)},
    **{f"l1+feat_w{w:g}": {"output": "l1", "layers": "stages", "layer_weight": w}
       for w in (1.0, 10.0)},
    "stereo_feat_w1": {"output": None, "layers": "stages"},
}

ALL_CRITERIA = ["kcp", "kcp_mean", "kcp_kmeans", "l1", "l2", "fpgm", "taylor", "hessian", "bn",
                "lamp", "fisher", "cdc", "random"]

PROFILES: dict[str, Profile] = {
    # a smoke test: minutes on 2 CPU cores, checks the pipeline and that numbers are sane
    "quick": Profile(
        tasks=["segmentation"], seeds=[0], criteria=["kcp", "kcp_mean", "l2", "fpgm", "random"],
        targets=[0.5, 0.3], iterative_criteria=["kcp"], n_train=256, n_val=64,
        dense_steps=300, finetune_steps=40, latency_runs=5,
    ),
    # what docs/benchmarks.md reports (sized for a shared 2-core CPU machine)
    "segmentation": Profile(
        tasks=["segmentation"], seeds=[0, 1, 2],
        criteria=["kcp", "kcp_mean", "kcp_kmeans", "l2", "fpgm", "taylor", "random"],
        targets=[0.5, 0.3], iterative_criteria=["kcp"], soft_criteria=["kcp"], n_train=512,
        n_val=128, dense_steps=1000, finetune_steps=200,
    ),
    "stereo": Profile(
        tasks=["stereo"], seeds=[0], criteria=["kcp", "kcp_mean", "l2", "fpgm", "random"],
        targets=[0.5, 0.3], n_train=256, n_val=32, dense_steps=400, finetune_steps=60,
        lr=2e-3,
    ),
    # distillation at equal fine-tuning steps (docs/benchmarks.md, "Distillation"): one
    # criterion, one-shot; segmentation at the segmentation profile's budgets (its dense cache),
    # stereo at the stereo profile's
    "distill": Profile(
        tasks=["segmentation", "stereo"], seeds=[0, 1, 2], criteria=["kcp"],
        targets=[0.5, 0.3], n_train=512, n_val=128, dense_steps=1000, finetune_steps=200,
        latency_runs=0, distill=dict(DISTILL_SETTINGS),
        task_overrides={"stereo": {"n_train": 256, "n_val": 32, "dense_steps": 400,
                                   "finetune_steps": 60, "lr": 2e-3}},
    ),
    # the exploration that chose the distill profile's settings: segmentation, seed 0, 30% of
    # the MACs, weights / temperatures / layers / DCA one at a time, then combined (three
    # rounds, --distill NAMES); stereo with --tasks stereo (its own budget)
    "distill_explore": Profile(
        tasks=["segmentation"], seeds=[0], criteria=["kcp"], targets=[0.3], n_train=512,
        n_val=128, dense_steps=1000, finetune_steps=200, latency_runs=0,
        distill=_EXPLORE,
        task_overrides={"stereo": {"n_train": 256, "n_val": 32, "dense_steps": 400,
                                   "finetune_steps": 60, "lr": 2e-3}},
    ),
    # the study quoted in docs/benchmarks.md
    "full": Profile(
        tasks=["segmentation", "stereo", "classification"], seeds=[0, 1, 2],
        criteria=ALL_CRITERIA, targets=[0.5, 0.3], iterative_criteria=["kcp", "l2", "fpgm"],
        n_train=512, n_val=128, dense_steps=600, finetune_steps=150,
    ),
}


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra = a.argsort().argsort().double()
    rb = b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = (ra.norm() * rb.norm()).item()
    return float((ra @ rb).item() / den) if den > 0 else float("nan")


def criterion_analysis(
    model: nn.Module,
    task: Task,
    batch: tuple[torch.Tensor, ...],
    criteria: list[str],
    repeats: int = 3,
) -> dict[str, dict[str, float]]:
    """Scoring cost relative to ``l2`` and rank correlation with ``l2``, on ``model``'s groups.

    Returns:
        ``{criterion: {"time_s", "time_vs_l2", "spearman_vs_l2"}}``.
    """
    model = copy.deepcopy(model).eval()
    example = task.example_inputs()
    graph = build_graph(model, example, forward_for(task))
    roots = [nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.Linear]
    groups = list(graph.get_all_groups(root_module_types=roots))
    out: dict[str, dict[str, float]] = {}
    scores: dict[str, list] = {}
    for name in dict.fromkeys(["l2", *criteria]):
        imp = get_importance(name)
        loss_fn = _feed(task, name, batch, [batch]).get("loss_fn")
        if loss_fn is not None:
            populate_gradients(model, imp, loss_fn)
        collect_s = 0.0
        if isinstance(imp, StatsImportance):
            start = time.perf_counter()
            try:
                collect(model, [batch], imp, example_inputs=example, forward_fn=forward_for(task),
                        step_fn=_step_fn(task), progress=False)
            except (ValueError, RuntimeError):
                continue  # the criterion does not apply to this task (cdc without classes)
            collect_s = time.perf_counter() - start
            imp.bind(model)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            result = [imp(g) for g in groups]
            best = min(best, time.perf_counter() - start)
        scores[name] = result
        out[name] = {"time_s": best, "collect_s": collect_s}
    for name in out:
        out[name]["time_vs_l2"] = out[name]["time_s"] / max(out["l2"]["time_s"], 1e-12)
        corr = [_spearman(s.float(), r.float()) for s, r in zip(scores[name], scores["l2"])
                if s is not None and r is not None and len(s) >= 3]
        out[name]["spearman_vs_l2"] = float(torch.tensor(corr).nanmean()) if corr else float("nan")
    return out


def forward_for(task: Task) -> Callable | None:
    return (lambda m, x: m(*x)) if task.name == "stereo" else None


def _step_fn(task: Task) -> Callable:
    """The task's summed training loss on a batch: the statistics step of data criteria."""
    return lambda model, batch: task.loss(task.forward(model, batch), batch, "sum")


def _feed(task: Task, criterion: str, batch: tuple[torch.Tensor, ...], train_loader: Any = None,
          data_steps: int | None = None) -> dict[str, Any]:
    """The ``prune`` arguments that feed ``criterion`` (:func:`criterion_arguments`): a loss
    on ``batch`` for gradient criteria, ``train_loader`` for data-driven ones."""
    return criterion_arguments(
        importance_info(criterion), lambda m, b, reduction: task.loss(task.forward(m, b), b,
                                                                     reduction),
        batch=batch, batches=train_loader, data_steps=data_steps)


def _prune_to(model: nn.Module, task: Task, criterion: str, target: float,
              kwargs: dict[str, Any], feed: dict[str, Any]) -> Any:
    return prune(model, task.example_inputs(), criterion, target_macs_ratio=target,
                 forward_fn=forward_for(task), importance_kwargs=kwargs or None,
                 progress=False, **feed)


def _reinitialise(model: nn.Module, seed: int) -> None:
    """Fresh random weights (and norm statistics) for every layer, seeded, shapes kept."""
    torch.manual_seed(seed)
    for module in model.modules():
        if hasattr(module, "reset_running_stats"):
            module.reset_running_stats()
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()


def run_one(
    dense: nn.Module,
    task: Task,
    criterion: str,
    target: float,
    schedule: str,
    profile: Profile,
    train_loader: Any,
    val_loader: Any,
    seed: int,
    distill: DistillConfig | None = None,
    memo: dict[tuple, Any] | None = None,
) -> tuple[dict[str, Any], nn.Module]:
    """Prune a copy of ``dense`` to ``target`` MACs kept, fine-tune, evaluate; one result row.

    Every row starts from the same random state and a fresh loader seeded with ``seed``: each
    criterion and schedule sees the same batches in the same order, whatever rows ran before
    it (otherwise the shuffling state left by earlier rows, or by dense training that a cached
    model skipped, would give each row its own batch order).

    ``distill``: the fine-tuning also distils from ``dense`` (a frozen copy is the teacher),
    same steps and learning rate; the row records the setting (``distill_config``).

    ``memo``: a dict kept across calls on the same dense model and seed; a one-shot prune is
    then made once and reused (with the random and shuffling states it left) by the rows that
    differ only in their distillation: the same rows, without pruning again.
    """
    model = copy.deepcopy(dense)

    def distiller() -> Distiller | None:
        if distill is None:
            return None
        return Distiller(copy.deepcopy(dense), model, distill, task.example_inputs(),
                         forward_fn=forward_for(task))

    torch.manual_seed(seed)
    train_loader = make_loader(train_loader.dataset, train_loader.batch_size, seed)
    batch = next(iter(train_loader))
    kwargs = profile.criterion_kwargs.get(criterion, {})
    feed = _feed(task, criterion, batch, train_loader, profile.data_steps)
    macs0 = count_macs_params(dense, task.example_inputs(), forward_for(task))[0]
    start = time.perf_counter()
    prune_s = 0.0
    if schedule == "scratch":
        t0 = time.perf_counter()
        _prune_to(model, task, criterion, target, kwargs, feed)
        prune_s += time.perf_counter() - t0
        _reinitialise(model, seed)
        after_prune = task.evaluate(model, val_loader)
        kd = distiller()
        train(model, task, train_loader, profile.dense_steps + profile.finetune_steps,
              profile.lr, desc=f"scratch {criterion}", progress=False, distiller=kd)
    elif schedule in ("oneshot", "oneshot+comp"):
        key = (id(dense), task.name, task.model, seed, criterion, target, schedule)
        if memo is not None and key in memo:
            pruned, prune_s, after_prune, rng, shuffle = memo[key]
            model = copy.deepcopy(pruned)
            torch.set_rng_state(rng)
            train_loader.generator.set_state(shuffle)
        else:
            t0 = time.perf_counter()
            if schedule == "oneshot":
                _prune_to(model, task, criterion, target, kwargs, feed)
            else:
                # statistics of the dense model's consumer inputs, the prune, the repair
                with compensating(model, train_loader, steps=profile.data_steps,
                                  forward_fn=forward_for(task), step_fn=_step_fn(task),
                                  progress=False):
                    _prune_to(model, task, criterion, target, kwargs, feed)
            prune_s += time.perf_counter() - t0
            after_prune = task.evaluate(model, val_loader)
            if memo is not None:
                memo[key] = (copy.deepcopy(model), prune_s, after_prune, torch.get_rng_state(),
                             train_loader.generator.get_state())
        kd = distiller()
        train(model, task, train_loader, profile.finetune_steps, profile.finetune_lr,
              desc=f"fine-tune {criterion}", progress=False, distiller=kd)
    else:
        # iterative (hard), SFP (soft) or SRFP (decay) through the training-time scheduler:
        # pruning points every F/S fine-tuning steps, the last one hard, then the remaining
        # steps fine-tune the pruned model: the same budget F as one-shot
        from ..schedule import PruningScheduler

        steps = profile.iterative_steps
        sched = PruningScheduler(
            model, task.example_inputs(), criterion, target_macs_ratio=target,
            num_prunes=steps, every=max(1, profile.finetune_steps // steps),
            mode="hard" if schedule == "iterative" else schedule,
            forward_fn=forward_for(task), importance_kwargs=kwargs or None,
            loss_fn=feed.get("loss_fn"),
            prune_kwargs={k: v for k, v in feed.items() if k != "loss_fn"},
        )
        t0 = time.perf_counter()
        sched.step()  # the first point, before any fine-tuning
        prune_s += time.perf_counter() - t0
        after_prune = task.evaluate(model, val_loader)
        kd = distiller()  # re-reads the kept channels after every pruning point
        train(model, task, train_loader, profile.finetune_steps, profile.finetune_lr,
              desc=f"fine-tune {criterion} {schedule}", progress=False, on_step=sched.step,
              distiller=kd)
    if kd is not None:
        kd.remove()
    metrics = task.evaluate(model, val_loader)
    macs, params = count_macs_params(model, task.example_inputs(), forward_for(task))
    row = {
        "task": task.name, "model": task.model, "seed": seed, "criterion": criterion,
        "schedule": schedule, "target_macs": target, "macs_ratio": macs / macs0,
        "params": params, "metric": task.metric, "value": metrics[task.metric],
        "after_prune": after_prune[task.metric] if after_prune else None, **metrics,
        "prune_s": prune_s, "wall_s": time.perf_counter() - start,
        "widths": layer_widths(model),
    }
    if distill is not None:
        row["distill_config"] = distill.to_dict()
    if profile.latency_runs:
        row["latency_ms"] = measure_latency(model, task.example_inputs(), forward_for(task),
                                            runs=profile.latency_runs, threads=1)
    return row, model


def _dense_key(task: Task, seed: int, profile: Profile) -> str:
    """What determines a trained dense model: the training settings and the code that builds,
    feeds and trains it (a change to the models, data or training loop invalidates the cache)."""
    root = Path(__file__).resolve().parents[1]
    sources = sorted([*(root / "models").glob("*.py"), *(root / "data").glob("*.py"),
                      root / "bench" / "training.py", root / "bench" / "tasks.py"])
    digest = hashlib.sha256()
    for path in sources:
        digest.update(path.read_bytes())
    settings = {
        "task": task.name, "model": task.model, "model_kwargs": task.model_kwargs,
        "data_kwargs": task.data_kwargs, "seed": seed, "n_train": profile.n_train,
        "n_val": profile.n_val, "batch_size": profile.batch_size,
        "dense_steps": profile.dense_steps, "lr": profile.lr, "torch": torch.__version__,
        "threads": torch.get_num_threads(), "code": digest.hexdigest(),
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def dense_model(task: Task, seed: int, profile: Profile, train_loader: Any, val_loader: Any,
                 progress: bool | None) -> tuple[nn.Module, dict[str, Any]]:
    """The trained dense model of ``task`` and ``seed`` with its result row; from
    ``profile.dense_cache`` when a model trained with the same settings and code is there.

    The cache holds a state dict (loaded with ``weights_only=True``) and the row as JSON; the
    row's ``cached`` field says where a reused model came from. Latency is measured anew. The
    model is returned in eval mode either way (what :func:`train` leaves).
    """
    dense = task.build(seed)
    cache = Path(profile.dense_cache) if profile.dense_cache else None
    name = f"{task.model}_s{seed}_{_dense_key(task, seed, profile)}" if cache else ""
    if cache and (cache / f"{name}.pt").is_file() and (cache / f"{name}.json").is_file():
        dense.load_state_dict(torch.load(cache / f"{name}.pt", weights_only=True))
        dense.eval()  # as train() leaves a model trained here: gradient criteria (taylor,
        # hessian) see BatchNorm in the same mode whether the dense model was cached or not
        dense_row = json.loads((cache / f"{name}.json").read_text())
        dense_row["cached"] = str(cache / f"{name}.pt")
    else:
        t0 = time.perf_counter()
        losses = train(dense, task, train_loader, profile.dense_steps, profile.lr,
                       desc=f"dense {task.name} seed {seed}", progress=progress)
        macs, params = count_macs_params(dense, task.example_inputs(), forward_for(task))
        dense_row = {
            "task": task.name, "model": task.model, "seed": seed, "macs": macs,
            "params": params, "metric": task.metric,
            **task.evaluate(dense, val_loader), "train_s": time.perf_counter() - t0,
            "first_loss": sum(losses[:5]) / 5, "last_loss": sum(losses[-5:]) / 5,
            "widths": layer_widths(dense),
        }
        dense_row["value"] = dense_row[task.metric]
        if cache:
            cache.mkdir(parents=True, exist_ok=True)
            # write to temporary names first: an interrupted run leaves no half entry
            torch.save(dense.state_dict(), cache / f"{name}.pt.tmp")
            (cache / f"{name}.json.tmp").write_text(json.dumps(dense_row))
            (cache / f"{name}.pt.tmp").replace(cache / f"{name}.pt")
            (cache / f"{name}.json.tmp").replace(cache / f"{name}.json")
    if profile.latency_runs:
        dense_row["latency_ms"] = measure_latency(dense, task.example_inputs(),
                                                  forward_for(task),
                                                  runs=profile.latency_runs, threads=1)
    return dense, dense_row


def dense_finetune(dense: nn.Module, task: Task, profile: Profile, train_loader: Any,
                   val_loader: Any, seed: int) -> dict[str, Any]:
    """The reference of the distillation rows: a copy of ``dense`` fine-tuned, unpruned, with
    the rows' steps, learning rate and batches; its metrics as a row."""
    model = copy.deepcopy(dense)
    torch.manual_seed(seed)
    loader = make_loader(train_loader.dataset, train_loader.batch_size, seed)
    start = time.perf_counter()
    train(model, task, loader, profile.finetune_steps, profile.finetune_lr,
          desc="fine-tune dense", progress=False)
    metrics = task.evaluate(model, val_loader)
    return {"task": task.name, "model": task.model, "seed": seed, "metric": task.metric,
            "value": metrics[task.metric], **metrics, "steps": profile.finetune_steps,
            "lr": profile.finetune_lr, "wall_s": time.perf_counter() - start}


def task_profile(profile: Profile, task: str) -> Profile:
    """``profile`` with ``task``'s overrides (its own budgets) applied.

    Raises:
        ValueError: an override of a field the profile does not have.
    """
    overrides = profile.task_overrides.get(task, {})
    names = {f for f in Profile.__dataclass_fields__} - {"task_overrides", "tasks"}
    bad = [k for k in overrides if k not in names]
    if bad:
        raise ValueError(f"task_overrides[{task!r}] sets {', '.join(bad)}, which are no "
                         "profile fields")
    return dataclasses.replace(profile, **overrides) if overrides else profile


def run_benchmark(
    profile: Profile,
    on_row: Callable[[dict[str, Any], dict[str, Any]], None] | None = None,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Run ``profile``; returns ``{"config", "dense", "rows", "criteria"}`` (plain data).

    ``on_row(row, result_so_far)`` is called after every result, so callers can save partial
    results (the whole structure, dense models and criterion analysis included).
    """
    from ..progress import progress_bar

    for name in profile.criteria:
        importance_info(name)  # fail fast on a typo, before hours of training
    for what in ("iterative_criteria", "soft_criteria", "comp_criteria", "scratch_criteria"):
        extra = [c for c in getattr(profile, what) if c not in profile.criteria]
        if extra:
            raise ValueError(f"{what} names {', '.join(extra)}, which the run's criteria "
                             f"({', '.join(profile.criteria)}) do not include")
    tasks = [get_task(t) for t in profile.tasks]
    keys = list(profile.tasks)  # registry names (two tasks may share a task.name)
    profiles = {key: task_profile(profile, key) for key in keys}
    # every setting checked on every task before any training (a typo, a bad field); a setting
    # a task cannot take (DCA on stereo) becomes rows that say why
    distills: dict[str, dict[str, DistillConfig | None | str]] = {}
    for key, task in zip(keys, tasks):
        distills[key] = {}
        for name, spec in profile.distill.items():
            try:
                distills[key][name] = distill_config(task, spec)
            except NotApplicable as exc:
                distills[key][name] = f"not applicable: {exc}"
    result: dict[str, Any] = {"config": asdict(profile), "dense": [], "rows": [], "criteria": []}
    if profile.distill:
        result["dense_ft"] = []
    def schedules(c: str) -> list[str]:
        return (["oneshot"] + (["oneshot+comp"] if c in profile.comp_criteria else [])
                + (["scratch"] if c in profile.scratch_criteria else [])
                + (["iterative"] if c in profile.iterative_criteria else [])
                + (["soft", "decay"] if c in profile.soft_criteria else []))

    settings = list(profile.distill) or [None]
    runs = [(c, t, s, d) for t in profile.targets for c in profile.criteria for s in schedules(c)
            for d in settings]
    bar = progress_bar(enabled=progress, total=len(tasks) * len(profile.seeds) * len(runs),
                       desc="benchmark")
    try:
        for key, task in zip(keys, tasks):
            budget = profiles[key]
            for seed in budget.seeds:
                train_ds, val_ds = task.splits(seed, budget.n_train, budget.n_val)
                train_loader = make_loader(train_ds, budget.batch_size, seed)
                val_loader = make_loader(val_ds, budget.batch_size, seed, shuffle=False)
                dense, dense_row = dense_model(task, seed, budget, train_loader, val_loader,
                                                progress)
                result["dense"].append(dense_row)
                analysis = criterion_analysis(dense, task, next(iter(train_loader)),
                                              profile.criteria)
                for name, values in analysis.items():
                    result["criteria"].append({"task": task.name, "seed": seed,
                                               "criterion": name, **values})
                memo: dict[tuple, Any] = {}  # one prune per row serves every setting
                if profile.distill:
                    result["dense_ft"].append(dense_finetune(dense, task, budget,
                                                             train_loader, val_loader, seed))
                for criterion, target, schedule, setting in runs:
                    kd = distills[key].get(setting)
                    try:
                        if isinstance(kd, str):
                            raise ValueError(kd)
                        row, _ = run_one(dense, task, criterion, target, schedule, budget,
                                         train_loader, val_loader, seed, distill=kd,
                                         memo=memo if profile.distill else None)
                    except (ValueError, RuntimeError) as exc:
                        row = {"task": task.name, "seed": seed, "criterion": criterion,
                               "schedule": schedule, "target_macs": target,
                               "error": f"{type(exc).__name__}: {exc}"}
                    if setting is not None:
                        row["distill"] = setting
                    if "latency_ms" in row and "latency_ms" in dense_row:
                        row["latency_ratio"] = row["latency_ms"] / dense_row["latency_ms"]
                    row["dense_value"] = dense_row["value"]
                    result["rows"].append(row)
                    if on_row:
                        on_row(row, result)
                    bar.update(1)
    finally:
        bar.close()
    return result
