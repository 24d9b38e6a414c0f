"""Latency measurement, one method for the CLI, the demo, the benchmarks and the latency target.

Every figure comes from the same loop: the backend's settings (:class:`~.backends.Backend`:
runtime, device, dtype, batch, threads), untimed warm-up passes, and, when models are
compared, their timed passes interleaved (dense, pruned, dense, pruned...) so a load change on
the machine hits both alike. The median is the figure; the quartiles give its spread.

Runtimes (:mod:`.backends`): ``"torch"`` (eager on the CPU, ``torch.inference_mode``),
``"onnxruntime"`` (each model exported with :func:`kcp_plugin.export_onnx`, checked against
torch, and run by an onnxruntime CPU session with ``threads`` intra-op threads and one
inter-op thread: the deployed speed, where the graph optimiser fuses conv + BN + activation),
and ``"cuda"`` (eager on a GPU in fp32 / fp16 / bf16, channels-last, ``cudnn.benchmark``,
CUDA events around each pass). The clock is the backend's (injectable: tests use a fake one).
"""

from __future__ import annotations

import contextlib
import os
import statistics
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.nn as nn

from ..graph import ForwardFn, default_forward, preserved_modes
from .backends import (
    BACKENDS,
    Backend,
    as_backend,
    backend_settings,
    check_backend,
    default_timer,
    placed,
)

__all__ = ["BACKENDS", "LatencyStats", "compare_latency", "fill_latency", "measure_latency",
           "timed_passes"]


@dataclass(frozen=True)
class LatencyStats:
    """Wall time of one forward pass, in milliseconds.

    Attributes:
        median_ms: The median over the timed passes.
        q1_ms / q3_ms: First and third quartiles (the spread).
        runs: Timed passes.
        threads: CPU threads during the measurement (torch's, or onnxruntime's intra-op ones;
            None on CUDA).
        backend: What ran the model: ``"torch"``, ``"onnxruntime"`` or ``"cuda"``.
        hardware: The processor (GPU or CPU model name).
        dtype: ``"fp32"``, ``"fp16"`` or ``"bf16"``.
        batch: The batch size timed (None: the example inputs' own).
    """

    median_ms: float
    q1_ms: float
    q3_ms: float
    runs: int
    threads: int | None
    backend: str = "torch"
    hardware: str = ""
    dtype: str = "fp32"
    batch: int | None = None

    def describe(self) -> str:
        """``"12.3 ms (11.9-12.8)"``: median and interquartile range."""
        return f"{self.median_ms:.2f} ms ({self.q1_ms:.2f}-{self.q3_ms:.2f})"


def compare_latency(
    models: Sequence[nn.Module],
    example_inputs: Any,
    forward_fn: ForwardFn | None = None,
    warmup: int | None = None,
    runs: int | None = None,
    threads: int | None = None,
    backend: str | Backend = "torch",
) -> list[LatencyStats]:
    """Time several models on the same inputs, their passes interleaved.

    Args:
        models: The models (e.g. dense and pruned); their train/eval flags are restored, and
            they are never moved or cast (CUDA / non-fp32 backends time copies).
        example_inputs: Inputs, as for :func:`kcp_plugin.prune` (at the backend's batch: see
            :attr:`Backend.batch`).
        forward_fn: How to call a model, if not ``model(x)``.
        warmup / runs / threads: Override the backend's (default 3 warm-up passes, 10 timed
            passes, 1 thread).
        backend: A runtime name (``"torch"``, ``"onnxruntime"``, ``"cuda"``) or a
            :class:`kcp_plugin.Backend` record (device, dtype, batch, threads, runs, clock).
            ``"onnxruntime"`` exports each model to ONNX in a temporary folder at the fixed
            input shapes, checks it against torch (:func:`kcp_plugin.export_onnx`) and times
            ``session.run``; it needs ``pip install kcp-plugin[deploy]`` and costs one export
            per model (about a second for a small convnet) on top of the timed passes.

    Returns:
        One :class:`LatencyStats` per model, in order.

    Raises:
        ValueError: a bad backend (unknown name, a dtype it cannot run, ``"cuda"`` without a
            GPU, bad counts; see :func:`kcp_plugin.deploy.backends.check_backend`).
        kcp_plugin.errors.ExportError: ``"onnxruntime"`` and a model cannot be exported or its
            file disagrees with torch.
        ImportError: ``"onnxruntime"`` without onnx / onnxruntime installed.
    """
    be = as_backend(backend, warmup=warmup, runs=runs, threads=threads)
    check_backend(be)
    fwd = forward_fn or default_forward
    setup = _onnxruntime_calls if be.name == "onnxruntime" else _torch_calls
    with backend_settings(be) as used, setup(models, example_inputs, fwd, be) as calls:
        times = timed_passes(calls, be)
    hardware = be.hardware()
    out = []
    for t in times:
        q1, _, q3 = statistics.quantiles(t, n=4) if len(t) > 1 else (t[0], t[0], t[0])
        out.append(LatencyStats(statistics.median(t), q1, q3, len(t), used, be.name, hardware,
                                be.dtype, be.batch))
    return out


