#!/usr/bin/env python
"""mmseg sweep: prune the smallest packaged config of every mmseg family through PruningHook.

For every family of mmsegmentation's packaged configs (the folders under ``mmseg/.mim/configs``:
``fcn``, ``pspnet``, ``segformer``...), the smallest variant is built on the CPU and pruned
through :class:`kcp_plugin.integrations.mmseg.PruningHook`'s own path: the hook is instantiated
(``importance='kcp', target_macs_ratio=0.5`` by default) and driven through ``before_run``,
``before_train`` and ``before_train_iter`` at iteration 0 on a minimal stand-in for mmengine's
``Runner`` (the model, an SGD ``OptimWrapper``, no other hooks, a work dir, a logger and a
message hub). Its one-shot default schedule prunes there, with ``trace_forward``, the example
input of ``example_inputs`` and the protected layers of ``PruningHook._protected``, then
rebuilds the optimizer and writes the plan, as in training.

Selection (deterministic): within a family, every config that defines a ``model`` is normalized
(``SyncBN`` -> ``BN``, ``pretrained=None``, ``init_cfg`` entries that load checkpoints removed),
identical model configs are counted once, each is built on the ``meta`` device (on the CPU if
that fails) to count its parameters, and the one with the fewest parameters wins (ties: the
config path, alphabetically). Configs that fail to build, and configs whose backbone does not
take 3-channel images (``in_channels=6``: LEVIR-CD change detection), are not candidates; a
family none of whose configs builds is skipped with that error as its reason. ``vpd`` (depth
estimation with Stable Diffusion) and ``dsdl`` (a dataset-format demo on deeplabv3_r50-d8) are
skipped by rule; ``_base_`` is not a family.

Each selected model is rebuilt on the CPU (weights from ``init_weights()`` with the checkpoint
entries removed; nothing is downloaded: outgoing network connections are refused), put in eval
mode, and checked:

* ``dense-fails``: the deployed forward (``kcp_plugin.integrations.mmseg.tensor_forward``)
  does not run at ``--size``;
* ``ok``: pruned; ``trace_forward`` and tensor-mode outputs keep their shapes and stay finite,
  and the MACs kept (tensor mode, which the hook logs, and traced, which it targets) are within
  ``--tolerance`` of the target;
* ``check-failed``: pruned, but one of these checks failed (named in the cause);
* ``refused``: a ``ValueError``/``TypeError`` raised by kcp_plugin itself, with the model's
  state dict unchanged;
* ``crash``: any other exception (type, message, last frame inside kcp_plugin / torch_pruning /
  mmseg / mmcv / mmengine);
* ``timeout``: the row ran past ``--timeout`` seconds (build included).

Results (``--json``, ``--markdown``) are written after every row.

    python tools/sweep_mmseg.py --list
    python tools/sweep_mmseg.py --families fcn,pspnet --json out.json --markdown out.md
    python tools/sweep_mmseg.py --timeout 240 --json base.json --markdown base.md \\
        --params-cache /tmp/mmseg_params.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import glob
import hashlib
import inspect
import json
import math
import os
import platform
import re
import socket
import sys
import tempfile
import time
import traceback
import warnings
from typing import Any

import torch
import torch_pruning as tp

import kcp_plugin

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sweep_models import (  # noqa: E402  (the timm sweep's helpers, shared)
    TimeLimitExceeded,
    _version,
    named_tensors,
    time_limit,
)

TRACKED = ("kcp_plugin", "torch_pruning", "mmseg", "mmcv", "mmengine")
NOT_FAMILIES = {"_base_": "shared base configs, not a family"}
# Families skipped by rule (everything else is tried; build failures skip a family too).
SKIP_RULES = {
    "vpd": "depth estimation (DepthEstimator, no decode-head class maps); its backbone is "
           "Stable Diffusion: needs the ldm package and SD weights (not available here)",
    "dsdl": "dataset-format demo (DSDL datasets); its models are deeplabv3_r50-d8, covered "
            "by the deeplabv3 family",
}
SEG_TYPES = {"EncoderDecoder", "CascadeEncoderDecoder", "MultimodalEncoderDecoder",
             "DepthEstimator"}
BN_TYPES = {"SyncBN", "MMSyncBN"}
STATUSES = ("ok", "check-failed", "refused", "crash", "timeout", "dense-fails", "skipped")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Prune the smallest packaged config of every mmseg family through "
        "kcp_plugin's PruningHook and check the result.",
    )
    p.add_argument("--families", default=None,
                   help="comma-separated families (config folders), run in this order; "
                   "default: all, alphabetically")
    p.add_argument("--list", action="store_true",
                   help="print the selection (family, config, params or skip reason) and exit")
    p.add_argument("--configs-root", default=None,
                   help="mmseg's configs folder (default: mmseg/.mim/configs of the installed "
                   "mmseg)")
    p.add_argument("--size", type=int, default=128, help="input side (default: 128)")
    p.add_argument("--importance", default="kcp", help="PruningHook importance (default: kcp)")
    p.add_argument("--target", type=float, default=0.5,
                   help="PruningHook target_macs_ratio (default: 0.5)")
    p.add_argument("--tolerance", type=float, default=0.02,
                   help="allowed |MACs kept - target| (default: 0.02)")
    p.add_argument("--timeout", type=int, default=240,
                   help="seconds per model, build included (default: 240)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default: 1)")
    p.add_argument("--seed", type=int, default=0, help="seed for the weights (default: 0)")
    p.add_argument("--init-weights", action=argparse.BooleanOptionalAction, default=True,
                   help="run model.init_weights() (checkpoint entries removed), as the Runner "
                   "does before the hook prunes (default: on)")
    p.add_argument("--params-cache", metavar="PATH", default=None,
                   help="JSON cache of the per-config parameter counts used for the selection")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    p.add_argument("--markdown", metavar="PATH", help="write the markdown table to PATH")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------- errors, limits
def _short(filename: str) -> str:
    for p in (*TRACKED, "torch"):
        i = filename.rfind(f"{os.sep}{p}{os.sep}")
        if i >= 0:
            return filename[i + 1:]
    return os.path.relpath(filename) if not os.path.relpath(filename).startswith("..") \
        else filename


def last_frame(exc: BaseException, within: tuple[str, ...] | None = TRACKED) -> str | None:
    """``file:line in function`` of the innermost frame (inside ``within``, if given)."""
    frames = traceback.extract_tb(exc.__traceback__)
    if within:
        frames = [f for f in frames if any(f"{os.sep}{p}{os.sep}" in f.filename for p in within)]
    if not frames:
        return None
    f = frames[-1]
    return f"{_short(f.filename)}:{f.lineno} in {f.name}"


def describe_error(exc: BaseException, stage: str) -> dict[str, Any]:
    msg = str(exc).strip()
    err: dict[str, Any] = {
        "stage": stage,
        "type": type(exc).__name__,
        "message": msg.splitlines()[0][:400] if msg else "",
        "where": last_frame(exc),
        "kcp_where": last_frame(exc, ("kcp_plugin",)),
        "innermost": last_frame(exc, None),
        "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
    }
    cause = exc.__cause__ or exc.__context__
    if cause is not None:
        cmsg = str(cause).strip()
        err["cause"] = {"type": type(cause).__name__,
                        "message": cmsg.splitlines()[0][:400] if cmsg else "",
                        "where": last_frame(cause), "innermost": last_frame(cause, None)}
    return err


def raised_by_kcp(exc: BaseException) -> bool:
    """Whether the innermost frame of ``exc`` (not of its cause) is kcp_plugin code."""
    frames = traceback.extract_tb(exc.__traceback__)
    return bool(frames) and f"{os.sep}kcp_plugin{os.sep}" in frames[-1].filename


def refuse_network() -> None:
    """Make every outgoing internet connection fail: nothing may be downloaded."""
    original = socket.socket.connect

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise ConnectionRefusedError(f"sweep_mmseg: network access refused ({address!r})")
        return original(self, address)

    socket.socket.connect = connect  # type: ignore[method-assign]


# ---------------------------------------------------------------------------- configs
def configs_root(arg: str | None) -> str:
    if arg:
        return arg
    import mmseg

    root = os.path.join(os.path.dirname(mmseg.__file__), ".mim", "configs")
    if not os.path.isdir(root):
        raise SystemExit(f"no packaged configs at {root}; pass --configs-root")
    return root


def normalize(node: Any, removed: list[str]) -> Any:
    """``SyncBN`` -> ``BN``, ``pretrained=None``, checkpoint-loading ``init_cfg`` removed."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "type" and value in BN_TYPES:
                value = "BN"
            elif key == "pretrained" and value is not None:
                removed.append(f"pretrained={value}")
                value = None
            elif key == "init_cfg":
                value = _drop_checkpoints(value, removed)
            out[key] = normalize(value, removed)
        return out
    if isinstance(node, (list, tuple)):
        return type(node)(normalize(v, removed) for v in node)
    return node


