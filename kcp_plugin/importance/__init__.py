"""Importance criteria. Importing this package registers every built-in criterion by name."""

from . import blend, builtin, cap, cdc, epruner, fisher  # noqa: F401  (registration on import)
from .blend import BlendImportance
from .cdc import CDCImportance
from .epruner import EPrunerImportance
from .fisher import FisherImportance
from .kcp import KCPImportance

__all__ = ["BlendImportance", "CDCImportance", "EPrunerImportance", "FisherImportance",
           "KCPImportance"]
