"""torch-pruning's dependency graph with correct channel index mapping through split, chunk,
cat and pixel shuffle.

torch-pruning 1.6 (``torch_pruning/dependency/index_mapping.py``, ``shape_infer.py``) maps
channel indices through these operations wrongly in four ways, which is where most of its
``IndexError: index N is out of bounds`` reports come from:

* ``update_split_index_mapping`` gives the ``i``-th *consumer* of a split the ``i``-th part,
  but consumers are listed in graph-traversal order, not by the part they read (a split whose
  second part is used first gets its offsets swapped); ``init_shape_information`` counts a
  chunk's parts as its consumers, so a part read twice shifts every offset;
* an edge from a split straight into a cat (``cat(x.chunk(2, 1))``) gets the split mapping in
  slot 0 and the cat mapping in slot 1 in both directions, but the reverse direction must undo
  the cat first: every index is filtered away or lands in the wrong part;
* ``SplitPruner`` stores the new offsets on itself, not on the split, so after one pruning step
  the mapping uses stale offsets (``iterative_steps > 1`` fails);
* nothing keeps the parts of ``chunk`` equal, although the forward code re-splits the pruned
  tensor evenly; and ``nn.PixelShuffle`` is treated as element-wise, although each output channel
  is a block of ``r * r`` input channels.

:class:`DependencyGraph` replaces the split / cat mappings with ones derived from autograd itself
(each consumer's ``next_functions`` entry says which output of the split it reads, and every
backward node records its forward output shapes), couples the parts of an equal split channel
by channel (removing channel ``j`` of one part removes channel ``j`` of every part), and maps
pixel shuffle block-wise. :class:`Pruner` is torch-pruning's ``BasePruner`` on this graph, with
equal-split parts counted as channel groups, so a ratio removes the same channels of each part.

Group tracing itself is replaced too (torch-pruning's ``get_pruning_group`` does not finish on
ReXNet, EfficientFormerV2, EfficientViT-M, CoAtNet, Visformer or FocalNet): upstream re-adds a
member unless one with an *identical* index list exists, so through cat / slice / add loops
the same channels arrive as ever new lists (3.6 M members for one ReXNet group) and indices
shifted up by loops grow without bound; it recomputes every index mapping before every group;
and its reshape guard reads ``grad_fn._saved_self_sizes``, which torch 2 names
``_saved_self_sym_sizes``, so every reshape gets a flatten mapping and chained ones multiply
index lists into the millions. Here a member is only re-visited with indices it has not had,
indices outside a member's channel count are dropped *and recorded* (``group.clipped``: such a
group is inconsistent and :mod:`kcp_plugin.safety` protects it), mappings are recomputed only
when a channel count changed, and the reshape guard reads the torch-2 attribute. Everything
else is upstream's.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections import Counter
from collections.abc import Iterator
from numbers import Number
from typing import Any

import torch
import torch.nn as nn
import torch_pruning as tp
from torch_pruning import _helpers, ops
from torch_pruning.dependency import index_mapping as _tp_mapping
from torch_pruning.dependency.dependency import Dependency
from torch_pruning.dependency.group import Group
from torch_pruning.pruner.algorithms import base_pruner as _tp_base_pruner

from .channelwise import group_companions, prune_companions
from .nested import output_tensors
from .stored_sizes import StoredSizes, trace_stored_sizes

__all__ = ["DependencyGraph", "Pruner", "pruner_graph_class", "split_channel_groups"]

_HI = _helpers._HybridIndex


# ---------------------------------------------------------------------- index mappings
class _Shift:
    """Add ``offset`` to every index (a part or cat input into the whole tensor)."""

    def __init__(self, offset: int):
        self.offset = offset

    def __call__(self, idxs: list) -> list:
        return [_HI(idx=i.idx + self.offset, root_idx=i.root_idx) for i in idxs]


class _Window:
    """Keep the indices in ``[offset, offset + size)``, shifted to start at 0 (whole -> part)."""

    def __init__(self, offset: int, size: int):
        self.offset, self.size = offset, size

    def __call__(self, idxs: list) -> list:
        lo, hi = self.offset, self.offset + self.size
        return [_HI(idx=i.idx - lo, root_idx=i.root_idx) for i in idxs if lo <= i.idx < hi]


class _Fold:
    """Whole tensor -> one of ``n`` equal parts of ``size``: channel ``j`` of every part is ``j``.

    Also pixel shuffle's input -> output (``size`` = number of output channels is not needed:
    with ``block > 1`` index ``i`` becomes ``i // block``).
    """

    def __init__(self, size: int = 0, block: int = 1):
        self.size, self.block = size, block

    def __call__(self, idxs: list) -> list:
        out, seen = [], set()
        for i in idxs:
            j = i.idx // self.block if self.block > 1 else i.idx % self.size
            if j not in seen:  # parts / blocks collapse onto one index: keep its first root
                seen.add(j)
                out.append(_HI(idx=j, root_idx=i.root_idx))
        return out


class _Unfold:
    """One equal part -> the whole tensor (channel ``j`` of every part), or a pixel-shuffle
    output channel -> its block of ``block`` input channels."""

    def __init__(self, size: int = 0, parts: int = 1, block: int = 1):
        self.size, self.parts, self.block = size, parts, block

    def __call__(self, idxs: list) -> list:
        if self.block > 1:
            b = self.block
            return [_HI(idx=i.idx * b + k, root_idx=i.root_idx) for i in idxs for k in range(b)]
        return [_HI(idx=i.idx + k * self.size, root_idx=i.root_idx)
                for i in idxs for k in range(self.parts)]


# ---------------------------------------------------------------------- graph
def _channel_dim(grad_fn: Any) -> int | None:
    """The normalized dimension a split / cat backward node works on (None if unknown)."""
    dim = getattr(grad_fn, "_saved_dim", None)
    if isinstance(dim, int) and dim >= 2 ** 63:  # a negative dim (chunk(2, dim=-1)) comes
        dim -= 2 ** 64  # back as an unsigned 64-bit value (what upstream calls uninitialized)
    try:
        ndim = len(grad_fn._input_metadata[0].shape)
    except (AttributeError, IndexError, RuntimeError):
        return None
    if not isinstance(dim, int) or not -ndim <= dim < ndim:
        return None
    return dim % ndim


def _splits_channels_into_groups(grad_fn: Any) -> bool:
    """A reshape of an NCHW tensor that splits its channels into two dimensions
    (``(N, C, H, W) -> (N, g, C // g, H, W)``, ``g > 1``)."""
    sizes = getattr(grad_fn, "_saved_self_sym_sizes", None)
    out = _out_shape(grad_fn, 0)
    if sizes is None or out is None:
        return False
    try:
        sizes = tuple(int(s) for s in sizes)
    except (TypeError, ValueError):
        return False
    return (len(sizes) == 4 and len(out) == 5 and out[0] == sizes[0] and 1 < out[1] < sizes[1]
            and out[1] * out[2] == sizes[1] and tuple(out[3:]) == sizes[2:])


def _out_shape(grad_fn: Any, nr: int) -> tuple[int, ...] | None:
    """Shape of forward output ``nr`` of the op whose backward node is ``grad_fn``."""
    try:
        return tuple(grad_fn._input_metadata[nr].shape)
    except (AttributeError, IndexError, RuntimeError):
        return None


class DependencyGraph(tp.DependencyGraph):
    """torch-pruning's ``DependencyGraph`` with split / chunk / cat / pixel-shuffle index
    mapping derived from autograd (see the module docstring for the upstream defects).

    After :meth:`build_dependency`, ``unmapped`` lists the split / cat nodes on the channel
    dimension whose parts could not be determined, and ``fixed_splits`` the splits into parts
    of unequal widths (``torch.split(x, [8, 16])``, FasterNet's ``[dim // 4, dim - dim // 4]``):
    the forward code fixes those widths, or recomputes them from the new total, which no choice
    of pruned channels can follow. Groups through either are not prunable.
    """

    def build_dependency(self, model: Any, example_inputs: Any, *args: Any,
                         **kwargs: Any) -> DependencyGraph:
        self.unmapped: list[Any] = []
        self.fixed_splits: list[Any] = []
        self.untraced_roots: list[tuple[Any, BaseException]] = []
        self._kcp_fresh = False
        self._kcp_pruners: dict[int, tuple[Any, Any]] = {}
        # upstream ends its build with an unguarded index_mapping.update_index_mapping, which
        # raises on a cat whose input widths it cannot infer (TypeError: int + None, timm's
        # CrossStage3 with one block); the mappings are recomputed below anyway
        update = _tp_mapping.update_index_mapping
        _tp_mapping.update_index_mapping = lambda graph: None
        # upstream traces autograd: frozen parameters (a frozen backbone, an EMA copy) leave no
        # graph there, and their layers would be silently unprunable. Every parameter requires
        # grad while tracing; the user's flags are restored.
        frozen = [p for p in model.parameters() if not p.requires_grad]
        try:
            for p in frozen:
                p.requires_grad_(True)
            # splits / slices sized by module attributes (kcp_plugin.stored_sizes)
            with torch.enable_grad(), trace_stored_sizes(model) as watch:
                # upstream flattens the output with flatten_as_list, which raises on a None
                # or any non-tensor leaf (RT-DETR returns None in its eval tuple): trace the
                # tensors only, after the caller's own output_transform
                given = kwargs.get("output_transform")
                kwargs["output_transform"] = lambda out, given=given: list(output_tensors(
                    given(out) if given is not None else out, objects=False).values())
                super().build_dependency(model, example_inputs, *args, **kwargs)
            self.stored_sizes = watch.result()
        finally:
            _tp_mapping.update_index_mapping = update
            for p in frozen:
                p.requires_grad_(False)
        self._kcp_analyse()
        for node in self.module2node.values():  # upstream's unguarded mappings: start afresh
            for dep in node.dependencies:
                dep.index_mapping = [None, None]
        self._update_mapping_if_changed()
        return self

    # ------------------------------------------------------------------ analysis (once)
    def _kcp_analyse(self) -> None:
        """Record, for every split / cat / pixel-shuffle node, its parts and which part (or
        cat position) each edge to a neighbour carries."""
        self._kcp_ops: dict[Any, dict[str, Any]] = {}
        self._kcp_place_stored_sizes()
        for node in self.module2node.values():
            gf = node.grad_fn
            name = gf.name() if gf is not None and hasattr(gf, "name") else ""
            if node.type == ops.OPTYPE.SPLIT and "Split" in name:
                self._kcp_split(node, gf, name)
            elif node.type == ops.OPTYPE.CONCAT:
                self._kcp_cat(node, gf)
            elif name in ("PixelShuffleBackward0", "PixelUnshuffleBackward0"):
                self._kcp_shuffle(node, gf, name)
            elif node.type == ops.OPTYPE.SLICE and self.stored_sizes.bound(node):
                self._kcp_ops[node] = {"kind": "slice"}  # its bounds follow pruning
            elif node.type == ops.OPTYPE.RESHAPE and _splits_channels_into_groups(gf):
                # a channel shuffle (ShuffleNet: view(B, g, C // g, H, W), transpose, flatten):
                # torch-pruning maps channels through it as if nothing moved, and the pruned
                # model computes something else with every shape intact; groups through it
                # are protected (see kcp_plugin.safety.invalid_groups)
                self.unmapped.append(node)

    def _occurrences(self, consumer: Any, producer: Any) -> list[tuple[int, int]] | None:
        """``(position in consumer's inputs, producer output number)`` for each edge from
        ``producer`` into ``consumer``, in the order torch-pruning created those edges."""
        gf = consumer.grad_fn
        if gf is None or not hasattr(gf, "next_functions"):
            return None
        found = [(pos, nr) for pos, (f, nr) in enumerate(gf.next_functions)
                 if f is not None and f is producer.grad_fn]
        expected = sum(1 for n in consumer.inputs if n is producer)
        return found if len(found) == expected else None

    def _on_channels(self, node: Any, gf: Any) -> int | None:
        """The dimension a split / cat node works on if it is the channel dimension, else
        None. Dimension 1 is channels, as upstream assumes (NCHW; upstream turns mapping off
        for a ViT's token concatenation). The last dimension of a 3-D or larger tensor is channels
        when the nearest layer reading (or else producing) it works on the last dimension
        (``nn.Linear``, ``nn.LayerNorm``): a SwiGLU MLP's ``fc1(x).chunk(2, dim=-1)``, a
        channels-last block's split. Upstream maps only dimension 1 and lets any other
        split or cat pass channels through unchanged."""
        dim = _channel_dim(gf)
        if dim is None:
            return None
        if dim == 1:
            return 1 if node.enable_index_mapping else None
        ndim = len(gf._input_metadata[0].shape)
        if ndim >= 3 and dim == ndim - 1 and self._layout_near(node) == "last":
            # upstream's build turns index mapping off for every split / cat downstream of a
            # 3-D parameter (a ViT's pos_embed; graph.py, "corner case for pruning ViT"):
            # aimed at the token concatenation on dimension 1, not at this one
            node.enable_index_mapping = True
            return dim
        return None

    def _layout_near(self, node: Any, depth: int = 8) -> str | None:
        """``"last"`` or ``"first"``: the channel layout of the nearest layer reached from
        ``node`` through ops that keep the layout (consumers first, then producers); None if
        a reshape / permute comes first or no such layer is found within ``depth`` steps."""
        for side in ("outputs", "inputs"):
            frontier, seen = list(getattr(node, side)), {node}
            for _ in range(depth):
                nxt = []
                for n in frontier:
                    if n in seen:
                        continue
                    seen.add(n)
                    m = n.module
                    if isinstance(m, (nn.Linear, nn.LayerNorm)):
                        return "last"
                    if isinstance(m, (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm,
                                      nn.GroupNorm)):
                        return "first"
                    name = n.grad_fn.name() if n.grad_fn is not None and hasattr(
                        n.grad_fn, "name") else ""
                    if n.type == ops.OPTYPE.RESHAPE or any(
                            k in name for k in ("Permute", "Transpose", "View", "Reshape")):
                        continue  # the layout may change here: no evidence past it
                    if n.type in (ops.OPTYPE.ELEMENTWISE, ops.OPTYPE.SPLIT, ops.OPTYPE.CONCAT):
                        nxt.extend(getattr(n, side))
                frontier = nxt
        return None

    def _kcp_place_stored_sizes(self) -> None:
        """Tell the stored-size bindings (:mod:`kcp_plugin.stored_sizes`) which of their
        splits / slices cut the channels this graph prunes."""
        sizes = getattr(self, "stored_sizes", None)
        if sizes is None:
            self.stored_sizes = sizes = StoredSizes({})
        if not sizes:
            return
        for node in self.module2node.values():
            op = sizes.op_of(node.grad_fn)
            if op is None:
                continue
            if node.type == ops.OPTYPE.SPLIT:
                on = self._on_channels(node, node.grad_fn) == op.dim
            elif node.type == ops.OPTYPE.SLICE:
                on = self._slice_on_channels(node, op.dim, op.ndim)
            else:
                on = False
            sizes.place(node, on)
        sizes.settle()
        # a part cut again at literal positions (FocalNet's gates[:, l:l + 1]) cannot follow
        # pruning, so neither can the stored sizes that made it
        for node in self.module2node.values():
            gf = node.grad_fn
            shape = getattr(gf, "_saved_self_sym_sizes", None)
            if node.type != ops.OPTYPE.SLICE or sizes.op_of(gf) is not None or not shape:
                continue
            m, width = node.module, int(shape[int(node.module.dim) % len(shape)])
            if (m.start > 0 or m.end < width) and self._slice_on_channels(
                    node, int(m.dim) % len(shape), len(shape)):
                above = self._stored_above(node)
                if above is not None:
                    sizes.flag(above, f"a part of it is cut again at fixed positions "
                                      f"[{m.start}:{m.end}], which pruning cannot move")

    def _slice_on_channels(self, node: Any, dim: int, ndim: int) -> bool:
        """Whether a slice cuts the channels (as torch-pruning's slice mapping assumes: NCHW
        dimension 1, or the last dimension next to a Linear / LayerNorm)."""
        layout = self._layout_near(node) if ndim >= 3 else None
        return (dim == 1 and ndim != 3 and layout != "last") or (
            ndim >= 3 and dim == ndim - 1 and layout == "last") or (
            ndim == 3 and dim == 1 and layout == "first")

    def _stored_above(self, node: Any, depth: int = 8) -> Any:
        """The nearest stored-size split / slice above ``node`` through element-wise ops."""
        frontier = list(node.inputs)
        for _ in range(depth):
            nxt = []
            for n in frontier:
                if self.stored_sizes.bound(n) is not None:
                    return n
                if n.type == ops.OPTYPE.ELEMENTWISE:
                    nxt.extend(n.inputs)
            frontier = nxt
        return None

    def _kcp_split(self, node: Any, gf: Any, name: str) -> None:
        dim = self._on_channels(node, gf)
        if dim is None:
            return  # not on channels: upstream leaves it alone as well
        n_out = len(getattr(gf, "_input_metadata", ()))
        sizes = [(_out_shape(gf, k) or (0,) * (dim + 1))[dim] for k in range(n_out)]
        parts: dict[int, list[int]] = {}  # consumer node id -> parts it reads, edge order
        for consumer in set(node.outputs):
            occ = self._occurrences(consumer, node)
            if occ is None or not sizes or 0 in sizes:
                self.unmapped.append(node)
                return
            parts[id(consumer)] = [nr for _, nr in occ]
        # Equal parts (chunk, or split into equal sizes) stay equal when channel j of every
        # part goes together; unequal parts cannot follow any pruning of the split's input.
        # Sizes stored on a module (torch.split(x, self.splits)) are rewritten after a prune
        # (kcp_plugin.stored_sizes): the parts then prune independently, unless one stored
        # part size is shared by all of them.
        stored = self.stored_sizes.bound(node)
        equal = len(set(sizes)) == 1 and len(sizes) > 1 and (
            stored is None or stored.equal_parts())
        if not equal and stored is None and not self.stored_sizes.problem(node):
            self.fixed_splits.append(node)
        node.module.split_sizes = list(sizes)
        node.module.offsets = [0, *_cumsum(sizes)]
        self._kcp_ops[node] = {"kind": "split", "equal": equal, "parts": parts}

    def _kcp_cat(self, node: Any, gf: Any) -> None:
        dim = self._on_channels(node, gf)
        if dim is None:
            return
        total = (_out_shape(gf, 0) or (0,) * (dim + 1))[dim]
        sizes: list[int | None] = []
        for f, nr in gf.next_functions:
            shape = _out_shape(f, nr) if f is not None else None
            sizes.append(shape[dim] if shape is not None and len(shape) > dim else None)
        unknown = [i for i, s in enumerate(sizes) if s is None]
        if len(unknown) == 1:  # one input without a gradient (e.g. the model input itself)
            sizes[unknown[0]] = total - sum(s for s in sizes if s is not None)
        positions: dict[int, list[int]] = {}
        for producer in set(node.inputs):
            occ = self._occurrences(node, producer)
            if occ is None or any(s is None for s in sizes):
                self.unmapped.append(node)
                return
            positions[id(producer)] = [pos for pos, _ in occ]
        node.module.concat_sizes = list(sizes)
        self._kcp_ops[node] = {"kind": "cat", "positions": positions}

    def _kcp_shuffle(self, node: Any, gf: Any, name: str) -> None:
        out = _out_shape(gf, 0)
        src = [(f, nr) for f, nr in gf.next_functions if f is not None]
        inp = _out_shape(*src[0]) if len(src) == 1 else None
        if out is None or inp is None or len(out) < 2 or len(inp) < 2:
            self.unmapped.append(node)
            return
        shuffle = name.startswith("PixelShuffle")
        block = inp[1] // out[1] if shuffle else out[1] // inp[1]
        self._kcp_ops[node] = {"kind": "shuffle" if shuffle else "unshuffle", "block": block}

    # ------------------------------------------------------------------ mapping
    def _kcp_side(self, op_node: Any, other: Any, k: int, toward_op: bool) -> Any:
        """The mapping an op contributes to its ``k``-th edge with ``other``.

        ``toward_op``: the indices travel from ``other`` into the op (else out of it).
        Returns ``False`` if the op is not one of ours, ``None`` for the identity.
        """
        info = self._kcp_ops.get(op_node)
        if info is None:
            return False
        kind = info["kind"]
        if kind == "split":
            if other not in op_node.outputs:  # the split's input: same channel space
                return None
            m = op_node.module
            part = info["parts"][id(other)][k]
            size = m.split_sizes[part]
            if info["equal"]:
                n = len(m.split_sizes)
                return _Unfold(size=size, parts=n) if toward_op else _Fold(size=size)
            offset = sum(m.split_sizes[:part])
            return _Shift(offset) if toward_op else _Window(offset, size)
        if kind == "slice":  # a channel slice with stored bounds: its input's channel space
            if other not in op_node.outputs:
                return None
            m = op_node.module
            return _Shift(m.start) if toward_op else _Window(m.start, m.end - m.start)
        if kind == "cat":
            if other not in op_node.inputs:  # the cat's consumers: same channel space
                return None
            sizes = op_node.module.concat_sizes
            pos = info["positions"][id(other)][k]
            offset = sum(sizes[:pos])
            return _Shift(offset) if toward_op else _Window(offset, sizes[pos])
        # pixel (un)shuffle: the node's own channel space is its output's
        if other not in op_node.inputs:
            return None
        b = info["block"]
        if kind == "shuffle":  # input i -> output i // b; output j -> inputs of block j
            return _Fold(block=b) if toward_op else _Unfold(block=b)
        return _Unfold(block=b) if toward_op else _Fold(block=b)

    def _kcp_update_mapping(self) -> None:
        """Upstream's mapping for reshape / slice / expand / unbind, ours where a split, cat
        or pixel shuffle is at either end of an edge (source side first, then target side)."""
        self._upstream_update()
        if not self._kcp_ops:
            return
        for node in self.module2node.values():  # upstream's slice mapping may have been
            if node.type == ops.OPTYPE.SLICE and any(n in self._kcp_ops for n in node.inputs):
                _tp_mapping.update_slice_index_mapping(self, node)  # overwritten by a split's
        for node in self.module2node.values():
            counts: Counter = Counter()
            for dep in node.dependencies:
                src, tgt = dep.source, dep.target
                if src not in self._kcp_ops and tgt not in self._kcp_ops:
                    continue
                k = counts[id(tgt)]
                counts[id(tgt)] += 1
                old = [m for m in dep.index_mapping if m is not None
                       and not isinstance(m, _UPSTREAM_SPLIT_CAT)]
                src_side = self._kcp_side(src, tgt, k, toward_op=False)
                # the k-th edge src -> tgt is the k-th occurrence from tgt's point of view too
                tgt_side = self._kcp_side(tgt, src, k, toward_op=True)
                if src_side is False:  # e.g. a slice / reshape: keep upstream's own mapping
                    src_side = old[0] if old and _upstream_owned(src) else None
                if tgt_side is False:
                    tgt_side = old[0] if old and _upstream_owned(tgt) else None
                dep.index_mapping = [src_side, tgt_side]

    def _upstream_update(self) -> None:
        """``index_mapping.update_index_mapping`` (torch_pruning/dependency/index_mapping.py),
        with the reshape step's size guard reading torch 2's ``_saved_self_sym_sizes``, and
        each node's step guarded: a node upstream cannot map (its shape inference returns None
        somewhere) is recorded in ``unmapped``, so groups through it are protected.

        Upstream's shape inference warns "Maximum recursive depth reached!" each time it gives
        up on a node (torch_pruning/dependency/shape_infer.py), with no node named: 31,017
        times on torchvision's swin_t. Its None is handled here, so the warning is dropped."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Maximum recursive depth reached!")
            for node in self.module2node.values():
                try:
                    self._upstream_update_node(node)
                except (TypeError, ValueError, ZeroDivisionError, IndexError, AttributeError):
                    if node not in self.unmapped and node not in getattr(self, "_kcp_ops", {}):
                        self.unmapped.append(node)

    def _upstream_update_node(self, node: Any) -> None:
        """One node of upstream's loop (ours overwrite split / cat / shuffle nodes)."""
        t = node.type
        if t == ops.OPTYPE.CONCAT:
            _tp_mapping.update_concat_index_mapping(self, node)
        elif t == ops.OPTYPE.SPLIT:
            _tp_mapping.update_split_index_mapping(self, node)
        elif t == ops.OPTYPE.RESHAPE:
            gf = node.grad_fn
            sizes = getattr(gf, "_saved_self_sym_sizes", None)
            if sizes is not None and not hasattr(gf, "_saved_self_sizes"):
                node.grad_fn = _SizesProxy(gf, sizes)
            try:
                _tp_mapping.update_reshape_index_mapping(self, node)
            finally:
                node.grad_fn = gf
        elif t == ops.OPTYPE.UNBIND:
            _tp_mapping.update_unbind_index_mapping(self, node)
        elif t == ops.OPTYPE.EXPAND:
            _tp_mapping.update_expand_index_mapping(self, node)
            _drop_degenerate_gqa(node)
        elif t == ops.OPTYPE.SLICE:
            _tp_mapping.update_slice_index_mapping(self, node)

    def get_pruner_of_module(self, module: Any) -> Any:
        """Upstream's lookup (graph.py), cached per module: it runs ``ops.module2type``'s
        chain of ``isinstance`` checks on every call, and tracing asks for pruners millions of
        times on a transformer. The pruner tables are fixed once the graph is built."""
        cache = getattr(self, "_kcp_pruners", None)
        if cache is None:
            return super().get_pruner_of_module(module)
        entry = cache.get(id(module))
        if entry is None or entry[0] is not module:  # the module is kept: its id stays its own
            entry = cache[id(module)] = (module, super().get_pruner_of_module(module))
        return entry[1]

    def register_customized_layer(self, layer_type_or_instance: Any, layer_pruner: Any) -> None:
        self._kcp_pruners = {}  # the tables change: forget cached lookups
        super().register_customized_layer(layer_type_or_instance, layer_pruner)

    def _update_mapping_if_changed(self) -> None:
        """Recompute the index mappings if a group of this graph was pruned since the last
        time. Upstream recomputes them before every ``get_pruning_group``; a transformer's
        ``get_all_groups`` then spends most of its time there. Channel counts change only
        through ``Group.prune`` (which :class:`_Group` reports) or ``load_pruning_history``;
        a pruning function called on a layer directly, outside any group, is not seen."""
        if self._kcp_fresh:
            return
        self._kcp_update_mapping()
        self._kcp_fresh = True

    def load_pruning_history(self, pruning_history: Any) -> None:
        self._kcp_fresh = False
        return super().load_pruning_history(pruning_history)

    # ------------------------------------------------------------------ groups
    def _divergence_limit(self) -> int:
        """An index no channel of this model can reach: ``_DIVERGENCE_MARGIN`` times the
        largest dimension of any parameter. Upstream's traversal follows index mappings
        around cycles of the graph; where a flatten mapping sits on such a cycle each lap
        multiplies the indices, none is ever "already seen", and the traversal grows until
        memory runs out (24 GB on LeViT-128S at 64 px). Pruning only shrinks layers, so the
        dense model's limit stays valid."""
        limit = getattr(self, "_kcp_index_limit", None)
        if limit is None:
            widest = max((max(p.shape) for p in self.model.parameters() if p.dim()),
                         default=1)
            limit = self._kcp_index_limit = _DIVERGENCE_MARGIN * widest
        return limit

    def _index_bound(self, node: Any, handler: Any) -> int | None:
        """Channel count of ``node`` on the side ``handler`` prunes, or None if unknown."""
        t = node.type
        if t == ops.OPTYPE.SPLIT:
            sizes = node.module.split_sizes
            return sum(sizes) if sizes and all(isinstance(v, int) for v in sizes) else None
        if t in _NO_BOUND_TYPES:
            return None
        try:
            if self.is_out_channel_pruning_fn(handler):
                return self.get_out_channels(node)
            if self.is_in_channel_pruning_fn(handler):
                return self.get_in_channels(node)
        except Exception:  # a pruner that cannot tell (no channel count)
            return None
        return None

    def get_pruning_group(self, module: Any, pruning_fn: Any, idxs: Any) -> Any:
        """Upstream's ``DependencyGraph.get_pruning_group`` (graph.py) with a terminating
        traversal: its ``_fix_dependency_graph_non_recursive`` (same depth-first order), with
        ``Group.has_pruning_op`` replaced by "only indices this member has not had yet" and
        ``Group.add_and_merge`` (group.py) by a dict; out-of-range indices dropped and recorded
        in ``group.clipped``."""
        if module not in self.module2node:
            raise ValueError(f"Module {module} is not in the dependency graph.")
        if isinstance(module, ops.TORCH_CONV) and module.groups == module.out_channels \
                and module.out_channels > 1:
            pruning_fn = tp.pruner.function.prune_depthwise_conv_out_channels
        if isinstance(idxs, Number):
            idxs = [idxs]
        idxs = [_HI(idx=int(i), root_idx=int(i)) for i in idxs]
        self._update_mapping_if_changed()

        root_node = self.module2node[module]
        root_dep = Dependency(pruning_fn, pruning_fn, source=root_node, target=root_node)
        items = [(root_dep, idxs)]
        reached = {(root_node, pruning_fn): {i.idx for i in idxs}}
        limit = self._divergence_limit()
        bounds: dict[Any, int | None] = {}
        clipped: list[tuple[Any, int, int]] = []
        visited = set()
        stack = [(root_dep, idxs)]
        while stack:
            dep, cur = stack.pop()
            node, fn = dep.target, dep.handler
            visited.add(node)
            for new_dep in node.dependencies:
                if not new_dep.is_triggered_by(fn):
                    continue
                new = cur
                for mapping in new_dep.index_mapping:
                    if mapping is not None:
                        new = mapping(new)
                target, handler = new_dep.target, new_dep.handler
                if new:
                    key = (target, handler)
                    if key not in bounds:
                        bounds[key] = self._index_bound(target, handler)
                    bound = bounds[key]
                    if bound is not None and any(not 0 <= i.idx < bound for i in new):
                        clipped.append((target, max(i.idx for i in new), bound))
                        new = [i for i in new if 0 <= i.idx < bound]
                    elif bound is None and max(i.idx for i in new) >= limit:
                        raise DivergentMappingError(
                            f"the channel indices of this group grow without bound around a "
                            f"cycle of index mappings (index {max(i.idx for i in new)} at "
                            f"{target.name}, while no layer of the model is wider than "
                            f"{limit // _DIVERGENCE_MARGIN}): torch-pruning's flatten / "
                            f"reshape mapping re-enters a loop of the graph (LeViT's attention "
                            f"at a 1x1 resolution); the group is left unpruned")
                if not new:
                    continue
                key = (target, handler)
                have = reached.get(key)
                if have is None:
                    reached[key] = {i.idx for i in new}
                elif target in visited:
                    new = [i for i in new if i.idx not in have]
                    if not new:
                        continue
                    have.update(i.idx for i in new)
                else:  # not expanded yet: as upstream, add and push the whole list
                    have.update(i.idx for i in new)
                items.append((new_dep, new))
                stack.append((new_dep, new))

        merged: list[list[Any]] = []  # [dep, hybrid idxs, idx values seen]
        slot: dict[Any, int] = {}
        for dep, new in items:
            if isinstance(dep.target.module, nn.Parameter) and any(
                    dep.target.module is p for p in self.ignored_params):
                continue
            key = (dep.target, dep.handler)
            if key not in slot:
                slot[key] = len(merged)
                merged.append([dep, [], set()])
            entry = merged[slot[key]]
            for index in new:
                if index.idx not in entry[2]:
                    entry[1].append(index)
                    entry[2].add(index.idx)
        group = _Group()
        group._DG = self
        for dep, hybrid, _ in merged:
            item = _helpers.GroupItem(dep, _helpers.to_plain_idxs(hybrid))
            item.root_idxs = _helpers.to_root_idxs(hybrid)
            group._group.append(item)
        group.clipped = clipped
        return group

    def get_all_groups(self, ignored_layers: Any = (), root_module_types: Any = (
            ops.TORCH_CONV, ops.TORCH_LINEAR)) -> Iterator[Any]:
        """Upstream's ``DependencyGraph.get_all_groups`` with an identity set of visited layers
        (upstream scans a list for every candidate root); a root whose group cannot be traced
        is skipped and recorded in ``untraced_roots`` (``(module, exception)``)."""
        visited: dict[int, Any] = {}
        ignored = list(ignored_layers) + list(self.IGNORED_LAYERS_IN_TRACING)
        ignored_ids = {id(m) for m in ignored}
        types = tuple(root_module_types)
        for m in list(self.module2node.keys()):
            if id(m) in ignored_ids or not isinstance(m, types) or id(m) in visited:
                continue
            pruner = self.get_pruner_of_module(m)
            if pruner is None or pruner.get_out_channels(m) is None:
                continue
            try:
                group = self.get_pruning_group(m, pruner.prune_out_channels,
                                               list(range(pruner.get_out_channels(m))))
            except Exception as exc:  # upstream's index mappings can raise (IndexError in
                # index_mapping.py on RT-DETR): this root's group is left out and recorded, the
                # safety checks protect it by name (safety.invalid_groups)
                self.untraced_roots.append((m, exc))
                visited[id(m)] = m
                continue
            prunable = True
            for dep, _ in group:
                if self.is_out_channel_pruning_fn(dep.handler):
                    visited[id(dep.target.module)] = dep.target.module
                    if id(dep.target.module) in ignored_ids:
                        prunable = False
            if prunable:
                self.last_group = group  # the group a failing pruner was at (run_pruner)
                yield group


class _Group(Group):
    """torch-pruning's ``Group`` that tells its graph when it pruned (channel counts, and so
    the index mappings, changed)."""

    def prune(self, idxs: Any = None, record_history: bool = True) -> None:
        # per-channel tensors of a conv / linear besides weight and bias (a weight-standardized
        # conv's gain): upstream's pruners slice weight and bias only (channelwise.py)
        owned = [] if idxs is not None else group_companions(
            self._group, self._DG.is_out_channel_pruning_fn)
        try:
            super().prune(idxs, record_history)
            if idxs is None and self._DG is not None and getattr(self._DG, "stored_sizes", None):
                self._DG.stored_sizes.write_back()  # module attributes sizing splits / slices
            for module, names, size, lost in owned:
                prune_companions(module, names, size,
                                 [i.idx if hasattr(i, "idx") else int(i) for i in lost])
        finally:
            if self._DG is not None:
                self._DG._kcp_fresh = False


class _SizesProxy:
    """A backward node seen through the attribute name torch-pruning's reshape guard reads."""

    def __init__(self, grad_fn: Any, sizes: Any):
        self._grad_fn = grad_fn
        self._saved_self_sizes = tuple(sizes)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grad_fn, name)


# How far past the widest parameter a channel index may go before a traversal is declared
# divergent (_divergence_limit); generous, since a flatten mapping legitimately multiplies
# indices on the way to a Linear whose in_features is itself a parameter dimension.
_DIVERGENCE_MARGIN = 4


class DivergentMappingError(RuntimeError):
    """A group's channel indices grow without bound around a cycle of index mappings; the
    group cannot be traced, and ``get_all_groups`` records its root in ``untraced_roots``."""


_NO_BOUND_TYPES = {ops.OPTYPE.CONCAT, ops.OPTYPE.ELEMENTWISE, ops.OPTYPE.RESHAPE,
                   ops.OPTYPE.UNBIND, ops.OPTYPE.EXPAND, ops.OPTYPE.SLICE, ops.OPTYPE.OUTPUT,
                   ops.OPTYPE.CUSTOMIZED}


_UPSTREAM_SPLIT_CAT = (_tp_mapping._SplitIndexMapping, _tp_mapping._ConcatIndexMapping)


def _drop_degenerate_gqa(node: Any) -> None:
    """Undo upstream's grouped-query-attention mapping where it does not apply.

    ``update_expand_index_mapping`` (torch_pruning/dependency/index_mapping.py) takes every
    5-D ``expand`` for transformers' GQA ``repeat_kv`` and installs a ``_GQAIndexMapping`` with
    ``repeat = out_channels // in_channels``; on other 5-D expands (windowed attention whose
    ``scaled_dot_product_attention`` broadcasts ``(B, heads, windows, N, head_dim)``: timm's
    NesT, Hiera, Twins, GCViT) that is 0 and the mapping divides by zero. Such an expand
    repeats no channels: the identity is its mapping.
    """
    for n in (node, *node.inputs):
        for dep in n.dependencies:
            if dep.target is not node and dep.source is not node:
                continue
            dep.index_mapping = [
                None if isinstance(m, _tp_mapping._GQAIndexMapping) and m.repeat < 1 else m
                for m in dep.index_mapping]


def _upstream_owned(node: Any) -> bool:
    return node.type in (ops.OPTYPE.SLICE, ops.OPTYPE.RESHAPE, ops.OPTYPE.EXPAND,
                         ops.OPTYPE.UNBIND, ops.OPTYPE.LINEAR)


def _cumsum(values: list[int]) -> list[int]:
    out, total = [], 0
    for v in values:
        total += v
        out.append(total)
    return out


# ---------------------------------------------------------------------- pruner
@contextlib.contextmanager
def pruner_graph_class() -> Iterator[None]:
    """Make ``BasePruner.__init__`` build a :class:`DependencyGraph` (it constructs
    ``dependency.DependencyGraph()`` itself, torch_pruning/pruner/algorithms/base_pruner.py)."""
    module = _tp_base_pruner.dependency
    old = module.DependencyGraph
    module.DependencyGraph = DependencyGraph
    try:
        yield
    finally:
        module.DependencyGraph = old


class Pruner(tp.pruner.BasePruner):
    """torch-pruning's ``BasePruner`` on :class:`DependencyGraph`.

    A group whose root channels are the whole input of an equal split (``chunk``) counts the
    parts as channel groups, like a grouped conv: importance is averaged over the parts and the
    same channels are removed from each, so the parts stay equal and the ratio is per part.
    A group whose root channels feed a pixel shuffle scores each block of ``r * r`` channels
    (one output channel) by its mean, so whole blocks are chosen.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        with pruner_graph_class():
            super().__init__(*args, **kwargs)

    def _get_channel_groups(self, group: Any) -> int:
        return math.lcm(super()._get_channel_groups(group), split_channel_groups(self.DG, group))

    def _round_to(self, n_pruned: int, current_channels: int, round_to: int) -> int:
        """Channels to prune so that the kept width is a multiple of ``round_to``, never
        rounded down to nothing: torch-pruning 1.6 rounds a kept width under ``round_to`` to 0,
        and its ``check_pruning_group`` then skips the group, so with ``round_to=8`` a high
        ratio left narrow layers entirely unpruned (and a MACs search found ratios that pruned
        only the wide ones). Here at least one multiple is kept (layers narrower than one keep
        their width)."""
        keep = current_channels - n_pruned
        keep = max(keep - keep % round_to, min(round_to, current_channels))
        return max(current_channels - keep, 0)

    def estimate_importance(self, group: Any) -> Any:
        imp = super().estimate_importance(group)
        block = _shuffle_block(self.DG, group)
        if imp is not None and block > 1 and len(imp) % block == 0:
            imp = imp.view(-1, block).mean(1).repeat_interleave(block)
        return imp


def split_channel_groups(graph: Any, group: Any) -> int:
    """Channel groups an equal split imposes on a group (1 if none).

    When the group's root channels are the whole input of a split into ``n`` equal parts,
    the root channels form ``n`` contiguous equal slices that must lose the same positions:
    the same contract as a grouped conv's channel groups in torch-pruning.
    """
    groups = 1
    ops_info = getattr(graph, "_kcp_ops", {})
    for item in group.items:
        info = ops_info.get(item.dep.target)
        if not info or info["kind"] != "split" or not info["equal"]:
            continue
        sizes = item.dep.target.module.split_sizes
        if list(item.idxs) == list(item.root_idxs) and len(item.idxs) == sum(sizes):
            groups = math.lcm(groups, len(sizes))
    return groups


def _shuffle_block(graph: Any, group: Any) -> int:
    """``r * r`` if the group's root channels are the input of a pixel shuffle, else 1."""
    ops_info = getattr(graph, "_kcp_ops", {})
    for item in group.items:
        info = ops_info.get(item.dep.target)
        if not info or info["kind"] != "shuffle" or item.dep.source not in item.dep.target.inputs:
            continue
        b = info["block"]
        if len(group[0].idxs) == b * len(item.idxs) and all(
                r // b == i for i, r in zip(item.idxs, item.root_idxs)):
            return b
    return 1
