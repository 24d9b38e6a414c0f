"""Stored sizes: module attributes that size a split or a channel slice of a pruned tensor.

Forward code often cuts channels by sizes it keeps on the module: timm's ``MixedConv2d`` calls
``torch.split(x, self.splits, 1)``, ReXNet adds its shortcut into ``x[:, 0:self.in_channels]``,
DPN slices a concatenation at ``self.num_1x1_c``. torch-pruning maps channel indices through
such a split or slice correctly (:mod:`kcp_plugin.depgraph`), but the module keeps the old
sizes, so the pruned model cuts at the wrong place: it fails in the split, or, with a slice,
silently computes something else.

Here, while the dependency graph traces the model, every ``split`` and slice is watched (a
``TorchFunctionMode``). The module whose code issued the call is the innermost ``self`` on the
Python stack; an integer size or bound is bound to an integer attribute of it with that value
which the calling statement read (``self.<attr>`` loads in its bytecode), a list of sizes to a
list attribute equal to it (the same object first). After a group is pruned, each bound
attribute is set to the size the graph computed for that operation
(:meth:`StoredSizes.write_back`) and recorded on the module (:func:`stored_size_attrs`) for the
pruning plan, so that a replay reproduces it. No class names are involved.

A binding that cannot follow pruning is not rewritten: the operation is reported
(:meth:`StoredSizes.problem`), naming the attribute, and the safety checks keep its channels.
That is the case when several attributes match, when parts of one split share an attribute
while others do not (``[key_dim, key_dim, val_dim]``), when the attribute also sizes a cut off
the channel dimension, when a slice bound is partly stored and partly literal, when a part is
cut again at literal positions (found by :mod:`kcp_plugin.depgraph`), and, once pruned, when one
attribute would need two values.
"""

from __future__ import annotations

import dis
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

__all__ = ["SizedOp", "StoredSize", "StoredSizes", "stored_size_attrs", "trace_stored_sizes"]

# module __dict__ key of the stored sizes pruning set: {attr: value}, for the plan
_RECORD = "_kcp_stored_sizes"
_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_THIS_FILE = os.path.abspath(__file__)
_BIG = 2 ** 62  # a slice end at least this large means "to the end" (None in Python)
# how far above the call site the module whose code issued the call may be (a helper
# function called from the module's forward)
_OWNER_DEPTH = 3
# bytecode that ends a statement: the attributes read "in the statement" of a call are those
# loaded after the last of these
_STATEMENT_END = ("STORE_", "POP_TOP", "RETURN_VALUE", "POP_JUMP", "JUMP_", "UNPACK_SEQUENCE")


@dataclass(frozen=True)
class StoredSize:
    """An integer (or list of integers) kept on a module and passed to a split or slice.

    Attributes:
        owner: The module holding the attribute.
        name: The module's qualified name in the traced model.
        attr: The attribute's name.
    """

    owner: nn.Module
    name: str
    attr: str

    def label(self) -> str:
        """``"<name>.<attr>"`` (``"<Class>.<attr>"`` for the root module)."""
        return f"{self.name or type(self.owner).__name__}.{self.attr}"


@dataclass
class SizedOp:
    """A split or slice the forward code issued with stored sizes.

    Attributes:
        kind: ``"split"`` or ``"slice"``.
        dim: The dimension it cuts (normalized).
        ndim: The number of dimensions of the tensor it cuts.
        slots: Which attribute gives which size: ``"sizes"`` (the whole list of a split),
            ``"size"`` (the part size of an equal split), ``"total"`` (the width an equal
            split's part size is computed from), ``"start"`` / ``"end"`` (a slice's bounds),
            ``("part", i)`` (one part of a split by a list of attributes).
        problem: Why the binding cannot follow pruning, naming the attribute (None if it can).
        where: ``file:line`` of the call.
    """

    kind: str
    dim: int
    ndim: int
    slots: dict[Any, StoredSize] = field(default_factory=dict)
    problem: str | None = None
    where: str = ""

    def equal_parts(self) -> bool:
        """A split whose parts all take one stored size (``x.split(self.c, 1)``,
        ``split([self.c, self.c])``): they must stay equal, channel by channel."""
        if "size" in self.slots or "total" in self.slots:
            return True
        parts = [s for k, s in self.slots.items() if isinstance(k, tuple)]
        return len(parts) > 1 and len({(id(s.owner), s.attr) for s in parts}) == 1


