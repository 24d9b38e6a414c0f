"""kcp-plugin's own mmengine registries (scope ``'kcp_plugin'``).

Children of mmengine's root registries, so configs of any OpenMMLab project (whatever their
``default_scope``) can name ``type='kcp_plugin.PruningHook'``: mmengine resolves the
``kcp_plugin.`` prefix through the root registry's children, and each registry imports
:mod:`kcp_plugin.integrations.mmseg` (its ``locations``) before the first lookup.
"""

from __future__ import annotations

from mmengine.registry import DATASETS as MMENGINE_DATASETS
from mmengine.registry import HOOKS as MMENGINE_HOOKS
from mmengine.registry import MODELS as MMENGINE_MODELS
from mmengine.registry import OPTIM_WRAPPERS as MMENGINE_OPTIM_WRAPPERS
from mmengine.registry import Registry

__all__ = ["SCOPE", "HOOKS", "MODELS", "OPTIM_WRAPPERS", "DATASETS"]

SCOPE = "kcp_plugin"
_LOCATIONS = ["kcp_plugin.integrations.mmseg"]

HOOKS = Registry("hook", parent=MMENGINE_HOOKS, scope=SCOPE, locations=_LOCATIONS)
MODELS = Registry("model", parent=MMENGINE_MODELS, scope=SCOPE, locations=_LOCATIONS)
OPTIM_WRAPPERS = Registry("optim_wrapper", parent=MMENGINE_OPTIM_WRAPPERS, scope=SCOPE,
                          locations=_LOCATIONS)
DATASETS = Registry("dataset", parent=MMENGINE_DATASETS, scope=SCOPE, locations=_LOCATIONS)
