"""ONNX export of (pruned) models, checked against torch in onnxruntime.

A pruned model is an ordinary ``nn.Module`` with narrower layers (its plan rides along in an
attribute that the exporter ignores), so deploying it is plain ``torch.onnx.export``; what this
module adds is what a deployment needs to trust the file:

* **the exporter**: torch's TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``).
  Measured here (torch 2.14.1, onnxruntime 1.32) on the package's resnet20 / DeepLabV3-lite /
  stereo net (cost volume), timm resnet18 and ViT-tiny and torchvision LR-ASPP / DeepLabV3
  (MobileNetV3): both exporters produce files that agree with torch to about 1e-6 at batch 1 and
  2, but the TorchScript exporter takes 0.5-4.5 s where the dynamo exporter takes 5-29 s, needs
  no ``onnxscript``, writes one self-contained file (the dynamo exporter writes the weights to a
  ``.data`` file beside it by default) and names the unsupported ``aten::`` operator in its
  error. Speed matters because :func:`kcp_plugin.latency.compare_latency` exports every model
  it times with ``backend="onnxruntime"``, searches included. torch marks the TorchScript
  exporter deprecated; its DeprecationWarning is silenced here, and when torch removes it,
  :func:`_export` is the one place to change.
* **no half-written files**: the file is written to a temporary name in the target folder and
  renamed (atomically, ``os.replace``) only once it exported and passed the check.
* **the check**: the file is run in onnxruntime on the example inputs and every output (flattened)
  is compared with torch's; with ``dynamic_batch`` also on a batch twice as large, so a batch size
  that the trace baked into a reshape is caught here rather than in deployment.
* **errors that name the culprit**: :class:`~kcp_plugin.errors.ExportError` names the operator the
  exporter could not convert and the layer (module name) that called it, found by running the
  model once under forward hooks and a ``TorchFunctionMode``.

onnx and onnxruntime are imported inside the functions (``pip install kcp-plugin[deploy]``):
``import kcp_plugin`` needs only torch and torch-pruning.
"""

from __future__ import annotations

import contextlib
import os
import re
import traceback
import uuid
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from ..errors import ExportError
from ..graph import ForwardFn, default_forward, preserved_modes
from ..safety import describe_exception, output_tensors

__all__ = ["DEPLOY_HINT", "ExportReport", "export_onnx", "inference_session", "require_deploy"]

DEPLOY_HINT = "pip install kcp-plugin[deploy]"

# float32 agreement: |onnxruntime - torch| <= ATOL + rtol * max|torch| per output. Relative to
# the output's scale, not element-wise: near-zero elements of a large output (cancellation)
# would fail an element-wise test for rounding alone. The absolute floor only matters for
# all-zero outputs: a larger one (1e-5 before) let anything pass on tiny outputs (random-init
# MNASNet: max |output| 7e-8), found by a newcomer trial.
ATOL = 1e-12


@dataclass(frozen=True)
class ExportReport:
    """What :func:`export_onnx` wrote and how well it agrees with torch.

    Attributes:
        path: The ONNX file.
        opset: The ONNX opset of the default domain written in the file.
        input_names: Graph inputs, one per tensor of ``example_inputs`` in order (``"input"``
            for a single tensor, ``"input.0"``, ``"input.1"``... for a tuple, ``"input.KEY"``
            for a dict).
        output_names: Graph outputs, one per tensor of the model's output, flattened the same
            way (``"output"``, ``"output.0"``, ``"output.out"``...).
        dynamic_batch: Whether the first dimension of every input is symbolic (``"batch"``).
        max_abs_diff: Largest ``|onnxruntime - torch|`` over every output of every checked
            batch; None when the check was skipped.
        providers: The onnxruntime execution providers of the check; empty when skipped.
    """

    path: str
    opset: int
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    dynamic_batch: bool
    max_abs_diff: float | None
    providers: tuple[str, ...]

    def feeds(self, example_inputs: Any) -> dict[str, Any]:
        """``session.run`` inputs for ``example_inputs`` (same structure as at export): the
        name of each graph input mapped to its tensor as a CPU numpy array."""
        tensors = [t for _, t in _leaves(example_inputs, "input")]
        if len(tensors) != len(self.input_names):
            raise ValueError(f"example_inputs hold {len(tensors)} tensor(s); {self.path} takes "
                             f"{len(self.input_names)}: {', '.join(self.input_names)}")
        return {n: t.detach().cpu().numpy() for n, t in zip(self.input_names, tensors)}