class _Watch(TorchFunctionMode):
    """Records every split / slice issued with stored sizes, keyed by its backward node."""

    def __init__(self, names: dict[int, str]):
        super().__init__()
        self.names = names
        self.ops: dict[int, tuple[Any, SizedOp]] = {}  # id(grad_fn) -> (grad_fn, op)
        self._code_cache: dict[Any, list[dis.Instruction]] = {}

    def __torch_function__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if torch.is_grad_enabled() and name in ("split", "split_with_sizes", "__getitem__"):
            try:
                if name == "__getitem__":
                    self._slice(args, out)
                else:
                    self._split(args, kwargs, out)
            except Exception:  # never break the trace: an unrecognized call is left alone
                pass
        return out

    # ------------------------------------------------------------------ calls
    def _split(self, args: tuple, kwargs: dict, out: Any) -> None:
        x = args[0] if args else kwargs.get("tensor", kwargs.get("input"))
        sizes = args[1] if len(args) > 1 else kwargs.get(
            "split_size_or_sections", kwargs.get("split_size", kwargs.get("split_sizes")))
        dim = args[2] if len(args) > 2 else kwargs.get("dim", 0)
        if not isinstance(x, torch.Tensor) or not isinstance(out, (tuple, list)) or not out:
            return
        gf = getattr(out[0], "grad_fn", None)
        if gf is None or not isinstance(dim, int):
            return
        ndim = x.dim()
        if isinstance(sizes, int) and not isinstance(sizes, bool):
            values: list[int] = [sizes]
        elif isinstance(sizes, (list, tuple)) and sizes and all(
                isinstance(v, int) and not isinstance(v, bool) for v in sizes):
            values = list(sizes)
        else:
            return
        owner, frame = self._owner()
        if owner is None:
            return
        op = SizedOp("split", dim % ndim, ndim, where=_where(frame))
        read = self._read_attrs(frame)
        if isinstance(sizes, int):
            self._bind(op, "size", sizes, owner, read)
            width = x.shape[dim]
            if not op.slots and op.problem is None and width % sizes == 0:
                # equal parts sized from a stored total (SKNet: split(x, self.in_channels //
                # self.num_paths)): the total follows, the forward recomputes the parts
                self._bind(op, "total", width, owner, read)
        else:
            whole = [a for a, v in _attrs(owner) if isinstance(v, (list, tuple))
                     and list(v) == values]
            same = [a for a in whole if getattr(owner, a) is sizes]
            whole = same or _narrow(whole, read)
            if len(whole) == 1:
                op.slots["sizes"] = self._stored(owner, whole[0])
            elif len(whole) > 1:
                op.problem = (f"the split sizes {values} equal several attributes of "
                              f"{self._label(owner)} ({', '.join(whole)})")
            elif not self._bind_in_order(op, values, owner, read):
                for i, v in enumerate(values):
                    self._bind(op, ("part", i), v, owner, read)
                if op.slots and len(op.slots) < len(values) and op.problem is None:
                    literal = [values[i] for i in range(len(values)) if ("part", i) not in
                               op.slots]
                    op.problem = (f"the split sizes {values} come partly from "
                                  f"{', '.join(s.label() for s in op.slots.values())} and "
                                  f"partly from elsewhere ({literal})")
            _check_shared_parts(op)
        self._keep(gf, op)

    def _slice(self, args: tuple, out: Any) -> None:
        if len(args) < 2 or not isinstance(args[0], torch.Tensor) \
                or not isinstance(out, torch.Tensor) or out.grad_fn is None:
            return
        x, index = args[0], args[1]
        index = index if isinstance(index, tuple) else (index,)
        if not all(isinstance(i, slice) or i is Ellipsis for i in index) \
                or sum(i is Ellipsis for i in index) > 1:
            return  # integer / tensor / None indexing: dimensions move, left alone
        ndim = x.dim()
        cuts: list[tuple[int, slice]] = []
        for pos, i in enumerate(index):
            if i is Ellipsis:
                continue
            after = index.index(Ellipsis) < pos if Ellipsis in index else False
            dim = ndim - (len(index) - pos) if after else pos
            if _stored_candidate(i.start) or _stored_candidate(i.stop):
                cuts.append((dim, i))
        if not cuts:
            return
        owner, frame = self._owner()
        if owner is None:
            return
        read = self._read_attrs(frame)
        nodes = _slice_nodes(out.grad_fn)
        for dim, cut in cuts:
            gf = nodes.get(dim)
            if gf is None:
                continue
            op = SizedOp("slice", dim, ndim, where=_where(frame))
            if cut.step not in (None, 1):
                continue
            for role, value in (("start", cut.start), ("end", cut.stop)):
                if _stored_candidate(value):
                    self._bind(op, role, value, owner, read)
            if not op.slots:
                continue
            literal = [v for role, v in (("start", cut.start), ("end", cut.stop))
                       if _stored_candidate(v) and role not in op.slots]
            if literal and op.problem is None:
                op.problem = (f"the slice [{_fmt(cut.start)}:{_fmt(cut.stop)}] is bounded "
                              f"partly by {', '.join(s.label() for s in op.slots.values())} and "
                              f"partly by a value from elsewhere ({literal[0]})")
            self._keep(gf, op)

    # ------------------------------------------------------------------ helpers
    def _keep(self, gf: Any, op: SizedOp) -> None:
        if op.slots or op.problem:
            self.ops[id(gf)] = (gf, op)

    def _bind(self, op: SizedOp, slot: Any, value: int, owner: nn.Module, read: list[str]
              ) -> None:
        # an integer equal to an attribute is evidence only if the statement read it
        found = [a for a, v in _attrs(owner) if isinstance(v, int) and v == value and a in read]
        if len(found) == 1:
            op.slots[slot] = self._stored(owner, found[0])
        elif len(found) > 1 and op.problem is None:
            op.problem = (f"the size {value} equals several attributes of {self._label(owner)} "
                          f"({', '.join(found)}), so which one to update is ambiguous")

    def _bind_in_order(self, op: SizedOp, values: list[int], owner: nn.Module,
                       read: list[str]) -> bool:
        """Bind a split's parts to the integer attributes the statement read one after the
        other with exactly those values (``[self.key_dim, self.key_dim, self.val_dim]``), if
        there is one such run."""
        ints = [a for a in read if isinstance(vars(owner).get(a), int)
                and not isinstance(vars(owner).get(a), bool)]
        n = len(values)
        runs = {tuple(ints[i:i + n]) for i in range(len(ints) - n + 1)
                if [vars(owner)[a] for a in ints[i:i + n]] == values}
        if len(runs) != 1:
            return False
        for i, attr in enumerate(runs.pop()):
            op.slots[("part", i)] = self._stored(owner, attr)
        return True

    def _stored(self, owner: nn.Module, attr: str) -> StoredSize:
        return StoredSize(owner, self.names.get(id(owner), ""), attr)

    def _label(self, owner: nn.Module) -> str:
        return self.names.get(id(owner)) or type(owner).__name__

    def _owner(self) -> tuple[nn.Module | None, Any]:
        """The module whose code issued the current call, and that code's frame."""
        frame = sys._getframe(2)
        while frame is not None and (frame.f_code.co_filename.startswith(_TORCH_DIR)
                                     or os.path.abspath(frame.f_code.co_filename) == _THIS_FILE):
            frame = frame.f_back
        for _ in range(_OWNER_DEPTH):
            if frame is None:
                break
            code = frame.f_code
            if code.co_argcount and code.co_varnames[0] == "self":
                owner = frame.f_locals.get("self")
                if isinstance(owner, nn.Module) and id(owner) in self.names:
                    return owner, frame
            frame = frame.f_back
        return None, None

    def _read_attrs(self, frame: Any) -> list[str]:
        """``self.<attr>`` loads of the statement running in ``frame``, up to the call, in
        order."""
        code = frame.f_code
        instrs = self._code_cache.get(code)
        if instrs is None:
            instrs = self._code_cache[code] = list(dis.get_instructions(code))
        here = max((k for k, ins in enumerate(instrs) if ins.offset <= frame.f_lasti),
                   default=-1)
        names: list[str] = []
        for k in range(here, 0, -1):
            ins = instrs[k]
            if ins.opname.startswith(_STATEMENT_END) and k != here:
                break
            prev = instrs[k - 1]
            if ins.opname in ("LOAD_ATTR", "LOAD_METHOD") and prev.opname in (
                    "LOAD_FAST", "LOAD_DEREF") and prev.argval == "self":
                names.append(ins.argval)
        return names[::-1]  # in the order the code reads them


