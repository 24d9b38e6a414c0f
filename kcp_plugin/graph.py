"""Dependency-graph helpers shared by pruning and plan replay.

Wraps torch-pruning's ``DependencyGraph`` construction so that (a) the model's train/eval flags
come back as they were (torch-pruning's tracer calls ``model.eval()`` and never restores it),
(b) example inputs are passed the way the user's forward expects (torch-pruning's fallback
``model(*x)`` silently unbatches a batch-1 tensor), and (c) output layers can be found.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.nn as nn
import torch_pruning as tp
from torch_pruning import ops

from .depgraph import DependencyGraph
from .errors import UnprunableError
from .hints import did_you_mean

ForwardFn = Callable[[nn.Module, Any], Any]
LayerRef = nn.Module | str | type

# Layers that consume a channel dimension and produce a new one: output detection stops there.
_CHANNEL_MIXERS = (ops.OPTYPE.CONV, ops.OPTYPE.LINEAR, ops.OPTYPE.LSTM, ops.OPTYPE.MHA,
                   ops.OPTYPE.EMBED)


def default_forward(model: nn.Module, inputs: Any) -> Any:
    """Call ``model`` with a tensor, a tuple/list of positional inputs, or a dict of kwargs.

    A tuple / list the model does not take as positional inputs is passed whole, as one
    argument, when the positional call raises (torchvision's detection models take a list of
    images, ``model([img])``); if that fails too, the positional call's error is raised."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        try:
            return model(*inputs)
        except Exception as positional:
            if not inputs:
                raise
            try:
                return model(inputs)
            except Exception:
                raise positional from None
    return model(inputs)


def resolve_layers(model: nn.Module, refs: Iterable[LayerRef] | LayerRef | None,
                   what: str) -> list[nn.Module]:
    """The modules of ``model`` named by ``refs``: module objects, qualified names, or module
    types (every instance).

    Args:
        model: The model the references point into.
        refs: One reference or an iterable of them; None for none.
        what: The argument's name, for error messages (e.g. ``"ignored_layers"``).

    Raises:
        ValueError: a name the model does not have (with close matches), or a module that is
            not part of the model.
        TypeError: a reference of another kind.
    """
    if refs is None:
        return []
    if isinstance(refs, (nn.Module, str, type)):
        refs = [refs]
    named = dict(model.named_modules())
    members = {id(m) for m in named.values()}
    out: list[nn.Module] = []
    for ref in refs:
        if isinstance(ref, str):
            if ref not in named:
                raise ValueError(f"{what}: the model has no layer named {ref!r}"
                                 f"{did_you_mean(ref, named)}")
            out.append(named[ref])
        elif isinstance(ref, type) and issubclass(ref, nn.Module):
            out.extend(m for m in named.values() if isinstance(m, ref))
        elif isinstance(ref, nn.Module):
            if id(ref) not in members:
                raise ValueError(f"{what}: {type(ref).__name__} object is not part of the model")
            out.append(ref)
        else:
            raise TypeError(f"{what}: expected modules, layer names or module types, got {ref!r}")
    return out