def require_deploy() -> tuple[Any, Any]:
    """Import the deploy extra's packages.

    Returns:
        The ``onnx`` and ``onnxruntime`` modules.

    Raises:
        ImportError: either is missing; the message says ``pip install kcp-plugin[deploy]``.
    """
    try:
        import onnx
        import onnxruntime
    except ImportError as exc:
        raise ImportError(f"ONNX export and onnxruntime latency need onnx and onnxruntime "
                          f"({exc}): {DEPLOY_HINT}") from exc
    return onnx, onnxruntime


def inference_session(path: str | os.PathLike, threads: int | None = None) -> Any:
    """An onnxruntime CPU session set up for repeatable timing.

    ``intra_op_num_threads=threads`` (None: onnxruntime's default, one per physical core),
    ``inter_op_num_threads=1`` (sequential graph execution) and no spin-waiting of idle worker
    threads: with spinning (onnxruntime's default) the threads of one session keep a core busy
    after ``run`` returns, which slows whichever model is timed next in an interleaved
    comparison.

    Args:
        path: An ONNX file.
        threads: Intra-op threads, >= 1, or None.

    Returns:
        ``onnxruntime.InferenceSession`` on ``CPUExecutionProvider``.

    Raises:
        ImportError: onnxruntime is missing (``pip install kcp-plugin[deploy]``).
    """
    _, ort = require_deploy()
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads or 0)
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: no per-session notes on stderr
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])


