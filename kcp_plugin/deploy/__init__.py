"""Deployment: ONNX export, latency measurement per backend, and latency-aware pruning.

* :mod:`.backends`: the :class:`Backend` record (runtime, device, dtype, batch, threads, runs,
  clock) and how a model is placed on it;
* :mod:`.export`: ONNX export checked in onnxruntime;
* :mod:`.latency`: one measurement method (:func:`compare_latency`) for every backend;
* :mod:`.table`: per-layer latency tables measured on the backend and the latency model of a
  net built from them;
* :mod:`.allocation`: a knapsack choosing each channel group's width under a latency budget;
* :mod:`.search`: the latency target of :func:`kcp_plugin.prune` (table allocation verified
  end to end, or one ratio searched on measured latency).

onnx / onnxruntime are imported inside the functions that need them (extra ``deploy``); the
CUDA backend needs a GPU only when it measures.
"""

from .backends import BACKENDS, DTYPES, Backend
from .export import ExportReport, export_onnx, inference_session, require_deploy
from .latency import LatencyStats, compare_latency, measure_latency
from .table import LatencyModel, LatencyTable

__all__ = ["BACKENDS", "DTYPES", "Backend", "ExportReport", "LatencyModel", "LatencyStats",
           "LatencyTable", "compare_latency", "export_onnx", "inference_session",
           "measure_latency", "require_deploy"]
