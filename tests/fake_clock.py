"""A deterministic stand-in for a latency clock (``kcp_plugin.Backend(timer=...)``), so the
latency machinery is tested without timing anything on a shared CI machine or a GPU.

Latency of a pass = the conv / linear layers' MACs at ``rate`` MACs per ms, each layer slowed
by ``penalty`` when one of its widths is not a multiple of ``multiple`` (what vectorised and
tensor-core kernels punish), + ``act_ms`` per million output elements of normalisation and
activation layers (memory-bound), + ``overhead_ms`` per pass (launch cost).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.nn as nn

_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.Linear)
_MEMORY_BOUND = (nn.BatchNorm1d, nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.GELU, nn.LayerNorm)


class CostClock:
    """``timer(model, call) -> ms`` with the cost model above (the call is run, under hooks)."""

    def __init__(self, multiple: int = 8, penalty: float = 1.0, rate: float = 1e6,
                 act_ms: float = 0.5, overhead_ms: float = 0.05):
        self.multiple, self.penalty, self.rate = multiple, penalty, rate
        self.act_ms, self.overhead_ms = act_ms, overhead_ms
        self.passes = 0

    def layer_ms(self, module: nn.Module, out_numel: int) -> float:
        if isinstance(module, nn.Linear):
            cin, cout, groups, kernel = module.in_features, module.out_features, 1, 1
        else:
            cin, cout, groups = module.in_channels, module.out_channels, module.groups
            kernel = 1
            for k in module.kernel_size:
                kernel *= k
        macs = out_numel * (cin // groups) * kernel
        misaligned = cin % self.multiple or cout % self.multiple
        return macs / self.rate * (1 + self.penalty * bool(misaligned))

    def __call__(self, model: nn.Module, call: Callable[[], Any]) -> float:
        total = [self.overhead_ms]

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            numel = output.numel() if hasattr(output, "numel") else 0
            if isinstance(module, _LAYERS):
                total[0] += self.layer_ms(module, numel)
            else:
                total[0] += self.act_ms * numel / 1e6

        handles = [m.register_forward_hook(hook) for m in model.modules()
                   if isinstance(m, _LAYERS + _MEMORY_BOUND)]
        try:
            call()
        finally:
            for h in handles:
                h.remove()
        self.passes += 1
        return total[0]
