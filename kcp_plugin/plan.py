"""The one pruning-plan format, and saving / loading pruned models with it.

A plan is plain data (JSON-compatible): torch-pruning's pruning history (which root layer lost
which channel indices, in order) plus the attributes set on modules afterwards (attention head
counts). Replaying it on a freshly built model of the original architecture reproduces the pruned
structure; the state dict then fills in the weights. No module is ever pickled, so checkpoints
load with ``torch.load(weights_only=True)``. Every integration (CLI, mmseg, timm, NNI) saves and
loads this format.
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from .attention import apply_attrs
from .errors import upstream_error
from .graph import ForwardFn, build_graph
from .hosts import adapters_for, host_forward
from .nested import map_tensors

__all__ = [
    "PLAN_FORMAT",
    "get_plan",
    "apply_plan",
    "sync_plan",
    "save_pruned",
    "load_pruned",
    "read_checkpoint",
    "load_plain",
    "CARRIED_PLAN_KEY",
    "carried_plan",
    "encode_plan",
    "decode_plan",
]

PLAN_FORMAT = "kcp_plugin.plan"
PLAN_VERSION = 1
_ATTR = "_kcp_pruning_plan"
# State-dict key of a plan carried inside a model's own state dict (timm's ``kcp_pruned``
# models: every checkpoint timm writes then describes its structure).
CARRIED_PLAN_KEY = "kcp_pruning_plan"


def empty_plan() -> dict[str, Any]:
    """A plan that changes nothing."""
    return {"format": PLAN_FORMAT, "version": PLAN_VERSION, "history": [], "attrs": {}}


def get_plan(model: nn.Module) -> dict[str, Any]:
    """The cumulative plan of every prune applied to ``model`` (a copy; empty if never pruned)."""
    return copy.deepcopy(getattr(model, _ATTR, None) or empty_plan())


def set_plan(model: nn.Module, plan: dict[str, Any]) -> None:
    # Stored in __dict__ directly: a plain attribute, not a submodule/parameter/buffer.
    model.__dict__[_ATTR] = plan


def input_spec(example_inputs: Any) -> Any:
    """The shapes and dtypes of ``example_inputs`` as plain data (tensors, and tuples / lists /
    dicts of them; other values kept if JSON-able, else None): what :func:`load_pruned` builds
    inputs from when it is not given any."""
    if isinstance(example_inputs, torch.Tensor):
        return {"tensor": list(example_inputs.shape), "dtype": str(example_inputs.dtype)}
    if isinstance(example_inputs, (list, tuple)):
        return {"seq": [input_spec(v) for v in example_inputs],
                "tuple": isinstance(example_inputs, tuple)}
    if isinstance(example_inputs, dict):
        return {"dict": {str(k): input_spec(v) for k, v in example_inputs.items()}}
    if example_inputs is None or isinstance(example_inputs, (bool, int, float, str)):
        return {"value": example_inputs}
    return {"value": None}


def inputs_from_spec(spec: Any) -> Any:
    """Inputs of the shapes and dtypes :func:`input_spec` recorded (random floats, zero
    integers: tracing needs shapes, not values).

    Raises:
        ValueError: not a spec this version wrote.
    """
    if not isinstance(spec, dict):
        raise ValueError(f"not an input spec: {spec!r}")
    if "tensor" in spec:
        dtype = getattr(torch, spec["dtype"].replace("torch.", ""))
        if dtype.is_floating_point:
            return torch.randn(spec["tensor"], dtype=dtype)
        return torch.zeros(spec["tensor"], dtype=dtype)
    if "seq" in spec:
        values = [inputs_from_spec(v) for v in spec["seq"]]
        return tuple(values) if spec.get("tuple") else values
    if "dict" in spec:
        return {k: inputs_from_spec(v) for k, v in spec["dict"].items()}
    if "value" in spec:
        return spec["value"]
    raise ValueError(f"not an input spec: {spec!r}")


def extend_plan(
    model: nn.Module, history: list, attrs: dict[str, dict[str, Any]],
    example_inputs: Any = None,
) -> dict[str, Any]:
    """Append one prune's history and attribute changes to the model's plan (and, the first
    time, the shapes of the example inputs: ``plan["inputs"]``)."""
    plan = get_plan(model)
    if example_inputs is not None and "inputs" not in plan:
        plan["inputs"] = input_spec(example_inputs)
    plan["history"].extend(
        [str(name), bool(is_out), [int(i) for i in idxs]] for name, is_out, idxs in history
    )
    for name, values in attrs.items():
        plan["attrs"].setdefault(name, {}).update(values)
    set_plan(model, plan)
    return plan


def validate_plan(plan: Any) -> dict[str, Any]:
    """Check that ``plan`` is a plan of a format this version reads; return it.

    Raises:
        ValueError: not a plan, or from an unknown format version.
    """
    if not isinstance(plan, dict) or plan.get("format") != PLAN_FORMAT:
        raise ValueError(f"not a kcp_plugin pruning plan (expected format {PLAN_FORMAT!r})")
    if plan.get("version") != PLAN_VERSION:
        raise ValueError(
            f"pruning plan version {plan.get('version')!r} is not supported "
            f"(this kcp_plugin reads version {PLAN_VERSION})"
        )
    for entry in plan["history"]:
        if not (isinstance(entry, (list, tuple)) and len(entry) == 3):
            raise ValueError(f"malformed pruning-history entry {entry!r}")
    return plan


def encode_plan(plan: dict[str, Any]) -> torch.Tensor:
    """A plan as a ``uint8`` tensor of its JSON text (storable in any state dict format)."""
    data = json.dumps(plan, sort_keys=True, separators=(",", ":")).encode()
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()


def decode_plan(tensor: torch.Tensor) -> dict[str, Any]:
    """Inverse of :func:`encode_plan`.

    Raises:
        ValueError: not a 1-D uint8 tensor holding a plan.
    """
    if not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.uint8 or tensor.dim() != 1:
        raise ValueError(f"{CARRIED_PLAN_KEY} must be a 1-D uint8 tensor of JSON text")
    return validate_plan(json.loads(bytes(tensor.cpu().tolist()).decode()))


def carried_plan(state_dict: Any) -> dict[str, Any] | None:
    """The plan carried inside a state dict (key ending in :data:`CARRIED_PLAN_KEY`), if any."""
    if isinstance(state_dict, dict):
        for key, value in state_dict.items():
            if isinstance(key, str) and key.split(".")[-1] == CARRIED_PLAN_KEY:
                return decode_plan(value)
    return None


def apply_plan(
    model: nn.Module,
    plan: dict[str, Any],
    example_inputs: Any,
    forward_fn: ForwardFn | None = None,
    customized_pruners: dict[Any, Any] | None = None,
    unwrapped_parameters: dict[nn.Parameter, int] | None = None,
) -> nn.Module:
    """Replay ``plan`` on an unpruned ``model`` in place, reproducing the pruned structure.

    Pass the same ``customized_pruners`` / ``unwrapped_parameters`` as when pruning, if any:
    the replay must map channels the same way. Host libraries' pruners (timm's) are added
    automatically, as :func:`kcp_plugin.prune` adds them.

    Raises:
        ValueError: the plan is malformed or names layers the model does not have; the model is
            left unchanged in that case.
    """
    from .snapshot import ModuleSnapshot

    validate_plan(plan)
    modules = dict(model.named_modules())
    missing = sorted({e[0] for e in plan["history"]} - set(modules))
    missing += sorted(set(plan["attrs"]) - set(modules))
    if missing:
        raise ValueError(
            f"the pruning plan names layers this model does not have: {', '.join(missing[:5])}"
            " - was it built with the same architecture and arguments?"
        )
    snapshot = ModuleSnapshot(model)
    forward_fn = host_forward(model, forward_fn)  # e.g. mmseg's trace with auxiliary heads
    try:
        graph = build_graph(model, example_inputs, forward_fn,
                            customized_pruners=customized_pruners,
                            unwrapped_parameters=unwrapped_parameters)
        history = [[n, bool(o), list(map(int, idx))] for n, o, idx in plan["history"]]
        graph.load_pruning_history(history)
        apply_attrs(model, plan["attrs"])
        for host in adapters_for(model):
            host.after_replay(model)
    except BaseException as exc:
        snapshot.restore()
        converted = upstream_error(exc, "replaying the pruning plan")
        if converted is None:
            raise
        raise converted from exc
    set_plan(model, copy.deepcopy(plan))
    return model


def sync_plan(
    model: nn.Module,
    plan: dict[str, Any],
    example_inputs: Any,
    forward_fn: ForwardFn | None = None,
) -> bool:
    """Bring ``model`` to the structure of ``plan`` by replaying the steps it has not had yet.

    ``model``'s own plan must be a prefix of ``plan`` (the same pruning history, possibly
    shorter): a freshly built model (empty plan), another DDP rank, or an EMA copy one pruning
    step behind. The missing entries name explicit channel indices, so the copy loses exactly the
    channels ``plan``'s model lost and keeps its own values for the rest (e.g. EMA averages).
    Runs under :func:`kcp_plugin.track_pruning`, so optimizers can carry their state afterwards
    with :func:`kcp_plugin.rebuild_optimizer`. Every integration (mmseg hook, timm schedule,
    deploy) replays through here.

    Args:
        model: The model to bring up to date (in place).
        plan: The full plan it should end with.
        example_inputs: Tracing inputs.
        forward_fn: How to call the model (default: its host's, see :func:`apply_plan`).

    Returns:
        Whether the structure or attributes changed.

    Raises:
        ValueError: ``plan`` is malformed, or diverges from what was already applied to
            ``model`` (the model is left unchanged).
    """
    from .tracking import track_pruning

    validate_plan(plan)
    have = get_plan(model)
    done = len(have["history"])
    if [list(e) for e in plan["history"][:done]] != [list(e) for e in have["history"]]:
        raise ValueError(
            "the pruning plan does not extend the structure this model already has "
            f"({done} pruning entries applied, which the plan does not start with)"
        )
    if done == len(plan["history"]) and plan["attrs"] == have["attrs"]:
        return False
    delta = copy.deepcopy(plan)
    delta["history"] = delta["history"][done:]
    # torch-pruning traces through autograd: frozen parameters (an EMA copy, a frozen stem)
    # would leave no graph to trace, so every parameter requires grad during the replay.
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    try:
        for p in model.parameters():
            p.requires_grad_(True)
        with torch.enable_grad(), track_pruning():
            apply_plan(model, delta, example_inputs, forward_fn=forward_fn)
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(name not in frozen)
    # apply_plan records the replayed steps only; the model's plan is the whole history.
    set_plan(model, copy.deepcopy(plan))
    return True


def save_pruned(model: nn.Module, path: str | os.PathLike, extra: dict | None = None) -> None:
    """Save ``model``'s pruning plan and state dict to ``path`` (loadable with weights_only).

    Args:
        model: A model pruned by :func:`kcp_plugin.prune` (or with a plan applied).
        path: Destination file.
        extra: Optional plain-data metadata stored beside the plan (e.g. the model spec).
    """
    payload = {
        "kcp_plugin": get_plan(model),
        "meta": json.loads(json.dumps(extra or {})),
        "state_dict": model.state_dict(),
    }
    torch.save(payload, path)


def load_plain(path: str | os.PathLike, what: str = "a kcp_plugin checkpoint") -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, with an error that says what is
    wrong instead of torch's advice to retry with ``weights_only=False`` (wrong advice for a
    file of unknown origin: it would run whatever code the file holds).

    Raises:
        FileNotFoundError: no such file.
        ValueError: ``path`` is not ``what``: not a torch file at all, or one holding Python
            objects beyond tensors and plain containers, which are never unpickled here.
    """
    try:
        # timm's training checkpoints hold their arguments as an argparse.Namespace, a plain
        # attribute container; timm's own loader allows it the same way (timm/models/_helpers.py
        # _torch_load), so such a checkpoint is read here too
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # weights_only refuses anything that is not plain data
        text = str(exc)
        unpickler = text.split("WeightsUnpickler error:", 1)[-1].strip().splitlines()
        detail = unpickler[0].strip() if "WeightsUnpickler error:" in text and unpickler else ""
        if "Unsupported global" in detail:
            name = detail.split("GLOBAL", 1)[-1].split(" was not")[0].strip()
            why = (f"it holds a Python object ({name}) besides tensors and plain data, and "
                   "kcp_plugin never unpickles code; load it with weights_only=False only if "
                   "you trust where it came from")
        elif detail:
            why = f"its bytes are not a torch checkpoint ({detail})"
        else:
            first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "empty file")
            why = f"torch cannot read it ({type(exc).__name__}: {first[:160]})"
        raise ValueError(f"{path} is not {what}: {why}") from None


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_pruned`, or one whose state dict carries its
    plan (a timm checkpoint of a ``kcp_pruned`` model), without unpickling any code.

    Returns:
        ``{"kcp_plugin": plan, "meta": {...}, "state_dict": {...}}``.

    Raises:
        ValueError: the file is not plain data, or holds no plan.
    """
    payload = load_plain(path)
    if isinstance(payload, dict) and "kcp_plugin" not in payload:
        # a checkpoint whose state dict carries the plan (timm's train.py output of a
        # kcp_pruned model, or a bare state dict of one)
        for key in ("state_dict_ema", "model_ema", "state_dict", "model", None):
            sd = payload if key is None else payload.get(key)
            plan = carried_plan(sd)
            if plan is not None:
                return {"kcp_plugin": plan, "meta": {}, "state_dict": sd}
    if not isinstance(payload, dict) or "kcp_plugin" not in payload or "state_dict" not in payload:
        raise ValueError(
            f"{path} is not a kcp_plugin checkpoint: it holds neither a 'kcp_plugin' plan "
            f"(kcp_plugin.save_pruned) nor a state dict carrying one ({CARRIED_PLAN_KEY!r})")
    validate_plan(payload["kcp_plugin"])
    return payload


def load_pruned(
    model_or_builder: nn.Module | Callable[[], nn.Module],
    path: str | os.PathLike,
    example_inputs: Any = None,
    forward_fn: ForwardFn | None = None,
    strict: bool = True,
    customized_pruners: dict[Any, Any] | None = None,
    unwrapped_parameters: dict[nn.Parameter, int] | None = None,
) -> nn.Module:
    """Rebuild a pruned model: replay the saved plan on the original architecture, load weights.

    Args:
        model_or_builder: A freshly built, unpruned model of the original architecture, or a
            zero-argument callable returning one.
        path: File written by :func:`save_pruned`.
        example_inputs: Inputs to trace the model's dependency graph. Default: inputs of the
            shapes and dtypes :func:`kcp_plugin.prune` was given (recorded in the plan).
        forward_fn: How to call the model on ``example_inputs`` if not ``model(x)``,
            ``model(*x)`` (tuple / list; ``model(x)`` with the list whole if the model does
            not take it so, as torchvision's detectors) or ``model(**x)`` (dict). A
            ``forward_fn`` that only chose
            which outputs ``prune`` protects (``lambda m, x: m(x)[0]`` for a YOLO) is not
            needed here: the replay follows the saved plan, whatever the outputs.
        strict: Passed to ``load_state_dict``; a shape mismatch always raises.
        customized_pruners / unwrapped_parameters: As given to :func:`kcp_plugin.prune`.

    Returns:
        The pruned model with the saved weights.
    """
    payload = read_checkpoint(path)
    spec = payload["kcp_plugin"].get("inputs")
    if example_inputs is None and spec is None:
        raise ValueError(f"{os.fspath(path)} records no example inputs (saved by an older "
                         "kcp_plugin, or never pruned): pass example_inputs")
    model = model_or_builder if isinstance(model_or_builder, nn.Module) else model_or_builder()
    if example_inputs is None:  # the shapes prune was given, on the model's device
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        example_inputs = map_tensors(inputs_from_spec(spec), lambda t: t.to(device))
    apply_plan(model, payload["kcp_plugin"], example_inputs, forward_fn, customized_pruners,
               unwrapped_parameters)
    # the plan a state dict may carry is the one just applied: it is not a weight
    saved = payload["state_dict"]
    state = collections.OrderedDict((k, v) for k, v in saved.items()
                                    if k.split(".")[-1] != CARRIED_PLAN_KEY)
    # keep the per-module metadata (versions) that modules' _load_from_state_dict read, e.g.
    # torchvision's MNASNet refuses a state dict without its version
    metadata = getattr(saved, "_metadata", None)
    if metadata is not None:
        state._metadata = metadata  # type: ignore[attr-defined]
    model.load_state_dict(state, strict=strict)
    return model
