"""Importance criteria. Importing this package registers every built-in criterion by name."""

from . import builtin  # noqa: F401  (registers the torch-pruning criteria)
from .kcp import KCPImportance

__all__ = ["KCPImportance"]
