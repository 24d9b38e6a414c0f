"""CPU latency measurement, so speed-ups are quoted next to MACs from the same run.

One method for the CLI, the demo and the benchmarks: a fixed thread count (1 by default: on a
shared machine more threads make the numbers swing by orders of magnitude), untimed warm-up
passes, and, when models are compared, their timed passes interleaved (dense, pruned, dense,
pruned...) so a load change on the machine hits both alike. The median is the figure; the
quartiles give its spread.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from .graph import ForwardFn, default_forward, preserved_modes

__all__ = ["LatencyStats", "compare_latency", "measure_latency"]


@dataclass(frozen=True)
class LatencyStats:
    """Wall time of one forward pass, in milliseconds.

    Attributes:
        median_ms: The median over the timed passes.
        q1_ms / q3_ms: First and third quartiles (the spread).
        runs: Timed passes.
        threads: torch CPU threads during the measurement.
    """

    median_ms: float
    q1_ms: float
    q3_ms: float
    runs: int
    threads: int

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
) -> list[LatencyStats]:
    """Time several models on the same inputs, their passes interleaved.

    Args:
        models: The models (e.g. dense and pruned); their train/eval flags are restored.
        example_inputs: Inputs, as for :func:`kcp_plugin.prune`.
        forward_fn: How to call a model, if not ``model(x)``.
        warmup: Untimed passes of each model first (allocator and kernel warm-up).
        runs: Timed passes of each model.
        threads: torch CPU threads during the measurement (restored afterwards); None keeps
            the current setting.

    Returns:
        One :class:`LatencyStats` per model, in order.

    Raises:
        ValueError: ``runs < 1`` or ``warmup < 0``.
    """
    if runs < 1 or warmup < 0:
        raise ValueError(f"runs must be >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}")
    fwd = forward_fn or default_forward
    times: list[list[float]] = [[] for _ in models]
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    used = torch.get_num_threads()
    try:
        with torch.inference_mode(), contextlib.ExitStack() as stack:
            for m in models:
                stack.enter_context(preserved_modes(m))
                m.eval()
            for i in range(warmup + runs):
                for k, m in enumerate(models):
                    start = time.perf_counter()
                    fwd(m, example_inputs)
                    if i >= warmup:
                        times[k].append((time.perf_counter() - start) * 1e3)
    finally:
        torch.set_num_threads(previous)
    out = []
    for t in times:
        q1, _, q3 = statistics.quantiles(t, n=4) if len(t) > 1 else (t[0], t[0], t[0])
        out.append(LatencyStats(statistics.median(t), q1, q3, len(t), used))
    return out


def measure_latency(
    model: nn.Module,
    example_inputs: Any,
    forward_fn: ForwardFn | None = None,
    warmup: int = 3,
    runs: int = 10,
    threads: int | None = 1,
) -> float:
    """Median wall time of one forward pass in milliseconds (eval mode, no autograd).

    :func:`compare_latency` for one model; use that to compare models (interleaved passes).

    Args:
        model: Model to time; its train/eval flags are restored afterwards.
        example_inputs: Inputs, as for :func:`kcp_plugin.prune`.
        forward_fn: How to call the model, if not ``model(x)``.
        warmup: Untimed passes first.
        runs: Timed passes; the median is returned.
        threads: torch CPU threads during the measurement (default 1, the most repeatable on a
            shared machine; None keeps the current setting).
    """
    return compare_latency([model], example_inputs, forward_fn, warmup, runs, threads)[0].median_ms