def export_onnx(
    model: nn.Module,
    example_inputs: Any,
    path: str | os.PathLike,
    *,
    opset: int | None = None,
    dynamic_batch: bool = True,
    check: bool = True,
    forward_fn: ForwardFn | None = None,
    rtol: float = 1e-3,
) -> ExportReport:
    """Export ``model`` to an ONNX file, checked in onnxruntime.

    The model is exported in eval mode (its train/eval flags are restored) with torch's
    TorchScript-based exporter (see the module docstring for why). Works the same on pruned
    models (:func:`kcp_plugin.prune`, :func:`kcp_plugin.load_pruned`) as on any ``nn.Module``.

    Args:
        model: The model.
        example_inputs: Inputs as for :func:`kcp_plugin.prune`: a tensor, a tuple / list of
            inputs, or a dict of keyword inputs (nesting allowed). Every tensor becomes a graph
            input; other values are baked into the graph.
        path: The ``.onnx`` file to write; its folder must exist. Replaced only when the export
            (and the check) succeeded.
        opset: ONNX opset; None for the exporter's default.
        dynamic_batch: Make dimension 0 of every input tensor symbolic (``"batch"``), so the
            file runs at any batch size. Pass False for models whose inputs' first dimension is
            not the batch.
        check: Run the file in onnxruntime on ``example_inputs`` (and, with ``dynamic_batch``,
            on a batch twice as large: each input concatenated with itself flipped along its
            last dimension) and compare every output with torch's.
        forward_fn: How to call the model, ``forward_fn(model, example_inputs)``, if not
            ``model(x)`` / ``model(*x)`` / ``model(**x)``: e.g. ``lambda m, x: m(x,
            mode="tensor")`` for mmseg segmentors. Its outputs (a tensor, or tuples / lists /
            dicts of them) are flattened into the graph's outputs.
        rtol: Agreement tolerance relative to each output's largest magnitude:
            ``max|onnxruntime - torch| <= 1e-12 + rtol * max|torch|``. 1e-3 leaves room for
            float32 reassociation in onnxruntime's fused kernels.

    Returns:
        :class:`ExportReport`.

    Raises:
        FileNotFoundError: the folder of ``path`` does not exist.
        IsADirectoryError: ``path`` is a folder.
        ValueError: ``example_inputs`` hold no tensor, or ``rtol`` is negative.
        ExportError: the model does not run on ``example_inputs``, the exporter failed (the
            message names the operator and the layer where they can be found), the model's
            output holds no tensor, or the file disagrees with torch (the message gives the
            largest difference). No file is left behind.
        ImportError: onnx / onnxruntime are missing (``pip install kcp-plugin[deploy]``).
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"cannot write {path}: folder {folder} does not exist "
                                "(create it first)")
    if os.path.isdir(path):
        raise IsADirectoryError(f"cannot write {path}: it is a folder; give a file path")
    if rtol < 0:
        raise ValueError(f"rtol must be >= 0, got {rtol}")
    inputs = _leaves(example_inputs, "input")
    if not inputs:
        raise ValueError("example_inputs hold no tensor; pass the tensor(s) the model takes")
    onnx, _ = require_deploy()
    fwd = forward_fn or default_forward
    wrapper = _Flat(model, fwd, example_inputs)
    input_names = [n for n, _ in inputs]
    tensors = tuple(t for _, t in inputs)
    # a unique name beside the target (same file system: the rename is atomic), created by the
    # exporter with the usual permissions (mkstemp's would be 0600)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with preserved_modes(model), torch.no_grad():
            # the wrapper too: the exporter restores the mode of the module it is given, which
            # (recursively) would put the model back in training mode for the check
            wrapper.eval()
            try:
                reference = wrapper.named_outputs(tensors)
            except Exception as exc:
                raise ExportError(
                    f"{type(model).__name__} does not run on example_inputs in torch "
                    f"({describe_exception(exc)}); pass the inputs it takes, or forward_fn="
                    "lambda model, x: ...") from exc
            if not reference:
                raise ExportError(f"{type(model).__name__}'s output holds no tensor; nothing to "
                                  "export (pass forward_fn= to select the outputs)")
            output_names = [n for n, _ in reference]
            try:
                _export(wrapper, tensors, tmp, input_names, output_names, opset, dynamic_batch)
            except Exception as exc:  # the exporter's errors come in many types
                raise _export_error(exc, model, example_inputs, fwd) from exc
            written = _opset_of(onnx, tmp)
            diff, providers = None, ()
            if check:
                diff, providers = _check(wrapper, tensors, tmp, input_names, reference,
                                         dynamic_batch, rtol)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
    return ExportReport(path, written, tuple(input_names), tuple(output_names), dynamic_batch,
                        diff, providers)


class _Flat(nn.Module):
    """``model`` behind a flat signature: ``forward(*tensors) -> tuple of tensors``.

    The exporter takes positional tensors; this rebuilds ``example_inputs``' structure around
    them, calls ``forward_fn`` and flattens the output the way :func:`_leaves` names it.
    """

    def __init__(self, model: nn.Module, forward_fn: ForwardFn, structure: Any):
        super().__init__()
        self.model = model
        self.forward_fn = forward_fn
        self.structure = structure

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The model's output tensors, flattened."""
        return tuple(t for _, t in self.named_outputs(tensors))

    def named_outputs(self, tensors: Sequence[torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
        """``(name, tensor)`` for each output tensor of the model on ``tensors``."""
        inputs = _rebuild(self.structure, iter(tensors))
        return _leaves(self.forward_fn(self.model, inputs), "output")


def _leaves(obj: Any, prefix: str) -> list[tuple[str, torch.Tensor]]:
    """Every tensor in a nest of tuples / lists / dicts, named by its path (``prefix.key``)."""
    return list(output_tensors(obj, prefix, objects=False).items())


def _rebuild(obj: Any, tensors: Iterator[torch.Tensor]) -> Any:
    """``obj`` with its tensors replaced, in :func:`_leaves` order, by the next of ``tensors``."""
    if isinstance(obj, torch.Tensor):
        return next(tensors)
    if isinstance(obj, dict):
        return {k: _rebuild(v, tensors) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_rebuild(v, tensors) for v in obj)
    return obj


def _export(wrapper: _Flat, tensors: tuple[torch.Tensor, ...], path: str,
            input_names: list[str], output_names: list[str], opset: int | None,
            dynamic_batch: bool) -> None:
    """``torch.onnx.export`` with the TorchScript-based exporter (why: module docstring).

    On an unsupported operator this exporter prints its TorchScript graph to stdout before it
    raises (torch 2.14: ``setup_onnx_logging`` tests the function ``_jit_is_onnx_log_enabled``
    instead of calling it, so its log is always on); the :class:`ExportError` that follows says
    what failed.
    """
    axes = {n: {0: "batch"} for n, t in zip(input_names, tensors) if t.dim()} if dynamic_batch \
        else None
    with warnings.catch_warnings():
        # chosen deliberately (module docstring); the warning would only repeat that choice
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        # the trace's notes on Python-side shape checks (timm's asserts): the onnxruntime
        # check below is what tells whether the file computes what the model does
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        # a note that a strided slice stays a Slice node (the stereo net's cost volume)
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1")
        torch.onnx.export(wrapper, tensors, path, dynamo=False, input_names=input_names,
                          output_names=output_names, opset_version=opset, dynamic_axes=axes)


def _opset_of(onnx: Any, path: str) -> int:
    """The opset of the default ONNX domain written in ``path``."""
    proto = onnx.load(path, load_external_data=False)
    return next((int(o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


def _check(wrapper: _Flat, tensors: tuple[torch.Tensor, ...], path: str,
           input_names: list[str], reference: list[tuple[str, torch.Tensor]],
           dynamic_batch: bool, rtol: float) -> tuple[float, tuple[str, ...]]:
    """Run ``path`` in onnxruntime and compare with torch; returns (max |diff|, providers)."""
    try:
        session = inference_session(path)
    except Exception as exc:
        raise ExportError(f"onnxruntime cannot load the exported file: "
                          f"{describe_exception(exc)}") from exc
    batches = [(tensors, reference, "the example inputs")]
    if dynamic_batch:
        doubled = tuple(torch.cat([t, t.flip(-1)]) if t.dim() else t for t in tensors)
        try:
            doubled_reference = wrapper.named_outputs(doubled)
        except Exception as exc:
            raise ExportError(
                "dynamic_batch: the model does not run in torch on the example inputs doubled "
                f"along dimension 0 ({describe_exception(exc)}); pass dynamic_batch=False for "
                "models whose inputs' first dimension is not the batch") from exc
        batches.append((doubled, doubled_reference, "a batch twice the example's"))
    worst = 0.0
    for inputs, expected, what in batches:
        feeds = {n: t.detach().cpu().numpy() for n, t in zip(input_names, inputs)}
        try:
            got = session.run(None, feeds)
        except Exception as exc:
            raise ExportError(f"the exported file fails in onnxruntime on {what}: "
                              f"{describe_exception(exc)}") from exc
        for (name, ref), out in zip(expected, got):
            ref64 = ref.detach().cpu().double()
            out64 = torch.from_numpy(out).double()
            if tuple(out64.shape) != tuple(ref64.shape):
                raise ExportError(f"output {name} on {what}: onnxruntime gives shape "
                                  f"{tuple(out64.shape)}, torch {tuple(ref64.shape)}")
            if not ref64.numel():
                continue
            diff = float((out64 - ref64).abs().max())
            scale = float(ref64.abs().max())
            if not diff <= ATOL + rtol * scale:  # also catches NaN
                raise ExportError(
                    f"output {name} on {what}: onnxruntime and torch disagree, max |difference| "
                    f"{diff:.3g} with max |torch output| {scale:.3g} (allowed: {ATOL:g} + "
                    f"rtol={rtol:g} x {scale:.3g})")
            worst = max(worst, diff)
    return worst, tuple(session.get_providers())


# TorchScript exporter: "Exporting the operator 'aten::histc' to ONNX opset version 20 is not
# supported"
_OP_PATTERN = re.compile(r"operator '([\w.]+::[\w.]+)'")


def _failed_op(exc: BaseException) -> str | None:
    """The operator an exporter error is about (``"aten::histc"``), if it names one."""
    for err in (exc, exc.__cause__):
        match = _OP_PATTERN.search(str(err or ""))
        if match:
            return match.group(1)
    return None


def _export_error(exc: BaseException, model: nn.Module, example_inputs: Any,
                  fwd: ForwardFn) -> ExportError:
    """The :class:`ExportError` for an exporter failure, naming operator and layer."""
    names = {id(m): n for n, m in model.named_modules()}
    op = _failed_op(exc)
    layer = _raising_layer(exc, names)
    if layer is None:
        layer = _find_layer(model, example_inputs, fwd, op)
    where = ""
    if layer is not None:
        module = model.get_submodule(layer) if layer else model
        where = (f" in layer '{layer}' ({type(module).__name__})" if layer else
                 f" in the model's own forward ({type(model).__name__})")
    if op:
        what = f"operator {op}{where}"
        fix = ("replace that operation, register an ONNX symbolic for it "
               "(torch.onnx.register_custom_op_symbolic), or try another opset=")
    else:
        what = f"the forward pass{where}"
        fix = "the exporter traces the forward with torch.jit.trace: make it traceable there"
    return ExportError(f"cannot export {type(model).__name__} to ONNX: {what} failed "
                       f"({describe_exception(exc)}); {fix}", op=op, layer=layer)


def _raising_layer(exc: BaseException, names: dict[int, str]) -> str | None:
    """The innermost module of the model whose ``forward`` is on ``exc``'s traceback (a failure
    while the exporter traced the forward pass), or None."""
    found = None
    for frame, _ in traceback.walk_tb(exc.__traceback__):
        owner = frame.f_locals.get("self")
        if frame.f_code.co_name == "forward" and id(owner) in names:
            found = names[id(owner)]
    return found


class _OpFinder(TorchFunctionMode):
    """Records the innermost module (by forward hooks) that calls the torch function ``op``."""

    def __init__(self, op: str | None, stack: list[str]):
        super().__init__()
        self.base = op.split("::")[-1].split(".")[0].strip("_") if op else None
        self.stack = stack
        self.found: str | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "").strip("_")
        if self.found is None and self.base and name == self.base and self.stack:
            self.found = self.stack[-1]
        return func(*args, **(kwargs or {}))


def _find_layer(model: nn.Module, example_inputs: Any, fwd: ForwardFn,
                op: str | None) -> str | None:
    """Run the model once (eval, no grad) and return the qualified name of the innermost module
    that called ``op`` (or whose forward raised), or None."""
    stack: list[str] = []
    handles = []
    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(
            lambda _m, _a, name=name: stack.append(name)))
        handles.append(module.register_forward_hook(lambda *_: stack.pop()))
    finder = _OpFinder(op, stack)
    try:
        with torch.no_grad(), preserved_modes(model), finder:
            model.eval()
            fwd(model, example_inputs)
    except Exception:  # the forward itself fails: the module it failed in is the layer
        return stack[-1] if stack else None
    finally:
        for handle in handles:
            handle.remove()
    return finder.found