def _loads_checkpoint(init: Any) -> bool:
    return isinstance(init, dict) and (init.get("type") == "Pretrained" or "checkpoint" in init)


def _drop_checkpoints(init: Any, removed: list[str]) -> Any:
    if _loads_checkpoint(init):
        removed.append(f"init_cfg={init.get('checkpoint')}")
        return None
    if isinstance(init, (list, tuple)):
        kept = [i for i in init if not _loads_checkpoint(i)]
        removed.extend(f"init_cfg={i.get('checkpoint')}" for i in init if _loads_checkpoint(i))
        return kept or None
    return init


def leftover_weights(node: Any, path: str = "model") -> list[str]:
    """String values that still name remote or local weight files (reported, not used)."""
    found = []
    if isinstance(node, dict):
        for k, v in node.items():
            found.extend(leftover_weights(v, f"{path}.{k}"))
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            found.extend(leftover_weights(v, f"{path}[{i}]"))
    elif isinstance(node, str) and (node.startswith(("http://", "https://", "open-mmlab://",
                                                     "torchvision://", "mmcls://"))
                                    or node.endswith((".pth", ".pt", ".ckpt", ".safetensors"))):
        found.append(f"{path}={node}")
    return found


def load_model_cfg(path: str) -> tuple[dict[str, Any], list[str]] | None:
    """The normalized model config of ``path`` (``None`` if it defines no model)."""
    from mmengine.config import Config

    cfg = Config.fromfile(path)
    if "model" not in cfg or not isinstance(cfg.model, dict) or "type" not in cfg.model:
        return None
    removed: list[str] = []
    model = normalize(cfg.model.to_dict(), removed)
    return model, removed


