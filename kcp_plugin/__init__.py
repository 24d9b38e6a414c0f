"""kcp-plugin: Kernel Cluster Pruning and other criteria for torch-pruning, NNI, mmseg and timm.

The core API needs only torch and torch-pruning; integrations import their host libraries lazily.
"""

from .deploy import (
    Backend,
    ExportReport,
    LatencyStats,
    compare_latency,
    export_onnx,
    measure_latency,
)
from .distill import DistillConfig, Distiller
from .errors import CriterionError, TargetUnreachable, UnprunableError
from .graph import count_macs_params
from .importance import KCPImportance
from .optim import rebuild_optimizer
from .plan import apply_plan, get_plan, load_pruned, read_checkpoint, save_pruned, sync_plan
from .pruning import prune, resolve_importance
from .registry import (
    criterion_arguments,
    get_importance,
    importance_info,
    list_importances,
    register_importance,
)
from .report import PruneReport
from .stats import RecentBatches, StatsImportance, collect, collecting
from .tracking import track_pruning

__version__ = "0.1.0"

__all__ = [
    "Backend",
    "CriterionError",
    "DistillConfig",
    "Distiller",
    "ExportReport",
    "KCPImportance",
    "LatencyStats",
    "PruneReport",
    "RecentBatches",
    "StatsImportance",
    "TargetUnreachable",
    "UnprunableError",
    "apply_plan",
    "collect",
    "collecting",
    "compare_latency",
    "count_macs_params",
    "criterion_arguments",
    "export_onnx",
    "get_importance",
    "get_plan",
    "importance_info",
    "list_importances",
    "load_pruned",
    "measure_latency",
    "prune",
    "read_checkpoint",
    "rebuild_optimizer",
    "register_importance",
    "resolve_importance",
    "save_pruned",
    "sync_plan",
    "track_pruning",
]

# mmengine resolves ``type='kcp_plugin.PruningHook'`` in a config that never imported the
# integration by importing ``kcp_plugin`` and reading the attribute (its registry's
# ``get_object_from_string`` fallback). These names load the mmseg integration on first access,
# so ``import kcp_plugin`` itself still needs only torch and torch-pruning.
_LAZY = {
    name: "kcp_plugin.integrations.mmseg"
    for name in ("PruningHook", "RegularizedOptimWrapper", "AmpRegularizedOptimWrapper",
                 "PrunedSegmentor", "GeneratedSegDataset")
}


def __getattr__(name: str):
    """Load an integration's public type on first access (PEP 562)."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kcp_plugin' has no attribute {name!r}")
