"""The dense-labeling benchmark protocol: train once per seed, prune with every criterion at
equal MACs, fine-tune with the same budget, evaluate; plus criterion cost and similarity.
"""

from __future__ import annotations

import copy
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
from ..graph import build_graph, count_macs_params
from ..pruning import prune
from ..registry import criterion_arguments, get_importance, importance_info
from ..report import layer_widths
from ..run import populate_gradients
from ..stats import StatsImportance, collect
from .tasks import Task, get_task
from .training import make_loader, train

__all__ = ["Profile", "PROFILES", "criterion_analysis", "dense_model", "forward_for",
           "run_benchmark"]


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
) -> tuple[dict[str, Any], nn.Module]:
    """Prune a copy of ``dense`` to ``target`` MACs kept, fine-tune, evaluate; one result row.

    Every row starts from the same random state and a fresh loader seeded with ``seed``: each
    criterion and schedule sees the same batches in the same order, whatever rows ran before
    it (otherwise the shuffling state left by earlier rows, or by dense training that a cached
    model skipped, would give each row its own batch order).
    """
    model = copy.deepcopy(dense)
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
        train(model, task, train_loader, profile.dense_steps + profile.finetune_steps,
              profile.lr, desc=f"scratch {criterion}", progress=False)
    elif schedule in ("oneshot", "oneshot+comp"):
        t0 = time.perf_counter()
        if schedule == "oneshot":
            _prune_to(model, task, criterion, target, kwargs, feed)
        else:
            # statistics of the dense model's consumer inputs, then the prune, then the repair
            with compensating(model, train_loader, steps=profile.data_steps,
                              forward_fn=forward_for(task), step_fn=_step_fn(task),
                              progress=False):
                _prune_to(model, task, criterion, target, kwargs, feed)
        prune_s += time.perf_counter() - t0
        after_prune = task.evaluate(model, val_loader)
        train(model, task, train_loader, profile.finetune_steps, profile.finetune_lr,
              desc=f"fine-tune {criterion}", progress=False)
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
        train(model, task, train_loader, profile.finetune_steps, profile.finetune_lr,
              desc=f"fine-tune {criterion} {schedule}", progress=False, on_step=sched.step)
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
    result: dict[str, Any] = {"config": asdict(profile), "dense": [], "rows": [], "criteria": []}
    def schedules(c: str) -> list[str]:
        return (["oneshot"] + (["oneshot+comp"] if c in profile.comp_criteria else [])
                + (["scratch"] if c in profile.scratch_criteria else [])
                + (["iterative"] if c in profile.iterative_criteria else [])
                + (["soft", "decay"] if c in profile.soft_criteria else []))

    runs = [(c, t, s) for t in profile.targets for c in profile.criteria for s in schedules(c)]
    bar = progress_bar(enabled=progress, total=len(tasks) * len(profile.seeds) * len(runs),
                       desc="benchmark")
    try:
        for task in tasks:
            for seed in profile.seeds:
                train_ds, val_ds = task.splits(seed, profile.n_train, profile.n_val)
                train_loader = make_loader(train_ds, profile.batch_size, seed)
                val_loader = make_loader(val_ds, profile.batch_size, seed, shuffle=False)
                dense, dense_row = dense_model(task, seed, profile, train_loader, val_loader,
                                                progress)
                result["dense"].append(dense_row)
                analysis = criterion_analysis(dense, task, next(iter(train_loader)),
                                              profile.criteria)
                for name, values in analysis.items():
                    result["criteria"].append({"task": task.name, "seed": seed,
                                               "criterion": name, **values})
                for criterion, target, schedule in runs:
                    try:
                        row, _ = run_one(dense, task, criterion, target, schedule,
                                         profile, train_loader, val_loader, seed)
                    except (ValueError, RuntimeError) as exc:
                        row = {"task": task.name, "seed": seed, "criterion": criterion,
                               "schedule": schedule, "target_macs": target,
                               "error": f"{type(exc).__name__}: {exc}"}
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