def count_params(model_cfg: dict[str, Any]) -> tuple[int, str]:
    """Parameter count of a model config, built on the meta device (else on the CPU)."""
    from mmengine.config import ConfigDict
    from mmseg.registry import MODELS

    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = MODELS.build(ConfigDict(copy.deepcopy(model_cfg)))
        how = "meta"
    except Exception:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = MODELS.build(ConfigDict(copy.deepcopy(model_cfg)))
        how = "cpu"
    return sum(p.numel() for p in model.parameters()), how


def _mmseg_version() -> str:
    import mmseg

    return mmseg.__version__


def select(root: str, families: list[str] | None, cache_path: str | None) -> list[dict[str, Any]]:
    """One entry per family: the config with the fewest parameters, or a skip reason."""
    cache: dict[str, Any] = {}
    key = f"mmseg {_mmseg_version()} torch {torch.__version__}"
    if cache_path and os.path.exists(cache_path):
        with open(cache_path) as f:
            stored = json.load(f)
        if stored.get("key") == key:
            cache = stored.get("configs", {})
    all_families = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if families:
        unknown = sorted(set(families) - set(all_families))
        if unknown:
            raise SystemExit(f"--families: unknown {', '.join(unknown)}; valid: "
                             f"{', '.join(f for f in all_families if f not in NOT_FAMILIES)}")
        all_families = list(dict.fromkeys(families))  # in the order given
    entries = []
    for family in all_families:
        if family in NOT_FAMILIES:
            continue
        entry: dict[str, Any] = {"family": family}
        entries.append(entry)
        if family in SKIP_RULES:
            entry["skip"] = SKIP_RULES[family]
            continue
        paths = sorted(glob.glob(os.path.join(root, family, "*.py")))
        seen: dict[str, dict[str, Any]] = {}  # normalized model config -> its first config
        failures: list[str] = []
        excluded: list[str] = []
        n_models = 0
        for path in paths:
            rel = os.path.relpath(path, root)
            info = cache.get(rel)
            if info is None:
                info = _measure(path)
                cache[rel] = info
                if cache_path:
                    os.makedirs(os.path.dirname(os.path.abspath(cache_path)), exist_ok=True)
                    with open(cache_path, "w") as f:
                        json.dump({"key": key, "configs": cache}, f, indent=1)
            if info.get("no_model"):
                continue
            n_models += 1
            if "error" in info:
                failures.append(f"{os.path.basename(rel)}: {info['error']}")
                continue
            if "in_channels" in info:  # e.g. LEVIR-CD change detection: image pairs
                excluded.append(f"{os.path.basename(rel)}: in_channels={info['in_channels']}")
                continue
            seen.setdefault(info["digest"], {"config": rel, "params": info["params"],
                                             "type": info["type"]})
        if not n_models:
            entry["skip"] = "no model configs (dataset/base configs only)"
            continue
        if not seen:
            reasons = sorted({f.split(": ", 1)[1] for f in failures})
            entry["skip"] = f"no config builds here ({n_models} tried): " + "; ".join(reasons)
            continue
        best = min(seen.values(), key=lambda c: (c["params"], c["config"]))
        entry.update(best, candidates=n_models, unique_models=len(seen),
                     build_failures=failures, excluded=excluded)
    return entries


