"""Cheap, identity-preserving snapshots of a module tree, so a failed prune can be undone.

torch-pruning never edits a tensor in place: it assigns new ``Parameter``/buffer objects and new
integer attributes. Keeping a shallow copy of each module's ``__dict__`` (and of its parameter,
buffer, submodule and hook dicts) is therefore enough to put the model back exactly as it was,
with the user's original parameter objects, at the cost of a few dict copies.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

_DICT_ATTRS = (
    "_parameters", "_buffers", "_modules", "_forward_hooks", "_forward_pre_hooks",
    "_backward_hooks", "_non_persistent_buffers_set",
)


class ModuleSnapshot:
    """The state of every module of a model at construction time; :meth:`restore` returns to it."""

    def __init__(self, model: nn.Module):
        self._entries: list[tuple[nn.Module, dict[str, Any]]] = []
        for module in model.modules():
            state = dict(module.__dict__)
            for key in _DICT_ATTRS:
                if key in state:
                    state[key] = state[key].copy()
            for key, value in list(state.items()):
                if isinstance(value, (list, dict)) and key not in _DICT_ATTRS:
                    state[key] = value.copy()
            self._entries.append((module, state))

    def restore(self) -> None:
        """Put every module's attributes back; module and parameter identities are preserved."""
        for module, state in self._entries:
            module.__dict__.clear()
            module.__dict__.update({k: (v.copy() if isinstance(v, (list, dict, set)) else v)
                                    for k, v in state.items()})
