"""Importance criteria. Importing this package registers every built-in criterion by name."""

from . import builtin, cdc, fisher  # noqa: F401  (registration on import)
from .cdc import CDCImportance
from .fisher import FisherImportance
from .kcp import KCPImportance

__all__ = ["CDCImportance", "FisherImportance", "KCPImportance"]
