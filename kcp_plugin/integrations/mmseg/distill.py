"""Distillation from the dense segmentor inside mmengine's training step (``PruningHook``'s
``distill=``).

What the hook needs beyond :class:`kcp_plugin.distill.Distiller`:

* :class:`SegmentorDistillLoss`: the segmentor's ``loss(inputs, data_samples)`` with the
  distillation terms joined to mmseg's loss dict, so ``parse_losses`` sums them into the total
  and the logger shows them like any loss. The student's logits are read from the forward the
  task loss runs (the last decode head's ``forward``, which mmseg calls directly, out of sight
  of module hooks), so a step costs the student one forward and the teacher one;
* :func:`seg_labels`: the per-pixel labels of the data samples (DCA terms);
* the teacher file: the teacher is written once per run (:func:`save_teacher`, a plain state
  dict with its pruning plan) instead of into every checkpoint, and rebuilt on resume
  (:func:`load_teacher`) on a copy of the freshly built segmentor.
"""

from __future__ import annotations

import contextlib
import copy
import os
import os.path as osp
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn as nn

from kcp_plugin.distill import DistillConfig, Distiller
from kcp_plugin.hints import did_you_mean
from kcp_plugin.plan import get_plan, validate_plan

from .structure import sync_structure

__all__ = ["TEACHER_FILE", "SegmentorDistillLoss", "check_distill_config", "check_segmentor",
           "seg_labels", "save_teacher", "load_teacher"]

TEACHER_FILE = "distill_teacher.pth"  # in the work_dir, written at a run's first checkpoint
_FORMAT = "kcp_plugin.distill_teacher"


def check_distill_config(value: Any) -> DistillConfig | None:
    """The hook's ``distill`` argument as a record (None: no distillation).

    Raises:
        ValueError / TypeError: the record's own errors (unknown field with the valid ones, bad
            value), or ``adapter=True``: the optimizer is built from the model by mmengine and
            the student is pruned during training, so a learned adapter has neither an
            optimizer nor a fixed width.
    """
    try:
        config = DistillConfig.from_value(value)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"PruningHook distill: {exc}") from None
    if config is not None and config.adapter:
        raise ValueError("PruningHook distill: adapter=True is not supported (mmengine builds "
                         "the optimizer from the model, so an adapter's weights would not be "
                         "trained, and the student is pruned during training); distil the "
                         "teacher's kept channels (adapter=False, the default)")
    return config


def check_segmentor(model: nn.Module, config: DistillConfig) -> None:
    """Refuse, before training, a model the hook cannot distil and layer names it lacks.

    Raises:
        ValueError: not an encoder-decoder segmentor (no ``decode_head`` / ``extract_feat`` /
            ``loss``), a ``layers`` / ``dca_layers`` name not in the model (close matches), or
            a head itself (mmseg calls heads' ``forward`` directly: no hook sees their output).
    """
    if not all(hasattr(model, a) for a in ("decode_head", "extract_feat", "loss")):
        raise ValueError(f"PruningHook distill: {type(model).__name__} is not an mmseg "
                         "encoder-decoder segmentor (decode_head, extract_feat, loss); "
                         "distillation reads the decode head's logits")
    modules = dict(model.named_modules())
    names = [n for n in modules if n]
    heads = set()  # the heads (and lists of heads) mmseg calls as head.forward(...)
    for attr in ("decode_head", "auxiliary_head"):
        head = getattr(model, attr, None)
        if isinstance(head, nn.Module):
            heads |= {id(head), *(id(h) for h in head)} if isinstance(head, nn.ModuleList) \
                else {id(head)}
    for key in ("layers", "dca_layers"):
        for name in getattr(config, key):
            if name not in names:
                raise ValueError(f"PruningHook distill {key}: layer {name!r} does not exist "
                                 f"in the model{did_you_mean(name, names)}")
            if id(modules[name]) in heads:
                raise ValueError(f"PruningHook distill {key}: {name!r} is a head, which mmseg "
                                 "runs as head.forward(...), out of sight of module hooks; "
                                 "name a layer inside it (e.g. 'decode_head.convs'), or "
                                 "distil the logits with the output loss (type=...)")


def seg_labels(data_samples: Sequence[Any]) -> torch.Tensor:
    """Per-pixel class labels ``[N, H, W]`` of the samples' ``gt_sem_seg`` (255: ignored)."""
    return torch.stack([s.gt_sem_seg.data for s in data_samples]).squeeze(1).long()


def _last_decode_head(model: nn.Module) -> nn.Module:
    heads = model.decode_head
    return heads[-1] if isinstance(heads, nn.ModuleList) else heads