def _measure(path: str) -> dict[str, Any]:
    """Parameter count (and a digest of the normalized model config) of one config file."""
    try:
        loaded = load_model_cfg(path)
    except Exception as exc:
        msg = str(exc).strip().split(", the current sys.path")[0]  # mmengine's import errors
        return {"error": f"config: {type(exc).__name__}: {msg[:200]}"}
    if loaded is None:
        return {"no_model": True}
    model_cfg, _ = loaded
    digest = hashlib.sha256(json.dumps(model_cfg, sort_keys=True, default=str).encode())
    info: dict[str, Any] = {"digest": digest.hexdigest()[:16], "type": model_cfg["type"]}
    channels = (model_cfg.get("backbone") or {}).get("in_channels", 3)
    if channels != 3:
        info["in_channels"] = channels
    try:
        info["params"], info["built_on"] = count_params(model_cfg)
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        info["error"] = f"build: {type(exc).__name__}: {msg}"
    return info


# ---------------------------------------------------------------------------- one model
class _Logger:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def info(self, msg: Any, *args: Any, **kwargs: Any) -> None:
        self.lines.append(str(msg))

    warning = info


class _MessageHub:
    def __init__(self) -> None:
        self.info: dict[str, Any] = {}

    def update_info(self, key: str, value: Any) -> None:
        self.info[key] = value


class HookRunner:
    """What ``PruningHook`` reads of mmengine's ``Runner`` at a one-shot pruning point."""

    def __init__(self, model: torch.nn.Module, work_dir: str):
        from mmengine.optim import OptimWrapper

        self.model = model
        self.optim_wrapper = OptimWrapper(
            torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9))
        self.hooks: list[Any] = []
        self.rank = 0
        self.world_size = 1
        self.work_dir = work_dir
        self.iter = 0
        self.epoch = 0
        self.cfg: dict[str, Any] = {}
        self.logger = _Logger()
        self.message_hub = _MessageHub()


def _tensor_forward(model: torch.nn.Module, x: torch.Tensor) -> Any:
    # the deployed logits: mmseg's tensor mode, or a cascade's heads in turn (PointRend's
    # point head has no tensor mode in mmseg)
    from kcp_plugin.integrations.mmseg import tensor_forward

    return tensor_forward(model, x)


