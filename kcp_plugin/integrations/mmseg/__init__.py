"""mmsegmentation / mmengine integration: pruning hook, regularizing optimizer wrappers,
pruned-segmentor builder for test and deploy, safe checkpoint loading, a generated dataset.

Importing this package imports mmengine and mmseg (the core ``import kcp_plugin`` does not),
registers everything under the ``kcp_plugin`` scope of mmengine's registries, and makes mmengine
load checkpoints with ``weights_only=True`` and an allow-list (see :mod:`.checkpoint`). Configs
name the types as ``type='kcp_plugin.PruningHook'``; see docs/mmseg.md.
"""

from .checkpoint import install as _install_safe_loader

_install_safe_loader()

from .dataset import GeneratedSegDataset  # noqa: E402
from .deploy import PrunedSegmentor, read_plan  # noqa: E402
from .hooks import PruningHook  # noqa: E402
from .optim_wrapper import AmpRegularizedOptimWrapper, RegularizedOptimWrapper  # noqa: E402
from .registry import DATASETS, HOOKS, MODELS, OPTIM_WRAPPERS, SCOPE  # noqa: E402
from .structure import (  # noqa: E402
    check_cascade,
    example_inputs,
    output_convs,
    sync_structure,
    tensor_forward,
    trace_forward,
)

__all__ = [
    "AmpRegularizedOptimWrapper",
    "DATASETS",
    "GeneratedSegDataset",
    "HOOKS",
    "MODELS",
    "OPTIM_WRAPPERS",
    "PrunedSegmentor",
    "PruningHook",
    "RegularizedOptimWrapper",
    "SCOPE",
    "check_cascade",
    "example_inputs",
    "output_convs",
    "read_plan",
    "sync_structure",
    "tensor_forward",
    "trace_forward",
]
