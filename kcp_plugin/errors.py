"""The plugin's own errors: a model that cannot be pruned as asked (left unchanged), a criterion
that cannot score the model with what it was given (nothing pruned), and a model that cannot be
exported to ONNX as asked (nothing written)."""

from __future__ import annotations

from typing import Any

__all__ = ["CriterionError", "ExportError", "TargetUnreachable", "UnprunableError",
           "upstream_error"]


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


class TargetUnreachable(UnprunableError):
    """The target (MACs or latency) is out of reach with these settings: every safe group was
    tried and the closest setting misses it. The model is unchanged. A coarser setting's
    refusal (a large ``round_to``) can be retried with a finer one; :func:`kcp_plugin.prune`
    does so for its default channel multiple.
    """


class CriterionError(ValueError):
    """The criterion could not score the unpruned model's channels with what it was given: the
    ``loss_fn``, ``data`` / ``step_fn`` or labels of a gradient or data-driven criterion, or the
    criterion's own check of them (e.g. ``cdc`` given floating-point targets).

    Raised by :func:`kcp_plugin.prune` before any channel is pruned (the model is left
    unchanged); the original error is its ``__cause__``. Unlike :class:`UnprunableError` it
    says nothing about the model's structure: fix the inputs, or pick another criterion.
    """


class ExportError(ValueError):
    """The model cannot be exported to ONNX, or the exported file computes something else than
    the model in onnxruntime.

    Raised by :func:`kcp_plugin.export_onnx`; no file is written at the requested path.
    ``op`` is the operator the exporter could not convert (e.g. ``"aten::histc"``) and ``layer``
    the qualified name of the module that called it (``""`` for the model's own forward), each
    None where it could not be found.
    """

    def __init__(self, message: str, op: str | None = None, layer: str | None = None):
        super().__init__(message)
        self.op = op
        self.layer = layer


def upstream_error(exc: BaseException, doing: str) -> UnprunableError | None:
    """The :class:`UnprunableError` that replaces a raw error raised inside torch-pruning while
    ``doing`` (e.g. ``"pruning"``), or None for any other error (the plugin's own, the user's
    callbacks', an interrupt), which passes unchanged.

    The promise of every entry point is that no raw torch-pruning error reaches the caller: the
    model is left as it was, and the message names the upstream function that failed.
    """
    if isinstance(exc, (UnprunableError, CriterionError, ExportError)) \
            or not isinstance(exc, Exception):
        return None
    frames = []
    tb = exc.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame.f_code)
        tb = tb.tb_next
    upstream = [f for f in frames if "torch_pruning" in f.co_filename.replace("\\", "/")
                .split("/")]
    if not upstream:
        return None
    where = upstream[-1]
    module = where.co_filename.replace("\\", "/").split("torch_pruning/")[-1]
    return UnprunableError(
        f"torch-pruning failed while {doing} ({type(exc).__name__}: {exc}, in {where.co_name} "
        f"of torch_pruning/{module}); the model was left as it was. This is an operation "
        "torch-pruning cannot map channels through: pass the layers around it in "
        "ignored_layers, or report the model")