def _outputs(model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    from kcp_plugin.integrations.mmseg import trace_forward

    with torch.no_grad():
        out = named_tensors(_tensor_forward(model, x), "tensor")
        out.update(named_tensors(trace_forward(model, x), "trace"))
    return out


def same_state(model: torch.nn.Module, ref: dict[str, torch.Tensor]) -> bool:
    state = model.state_dict()
    return list(state) == list(ref) and all(
        state[k].shape == ref[k].shape and torch.equal(state[k], ref[k]) for k in ref)


def build(entry: dict[str, Any], root: str, args: argparse.Namespace) -> torch.nn.Module:
    from mmengine.config import ConfigDict
    from mmseg.registry import MODELS

    loaded = load_model_cfg(os.path.join(root, entry["config"]))
    assert loaded is not None
    model_cfg, removed = loaded
    entry["removed_weights"] = removed
    entry["leftover_weights"] = leftover_weights(model_cfg)
    torch.manual_seed(args.seed)
    # a ConfigDict, as Runner builds cfg.model (some segmentors set attributes on sub-configs)
    model = MODELS.build(ConfigDict(model_cfg))
    if args.init_weights:
        try:
            model.init_weights()
        except Exception as exc:  # mmseg's own (SAN's CLIP head needs its checkpoint)
            entry["init_weights_error"] = describe_error(exc, "init_weights")
    return model.eval()


def run_one(entry: dict[str, Any], root: str, args: argparse.Namespace) -> dict[str, Any]:
    """Build, check the dense model, prune a copy through PruningHook, check; one row."""
    from kcp_plugin.integrations.mmseg import PruningHook, example_inputs, trace_forward

    row: dict[str, Any] = {"family": entry["family"], "config": entry["config"],
                           "candidates": entry.get("candidates"),
                           "unique_models": entry.get("unique_models")}
    times: dict[str, float] = {}
    row["times"] = times
    stage = "build"
    t0 = t = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t
        now = time.perf_counter()
        times[name] = round(now - t, 3)
        t = now

    base = model = None
    caught: list[warnings.WarningMessage] = []
    try:
        with time_limit(args.timeout), tempfile.TemporaryDirectory() as work_dir, \
                contextlib.ExitStack() as stack:
            base = build(entry, root, args)
            row["params"] = sum(p.numel() for p in base.parameters())
            row["type"] = type(base).__name__
            row["removed_weights"] = entry.get("removed_weights")
            row["leftover_weights"] = entry.get("leftover_weights")
            if "init_weights_error" in entry:
                e = entry["init_weights_error"]
                row["init_weights_error"] = {k: e[k] for k in ("type", "message", "where")}
            lap("build")
            x = example_inputs(base, (args.size, args.size))
            stage = "dense forward (tensor_forward)"
            try:
                with torch.no_grad():
                    dense_tensor = named_tensors(_tensor_forward(base, x), "tensor")
            except Exception as exc:
                row["status"] = "dense-fails"
                row["error"] = describe_error(exc, stage)
                return row
            stage = "dense forward (trace_forward)"
            try:
                with torch.no_grad():
                    dense = dict(dense_tensor)
                    dense.update(named_tensors(trace_forward(base, x), "trace"))
            except Exception as exc:  # the hook's own forward: the hook is still run below
                row["dense_trace_error"] = describe_error(exc, stage)
                dense = None
            lap("dense")
            stage = "deepcopy"
            model = copy.deepcopy(base)
            ref = base.state_dict()
            lap("deepcopy")
            stage = "PruningHook()"
            caught = stack.enter_context(warnings.catch_warnings(record=True))
            warnings.simplefilter("always")
            hook = PruningHook(importance=args.importance, target_macs_ratio=args.target,
                               input_shape=(args.size, args.size))
            runner = HookRunner(model, work_dir)
            stage = "before_run"
            hook.before_run(runner)
            row["protected"] = hook._protected(model)
            stage = "before_train"
            hook.before_train(runner)
            lap("before_train")
            stage = "before_train_iter (prune)"
            try:
                hook.before_train_iter(runner, 0, None)
            except Exception as exc:
                row["error"] = describe_error(exc, stage)
                row["model_untouched"] = same_state(model, ref)
                refused = isinstance(exc, (ValueError, TypeError)) and raised_by_kcp(exc)
                row["status"] = "refused" if refused and row["model_untouched"] else "crash"
                return row
            lap("prune")
            row["hook_log"] = runner.logger.lines
            row["plan_steps"] = len(kcp_plugin.get_plan(model)["history"])
            stage = "checks"
            _check(row, base, model, x, hook, dense, args)
            lap("checks")
    except TimeLimitExceeded as exc:
        row["status"] = "timeout"
        row["error"] = describe_error(exc, stage)
    except Exception as exc:
        row["status"] = "crash"
        row["error"] = describe_error(exc, stage)
        if model is not None and base is not None and "model_untouched" not in row:
            row["model_untouched"] = same_state(model, base.state_dict())
    finally:
        row["time_s"] = round(time.perf_counter() - t0, 2)
        _record_warnings(row, caught)
        del base, model
    return row


def _record_warnings(row: dict[str, Any], caught: list[warnings.WarningMessage]) -> None:
    """kcp_plugin's warnings during the hook's calls (e.g. groups its safety net kept)."""
    ours = list(dict.fromkeys(str(w.message) for w in caught if "kcp_plugin" in str(w.message)
                              or f"{os.sep}kcp_plugin{os.sep}" in w.filename))
    if ours:
        row["kcp_warnings"] = ours
    kept = [int(m.group(1)) for text in ours
            for m in [re.search(r"kept (\d+) channel group", text)] if m]
    if kept:
        row["groups_kept"] = sum(kept)


def _check(row: dict[str, Any], base: torch.nn.Module, model: torch.nn.Module, x: torch.Tensor,
           hook: Any, dense: dict[str, torch.Tensor] | None, args: argparse.Namespace) -> None:
    from kcp_plugin import count_macs_params
    from kcp_plugin.integrations.mmseg import trace_forward

    model.eval()
    after = _outputs(model, x)
    if dense is None:  # the dense trace failed, yet the hook pruned: compare tensor mode only
        after = {k: v for k, v in after.items() if k.startswith("tensor")}
        with torch.no_grad():
            dense = named_tensors(_tensor_forward(base, x), "tensor")
    row["shape_ok"] = list(dense) == list(after) and all(
        dense[k].shape == after[k].shape for k in dense)
    if not row["shape_ok"]:
        row["shapes"] = {k: [list(dense[k].shape), list(after[k].shape) if k in after else None]
                         for k in dense}
    row["finite_ok"] = all(bool(torch.isfinite(v).all()) for v in after.values())
    tensor_dense = count_macs_params(base, x, _tensor_forward)[0]
    tensor_pruned, row["params_pruned"] = count_macs_params(model, x, _tensor_forward)
    traced_pruned = count_macs_params(model, x, trace_forward)[0]
    row["macs_dense"] = tensor_dense
    row["macs_traced_dense"] = hook.macs_dense
    row["macs_ratio"] = tensor_pruned / tensor_dense
    row["macs_traced_ratio"] = traced_pruned / hook.macs_dense
    row["params_ratio"] = row["params_pruned"] / row["params"]
    row["macs_ok"] = abs(row["macs_ratio"] - args.target) <= args.tolerance
    row["macs_traced_ok"] = abs(row["macs_traced_ratio"] - args.target) <= args.tolerance
    failed = [k[:-3] for k in CHECKS if not row[k]]
    row["failed_checks"] = failed
    row["status"] = "check-failed" if failed else "ok"


CHECKS = ("shape_ok", "finite_ok", "macs_ok", "macs_traced_ok")


# ---------------------------------------------------------------------------- outputs
def cause(row: dict[str, Any]) -> str:
    status = row["status"]
    if status == "skipped":
        return row.get("reason", "")
    kept = (f"kcp_plugin's safety net kept {row['groups_kept']} channel group(s) unpruned"
            if row.get("groups_kept") else "")
    if row.get("init_weights_error"):
        e = row["init_weights_error"]
        kept = "; ".join(filter(None, [kept, f"init_weights() failed ({e['type']}: "
                                       f"{e['message'][:80]}), PyTorch default init"]))
    if status == "ok":
        return kept
    if status == "check-failed":
        parts = []
        for k in row["failed_checks"]:
            if k == "macs":
                parts.append(f"MACs (tensor mode) {row['macs_ratio']:.3f}")
            elif k == "macs_traced":
                parts.append(f"MACs (traced) {row['macs_traced_ratio']:.3f}")
            elif k == "shape":
                bad = {n: s for n, s in row.get("shapes", {}).items() if s[0] != s[1]}
                parts.append(f"shapes {bad}")
            else:
                parts.append(k)
        return "failed: " + "; ".join(parts) + (f"; {kept}" if kept else "")
    e = row.get("error") or {}
    text = f"{e.get('stage')}: {e.get('type')}: {e.get('message', '')[:160]}"
    if e.get("where"):
        text += f" at `{e['where']}`"
    if row.get("model_untouched") is False:
        text += " (model left modified)"
    c = e.get("cause")
    if c:
        text += f" (from {c['type']}: {c['message'][:120]}"
        text += f" at `{c['where']}`)" if c.get("where") else ")"
    return text + (f"; {kept}" if kept else "")


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(result: dict[str, Any]) -> str:
    meta = result["meta"]
    lines = [
        f"PruningHook(importance={meta['importance']!r}, target_macs_ratio={meta['target']}), "
        f"input 1x3x{meta['size']}x{meta['size']}, tolerance {meta['tolerance']}, timeout "
        f"{meta['timeout']} s, {meta['threads']} thread(s); torch {meta['torch']}, "
        f"torch-pruning {meta['torch_pruning']}, mmseg {meta['mmseg']}, mmcv {meta['mmcv']}, "
        f"mmengine {meta['mmengine']}, kcp_plugin sources sha256 {meta['kcp_sha256']}"
        + (f" (commit {meta['commit'][:10]}"
           + (", kcp_plugin modified)" if meta.get("kcp_plugin_modified") else ")")
           if meta.get("commit") else "")
        + (f", changed during the run to {meta['kcp_sha256_end']}"
           if meta.get("kcp_sha256_end") else ""),
        "",
        "MACs kept: tensor mode (`model(x, mode='tensor')`, what the hook logs); traced: "
        "`trace_forward` (what the hook targets).",
        "",
        "| family | config | params (M) | status | MACs kept | traced | time (s) | cause |",
        "|---|---|---:|---|---:|---:|---:|---|",
    ]
    for row in result["rows"]:
        params = f"{row['params'] / 1e6:.2f}" if row.get("params") else "-"
        macs = f"{row['macs_ratio']:.3f}" if "macs_ratio" in row else "-"
        traced = f"{row['macs_traced_ratio']:.3f}" if "macs_traced_ratio" in row else "-"
        t = f"{row['time_s']:.1f}" if "time_s" in row else "-"
        config = os.path.basename(row.get("config") or "-")
        lines.append(f"| {row['family']} | {_md(config)} | {params} | {row['status']} | {macs} "
                     f"| {traced} | {t} | {_md(cause(row))} |")
    counts = {s: sum(r["status"] == s for r in result["rows"]) for s in STATUSES}
    lines += ["", ", ".join(f"{s}: {n}" for s, n in counts.items() if n)
              + f"; wall time {result.get('wall_s', 0):.0f} s"]
    groups: dict[tuple[str, str, str], list[str]] = {}
    for row in result["rows"]:
        e = row.get("error")
        if row["status"] in ("crash", "refused", "timeout", "dense-fails") and e:
            groups.setdefault((row["status"], e["type"], e.get("where") or "-"), []).append(
                row["family"])
    if groups:
        lines += ["", "Failures by exception and frame:", ""]
        for (status, typ, where), fams in sorted(groups.items()):
            lines.append(f"* {status}: `{typ}` at `{where}`: {', '.join(fams)}")
    return "\n".join(lines)


def write_outputs(result: dict[str, Any], args: argparse.Namespace) -> str:
    text = markdown(result)
    for path, content in ((args.markdown, text + "\n"),
                          (args.json, json.dumps(result, indent=2, default=str))):
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path, "w") as f:
                f.write(content)
    return text


