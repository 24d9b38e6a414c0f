"""timm integration: a ``kcp_pruned`` entrypoint, timm-aware pruning, training-time pruning.

Importing this package registers the ``kcp_pruned`` model with timm, so timm's scripts can use
it after ``--device-modules kcp_plugin.integrations.timm`` (or any import of this package)::

    model = timm.create_model("kcp_pruned", base="resnet50", target_macs_ratio=0.5)
    model = timm.create_model("kcp_pruned", base="resnet50", checkpoint_path="pruned.pth.tar")

It imports timm (``pip install 'kcp-plugin[timm]'``); ``import kcp_plugin`` alone does not.

* :func:`prune_timm_model` / :func:`apply_timm_plan`: :func:`kcp_plugin.prune` /
  :func:`kcp_plugin.apply_plan` with timm's custom pruners, refusals of unsupported
  architectures and head bookkeeping (``reset_classifier`` keeps working).
* :func:`read_plan` / :func:`install_plan_hooks`: plans carried inside state dicts, so every
  timm checkpoint of a pruned model is self-describing.
* :class:`TimmPruningSchedule`: iterative pruning inside timm's training
  loop, which has no callbacks (driven by an optimizer step hook); see ``tools/timm_train.py``.
"""

from __future__ import annotations

from timm.models import register_model

from .entrypoints import (
    PLAN_KEY,
    decode_plan,
    dense_macs,
    encode_plan,
    install_plan_hooks,
    kcp_pruned,
    read_plan,
)
from .pruning import (
    apply_timm_plan,
    check_reset_classifier,
    default_inputs,
    prune_timm_model,
    replay_new_entries,
    sync_head_attrs,
)
from .support import UnsupportedModelError, check_supported, pruning_setup
from .training import TimmPruningSchedule

register_model(kcp_pruned)

__all__ = [
    "PLAN_KEY",
    "TimmPruningSchedule",
    "UnsupportedModelError",
    "apply_timm_plan",
    "check_reset_classifier",
    "check_supported",
    "decode_plan",
    "dense_macs",
    "default_inputs",
    "encode_plan",
    "install_plan_hooks",
    "kcp_pruned",
    "prune_timm_model",
    "pruning_setup",
    "read_plan",
    "replay_new_entries",
    "sync_head_attrs",
]
