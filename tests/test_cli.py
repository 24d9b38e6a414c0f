"""kcp-prune end to end: table, saved plan + weights, exit codes, help."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kcp_plugin
from kcp_plugin.cli import build_parser, main
from kcp_plugin.zoo import load_spec_checkpoint

SPEC = "module:conftest:ResBlockNet"


def test_prune_save_and_reload_end_to_end(tmp_path, capsys):
    out, js, png = tmp_path / "p.pt", tmp_path / "r.json", tmp_path / "w.png"
    code = main(["--model", SPEC, "--model-arg", "width=32", "--input-shape", "1,3,16,16",
                 "--target-macs", "0.5", "--out", str(out), "--json", str(js), "--plot",
                 str(png), "--latency-runs", "2", "-q"])
    assert code == 0
    text = capsys.readouterr().out
    assert "MACs" in text and "Params" in text and "latency (torch" in text
    report = json.loads(js.read_text())
    assert abs(report["macs_ratio"] - 0.5) <= 0.02
    assert report["latency_before_ms"] > 0 and report["latency_after_ms"] > 0
    assert png.read_bytes()[:4] == b"\x89PNG"
    model, meta = load_spec_checkpoint(out)
    assert meta["model"] == SPEC and meta["model_kwargs"] == {"width": 32}
    x = torch.randn(1, 3, 16, 16)
    assert kcp_plugin.count_macs_params(model, x)[0] == report["macs_after"]
    assert model(x).shape == (1, 5)


def test_timm_model_goes_through_the_timm_integration_and_reloads(tmp_path, capsys):
    """timm specs are pruned by the timm integration: plain prune() leaves ``num_features`` /
    ``embed_dim`` stale, so ``reset_classifier`` builds a head of the dense width."""
    out = tmp_path / "vit.pt"
    code = main(["--model", "timm:vit_tiny_patch16_224", "--model-arg", "img_size=32",
                 "--model-arg", "depth=2", "--input-shape", "1,3,32,32", "--importance", "kcp",
                 "--target-macs", "0.6", "--out", str(out), "--latency-runs", "0", "-q"])
    assert code == 0, capsys.readouterr().err
    model, meta = load_spec_checkpoint(out)
    x = torch.randn(2, 3, 32, 32)
    assert model.num_features == model.head.in_features < 192
    assert torch.isfinite(model(x)).all() and model(x).shape == (2, 1000)
    model.reset_classifier(7)
    assert model(x).shape == (2, 7)


def test_stereo_style_two_inputs_and_iterative_steps(tmp_path, capsys):
    code = main(["--model", "module:conftest:ResBlockNet", "--input-shape", "1,3,16,16",
                 "--pruning-ratio", "0.5", "--iterative-steps", "2", "--importance", "l2",
                 "--importance-arg", "group_reduction=\"max\"", "--latency-runs", "0", "-q"])
    assert code == 0
    assert "channel pruning ratio 0.500" in capsys.readouterr().out


@pytest.mark.parametrize("argv,code,message", [
    (["--importance", "kcpp"], 2, "Valid names:"),
    (["--importance", "fisher"], 2, "data-free criterion: "),
    (["--importance", "taylor"], 2, "scores channels from training data"),
    (["--target-macs", "1.5"], 2, "must be in (0, 1]"),
    (["--pruning-ratio", "1.5"], 2, "--pruning-ratio must be in [0, 1)"),
    (["--input-shape", "1,x,3"], 2, "comma-separated integers"),
    (["--target-macs", "0.5", "--pruning-ratio", "0.5"], 2, "not allowed with"),
    (["--model", "resnet50"], 3, "needs a source prefix"),
    (["--model", "onnx:resnet50"], 3, "unknown model source"),
    (["--model", "timm:no_such_net"], 3, "timm has no model"),
    (["--model", SPEC, "--input-shape", "1,3,16,16", "--ignore", "nope"], 2,
     "no layer named 'nope'"),
    (["--model", SPEC, "--input-shape", "1,5,16,16"], 2, "could not be run"),
    (["--model", SPEC, "--input-shape", "1,3,16,16", "--importance-arg", "bogus=1"], 2,
     "accepted arguments"),
    # a shape the model cannot take: one line before anything is timed or pruned (it used to
    # be a traceback from the latency measurement)
    (["--model", SPEC, "--input-shape", "1,3,16", "--latency-runs", "3"], 2,
     "--input-shape 1,3,16: example_inputs could not be run"),
    (["--out", "/no/such/folder/p.pt"], 2, "folder /no/such/folder does not exist"),
    (["--json", "/no/such/folder/r.json"], 2, "--json /no/such/folder/r.json: folder"),
    (["--threads", "0"], 2, "--threads must be >= 1"),
    (["--round-to", "auto"], 2, "--round-to auto measures latency: it needs --target-latency"),
    (["--round-to", "x"], 2, "expected an integer >= 1 or 'auto'"),
    (["--target-latency", "0.5", "--pruning-ratio", "0.5"], 2, "replaces --pruning-ratio"),
    (["--latency-backend", "cuda", "--device", "gpu0"], 2, "bad device 'gpu0'"),
])
def test_bad_input_gives_clear_message_and_exit_code(argv, code, message, capsys):
    runs = [] if "--latency-runs" in argv else ["--latency-runs", "0"]
    try:
        got = main(argv + runs + ["-q"])
    except SystemExit as exc:  # argparse errors
        got = exc.code
    assert got == code
    assert message in capsys.readouterr().err


def test_help_documents_every_flag():
    parser = build_parser()
    text = parser.format_help()
    assert "30% of MACs" in text and "%%" not in text
    for action in parser._actions:
        for opt in action.option_strings:
            assert opt in text
        if action.option_strings and action.dest != "help":
            assert action.help, f"{action.option_strings} has no help text"


def test_latency_is_interleaved_with_its_spread(capsys, monkeypatch):
    calls = []
    real = kcp_plugin.deploy.latency.compare_latency

    def spy(models, *args, **kwargs):
        calls.append((len(models), kwargs.get("threads")))
        return real(models, *args, **kwargs)

    monkeypatch.setattr("kcp_plugin.pruning.compare_latency", spy)
    assert main(["--model", SPEC, "--input-shape", "1,3,16,16", "--target-macs", "0.5",
                 "--latency-runs", "3", "-q"]) == 0
    assert calls == [(2, None)]  # dense and pruned in one interleaved run (the backend's)
    out = capsys.readouterr().out
    assert "1 thread): median of 3 passes each, dense and pruned interleaved" in out
    assert "interquartile range" in out


def test_list_importances(capsys):
    assert main(["--list-importances"]) == 0
    lines = capsys.readouterr().out.splitlines()
    listed = [line.split()[0] for line in lines]
    assert listed == kcp_plugin.list_importances()
    assert any(line.startswith("fisher") and line.endswith("(needs data)") for line in lines)


def test_console_script_is_installed():
    here = Path(sys.executable).parent / "kcp-prune"  # the venv's bin, even if not on PATH
    exe = str(here) if here.exists() else shutil.which("kcp-prune")
    assert exe is not None, "kcp-prune is not installed: run tools/setup_env.sh"
    result = subprocess.run([exe, "--version"], capture_output=True, text=True, check=True)
    assert result.stdout.startswith("kcp-plugin ")


def test_onnx_file_of_the_pruned_model_runs_in_onnxruntime(tmp_path, capsys):
    from kcp_plugin.deploy.export import inference_session

    path = tmp_path / "pruned.onnx"
    code = main(["--model", SPEC, "--model-arg", "width=64", "--input-shape", "1,3,16,16",
                 "--target-macs", "0.5", "--onnx", str(path), "--latency-backend",
                 "onnxruntime", "--latency-runs", "2", "-q"])
    assert code == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "saved ONNX (opset " in out and str(path) in out
    assert "latency (onnxruntime (" in out and "median of 3 passes each" in out
    assert "--round-to" not in out  # the MACs target rounded to onnxruntime's multiple
    session = inference_session(path, threads=1)
    (logits,) = session.run(None, {"input": torch.randn(3, 3, 16, 16).numpy()})
    assert logits.shape == (3, 5)  # exported at batch 1, runs at batch 3


@pytest.mark.parametrize("argv,message", [
    (["--onnx", "/no/such/folder/m.onnx"], "--onnx /no/such/folder/m.onnx: folder"),
    (["--latency-backend", "tensorrt"], "invalid choice: 'tensorrt'"),
])
def test_onnx_arguments_are_checked_before_pruning(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv + ["--latency-runs", "0", "-q"])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_deploy_extra_is_a_usage_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(SystemExit) as info:
        main(["--model", SPEC, "--input-shape", "1,3,16,16", "--onnx", str(tmp_path / "m.onnx"),
              "--latency-runs", "0", "-q"])
    assert info.value.code == 2
    assert "pip install kcp-plugin[deploy]" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_latency_target_from_the_command_line(tmp_path, capsys, monkeypatch):
    """--target-latency prunes by measured latency; the report JSON says what was measured.
    The search measures through a stand-in (latency = MACs), so the machine's load cannot
    make a 1 ms model's target unreachable; the CLI's own latency line is measured for real."""
    import kcp_plugin.deploy.search as search
    from kcp_plugin import count_macs_params
    from kcp_plugin.deploy.latency import LatencyStats

    def by_macs(models, example_inputs, *args, backend="torch", **kwargs):
        macs = [float(count_macs_params(m, example_inputs)[0]) for m in models]
        return [LatencyStats(v, v, v, 3, 1, backend) for v in macs]

    monkeypatch.setattr(search, "compare_latency", by_macs)
    out = tmp_path / "r.json"
    code = main(["--model", SPEC, "--input-shape", "1,3,32,32", "--target-latency", "0.7",
                 "--round-to", "auto", "--latency-runs", "3", "--json", str(out), "-q"])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["target_latency_ratio"] == 0.7 and report["latency_backend"] == "torch"
    assert report["round_to"] in (None, 8, 16) and report["latency_search"]


def test_unreachable_latency_target_is_a_pruning_failure(capsys):
    """Exit 1 (pruning failed), not 2 (invalid arguments): the arguments were fine."""
    code = main(["--model", SPEC, "--input-shape", "1,3,32,32", "--target-latency", "0.01",
                 "--latency-runs", "3", "-q"])
    assert code == 1
    assert "pruning failed: target_latency_ratio=0.01" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_gpu_widths_from_a_machine_without_a_gpu(tmp_path, capsys):
    """A MACs target for a CUDA deployment prunes here (widths on cuda's multiple); a latency
    target, which must measure on the GPU, is a usage error naming the way out."""
    out = tmp_path / "r.json"
    code = main(["--model", SPEC, "--model-arg", "width=256", "--input-shape", "1,3,8,8",
                 "--target-macs", "0.5", "--latency-backend", "cuda", "--dtype", "bf16",
                 "--json", str(out), "-q"])
    assert code == 0, capsys.readouterr().err
    report = json.loads(out.read_text())
    assert report["round_to"] in (16, 32) and report["latency_before_ms"] is None
    assert all(w % report["round_to"] == 0 for n, w in report["widths_after"].items()
               if n != "fc")
    with pytest.raises(SystemExit) as info:
        main(["--model", SPEC, "--input-shape", "1,3,16,16", "--target-latency", "0.5",
              "--latency-backend", "cuda", "-q"])
    assert info.value.code == 2
    assert "needs an NVIDIA GPU" in capsys.readouterr().err


def test_latency_target_with_a_macs_cap_from_the_command_line(tmp_path, monkeypatch):
    """--target-latency with --target-macs: the MACs cap on top of the latency target (table
    allocation); latency measured through a stand-in (latency = MACs), and the report JSON is
    strict (no NaN)."""
    import kcp_plugin.deploy.search as search
    from kcp_plugin import count_macs_params
    from kcp_plugin.deploy.latency import LatencyStats

    def by_macs(models, example_inputs, *args, backend="torch", **kwargs):
        macs = [float(count_macs_params(m, example_inputs)[0]) for m in models]
        return [LatencyStats(v, v, v, 3, 1, "torch") for v in macs]

    monkeypatch.setattr(search, "compare_latency", by_macs)
    out = tmp_path / "r.json"
    code = main(["--model", SPEC, "--model-arg", "width=32", "--input-shape", "1,3,16,16",
                 "--target-latency", "0.95", "--target-macs", "0.5", "--latency-runs", "3",
                 "--json", str(out), "-q"])
    assert code == 0
    text = out.read_text()
    assert "NaN" not in text
    report = json.loads(text)
    assert report["macs_after"] / report["macs_before"] <= 0.52
    assert report["latency_allocation"] == "table" and report["target_latency_ratio"] == 0.95
