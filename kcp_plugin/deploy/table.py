"""A latency model of a network on a backend: per-layer lookup tables, measured on the target.

HALP (Shen et al., NeurIPS 2022, NVlabs/HALP) prunes against a latency lookup table: every
conv's latency measured on the target GPU as a function of its input and output widths, keyed
``{batch}_{cin}_{cout}_{fmap}_{k}_{stride}_{groups}``, the network's latency taken as the sum.
This module builds such a table for any net and any backend of :mod:`.backends`:

* **layers**: every conv (1-D / 2-D / 3-D, transposed, any groups: depthwise ones keep
  ``groups == width``) and linear layer the example forward pass calls, with the input shape
  of each call (:func:`trace_layers`); layers called several times count once per call;
* **signature**: the layer's type, options (kernel, stride, padding, dilation, groups, bias),
  input shape at the backend's batch and dense widths: identical layers (a ResNet stage's
  repeated blocks) share one set of measurements;
* **grid**: each width that pruning can change is measured at a handful of hardware-aligned
  widths between 10% and 100% (multiples of the backend's channel multiple, finer for narrow
  layers), both widths of a layer on the product grid; between grid points the time is
  interpolated bilinearly. It is not forced to fall with the width: an odd width can run
  slower than a wider aligned one, and the allocation only takes steps that save time;
* **cache**: measurements are kept on disk per backend (runtime, hardware, dtype, batch,
  threads, library versions), under ``$KCP_CACHE/latency`` (default ``~/.cache/kcp-plugin``),
  so a second prune of the same net on the same machine measures nothing.

The sum of layers misses what is not a conv or linear layer: normalisation, activations,
residual additions, pooling (memory-bound, roughly proportional to the activations) and fixed
costs (kernel launches, the input stem). :class:`LatencyModel` adds a residual term
``b * activations + a`` (and, given enough points, a scale ``s`` on the table's sum), fitted by
least squares to the end-to-end measurements it is given (the dense model first, then each pruned
model measured), and reports how well it predicts (:attr:`LatencyModel.points`) and how much
of the dense latency the layers explain (:attr:`LatencyModel.table_share`). Where the layers
explain little (launch-bound small batches on a GPU, fused blocks), the prediction is poor; the
latency target then leans on end-to-end measurements (:mod:`.search`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..graph import ForwardFn, default_forward, preserved_modes
from ..progress import progress_bar
from .backends import Backend, backend_settings, first_tensor, place_module, place_tensor

__all__ = ["LayerCall", "LatencyModel", "LatencyTable", "cache_folder", "trace_layers",
           "width_step"]

logger = logging.getLogger(__name__)

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
          nn.ConvTranspose3d)
TABLE_TYPES = (*_CONVS, nn.Linear)
# grid fractions of the dense width (the default max_pruning_ratio keeps >= 10%)
MIN_FRACTION = 0.1


def cache_folder() -> Path:
    """Where latency tables are kept: ``$KCP_CACHE/latency`` (default ``~/.cache/kcp-plugin``,
    or ``$XDG_CACHE_HOME/kcp-plugin``)."""
    root = os.environ.get("KCP_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "kcp-plugin")
    return Path(root) / "latency"


def width_step(width: int, multiple: int, groups: int = 1) -> int:
    """The width step of a layer ``width`` wide: the backend's channel ``multiple``, halved
    while fewer than 4 steps fit (narrow layers need finer steps to be prunable at all), and a
    multiple of ``groups`` (grouped convs lose the same count in every group)."""
    step = max(1, multiple)
    while step > 1 and width < 4 * step:
        step //= 2
    return math.lcm(step, max(1, groups))


@dataclass(frozen=True)
class LayerCall:
    """One call of a conv / linear layer in the dense forward pass.

    Attributes:
        name: The layer's module name.
        cls: Its class (a torch conv / linear class, or a subclass).
        shape: Its input's shape at the backend's batch (the channel dimension at the dense
            width).
        cin / cout: Dense input / output widths.
        groups: Conv groups (1 for linear layers).
        options: Constructor options besides widths and groups (kernel, stride, padding,
            dilation, output padding, padding mode, bias), as ``(name, value)`` pairs.
        out_per_channel: Output elements per output channel in this call (batch included):
            what a channel of this layer costs the memory-bound ops after it.
    """

    name: str
    cls: type
    shape: tuple[int, ...]
    cin: int
    cout: int
    groups: int
    options: tuple[tuple[str, Any], ...]
    out_per_channel: int

    @property
    def is_linear(self) -> bool:
        """Whether the layer is a linear layer (channels last) rather than a conv."""
        return issubclass(self.cls, nn.Linear)

    @property
    def depthwise(self) -> bool:
        """A depthwise conv: one group per channel, input and output widths tied."""
        return not self.is_linear and self.groups == self.cin == self.cout and self.groups > 1

    def spec(self) -> str:
        """The signature identical layers share (type, options, input shape, dense widths,
        groups)."""
        opts = ",".join(f"{k}={v}" for k, v in self.options)
        return (f"{self.cls.__name__}|{'x'.join(map(str, self.shape))}|{self.cin}->{self.cout}"
                f"|g={self.groups}|{opts}")

    def widths_ok(self, cin: int, cout: int) -> bool:
        """Whether ``(cin, cout)`` is a layer this one can be pruned to."""
        if self.depthwise:
            return cin == cout
        return cin % self.groups == 0 and cout % self.groups == 0

    def build(self, cin: int, cout: int) -> nn.Module:
        """A standalone layer of this type at the given widths (random weights, CPU, fp32).
        Subclasses (timm's ``Conv2dSame``, ``ScaledStdConv2d``...) are built as their torch
        base class: the table times the convolution, not a subclass's extras."""
        opts = dict(self.options)
        if self.is_linear:
            return nn.Linear(cin, cout, bias=opts["bias"])
        base = next(c for c in _CONVS if issubclass(self.cls, c))
        groups = cin if self.depthwise else self.groups
        if base in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
            return base(cin, cout, opts["kernel_size"], opts["stride"], opts["padding"],
                        opts["output_padding"], groups, opts["bias"], opts["dilation"])
        return base(cin, cout, opts["kernel_size"], opts["stride"], opts["padding"],
                    opts["dilation"], groups, opts["bias"], opts["padding_mode"])

    def input(self, cin: int) -> torch.Tensor:
        """A random input of the call's shape with ``cin`` channels."""
        shape = list(self.shape)
        shape[-1 if self.is_linear else 1] = cin
        return torch.randn(*shape)

    def macs(self, cin: int, cout: int) -> int:
        """Multiply-accumulates of the call at the given widths."""
        opts = dict(self.options)
        kernel = math.prod(opts.get("kernel_size", (1,)))
        groups = cin if self.depthwise else self.groups
        return int(self.out_per_channel * cout * (cin // groups) * kernel)


def trace_layers(model: nn.Module, example_inputs: Any, forward_fn: ForwardFn | None = None,
                 batch: int | None = None, names: Iterable[str] | None = None
                 ) -> list[LayerCall]:
    """The conv / linear layer calls of one forward pass of ``model`` (eval, no autograd).

    Args:
        model: The dense model (its modes are restored; it is not changed).
        example_inputs: Inputs as for :func:`kcp_plugin.prune`.
        forward_fn: How to call the model.
        batch: The batch the table is measured at (None: the example's); shapes whose first
            dimension is a multiple of the example batch are scaled to it.
        names: Only these layers (default: every conv / linear layer).

    Returns:
        One :class:`LayerCall` per call, in call order.
    """
    wanted = None if names is None else set(names)
    first = first_tensor(example_inputs)
    b0 = int(first.shape[0]) if first is not None and first.dim() else 1
    calls: list[LayerCall] = []
    handles = []

    def hook(name: str):
        def record(module: nn.Module, args: tuple, output: Any) -> None:
            if not args or not isinstance(args[0], torch.Tensor) \
                    or not isinstance(output, torch.Tensor):
                return
            shape = list(args[0].shape)
            out = list(output.shape)
            if batch is not None and shape and shape[0] % b0 == 0:
                shape[0] = shape[0] // b0 * batch
                out[0] = out[0] // b0 * batch if out and out[0] % b0 == 0 else out[0]
            if isinstance(module, nn.Linear):
                cin, cout, groups = module.in_features, module.out_features, 1
                options = (("bias", module.bias is not None),)
                per_channel = math.prod(out[:-1])
            else:
                cin, cout, groups = module.in_channels, module.out_channels, module.groups
                options = (("kernel_size", tuple(module.kernel_size)),
                           ("stride", tuple(module.stride)),
                           ("padding", module.padding if isinstance(module.padding, str)
                            else tuple(module.padding)),
                           ("dilation", tuple(module.dilation)),
                           ("output_padding", tuple(getattr(module, "output_padding", ()))),
                           ("padding_mode", module.padding_mode),
                           ("bias", module.bias is not None))
                per_channel = math.prod(out) // max(out[1], 1) if len(out) > 1 else 1
            calls.append(LayerCall(name, type(module), tuple(shape), cin, cout, groups,
                                   options, int(per_channel)))
        return record

    for name, module in model.named_modules():
        if isinstance(module, TABLE_TYPES) and (wanted is None or name in wanted):
            handles.append(module.register_forward_hook(hook(name)))
    fwd = forward_fn or default_forward
    try:
        with preserved_modes(model), torch.inference_mode():
            model.eval()
            fwd(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
    return calls


@dataclass
class _Grid:
    """Measured times of one signature: ``ms[i][j]`` at ``(ins[i], outs[j])``."""

    ins: list[int]
    outs: list[int]
    ms: list[list[float]]

    def at(self, cin: float, cout: float) -> float:
        """Bilinear interpolation; clamped outside the grid."""
        i0, i1, fi = _bracket(self.ins, cin)
        j0, j1, fj = _bracket(self.outs, cout)
        m = self.ms
        top = m[i0][j0] * (1 - fj) + m[i0][j1] * fj
        bottom = m[i1][j0] * (1 - fj) + m[i1][j1] * fj
        return top * (1 - fi) + bottom * fi


def _bracket(levels: Sequence[int], x: float) -> tuple[int, int, float]:
    if len(levels) == 1 or x <= levels[0]:
        return 0, 0, 0.0
    if x >= levels[-1]:
        n = len(levels) - 1
        return n, n, 0.0
    for k in range(len(levels) - 1):
        if levels[k] <= x <= levels[k + 1]:
            span = levels[k + 1] - levels[k]
            return k, k + 1, (x - levels[k]) / span if span else 0.0
    return 0, 0, 0.0  # unreachable: levels are sorted


class LatencyTable:
    """Per-layer latency on one backend, measured on hardware-aligned width grids.

    Args:
        backend: Where to measure (its dtype, batch, threads, clock).
        levels: Grid points per prunable width (the product for layers whose two widths are
            both prunable: ``levels ** 2`` measurements per signature).
        cache: Keep measurements on disk (:func:`cache_folder`); never with a custom timer
            (``backend.timer``), whose numbers describe no machine.
        progress: Show a progress bar while measuring.
    """

    def __init__(self, backend: Backend, levels: int = 6, cache: bool = True,
                 progress: bool | None = None):
        if levels < 2:
            raise ValueError(f"levels must be >= 2, got {levels}")
        self.backend = backend
        self.levels = levels
        self.progress = progress
        self.measured = 0  # measurements made by this table (not read from the cache)
        self._grids: dict[str, _Grid] = {}
        self._path: Path | None = None
        if cache and backend.timer is None:
            key = json.dumps(backend.key(), sort_keys=True)
            digest = hashlib.sha256(key.encode()).hexdigest()[:16]
            self._path = cache_folder() / f"{backend.name}-{digest}.json"
            self._load()

    # ------------------------------------------------------------------ grid
    def grid_widths(self, dense: int, free: bool, step: int) -> list[int]:
        """The widths a prunable dimension is measured at (just ``[dense]`` if not free)."""
        if not free:
            return [dense]
        lo = max(step, int(round(dense * MIN_FRACTION / step)) * step)
        points = {dense}
        for k in range(self.levels - 1):
            frac = MIN_FRACTION + (1 - MIN_FRACTION) * k / (self.levels - 1)
            w = int(round(max(lo, dense * frac) / step)) * step
            if 0 < w < dense:
                points.add(w)
        return sorted(points)

    def key(self, call: LayerCall, free_in: bool, free_out: bool) -> str:
        """The cache key of a signature and which of its widths vary."""
        return f"{call.spec()}|free={int(free_in)}{int(free_out)}|levels={self.levels}"

    def ensure(self, calls: Sequence[tuple[LayerCall, bool, bool]]) -> None:
        """Measure the grids of these ``(call, input width free, output width free)`` that
        are not known yet (one progress bar over all of them; saved to the cache)."""
        todo: dict[str, tuple[LayerCall, list[int], list[int]]] = {}
        multiple = self.backend.channel_multiple()
        for call, free_in, free_out in calls:
            if call.depthwise:
                free_in = free_out = free_in or free_out
            key = self.key(call, free_in, free_out)
            if key in self._grids or key in todo:
                continue
            ins = self.grid_widths(call.cin, free_in,
                                   width_step(call.cin, multiple, _groups_of(call)))
            outs = self.grid_widths(call.cout, free_out,
                                    width_step(call.cout, multiple, _groups_of(call)))
            todo[key] = (call, ins, outs)
        if not todo:
            return
        points = sum(len(ins) if call.depthwise else len(ins) * len(outs)
                     for call, ins, outs in todo.values())
        bar = progress_bar(enabled=self.progress, total=points,
                           desc=f"latency table ({self.backend.name})")
        try:
            with backend_settings(self.backend):
                for key, (call, ins, outs) in todo.items():
                    self._grids[key] = self._measure(call, ins, outs, bar)
        finally:
            bar.close()
            self._save()

    def cost(self, call: LayerCall, free_in: bool, free_out: bool, cin: float,
             cout: float) -> float:
        """Interpolated time (ms) of ``call`` at widths ``(cin, cout)``; :meth:`ensure` first."""
        if call.depthwise:
            free_in = free_out = free_in or free_out
        grid = self._grids[self.key(call, free_in, free_out)]
        if call.depthwise:
            cout = cin = min(cin, cout)
        return grid.at(cin, cout)

    # ------------------------------------------------------------- measuring
    def _measure(self, call: LayerCall, ins: list[int], outs: list[int], bar: Any) -> _Grid:
        ms = [[0.0] * len(outs) for _ in ins]
        for i, cin in enumerate(ins):
            for j, cout in enumerate(outs):
                if call.depthwise and cin != cout:
                    continue
                ms[i][j] = self._time_layer(call, cin, cout)
                self.measured += 1
                bar.update(1)
        if call.depthwise:  # only the diagonal was measured: the time follows the width
            diag = {w: ms[i][ins.index(w)] for i, w in enumerate(ins) if w in outs}
            ms = [[diag[min(ci, co)] if min(ci, co) in diag else 0.0 for co in outs]
                  for ci in ins]
        return _Grid(ins, outs, ms)

    def _time_layer(self, call: LayerCall, cin: int, cout: int) -> float:
        """Median time of one call of a standalone layer at ``(cin, cout)``, in ms."""
        from .latency import timed_passes

        b = self.backend
        layer = call.build(cin, cout).eval()
        x = call.input(cin)
        runs = max(3, b.runs // 2)
        measure = Backend(b.name, b.device, b.dtype, b.batch, b.threads, runs,
                          max(1, min(b.warmup, 2)), b.channels_last, b.timer)
        if b.timer is not None:
            times = timed_passes([(layer, lambda: layer(x))], measure)[0]
        elif b.name == "onnxruntime":
            times = self._time_onnx(layer, x, measure)
        else:
            layer, x = place_module(layer, b), place_tensor(x, b)
            repeat = 5 if b.is_cuda else 1  # a GPU layer can take microseconds: time 5 calls
            with torch.inference_mode():
                def run() -> None:
                    for _ in range(repeat):
                        layer(x)
                times = [t / repeat for t in timed_passes([(layer, run)], measure)[0]]
        times.sort()
        return times[len(times) // 2]

    def _time_onnx(self, layer: nn.Module, x: torch.Tensor, measure: Backend) -> list[float]:
        from .export import export_onnx, inference_session
        from .latency import timed_passes

        with tempfile.TemporaryDirectory(prefix="kcp-table-") as folder:
            report = export_onnx(layer, x, os.path.join(folder, "layer.onnx"),
                                 dynamic_batch=False, check=False)
            session = inference_session(report.path, measure.threads or torch.get_num_threads())
            feeds = report.feeds(x)
            return timed_passes([(layer, lambda: session.run(None, feeds))], measure)[0]

    # ----------------------------------------------------------------- cache
    def _load(self) -> None:
        if self._path is None or not self._path.exists():
            return
        try:
            data = json.loads(self._path.read_text())
            for key, g in data.get("grids", {}).items():
                self._grids[key] = _Grid(list(g["ins"]), list(g["outs"]),
                                         [list(map(float, r)) for r in g["ms"]])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.warning("ignoring the unreadable latency table cache %s (%s)", self._path, exc)

    def _save(self) -> None:
        if self._path is None:
            return
        with contextlib.suppress(OSError):
            self._path.parent.mkdir(parents=True, exist_ok=True)
            payload = {"backend": self.backend.key(),
                       "grids": {k: {"ins": g.ins, "outs": g.outs, "ms": g.ms}
                                 for k, g in self._grids.items()}}
            fd, tmp = tempfile.mkstemp(dir=self._path.parent, suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(payload, f)
            os.replace(tmp, self._path)


def _groups_of(call: LayerCall) -> int:
    return 1 if call.depthwise else call.groups


@dataclass
class LatencyModel:
    """Predicted end-to-end latency of a net at given layer widths, on one backend.

    ``predict = s * (sum of the table over the layer calls) + b * activations + a``, where
    activations are the output elements of the layer calls (what normalisation, activation
    and residual ops traffic scales with); ``s, b >= 0`` and ``a`` are fitted to the end-to-end
    measurements in :attr:`points` (the dense model's first).

    Attributes:
        table: The per-layer table.
        calls: ``(call, input width prunable, output width prunable)`` for every layer call.
        points: ``(layer sum, activations, measured ms, predicted ms before this point was
            fitted)`` per end-to-end measurement.
        coef: ``(s, b, a)``.
    """

    table: LatencyTable
    calls: list[tuple[LayerCall, bool, bool]]
    points: list[tuple[float, float, float, float | None]] = field(default_factory=list)
    coef: tuple[float, float, float] = (1.0, 0.0, 0.0)
    _fitted: list[int] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self.table.ensure(self.calls)

    # ------------------------------------------------------------ components
    def layer_sum(self, widths: dict[str, tuple[int, int]]) -> float:
        """Sum of the table over every layer call at ``widths`` (name -> (cin, cout); layers
        absent keep their dense widths), in ms."""
        total = 0.0
        for call, free_in, free_out in self.calls:
            cin, cout = widths.get(call.name, (call.cin, call.cout))
            total += self.table.cost(call, free_in, free_out, cin, cout)
        return total

    def activations(self, widths: dict[str, tuple[int, int]]) -> float:
        """Output elements of every layer call at ``widths``."""
        return float(sum(call.out_per_channel * widths.get(call.name, (call.cin, call.cout))[1]
                         for call, _, _ in self.calls))

    def predict(self, widths: dict[str, tuple[int, int]]) -> float:
        """Predicted end-to-end latency (ms) at ``widths`` (never below 1% of the layers'
        sum: a negative intercept must not predict a free model)."""
        s, b, a = self.coef
        layers = s * self.layer_sum(widths)
        return max(layers + b * self.activations(widths) + a, 0.01 * layers)

    # ----------------------------------------------------------- calibration
    def add_measurement(self, widths: dict[str, tuple[int, int]], measured_ms: float,
                        refit: bool = True) -> None:
        """Record an end-to-end measurement at ``widths`` (its prediction before, kept for the
        report) and, with ``refit``, refit ``(s, b, a)`` to the points recorded with it."""
        before = self.predict(widths) if self.points else None
        self.points.append((self.layer_sum(widths), self.activations(widths),
                            float(measured_ms), before))
        if refit or len(self.points) == 1:
            self._fitted.append(len(self.points) - 1)
            self.coef = _fit([self.points[i] for i in self._fitted])

    @property
    def table_share(self) -> float:
        """Fraction of the dense end-to-end latency the table's layers account for."""
        if not self.points:
            return float("nan")
        layers, _, measured, _ = self.points[0]
        return layers / measured if measured > 0 else float("nan")

    def errors(self) -> list[float]:
        """Relative errors ``predicted / measured - 1`` of the predictions made before each
        measurement was fitted (the dense point, which calibrates, has none)."""
        return [p / m - 1 for _, _, m, p in self.points if p is not None and m > 0]

    def widths_of(self, model: nn.Module) -> dict[str, tuple[int, int]]:
        """The current widths of the model's table layers, by name."""
        modules = dict(model.named_modules())
        out = {}
        for call, _, _ in self.calls:
            m = modules.get(call.name)
            if isinstance(m, nn.Linear):
                out[call.name] = (m.in_features, m.out_features)
            elif m is not None:
                out[call.name] = (m.in_channels, m.out_channels)
        return out

    def summary(self) -> dict[str, Any]:
        """Plain data for reports: backend, layer calls, signatures, table share, fit and the
        prediction errors."""
        errors = self.errors()
        return {
            "backend": self.table.backend.describe(),
            "layer_calls": len(self.calls),
            "signatures": len({self.table.key(c, i, o) for c, i, o in self.calls}),
            "table_measurements": self.table.measured,
            "table_share": round(self.table_share, 4),
            "coef": [round(c, 6) for c in self.coef],
            "points": [{"predicted_ms": None if p is None else round(p, 4),
                        "measured_ms": round(m, 4)} for _, _, m, p in self.points],
            "max_abs_error": round(max((abs(e) for e in errors), default=float("nan")), 4),
        }


def _fit(points: Sequence[tuple[float, float, float, Any]]) -> tuple[float, float, float]:
    """Least squares of ``measured ~ s * layers + b * activations + a``, ``s, b >= 0``.

    The table is trusted (``s = 1``) and the residual ``measured - layers`` is what is fitted:
    ``b * activations`` is the memory-bound traffic (normalisation, activations, additions)
    that scales with the widths, ``a`` what does not: fixed costs when positive, per-call
    overhead the standalone timings count once per layer but the net overlaps when negative.
    One point cannot separate the two: a positive residual goes on the activations, a negative
    one on ``a``. Two points fit ``(b, a)``. From three, a free scale ``s`` is tried too and
    kept only if it explains the points clearly better (noise must not pick it).
    """
    layers0, act0, measured0, _ = points[0]
    if len(points) == 1:
        residual = measured0 - layers0
        if residual >= 0 and act0 > 0:
            return 1.0, residual / act0, 0.0
        return 1.0, 0.0, residual
    x = torch.tensor([[p[0], p[1], 1.0] for p in points], dtype=torch.float64)
    y = torch.tensor([p[2] for p in points], dtype=torch.float64)
    scale = x.abs().max(0).values.clamp_min(1e-12)  # ms against millions of elements

    def solve(cols: tuple[int, ...], target: torch.Tensor) -> list[float] | None:
        sol = torch.linalg.lstsq(x[:, cols] / scale[list(cols)],
                                 target.unsqueeze(1)).solution.squeeze(1)
        coef = [0.0, 0.0, 0.0]
        for c, v in zip(cols, sol.tolist()):
            coef[c] = v / float(scale[c])
        return None if coef[0] < 0 or coef[1] < 0 else coef

    def sse(coef: list[float]) -> float:
        return float(((x @ torch.tensor(coef, dtype=torch.float64)) - y).pow(2).sum())

    residual = y - x[:, 0]
    fits = [c for c in (solve((1, 2), residual), solve((2,), residual)) if c is not None]
    for c in fits:
        c[0] = 1.0
    best = min(fits, key=sse)
    if len(points) >= 3:
        free = solve((0, 1, 2), y)
        if free is not None and sse(free) < 0.5 * sse(best):
            best = free
    return best[0], best[1], best[2]
