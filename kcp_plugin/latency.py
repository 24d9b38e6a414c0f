"""CPU latency measurement, so speed-ups are quoted next to MACs from the same run.

One method for the CLI, the demo and the benchmarks: a fixed thread count (1 by default: on a
shared machine more threads make the numbers swing by orders of magnitude), untimed warm-up
passes, and, when models are compared, their timed passes interleaved (dense, pruned, dense,
pruned...) so a load change on the machine hits both alike. The median is the figure; the
quartiles give its spread.

Two backends share that loop: ``"torch"`` (eager, ``torch.inference_mode``) and
``"onnxruntime"`` (each model exported with :func:`kcp_plugin.export.export_onnx`, checked
against torch, and run by an onnxruntime CPU session with ``threads`` intra-op threads and one
inter-op thread: the deployed speed, where the graph optimiser fuses conv + BN + activation).
"""

from __future__ import annotations

import contextlib
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from .graph import ForwardFn, default_forward, preserved_modes
from .hints import did_you_mean

__all__ = ["BACKENDS", "LatencyStats", "compare_latency", "measure_latency"]

BACKENDS = ("torch", "onnxruntime")


@dataclass(frozen=True)
class LatencyStats:
    """Wall time of one forward pass, in milliseconds.

    Attributes:
        median_ms: The median over the timed passes.
        q1_ms / q3_ms: First and third quartiles (the spread).
        runs: Timed passes.
        threads: CPU threads during the measurement (torch's, or onnxruntime's intra-op ones).
        backend: What ran the model: ``"torch"`` or ``"onnxruntime"``.
    """

    median_ms: float
    q1_ms: float
    q3_ms: float
    runs: int
    threads: int
    backend: str = "torch"

    def describe(self) -> str:
        """``"12.3 ms (11.9-12.8)"``: median and interquartile range."""
        return f"{self.median_ms:.2f} ms ({self.q1_ms:.2f}-{self.q3_ms:.2f})"


def compare_latency(
    models: Sequence[nn.Module],
    example_inputs: Any,
    forward_fn: ForwardFn | None = None,
    warmup: int = 3,
    runs: int = 10,
    threads: int | None = 1,
    backend: str = "torch",
) -> list[LatencyStats]:
    """Time several models on the same inputs, their passes interleaved.

    Args:
        models: The models (e.g. dense and pruned); their train/eval flags are restored.
        example_inputs: Inputs, as for :func:`kcp_plugin.prune`.
        forward_fn: How to call a model, if not ``model(x)``.
        warmup: Untimed passes of each model first (allocator and kernel warm-up).
        runs: Timed passes of each model.
        threads: CPU threads during the measurement: torch's (restored afterwards), or the
            onnxruntime sessions' intra-op threads; None keeps torch's current setting (and
            gives onnxruntime as many).
        backend: ``"torch"`` (eager) or ``"onnxruntime"``: each model is exported to ONNX in a
            temporary folder at the example's fixed shapes, checked against torch
            (:func:`kcp_plugin.export.export_onnx`), and ``session.run`` is timed. Needs
            ``pip install kcp-plugin[deploy]``; costs one export per model (about a second for
            a small convnet) on top of the timed passes.

    Returns:
        One :class:`LatencyStats` per model, in order.

    Raises:
        ValueError: ``runs < 1``, ``warmup < 0`` or an unknown ``backend``.
        kcp_plugin.errors.ExportError: ``backend="onnxruntime"`` and a model cannot be exported
            or its file disagrees with torch.
        ImportError: ``backend="onnxruntime"`` without onnx / onnxruntime installed.
    """
    if runs < 1 or warmup < 0:
        raise ValueError(f"runs must be >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown latency backend {backend!r}; valid: {', '.join(BACKENDS)}"
                         + did_you_mean(backend, BACKENDS))
    fwd = forward_fn or default_forward
    setup = _torch_calls if backend == "torch" else _onnxruntime_calls
    with setup(models, example_inputs, fwd, threads) as (calls, used):
        times: list[list[float]] = [[] for _ in calls]
        for i in range(warmup + runs):
            for k, call in enumerate(calls):
                start = time.perf_counter()
                call()
                if i >= warmup:
                    times[k].append((time.perf_counter() - start) * 1e3)
    out = []
    for t in times:
        q1, _, q3 = statistics.quantiles(t, n=4) if len(t) > 1 else (t[0], t[0], t[0])
        out.append(LatencyStats(statistics.median(t), q1, q3, len(t), used, backend))
    return out


_Calls = Iterator[tuple[list[Callable[[], Any]], int]]


@contextlib.contextmanager
def _torch_calls(models: Sequence[nn.Module], example_inputs: Any, fwd: ForwardFn,
                 threads: int | None) -> _Calls:
    """One eager forward pass per model (eval, inference mode, ``threads`` torch threads)."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    used = torch.get_num_threads()
    try:
        with torch.inference_mode(), contextlib.ExitStack() as stack:
            for m in models:
                stack.enter_context(preserved_modes(m))
                m.eval()
            yield [lambda m=m: fwd(m, example_inputs) for m in models], used
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def _onnxruntime_calls(models: Sequence[nn.Module], example_inputs: Any, fwd: ForwardFn,
                       threads: int | None) -> _Calls:
    """One ``session.run`` per model, each exported (and checked) in a temporary folder."""
    from .export import export_onnx, inference_session

    used = threads or torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="kcp-latency-") as folder:
        calls = []
        for k, m in enumerate(models):
            report = export_onnx(m, example_inputs, os.path.join(folder, f"model{k}.onnx"),
                                 dynamic_batch=False, forward_fn=fwd)
            session, feeds = inference_session(report.path, used), report.feeds(example_inputs)
            calls.append(lambda s=session, f=feeds: s.run(None, f))
        yield calls, used


def measure_latency(
    model: nn.Module,
    example_inputs: Any,
    forward_fn: ForwardFn | None = None,
    warmup: int = 3,
    runs: int = 10,
    threads: int | None = 1,
    backend: str = "torch",
) -> float:
    """Median wall time of one forward pass in milliseconds (eval mode, no autograd).

    :func:`compare_latency` for one model; use that to compare models (interleaved passes).

    Args:
        model: Model to time; its train/eval flags are restored afterwards.
        example_inputs: Inputs, as for :func:`kcp_plugin.prune`.
        forward_fn: How to call the model, if not ``model(x)``.
        warmup: Untimed passes first.
        runs: Timed passes; the median is returned.
        threads: CPU threads during the measurement (default 1, the most repeatable on a
            shared machine; None keeps torch's current setting).
        backend: ``"torch"`` or ``"onnxruntime"``, as for :func:`compare_latency`.
    """
    return compare_latency([model], example_inputs, forward_fn, warmup, runs, threads,
                           backend)[0].median_ms