def _git_state() -> dict[str, Any]:
    """Commit of the checkout kcp_plugin is imported from, and whether its sources differ."""
    import subprocess

    repo = os.path.dirname(os.path.dirname(inspect.getsourcefile(kcp_plugin) or ""))
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "kcp_plugin"], cwd=repo,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return {}
    return {"commit": head, "kcp_plugin_modified": bool(dirty)}


def _kcp_fingerprint() -> str:
    root = os.path.dirname(inspect.getsourcefile(kcp_plugin) or "")
    digest = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(root, "**", "*.py"), recursive=True)):
        with open(path, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:12]


def summary(row: dict[str, Any]) -> str:
    extra = f" (MACs {row['macs_ratio']:.3f})" if "macs_ratio" in row else ""
    why = cause(row)
    return f"{row['status']}{extra}, {row.get('time_s', 0):.1f} s" + (f": {why}" if why else "")


def setup(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    refuse_network()
    warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
    warnings.filterwarnings("ignore", category=UserWarning, module="mmseg")
    warnings.filterwarnings("ignore", category=UserWarning, module="mmengine")
    from mmengine.logging import MMLogger
    from mmseg.utils import register_all_modules

    import kcp_plugin.integrations.mmseg  # noqa: F401  (registers the hook, safe loading)

    # init_weights() logs every module's initialization to the current logger
    MMLogger.get_instance("sweep_mmseg", log_level="WARNING")
    register_all_modules(init_default_scope=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not 0 < args.target <= 1 or math.isnan(args.target):
        raise SystemExit("--target must be in (0, 1]")
    setup(args)
    root = configs_root(args.configs_root)
    families = [f.strip() for f in args.families.split(",") if f.strip()] \
        if args.families else None
    entries = select(root, families, args.params_cache)
    if args.list:
        for e in entries:
            what = f"skip: {e['skip']}" if "skip" in e else \
                f"{e['config']}  {e['params'] / 1e6:.2f} M  ({e['candidates']} configs, " \
                f"{e['unique_models']} distinct models)"
            print(f"{e['family']:16s} {what}")
        return 0
    meta = {
        "importance": args.importance, "target": args.target, "tolerance": args.tolerance,
        "size": args.size, "timeout": args.timeout, "threads": torch.get_num_threads(),
        "seed": args.seed, "init_weights": args.init_weights, "torch": torch.__version__,
        "torch_pruning": tp.__version__, "mmseg": _version("mmseg"), "mmcv": _version("mmcv"),
        "mmengine": _version("mmengine"), "python": platform.python_version(),
        "kcp_sha256": _kcp_fingerprint(), **_git_state(), "configs_root": root,
        "selection": "fewest parameters among the family's configs (normalized model configs, "
                     "built on the meta device); ties by config path",
    }
    result: dict[str, Any] = {"meta": meta, "rows": []}
    t_start = time.perf_counter()
    for entry in entries:
        if "skip" in entry:
            row = {"family": entry["family"], "config": None, "status": "skipped",
                   "reason": entry["skip"]}
        else:
            print(f"{entry['family']}: {entry['config']} ...", file=sys.stderr, flush=True)
            row = run_one(entry, root, args)
            row["build_failures"] = entry.get("build_failures")
            row["excluded"] = entry.get("excluded")
        result["rows"].append(row)
        print(f"  {row['family']}: {summary(row)}", file=sys.stderr, flush=True)
        result["wall_s"] = time.perf_counter() - t_start
        write_outputs(result, args)  # after every row: an interrupted sweep keeps its rows
    end = _kcp_fingerprint()
    if end != meta["kcp_sha256"]:
        meta["kcp_sha256_end"] = end
        print(f"warning: kcp_plugin's sources changed during the sweep ({meta['kcp_sha256']} -> "
              f"{end}); modules imported late may have run the new code", file=sys.stderr)
    print(write_outputs(result, args))
    return 0 if all(r["status"] in ("ok", "skipped") for r in result["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
