"""tools/bench_deploy.py (issue 16's deployment benchmark): the smoke run writes the JSON fields,
the markdown table and the plot; bad arguments are refused before anything is measured. Latency
numbers are never checked (they depend on the machine's load)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HAS_DEPLOY = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime"))


def _tool():
    spec = importlib.util.spec_from_file_location("bench_deploy", ROOT / "tools" /
                                                  "bench_deploy.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_quick_run_writes_json_table_and_plot(tmp_path):
    bench = _tool()
    backends = ["torch", "onnxruntime"] if HAS_DEPLOY else ["torch"]
    out = tmp_path / "deploy"
    assert bench.main(["--quick", "--models", "resnet20", "--threads", "1", "--backends",
                       *backends, "--out", str(out)]) == 0
    result = json.loads((out / "deploy_latency.json").read_text())
    meta, rows, target = result["meta"], result["rows"], result["latency_target"]
    assert meta["quick"] and meta["runs"] == 3 and meta["backends"] == backends
    assert meta["total_s"] > 0 and len(meta["load_before"]) == 3
    # one row per MACs target and backend (one thread count), none failed
    assert sorted((r["target_macs"], r["backend"]) for r in rows) == sorted(
        (t, b) for t in (0.5, 0.3) for b in backends)
    for r in rows:
        assert "error" not in r, r
        assert r["model"] == "resnet20" and r["input"] == [32, 32] and r["threads"] == 1
        assert abs(r["macs_kept"] - r["target_macs"]) <= 0.03
        assert r["runs"] == 3 and r["dense_ms"] > 0 and r["pruned_ms"] > 0
        assert r["latency_kept_low"] <= r["latency_kept"] <= r["latency_kept_high"]
    assert target["model"] == "resnet20" and target["target_latency_ratio"] == 0.5
    assert "error" not in target, target
    assert target["trials"] and target["search_s"] > 0 and 0 < target["macs_kept"] < 1
    assert {"search_latency_kept", "latency_kept", "within_tolerance"} <= set(target)
    table = (out / "deploy_latency.md").read_text()
    assert "| resnet20 | 32x32 | 0.5 | - |" in table and "target_latency_ratio=0.5" in table
    assert (out / "deploy_latency.png").read_bytes()[:4] == b"\x89PNG"
    # --replot rebuilds the table and plot from the JSON without measuring
    again = tmp_path / "again"
    assert bench.main(["--replot", str(out / "deploy_latency.json"), "--out", str(again)]) == 0
    assert (again / "deploy_latency.md").read_text() == table
    assert (again / "deploy_latency.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("argv, message", [
    (["--ratios", "1.5"], "must be a fraction in (0, 1)"),
    (["--threads", "0"], "must be >= 1"),
    (["--models", "resnet5"], "invalid choice: 'resnet5'"),
    (["--backends", "tensorrt"], "invalid choice: 'tensorrt'"),
    (["--warmup", "-1"], "--warmup must be >= 0"),
    (["--replot", "missing.json"], "no such file"),
])
def test_bad_arguments_are_refused_before_measuring(tmp_path, capsys, argv, message):
    bench = _tool()
    assert bench.main([*argv, "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
