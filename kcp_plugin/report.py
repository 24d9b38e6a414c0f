"""What a prune did: MACs and parameters before and after, per-layer widths, the plan."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

import torch.nn as nn

__all__ = ["PruneReport", "SizeReport", "human_count", "layer_widths"]


def layer_widths(model: nn.Module) -> dict[str, int]:
    """Output width of every conv / linear / norm layer, by qualified name."""
    widths = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            widths[name] = m.out_channels
        elif isinstance(m, nn.Linear):
            widths[name] = m.out_features
    return widths


class SizeReport:
    """What every report of a structural change shares (:class:`PruneReport`, NNI's
    ``SpeedupReport``): MACs and parameter counts before and after, their ratios, the
    plain-data form and the before / after table. Subclasses are dataclasses with the fields
    ``macs_before``, ``macs_after``, ``params_before`` and ``params_after``."""

    macs_before: int
    macs_after: int
    params_before: int
    params_after: int

    @property
    def macs_ratio(self) -> float:
        """Fraction of MACs kept."""
        return self.macs_after / max(self.macs_before, 1)

    @property
    def params_ratio(self) -> float:
        """Fraction of parameters kept."""
        return self.params_after / max(self.params_before, 1)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (JSON-compatible)."""
        d = asdict(self)
        d["macs_ratio"] = self.macs_ratio
        d["params_ratio"] = self.params_ratio
        return d

    def size_table(self, extra_rows: list[tuple[str, str, str, float]] = ()) -> str:
        """Rows ``(name, before, after, fraction kept)`` for MACs, parameters and
        ``extra_rows``, aligned for terminals and logs."""
        rows = [
            ("MACs", human_count(self.macs_before), human_count(self.macs_after),
             self.macs_ratio),
            ("Params", human_count(self.params_before), human_count(self.params_after),
             self.params_ratio),
            *extra_rows,
        ]
        lines = [f"{'':<12} {'before':>12} {'after':>12} {'kept':>8}"]
        lines += [f"{n:<12} {b:>12} {a:>12} {r:>8.1%}" for n, b, a, r in rows]
        return "\n".join(lines)


