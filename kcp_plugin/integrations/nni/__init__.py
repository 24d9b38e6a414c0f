"""NNI 3.0 integration: pruners for every registered criterion and a working speedup.

* :class:`KCPPluginPruner` (any criterion of :func:`kcp_plugin.list_importances`, by name),
  :class:`KCPPruner` and one class per criterion (:func:`pruner_class`, e.g.
  ``FisherGroupPruner``): NNI ``Pruner`` subclasses taking NNI's ``config_list``, returning
  NNI masks from ``compress()``, usable inside ``AGPPruner`` / ``LinearPruner`` and with an
  NNI ``Evaluator`` for data-driven criteria. Masks are coupled: layers tied by residuals,
  concatenations or depthwise convs (and their norm layers) mask the same channels.
* :func:`speedup`: masks (ours or NNI's own pruners') -> a physically smaller model through
  torch-pruning's dependency graph (NNI 3.0's ``ModelSpeedup`` fails on torch 2.14).

The NNI experiment that searches criterion, MACs target or per-stage ratios and fine-tuning
settings on the benchmark tasks is an experiment over the benchmark, not an adapter:
:mod:`kcp_plugin.bench.nni_search` (``tools/nni_search.py``).

``speedup`` and the config check need only torch and torch-pruning; the pruners
import NNI (``pip install 'kcp-plugin[nni]'``) on first access.
"""

from __future__ import annotations

import importlib
from typing import Any

from .config import validate_config_list
from .speedup import SpeedupReport, apply_masks, speedup

_LAZY = {
    "KCPPluginPruner": "pruner",
    "KCPPruner": "pruner",
    "list_pruners": "pruner",
    "pruner_class": "pruner",
}

__all__ = ["SpeedupReport", "apply_masks", "speedup", "validate_config_list", *_LAZY]


def _import(name: str) -> Any:
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ImportError as exc:
        if exc.name and exc.name.split(".")[0] in ("nni", "schema"):
            raise ImportError(
                "kcp_plugin's NNI pruners need NNI 3.0: pip install 'kcp-plugin[nni]'"
            ) from exc
        raise


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(_import(_LAZY[name]), name)
    if name.endswith("GroupPruner"):
        return getattr(_import("pruner"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
