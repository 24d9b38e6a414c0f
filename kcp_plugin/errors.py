"""The plugin's own refusal: a model that cannot be pruned as asked, left unchanged."""

from __future__ import annotations

from typing import Any

__all__ = ["UnprunableError"]


class UnprunableError(ValueError):
    """The model cannot be pruned to the request with the groups that are safe to prune, or
    its channel dependencies cannot be traced.

    Raised by kcp_plugin itself, before or after restoring the model (it is left unchanged).
    ``protected`` lists the groups the safety net had to keep
    (:class:`kcp_plugin.safety.ProtectedGroup`).
    """

    def __init__(self, message: str, protected: list[Any] | None = None):
        super().__init__(message)
        self.protected = list(protected or [])