def timed_passes(calls: Sequence[tuple[nn.Module, Callable[[], Any]]],
                 backend: Backend) -> list[list[float]]:
    """The measurement loop: ``backend.warmup`` untimed then ``backend.runs`` timed passes of
    every ``(model, call)``, interleaved, each timed by the backend's clock.

    Returns:
        The timed passes' milliseconds, one list per call.
    """
    timer = default_timer(backend)
    times: list[list[float]] = [[] for _ in calls]
    for i in range(backend.warmup + backend.runs):
        for k, (model, call) in enumerate(calls):
            ms = timer(model, call)
            if i >= backend.warmup:
                times[k].append(float(ms))
    return times


_Calls = Iterator[list[tuple[nn.Module, Callable[[], Any]]]]


@contextlib.contextmanager
def _torch_calls(models: Sequence[nn.Module], example_inputs: Any, fwd: ForwardFn,
                 backend: Backend) -> _Calls:
    """One eager forward pass per model (eval, inference mode), placed on the backend."""
    with torch.inference_mode(), contextlib.ExitStack() as stack:
        calls = []
        for m in models:
            stack.enter_context(preserved_modes(m))
            m.eval()
            moved, inputs = placed(m, example_inputs, backend)
            moved.eval()
            calls.append((moved, lambda moved=moved, inputs=inputs: fwd(moved, inputs)))
        yield calls


@contextlib.contextmanager
def _onnxruntime_calls(models: Sequence[nn.Module], example_inputs: Any, fwd: ForwardFn,
                       backend: Backend) -> _Calls:
    """One ``session.run`` per model, each exported (and checked) in a temporary folder."""
    from .backends import batched
    from .export import export_onnx, inference_session

    inputs = batched(example_inputs, backend.batch)
    threads = backend.threads or torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="kcp-latency-") as folder:
        calls = []
        for k, m in enumerate(models):
            if backend.timer is not None:  # a stand-in clock (tests): time torch's pass
                calls.append((m, lambda m=m: fwd(m, inputs)))
                continue
            cpu_model, cpu_inputs = placed(m, inputs, replace(backend, batch=None))
            report = export_onnx(cpu_model, cpu_inputs, os.path.join(folder, f"model{k}.onnx"),
                                 dynamic_batch=False, forward_fn=fwd)
            session, feeds = inference_session(report.path, threads), report.feeds(cpu_inputs)
            calls.append((m, lambda s=session, f=feeds: s.run(None, f)))
        yield calls


def measure_latency(
    model: nn.Module,
    example_inputs: Any,
    forward_fn: ForwardFn | None = None,
    warmup: int | None = None,
    runs: int | None = None,
    threads: int | None = None,
    backend: str | Backend = "torch",
) -> float:
    """Median time of one forward pass in milliseconds (eval mode, no autograd).

    :func:`compare_latency` for one model; use that to compare models (interleaved passes).
    Arguments as there.
    """
    return compare_latency([model], example_inputs, forward_fn, warmup, runs, threads,
                           backend)[0].median_ms


def fill_latency(report: Any, backend: Backend, dense: LatencyStats, pruned: LatencyStats) -> None:
    """Write a dense-vs-pruned measurement into a :class:`kcp_plugin.PruneReport`: medians,
    both :class:`LatencyStats` as dicts, the backend and its whole setting."""
    report.latency_before_ms, report.latency_after_ms = dense.median_ms, pruned.median_ms
    report.latency_stats = [asdict(dense), asdict(pruned)]
    report.latency_backend, report.latency_setting = backend.name, backend.describe()