def _check_shared_parts(op: SizedOp) -> None:
    """Parts that share one attribute must stay equal; unless all parts do (an equal split,
    pruned channel by channel), pruning the parts separately cannot keep them so."""
    if op.problem is not None or op.equal_parts():
        return
    by_attr: dict[tuple[int, str], list[int]] = {}
    for slot, stored in op.slots.items():
        if isinstance(slot, tuple):
            by_attr.setdefault((id(stored.owner), stored.attr), []).append(slot[1])
    for (_, attr), parts in by_attr.items():
        if len(parts) > 1:
            label = next(s.label() for s in op.slots.values() if s.attr == attr)
            op.problem = (f"{label} sizes parts {parts} of the split, which must then stay "
                          "equal channel by channel (as a matmul of q and k needs), while the "
                          "other parts are pruned on their own")
            return


def _where(frame: Any) -> str:
    return f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno}" if frame else ""


def _fmt(value: Any) -> str:
    return "" if value is None else str(value)


def _stored_candidate(value: Any) -> bool:
    """A slice bound that could come from an attribute (0, None and negatives cannot follow
    pruning, nor need to)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value < _BIG


def _attrs(owner: nn.Module) -> Iterator[tuple[str, Any]]:
    """Public integer / integer-list attributes of a module (plain attributes only)."""
    for name, value in vars(owner).items():
        if name.startswith("_") or isinstance(value, bool):
            continue
        if isinstance(value, int) or (isinstance(value, (list, tuple)) and value and all(
                isinstance(v, int) and not isinstance(v, bool) for v in value)):
            yield name, value


def _narrow(found: list[str], read: list[str]) -> list[str]:
    """Candidates the statement actually read, if that leaves any (a list equal to a list
    attribute is evidence on its own)."""
    if len(found) <= 1:
        return found
    narrowed = [a for a in found if a in read]
    return narrowed or found


def _slice_nodes(gf: Any) -> dict[int, Any]:
    """The ``SliceBackward0`` nodes of one indexing expression, by the dimension they cut."""
    nodes: dict[int, Any] = {}
    while gf is not None and type(gf).__name__ == "SliceBackward0":
        nodes.setdefault(int(gf._saved_dim), gf)
        nxt = gf.next_functions
        gf = nxt[0][0] if nxt else None
    return nodes


class StoredSizes:
    """The stored-size bindings of one traced graph, and their update after each prune.

    Built by :func:`trace_stored_sizes` around the graph's trace; the graph then says which
    operations cut channels (:meth:`place`), and calls :meth:`write_back` after every group it
    prunes.
    """

    def __init__(self, ops: dict[int, tuple[Any, SizedOp]]):
        self._ops = ops
        self._placed: dict[Any, SizedOp] = {}  # graph node -> op, on a channel dimension
        self._problems: dict[int, str] = {}

    def __bool__(self) -> bool:
        return bool(self._ops)

    def op_of(self, grad_fn: Any) -> SizedOp | None:
        """The stored-size operation whose backward node is ``grad_fn``, if any."""
        entry = self._ops.get(id(grad_fn))
        return entry[1] if entry is not None and entry[0] is grad_fn else None

    def place(self, node: Any, on_channels: bool) -> SizedOp | None:
        """Tell whether the graph node of a stored-size operation cuts channels; returns the
        operation if it does (it must then be mapped and written back), else None."""
        op = self.op_of(node.grad_fn)
        if op is None:
            return None
        if not on_channels:
            return None  # its attributes then count as used elsewhere (settle)
        self._placed[node] = op
        return op

    def settle(self) -> None:
        """Decide, once every node is placed, which bindings cannot follow pruning: their own
        problem, or an attribute that also sizes an operation off the channel dimension, or
        one that the trace did not reach as a graph node."""
        placed_ids = {id(op) for op in self._placed.values()}
        elsewhere: dict[tuple[int, str], SizedOp] = {}
        for _, op in self._ops.values():
            if id(op) in placed_ids:
                continue
            for stored in op.slots.values():
                elsewhere.setdefault((id(stored.owner), stored.attr), op)
        for node, op in self._placed.items():
            reason = op.problem
            for stored in op.slots.values():
                other = elsewhere.get((id(stored.owner), stored.attr))
                if reason is None and other is not None:
                    reason = (f"{stored.label()} also sizes a {other.kind} that is not on the "
                              f"pruned channels ({other.where}), so it cannot follow them")
            if reason is not None:
                self._problems[id(node)] = self._describe(op, reason)

    def flag(self, node: Any, reason: str) -> None:
        """Keep a bound operation's channels after all, for ``reason`` (the graph found a
        use of its parts that cannot follow pruning)."""
        op = self._placed.get(node)
        if op is not None and id(node) not in self._problems:
            labels = ", ".join(sorted({s.label() for s in op.slots.values()}))
            self._problems[id(node)] = self._describe(op, f"{labels}: {reason}")

    def _describe(self, op: SizedOp, reason: str) -> str:
        what = "split" if op.kind == "split" else "channel slice"
        return (f"the forward code ({op.where}) sizes a {what} of these channels by a stored "
                f"attribute it cannot update: {reason}; keep these channels, or compute the "
                "size from the tensor (x.shape) in the forward code")

    def bound(self, node: Any) -> SizedOp | None:
        """The operation of a graph node whose stored sizes follow pruning, else None."""
        op = self._placed.get(node)
        return op if op is not None and id(node) not in self._problems else None

    def problem(self, node: Any) -> str | None:
        """Why a graph node's stored sizes cannot follow pruning (None if they can, or if it
        has none)."""
        return self._problems.get(id(node))

    def write_back(self) -> None:
        """Set every bound attribute to the size its operations have now (after a prune).

        Raises:
            RuntimeError: one attribute sizes operations that pruning changed differently
                (it names the attribute and the sizes).
        """
        wanted: dict[tuple[int, str], tuple[StoredSize, Any, str]] = {}
        for node, op in self._placed.items():
            if id(node) in self._problems:
                continue
            for slot, stored in op.slots.items():
                value = _new_value(op, slot, node.module, getattr(stored.owner, stored.attr))
                if value is None:
                    continue
                key = (id(stored.owner), stored.attr)
                have = wanted.get(key)
                if have is not None and have[1] != value:
                    raise RuntimeError(
                        f"{stored.label()} sizes two operations that pruning changed "
                        f"differently ({have[1]} at {have[2]}, {value} at {op.where}): one "
                        "attribute cannot hold both")
                wanted[key] = (stored, value, op.where)
        for stored, value, _ in wanted.values():
            if getattr(stored.owner, stored.attr) != value:
                setattr(stored.owner, stored.attr, value)
                record = stored.owner.__dict__.setdefault(_RECORD, {})
                record[stored.attr] = list(value) if isinstance(value, tuple) else value


def _new_value(op: SizedOp, slot: Any, module: Any, old: Any) -> Any:
    """The value a stored size must take, from the graph's operation after pruning."""
    if op.kind == "slice":
        value = getattr(module, "start" if slot == "start" else "end", None)
        return int(value) if isinstance(value, int) else None
    sizes = getattr(module, "split_sizes", None)
    if not sizes or not all(isinstance(v, int) for v in sizes):
        return None
    if slot == "sizes":
        return type(old)(int(v) for v in sizes) if isinstance(old, tuple) else \
            [int(v) for v in sizes]
    if slot == "size":
        return int(sizes[0]) if len(set(sizes)) == 1 or len(sizes) == 1 else None
    if slot == "total":
        return int(sum(sizes))
    return int(sizes[slot[1]])


class trace_stored_sizes:  # noqa: N801 - used as a context manager, like a function
    """Watch a model's forward passes for splits and slices sized by module attributes.

    Use around the dependency graph's trace::

        with trace_stored_sizes(model) as watch:
            graph.build_dependency(model, example_inputs)
        sizes = watch.result()

    Args:
        model: The traced model (attribute owners are looked for among its modules).
    """

    def __init__(self, model: nn.Module):
        self._watch = _Watch({id(m): n for n, m in model.named_modules()})

    def __enter__(self) -> trace_stored_sizes:
        self._watch.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._watch.__exit__(*exc)

    def result(self) -> StoredSizes:
        """The bindings found (operations keyed by their backward nodes)."""
        return StoredSizes(self._watch.ops)


def stored_size_attrs(model: nn.Module) -> dict[str, dict[str, Any]]:
    """``{module_name: {attr: value}}`` of the stored sizes pruning has set on ``model``'s
    modules (plain data, for the pruning plan)."""
    found: dict[str, dict[str, Any]] = {}
    for name, m in model.named_modules():
        record = m.__dict__.get(_RECORD)
        if record:
            found[name] = dict(record)
    return found