@dataclass
class PruneReport(SizeReport):
    """Result of :func:`kcp_plugin.prune`.

    Attributes:
        importance: Description of the criterion used.
        macs_before / macs_after: MACs of one forward pass on the example inputs.
        params_before / params_after: Parameter counts.
        pruning_ratio: The channel pruning ratio applied (searched when a MACs target is given).
        target_macs_ratio: The requested fraction of MACs kept, if any.
        iterative_steps: Number of pruning steps.
        widths_before / widths_after: Output width of each conv/linear layer, by name.
        protected: Names of the layers left unpruned: output layers, depthwise convs reading
            the model input, ``ignored_layers`` and host-library protections (timm blocks,
            mmseg ``conv_seg``); groups the safety net kept are in ``auto_protected``.
        search: ``(channel ratio, MACs kept)`` for each trial of the MACs-target search.
        plan: The model's cumulative pruning plan after this prune (plain data).
        latency_before_ms / latency_after_ms: Latency (median, ms), if measured: by the
            latency target, on the ``latency_backend`` a MACs target named, or by the caller.
        target_latency_ratio: The requested fraction of the dense latency, if any.
        latency_backend: The runtime that measured: ``"torch"``, ``"onnxruntime"``, ``"cuda"``.
        latency_setting: The whole measurement setting (hardware, dtype, batch, threads).
        latency_allocation: ``"table"`` or ``"uniform"`` (latency targets).
        round_to: The channel multiple used (the default one of a MACs target, or picked by
            measuring with ``round_to="auto"``).
        latency_search: The latency trials: ``(MACs target, round_to, latency kept)`` for the
            uniform search, ``(budget, 0, latency kept)`` for the table allocation; the last
            entry is the pruned model measured again.
        latency_stats: The dense and pruned :class:`kcp_plugin.LatencyStats` of the last
            measurement, as dicts (median, quartiles, runs, threads, backend, hardware, dtype,
            batch).
        latency_model: Table allocation only: the latency model's summary (backend, layer
            calls, signatures, measurements made, share of the dense latency the layers
            explain, the fit, predicted vs measured latency of every trial, the largest
            error after calibration, ``fallback`` where the table predicted poorly and the
            end-to-end measurements decided) and the predicted widths.
        selected: With ``dry_run``: output channels each layer would lose, by layer name.
        auto_protected: Channel groups the safety net kept unpruned because pruning them would
            break the model (see :class:`kcp_plugin.safety.ProtectedGroup`: ``root``,
            ``layers``, ``couplings``, ``reason``), as plain dicts.
    """

    importance: str
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    pruning_ratio: float
    target_macs_ratio: float | None
    iterative_steps: int
    widths_before: dict[str, int]
    widths_after: dict[str, int]
    protected: list[str]
    search: list[tuple[float, float]] = field(default_factory=list)
    plan: dict[str, Any] = field(default_factory=dict)
    latency_before_ms: float | None = None
    latency_after_ms: float | None = None
    selected: dict[str, list[int]] | None = None
    auto_protected: list[dict[str, Any]] = field(default_factory=list)
    target_latency_ratio: float | None = None
    latency_backend: str | None = None
    round_to: int | None = None
    latency_search: list[tuple[float, int, float]] = field(default_factory=list)
    latency_setting: str | None = None
    latency_allocation: str | None = None
    latency_model: dict[str, Any] | None = None
    latency_stats: list[dict[str, Any]] | None = None

    def table(self) -> str:
        """A before/after table for terminals and logs."""
        rows = []
        if self.latency_before_ms is not None and self.latency_after_ms is not None:
            rows.append((
                "Latency",
                f"{self.latency_before_ms:.2f} ms",
                f"{self.latency_after_ms:.2f} ms",
                self.latency_after_ms / max(self.latency_before_ms, 1e-9),
            ))
        head = f"importance: {self.importance}"
        if self.latency_allocation != "table":  # table widths come per group, not from a ratio
            head += f"; channel pruning ratio {self.pruning_ratio:.3f}"
        if self.target_latency_ratio is not None:
            how = ("widths from a latency table" if self.latency_allocation == "table" else
                   "one channel ratio")
            head += (f" (latency target {self.target_latency_ratio:.1%} of dense, {how}"
                     f"{f', round_to {self.round_to}' if self.round_to else ''})")
        elif self.target_macs_ratio is not None:
            head += (f" (searched for {self.target_macs_ratio:.1%} of MACs"
                     f"{f', round_to {self.round_to}' if self.round_to else ''})")
        if self.latency_setting:
            head += f"\nlatency: median on {self.latency_setting}"
        return head + "\n" + self.size_table(rows)

    def plot_widths(self, path: str | os.PathLike, title: str | None = None) -> None:
        """Write a PNG of the fraction of output channels each layer kept, in layer order.

        Fractions (not raw widths) keep early, narrow layers visible next to a wide head; at
        most about 40 layer names are printed (every k-th), the layer index is the x axis.
        """
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = [n for n in self.widths_before if self.widths_before[n] > 0]
        kept = [self.widths_after.get(n, 0) / self.widths_before[n] for n in names]
        fig, ax = plt.subplots(figsize=(min(16.0, max(6.0, 0.12 * len(names) + 3)), 4.2))
        xs = list(range(len(names)))
        colors = ["#c8d6e5" if k >= 0.999 else "#2e86de" for k in kept]
        ax.bar(xs, kept, color=colors, width=0.85)
        ax.axhline(self.params_ratio, color="#ee5253", linestyle="--", linewidth=1,
                   label=f"parameters kept overall ({self.params_ratio:.0%})")
        step = max(1, -(-len(names) // 40))
        ax.set_xticks(xs[::step])
        ax.set_xticklabels([f"{i}: {names[i]}" for i in xs[::step]], rotation=90, fontsize=6)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("fraction of output channels kept")
        ax.set_xlabel("layer (grey: unpruned)")
        ax.set_title(title or f"Channels kept per layer ({self.importance}, "
                     f"{self.macs_ratio:.0%} of MACs)")
        ax.legend(loc="lower right", fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


def human_count(n: float) -> str:
    """``n`` with a G / M / K suffix and two decimals (``1.23M``), or as an integer below 1000."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))
