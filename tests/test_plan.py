"""Saved pruning plans: plain data, bit-exact round trips, no code execution on load."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
import torch.nn as nn
from conftest import ResBlockNet, Tiny3D, TinySeg

import kcp_plugin
from kcp_plugin.plan import apply_plan, get_plan


@pytest.mark.parametrize("builder,shape", [
    (ResBlockNet, (2, 3, 16, 16)), (TinySeg, (1, 3, 16, 16)), (Tiny3D, (1, 4, 4, 8, 8)),
], ids=["resnet", "seg", "3d"])
def test_round_trip_is_bit_exact(tmp_path, builder, shape):
    torch.manual_seed(0)
    model = builder().eval()
    x = torch.randn(*shape)
    kcp_plugin.prune(model, x, "kcp", pruning_ratio=0.4, progress=False)
    with torch.no_grad():  # weights that differ from a fresh init, as after fine-tuning
        for p in model.parameters():
            p.add_(0.01)
    path = tmp_path / "pruned.pt"
    kcp_plugin.save_pruned(model, path)
    loaded = kcp_plugin.load_pruned(builder, path, x).eval()
    assert torch.equal(loaded(x), model(x))
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)


def test_successive_prunes_accumulate_in_one_plan(tmp_path):
    model = ResBlockNet().eval()
    x = torch.randn(1, 3, 16, 16)
    r1 = kcp_plugin.prune(model, x, "kcp", pruning_ratio=0.25, progress=False)
    n1 = len(r1.plan["history"])
    r2 = kcp_plugin.prune(model, x, "l2", pruning_ratio=0.25, progress=False)
    assert len(r2.plan["history"]) > n1
    path = tmp_path / "twice.pt"
    kcp_plugin.save_pruned(model, path)
    loaded = kcp_plugin.load_pruned(ResBlockNet(), path, x).eval()
    assert loaded.stem[0].out_channels == model.stem[0].out_channels
    assert torch.equal(loaded(x), model(x))


def test_checkpoint_is_plain_data_loadable_with_weights_only(tmp_path):
    model = ResBlockNet().eval()
    x = torch.randn(1, 3, 16, 16)
    kcp_plugin.prune(model, x, "kcp", pruning_ratio=0.5, progress=False)
    path = tmp_path / "p.pt"
    kcp_plugin.save_pruned(model, path, extra={"note": "hello"})
    payload = torch.load(path, weights_only=True)
    plan = payload["kcp_plugin"]
    assert json.loads(json.dumps(plan)) == plan
    assert plan["format"] == "kcp_plugin.plan" and plan["version"] == 1
    assert payload["meta"] == {"note": "hello"}
    assert get_plan(model) == plan


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("touch /tmp/kcp_plugin_pwned",))


def test_loading_never_executes_pickled_code(tmp_path):
    marker = "/tmp/kcp_plugin_pwned"
    import os

    if os.path.exists(marker):
        os.remove(marker)
    path = tmp_path / "evil.pt"
    with open(path, "wb") as fh:
        pickle.dump({"kcp_plugin": _Evil(), "state_dict": {}}, fh)
    with pytest.raises(ValueError, match="evil.pt is not a kcp_plugin checkpoint"):
        kcp_plugin.load_pruned(ResBlockNet(), path, torch.randn(1, 3, 16, 16))
    assert not os.path.exists(marker)
    module_path = tmp_path / "module.pt"
    torch.save(ResBlockNet(), module_path)  # a pickled module is refused too, and named
    with pytest.raises(ValueError, match=r"holds a Python object \(conftest.ResBlockNet\) "
                                         "besides tensors") as info:
        kcp_plugin.read_checkpoint(module_path)
    assert "will likely succeed" not in str(info.value)  # not torch's advice to unpickle it


@pytest.mark.parametrize("content", [b"", bytes(range(256)) * 3], ids=["empty", "garbage"])
def test_a_file_that_is_not_a_checkpoint_is_named_so(tmp_path, content):
    path = tmp_path / "x.pt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="x.pt is not a kcp_plugin checkpoint: ") as info:
        kcp_plugin.load_pruned(ResBlockNet, path, torch.randn(1, 3, 16, 16))
    assert "weights_only" not in str(info.value)


def test_plan_for_another_architecture_is_refused_without_changes(tmp_path):
    model = ResBlockNet().eval()
    x = torch.randn(1, 3, 16, 16)
    kcp_plugin.prune(model, x, "kcp", pruning_ratio=0.5, progress=False)
    other = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    before = [p for p in other.parameters()]
    with pytest.raises(ValueError, match="does not have"):
        apply_plan(other, get_plan(model), x)
    assert list(other.parameters()) == before and other[0].out_channels == 8


def test_size_mismatch_is_an_error(tmp_path):
    model = ResBlockNet().eval()
    x = torch.randn(1, 3, 16, 16)
    kcp_plugin.prune(model, x, "kcp", pruning_ratio=0.5, progress=False)
    path = tmp_path / "p.pt"
    kcp_plugin.save_pruned(model, path)
    payload = torch.load(path, weights_only=True)
    payload["kcp_plugin"]["history"] = payload["kcp_plugin"]["history"][:1]
    torch.save(payload, path)
    with pytest.raises(RuntimeError, match="size mismatch"):
        kcp_plugin.load_pruned(ResBlockNet(), path, x, strict=False)


def test_vit_plan_restores_head_attributes(tmp_path):
    import timm  # installed by the test command (an extra); missing means a failure
    kw = dict(img_size=32, patch_size=8, depth=2, num_classes=10)
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", **kw).eval()
    x = torch.randn(1, 3, 32, 32)
    kcp_plugin.prune(model, x, "kcp", pruning_ratio=0.25, progress=False)
    path = tmp_path / "vit.pt"
    kcp_plugin.save_pruned(model, path)
    loaded = kcp_plugin.load_pruned(lambda: timm.create_model("vit_tiny_patch16_224", **kw),
                                    path, x).eval()
    assert loaded.blocks[0].attn.head_dim == model.blocks[0].attn.head_dim == 48
    assert torch.equal(loaded(x), model(x))


def test_reload_keeps_the_state_dict_metadata_modules_read(tmp_path):
    # torchvision's MNASNet reads its version from the state dict's metadata and refuses a
    # state dict without it; load_pruned used to drop that metadata
    import torchvision

    def build():
        return torchvision.models.mnasnet0_5(weights=None).eval()

    torch.manual_seed(0)
    model, x = build(), torch.randn(1, 3, 32, 32)
    kcp_plugin.prune(model, x, "l1", pruning_ratio=0.3, progress=False)
    kcp_plugin.save_pruned(model, tmp_path / "mnas.pt")
    loaded = kcp_plugin.load_pruned(build, tmp_path / "mnas.pt", x)
    assert torch.equal(loaded(x), model(x))
