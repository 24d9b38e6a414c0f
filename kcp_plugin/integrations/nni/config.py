"""Checking NNI 3.0 ``config_list`` entries before any module is wrapped.

NNI's own schema check rejects legacy (NNI 2.x) keys with messages such as ``Wrong key
'group_id'``, after translating ``total_sparsity`` half-way. The pruners of this package check
every entry first and name the NNI 3.0 key to use instead. The keys they accept are the ones a
channel-group pruner can honour:

* layer selection: ``op_types``, ``op_names``, ``op_names_re`` and their ``exclude_*`` forms;
* ``sparse_ratio`` (fraction of each selected layer's output channels to mask),
  ``max_sparse_ratio`` / ``min_sparse_ratio`` (per-layer bounds),
  ``global_group_id`` (layers with the same id are ranked together, NNI's global pruning);
* ``target_names`` (a subset of ``weight`` / ``bias``), ``granularity`` (``default`` or
  ``out_channel``), ``dependency_group_id`` (accepted and ignored: coupling comes from the
  dependency graph).
"""

from __future__ import annotations

import copy
import math
from typing import Any

__all__ = ["LEGACY_KEYS", "validate_config_list"]

SELECT_KEYS = ("op_types", "op_names", "op_names_re")
EXCLUDE_KEYS = ("exclude_op_types", "exclude_op_names", "exclude_op_names_re")
RATIO_KEYS = ("sparse_ratio", "max_sparse_ratio", "min_sparse_ratio")
OTHER_KEYS = ("global_group_id", "dependency_group_id", "target_names", "granularity")

LEGACY_KEYS: dict[str, str] = {
    "sparsity": "'sparse_ratio'",
    "sparsity_per_layer": "'sparse_ratio'",
    "total_sparsity": "'sparse_ratio' plus a 'global_group_id' shared by the layers ranked "
                      "together",
    "max_sparsity_per_layer": "'max_sparse_ratio'",
    "op_partial_names": "'op_names_re' (regular expressions, e.g. '.*layer1.*')",
    "exclude": "'exclude_op_names' / 'exclude_op_types' inside the entries that select layers",
    "quant_types": "a quantizer: this is a pruning config_list",
    "quant_bits": "a quantizer: this is a pruning config_list",
}

UNSUPPORTED_KEYS: dict[str, str] = {
    "sparse_threshold": "channel-group pruners rank channels: use 'sparse_ratio'",
    "target_settings": "put 'sparse_ratio', 'max_sparse_ratio', 'global_group_id' at the top "
                       "level of the entry",
    "align": "bias masks always follow the weight's output channels",
    "internal_metric_block": "channel groups come from the dependency graph",
    "apply_method": "masks are multiplied in (NNI's default)",
    "fuse_names": "module fusion is a quantization feature",
}


def _is_str_list(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)


def _ratio(where: str, key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"{where}: {key!r} must be a number, got {value!r}")
    low_ok = value >= 0 if key != "max_sparse_ratio" else value > 0
    high_ok = value <= 1 if key == "max_sparse_ratio" else value < 1
    if not (low_ok and high_ok):
        interval = "(0, 1]" if key == "max_sparse_ratio" else "[0, 1)"
        raise ValueError(f"{where}: {key!r} must be in {interval}, got {value}")
    return float(value)


def validate_config_list(config_list: Any) -> list[dict[str, Any]]:
    """Check an NNI 3.0 pruning ``config_list`` and return a normalised deep copy.

    Ratios given as integers (``0``) become floats, as NNI's schema requires.

    Args:
        config_list: A list of dicts, e.g.
            ``[{"op_types": ["Conv2d"], "sparse_ratio": 0.5}]``.

    Returns:
        The checked copy.

    Raises:
        ValueError: a legacy NNI 2.x key (the message names the NNI 3.0 replacement), a key
            these pruners do not support, an entry that selects no layer type or name, or a
            ratio out of range.
        TypeError: ``config_list`` is not a list of dicts.
    """
    if not isinstance(config_list, (list, tuple)):
        raise TypeError(f"config_list must be a list of dicts, got {type(config_list).__name__}")
    out = []
    valid = SELECT_KEYS + EXCLUDE_KEYS + RATIO_KEYS + OTHER_KEYS
    for i, entry in enumerate(config_list):
        where = f"config_list[{i}]"
        if not isinstance(entry, dict):
            raise TypeError(f"{where} must be a dict, got {type(entry).__name__}")
        for key in entry:
            if key in LEGACY_KEYS:
                raise ValueError(
                    f"{where}: {key!r} is a legacy NNI 2.x key, which NNI 3.0 no longer "
                    f"accepts; use {LEGACY_KEYS[key]}. Example: "
                    "[{'op_types': ['Conv2d'], 'sparse_ratio': 0.5, 'global_group_id': 0}]"
                )
            if key in UNSUPPORTED_KEYS:
                raise ValueError(
                    f"{where}: {key!r} is not supported here ({UNSUPPORTED_KEYS[key]})"
                )
            if key not in valid:
                raise ValueError(f"{where}: unknown key {key!r}; valid keys: {', '.join(valid)}")
        if not any(k in entry for k in SELECT_KEYS):
            raise ValueError(f"{where} selects no layer: give one of {', '.join(SELECT_KEYS)}")
        entry = copy.deepcopy(entry)
        for key in SELECT_KEYS + EXCLUDE_KEYS:
            if key in entry and not _is_str_list(entry[key]):
                raise ValueError(f"{where}: {key!r} must be a list of strings, got {entry[key]!r}")
            if key in entry:
                entry[key] = list(entry[key])
        for key in RATIO_KEYS:
            if key in entry:
                entry[key] = _ratio(where, key, entry[key])
        lo, hi = entry.get("min_sparse_ratio", 0.0), entry.get("max_sparse_ratio", 1.0)
        if lo > hi:
            raise ValueError(f"{where}: min_sparse_ratio {lo} exceeds max_sparse_ratio {hi}")
        gid = entry.get("global_group_id")
        if gid is not None and (isinstance(gid, bool) or not isinstance(gid, (int, str))):
            raise ValueError(f"{where}: 'global_group_id' must be an int or a str, got {gid!r}")
        names = entry.get("target_names")
        if names is not None and (not _is_str_list(names) or not set(names) <= {"weight", "bias"}):
            raise ValueError(f"{where}: 'target_names' must be a subset of ['weight', 'bias'], "
                             f"got {names!r}")
        if entry.get("granularity", "default") not in ("default", "out_channel"):
            raise ValueError(f"{where}: channel-group pruners mask whole output channels: "
                             f"granularity must be 'default' or 'out_channel', got "
                             f"{entry['granularity']!r}")
        out.append(entry)
    return out
