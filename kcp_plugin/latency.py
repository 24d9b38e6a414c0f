"""CPU latency measurement, so speed-ups are quoted next to MACs from the same run."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
import torch.nn as nn

from .graph import ForwardFn, default_forward, preserved_modes

__all__ = ["measure_latency"]


def measure_latency(
    model: nn.Module,
    example_inputs: Any,
    forward_fn: ForwardFn | None = None,
    warmup: int = 3,
    runs: int = 10,
    threads: int | None = None,
) -> float:
    """Median wall time of one forward pass in milliseconds (eval mode, no autograd).

    Args:
        model: Model to time; its train/eval flags are restored afterwards.
        example_inputs: Inputs, as for :func:`kcp_plugin.prune`.
        forward_fn: How to call the model, if not ``model(x)``.
        warmup: Untimed passes first (allocator and kernel warm-up).
        runs: Timed passes; the median is returned.
        threads: torch CPU threads during the measurement (restored afterwards); 1 gives the
            most repeatable numbers on a shared machine.
    """
    if runs < 1 or warmup < 0:
        raise ValueError("runs must be >= 1 and warmup >= 0")
    fwd = forward_fn or default_forward
    times = []
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        with preserved_modes(model), torch.inference_mode():
            model.eval()
            for i in range(warmup + runs):
                start = time.perf_counter()
                fwd(model, example_inputs)
                if i >= warmup:
                    times.append((time.perf_counter() - start) * 1e3)
    finally:
        torch.set_num_threads(previous)
    return statistics.median(times)