@contextlib.contextmanager
def _captured_logits(head: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Record what ``head.forward`` returns while the block runs (its last call)."""
    seen: list[torch.Tensor] = []
    own = head.__dict__.get("forward")  # an instance-level forward someone else set
    original = head.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        seen.append(out)
        return out

    head.__dict__["forward"] = forward
    try:
        yield seen
    finally:
        if own is None:
            del head.__dict__["forward"]
        else:
            head.__dict__["forward"] = own


class SegmentorDistillLoss:
    """Joins the distiller's terms to the segmentor's loss dict while :attr:`active`.

    :meth:`install` shadows ``model.loss`` on the instance (mmseg's ``forward(mode='loss')``,
    under DDP too, calls it); :meth:`remove` restores the class's method. Outside training
    steps (``active`` False: a pruning point scoring a gradient criterion, a data-driven
    criterion collecting) or in eval mode, the loss is mmseg's alone.

    Args:
        model: The unwrapped segmentor (the student).
        distiller: Its distiller; its ``forward_fn`` must return the decode logits first
            (``trace_forward``), which is what the teacher's output is compared by.
    """

    def __init__(self, model: nn.Module, distiller: Distiller):
        self.model = model
        self.distiller = distiller
        self.active = False

    def install(self) -> None:
        """Shadow ``model.loss`` (idempotent)."""
        if "loss" in self.model.__dict__:
            return
        original = type(self.model).loss.__get__(self.model)

        def loss(inputs: torch.Tensor, data_samples: list) -> dict[str, torch.Tensor]:
            return self(original, inputs, data_samples)

        # a plain function in the instance's __dict__: deep copies of the model (EMA, latency
        # references) share it without copying this object, and the state dict never sees it
        self.model.__dict__["loss"] = loss

    def remove(self) -> None:
        """Restore the segmentor's own ``loss``."""
        self.model.__dict__.pop("loss", None)
        self.active = False

    def __call__(self, original: Any, inputs: torch.Tensor,
                 data_samples: list) -> dict[str, torch.Tensor]:
        if not (self.active and self.model.training):
            return original(inputs, data_samples)
        with _captured_logits(_last_decode_head(self.model)) as seen:
            losses = original(inputs, data_samples)
        if not seen:
            raise RuntimeError(f"PruningHook distill: {type(self.model).__name__}.loss did not "
                               "run its decode head's forward, so there are no logits to "
                               "distil")
        labels = seg_labels(data_samples) if self.distiller.config.dca_layers else None
        terms = self.distiller(inputs, seen[-1], labels)
        clash = sorted(set(terms) & set(losses))
        if clash:
            raise RuntimeError(f"PruningHook distill: the segmentor's loss dict already has "
                               f"{', '.join(clash)}")
        losses.update(terms)
        return losses


# ---------------------------------------------------------------------- the teacher file
def save_teacher(teacher: nn.Module, path: str, run_id: str) -> None:
    """Write the teacher once: its state dict (on the CPU) and pruning plan, plain data for
    ``torch.load(weights_only=True)``; written beside and renamed, so a reader never sees a
    partial file."""
    state = {"format": _FORMAT, "run_id": run_id, "plan": get_plan(teacher),
             "state_dict": {k: v.detach().cpu() for k, v in teacher.state_dict().items()}}
    os.makedirs(osp.dirname(osp.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_teacher(fresh: nn.Module, candidates: Sequence[str], run_id: str,
                 inputs: torch.Tensor) -> tuple[nn.Module, str]:
    """Rebuild a run's teacher: a copy of ``fresh`` (the segmentor as the config builds it,
    before a checkpoint's plan is replayed on it) brought to the teacher's plan, with its
    weights, from the first of ``candidates`` that exists.

    Returns:
        ``(teacher, path)``: the teacher on ``fresh``'s device, and the file it came from.

    Raises:
        FileNotFoundError: none of the candidate paths exists (all named).
        ValueError: the file is not a teacher file, belongs to another run, or does not fit
            the model (tensor shapes named).
    """
    paths = list(dict.fromkeys(osp.abspath(p) for p in candidates))
    path = next((p for p in paths if osp.isfile(p)), None)
    if path is None:
        raise FileNotFoundError(
            "PruningHook distill: resuming needs the dense teacher this run saved, and no "
            f"teacher file exists at {' or '.join(paths)}; put the run's {TEACHER_FILE} "
            "beside the checkpoint (it is written to the work_dir at the first checkpoint)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != _FORMAT:
        raise ValueError(f"PruningHook distill: {path} is not a teacher file written by the "
                         "PruningHook")
    if state.get("run_id") != run_id:
        raise ValueError(f"PruningHook distill: {path} holds the teacher of another run "
                         f"({state.get('run_id')}, the checkpoint's is {run_id}): a later run "
                         "in the same work_dir replaced it")
    teacher = copy.deepcopy(fresh)
    sync_structure(teacher, validate_plan(state["plan"]), inputs)
    own = teacher.state_dict()
    saved = state["state_dict"]
    bad = [f"{k}: file {tuple(v.shape)}, model {tuple(own[k].shape)}" for k, v in saved.items()
           if k in own and own[k].shape != v.shape]
    missing = sorted(set(own) ^ set(saved))
    if bad or missing:
        raise ValueError(f"PruningHook distill: the teacher in {path} does not fit the model "
                         f"the config builds ({'; '.join((bad + missing)[:5])})")
    teacher.load_state_dict(saved)
    return teacher, path