@contextlib.contextmanager
def preserved_modes(model: nn.Module) -> Iterator[None]:
    """Restore every submodule's ``training`` flag on exit."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def build_graph(
    model: nn.Module,
    example_inputs: Any,
    forward_fn: ForwardFn | None = None,
    output_transform: Callable | None = None,
    **kwargs: Any,
) -> tp.DependencyGraph:
    """Build the plugin's dependency graph (:class:`kcp_plugin.depgraph.DependencyGraph`) in
    eval mode, leaving the model's modes intact.

    Host libraries' custom pruners (:mod:`kcp_plugin.hosts`) are added to ``customized_pruners``
    (given ones take precedence), so every graph of a model maps channels the same way.
    """
    from .hosts import host_pruners

    kwargs["customized_pruners"] = host_pruners(model, kwargs.get("customized_pruners"))
    with preserved_modes(model):
        model.eval()
        return DependencyGraph().build_dependency(
            model, example_inputs=example_inputs, forward_fn=forward_fn or default_forward,
            output_transform=output_transform, verbose=False, **kwargs,
        )


def check_runs(model: nn.Module, example_inputs: Any, forward_fn: ForwardFn | None = None) -> None:
    """Run ``example_inputs`` through ``model`` once (eval mode, modes restored, no grad).

    Raises:
        ValueError: the model does not run on them; the message says how to fix the inputs.
    """
    try:
        with torch.no_grad(), preserved_modes(model):
            model.eval()
            (forward_fn or default_forward)(model, example_inputs)
    except UnprunableError:  # a host's forward refusing by name (an mmseg cascade's head)
        raise
    except Exception as exc:
        raise ValueError(
            f"example_inputs could not be run through the model ({type(exc).__name__}: {exc}); "
            "pass inputs of the right shape, or forward_fn=lambda model, x: ..."
        ) from exc


def checked_graph(
    model: nn.Module,
    example_inputs: Any,
    forward_fn: ForwardFn | None = None,
    output_transform: Callable | None = None,
    **kwargs: Any,
) -> tp.DependencyGraph:
    """:func:`build_graph`, with a tracer failure reported apart from bad inputs.

    Call :func:`check_runs` first: a model that runs but cannot be traced uses an operation
    torch-pruning does not support.

    Raises:
        UnprunableError: torch-pruning could not trace the model; the message names the
            operation where it failed and the layers next to it, when they can be found.
    """
    try:
        return build_graph(model, example_inputs, forward_fn, output_transform, **kwargs)
    except Exception as exc:
        where = _failing_operation(exc)
        raise UnprunableError(
            "torch-pruning could not trace this model's channel dependencies "
            f"({type(exc).__name__}: {exc}){where}; the model runs, but an operation in it "
            "(channel shuffle, an unusual reshape) is not supported: pass the layers around it "
            "in ignored_layers, or register a customized pruner"
        ) from exc


def _failing_operation(exc: BaseException) -> str:
    """`` at <operation> (next to layers a, b)`` for the innermost traced graph node in the
    traceback of a tracing failure, or ``""``."""
    tb, found = exc.__traceback__, None
    while tb is not None:
        local = tb.tb_frame.f_locals
        node, graph = local.get("node"), local.get("self")
        if node is not None and hasattr(node, "inputs") and hasattr(node, "name"):
            found = (node, graph)
        tb = tb.tb_next
    if found is None:
        return ""
    node, graph = found
    names = getattr(graph, "_module2name", {})
    near = [names[n.module] for n in (*node.inputs, *node.outputs)
            if isinstance(n.module, nn.Module) and n.module in names]
    nearby = f" (next to {', '.join(dict.fromkeys(near))})" if near else ""
    return f" at {node.name}{nearby}"


def output_layers(graph: tp.DependencyGraph) -> list[nn.Module]:
    """Conv/linear layers whose output channels reach a model output unchanged.

    Pruning such a layer would change the shape of what the model returns (a classifier's
    logits, a segmentation head's class maps, a stereo net's cost channel), so they are protected.
    A layer qualifies if, following the graph downstream through channel-preserving operations
    (norms, activations, depthwise convs, adds, reshapes, upsampling...), an output is reached
    before any channel-mixing layer.
    """
    found = []
    for module, node in graph.module2node.items():
        if node.type not in (ops.OPTYPE.CONV, ops.OPTYPE.LINEAR, ops.OPTYPE.DEPTHWISE_CONV):
            continue
        if node.type == ops.OPTYPE.DEPTHWISE_CONV:
            continue  # depthwise layers follow their producer; protecting that is enough
        stack, seen = list(node.outputs), set()
        reaches_output = not node.outputs
        while stack and not reaches_output:
            n = stack.pop()
            if id(n) in seen:
                continue
            seen.add(id(n))
            if n.type == ops.OPTYPE.OUTPUT or not n.outputs and n.type not in _CHANNEL_MIXERS:
                reaches_output = True
            elif n.type not in _CHANNEL_MIXERS:
                stack.extend(n.outputs)
        if reaches_output:
            found.append(module)
    return found


def count_macs_params(
    model: nn.Module, example_inputs: Any, forward_fn: ForwardFn | None = None
) -> tuple[int, int]:
    """MACs of one forward pass on ``example_inputs`` (the whole batch) and the parameter count.

    torch-pruning's counter deep-copies the model and divides by a batch size it guesses from the
    input; routing the call through a wrapper with a batch-1 dummy makes the count the plain
    total of the user's own forward, whatever form its inputs take. Its ``nn.MultiheadAttention``
    hook reads query / key / value from the positional inputs only (torch_pruning/utils/
    op_counter.py, ``multihead_attention_counter_hook``) and fails when they are passed by
    keyword, as mmcv's attention wrappers do; they are captured by a pre-hook here instead.
    It also picks its hooks by exact type (``MODULES_MAPPING[type(module)]``), so subclasses
    of ``nn.Conv2d`` / ``nn.Linear`` (timm's ``StdConv2d``, ``ScaledStdConv2d``,
    ``Conv2dSame``: BiT, NF-Nets) counted nothing; they get their base class's hook here.
    Compute outside every layer the counter hooks (``F.linear(x, self.qkv.weight)`` in
    torchvision's Swin V2 and timm's BEiT, ``q @ k.transpose(-2, -1)``, ``F.conv2d`` or
    ``F.scaled_dot_product_attention`` in a block's own ``forward``) is added from torch's
    ``FlopCounterMode`` (aten-level FLOPs / 2), measured in the same forward pass: without it a
    MACs target applied to a fraction of the model (swin_v2_t kept 0.72 of its real compute at a
    target of 0.5). So a model whose layers torch-pruning hooks counts exactly as upstream does.

    Returns:
        ``(macs, params)``: multiply-accumulates of the whole batch, and parameters.
    """
    fwd = forward_fn or default_forward

    class _Forward(nn.Module):
        def __init__(self, inner: nn.Module):
            super().__init__()
            self.inner = inner

        def forward(self, dummy: torch.Tensor) -> Any:
            return fwd(self.inner, example_inputs)

    # upstream's counter prints a line per module it has seen before ("variables __flops__ or
    # __params__ are already defined", hundreds on YOLOv6) and per keyword-called module
    # (torch_pruning/utils/op_counter.py): the count is right, the lines are noise
    def count(measure_unhooked: bool) -> tuple[int, int]:
        unhooked = _unhooked_compute(model) if measure_unhooked else contextlib.nullcontext()
        with preserved_modes(model), torch.no_grad(), _mha_keyword_inputs(model), \
                _subclass_hooks(model), unhooked as extra, \
                contextlib.redirect_stdout(io.StringIO()):
            macs, params = tp.utils.count_ops_and_params(_Forward(model), torch.zeros(1))
        return int(macs) + (extra.macs if extra is not None else 0), int(params)

    try:
        return count(True)
    except Exception:  # noqa: BLE001 - the flop counter's own failure: count what upstream can
        # a model that runs fails only under FlopCounterMode when one of its FLOP formulas
        # cannot take an op's arguments; the count is then torch-pruning's alone, as before
        return count(False)


@contextlib.contextmanager
def _subclass_hooks(model: nn.Module) -> Iterator[None]:
    """Map every subclass of a type torch-pruning's counter knows to that type's hook, through
    its ``CUSTOM_MODULES_MAPPING`` (which ``count_ops_and_params`` resets after each count)."""
    from torch_pruning.utils import op_counter

    known = op_counter.MODULES_MAPPING
    extra = {}
    for m in model.modules():
        t = type(m)
        if t in known or t in extra:
            continue
        base = next((b for b in t.__mro__[1:] if b in known), None)
        if base is not None:
            extra[t] = known[base]
    op_counter.CUSTOM_MODULES_MAPPING = {**op_counter.CUSTOM_MODULES_MAPPING, **extra}
    try:
        yield
    finally:
        op_counter.CUSTOM_MODULES_MAPPING = {}


class _Unhooked:
    """What :func:`_unhooked_compute` measured: ``macs``, filled in when its block ends."""

    macs: int = 0


@contextlib.contextmanager
def _unhooked_compute(model: nn.Module) -> Iterator[_Unhooked]:
    """Measure, with torch's ``FlopCounterMode``, the compute of the forward pass run inside
    the block that happens outside every module torch-pruning's counter hooks.

    Pre- and post-hooks on those modules (the outermost one of a nest) read the flop total on
    entry and exit; what is left of the total is compute done by functions. torch-pruning
    deep-copies the model before its forward pass, and the hooks travel with the copy.
    ``result.macs`` stays 0 if the block raises.
    """
    from torch.utils.flop_counter import FlopCounterMode
    from torch_pruning.utils import op_counter

    hooked = {*op_counter.MODULES_MAPPING, *op_counter.CUSTOM_MODULES_MAPPING}
    counter = FlopCounterMode(display=False)
    state = {"depth": 0, "entered": 0, "inside": 0}

    def enter(module: nn.Module, args: tuple) -> None:
        if state["depth"] == 0:
            state["entered"] = counter.get_total_flops()
        state["depth"] += 1

    def leave(module: nn.Module, args: tuple, output: Any) -> None:
        state["depth"] -= 1
        if state["depth"] == 0:
            state["inside"] += counter.get_total_flops() - state["entered"]

    handles = []
    for m in model.modules():
        if type(m) in hooked:
            handles.append(m.register_forward_pre_hook(enter))
            handles.append(m.register_forward_hook(leave, always_call=True))
    result = _Unhooked()
    try:
        with counter:
            yield result
        result.macs = max(0, counter.get_total_flops() - state["inside"]) // 2
    finally:
        for h in handles:
            h.remove()


_MHA_ARGS = ("query", "key", "value")


@contextlib.contextmanager
def _mha_keyword_inputs(model: nn.Module) -> Iterator[None]:
    """Let torch-pruning's MultiheadAttention MACs hook see inputs passed by keyword."""
    from torch_pruning.utils import op_counter

    upstream = op_counter.MODULES_MAPPING.get(nn.MultiheadAttention)
    attention = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    if upstream is None or not attention:
        yield
        return

    def counter(module: nn.Module, inputs: tuple, output: Any) -> None:
        if len(inputs) < 3:
            inputs = module.__dict__.get("_kcp_mha_inputs", inputs)
        if len(inputs) >= 3:
            upstream(module, tuple(inputs[:3]), output)

    def capture(module: nn.Module, args: tuple, kwargs: dict) -> None:
        values = list(args[:3]) + [kwargs[k] for k in _MHA_ARGS[len(args):] if k in kwargs]
        module.__dict__["_kcp_mha_inputs"] = tuple(values)

    handles = [m.register_forward_pre_hook(capture, with_kwargs=True) for m in attention]
    mapping = op_counter.MODULES_MAPPING
    op_counter.MODULES_MAPPING = {**mapping, nn.MultiheadAttention: counter}
    try:
        yield
    finally:
        op_counter.MODULES_MAPPING = mapping
        for handle in handles:
            handle.remove()
        for m in attention:
            m.__dict__.pop("_kcp_mha_inputs", None)
