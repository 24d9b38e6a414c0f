"""mmseg cascade segmentors (``CascadeEncoderDecoder``): PointRend (FPNHead + PointHead) and
OCRNet (FCNHead + OCRHead), tiny, with the real mmseg heads and mmcv's ``point_sample``.

mmseg's own tensor mode fails for PointRend (its point head classifies sampled points, not
feature maps); the plugin traces a cascade through its heads in turn, a point head refining
the logits at its test-time points as ``predict`` does. Checked here: that forward is mmseg's
inference, ``kcp_plugin.prune`` and the ``PruningHook`` prune both cascades (the neck's channels
read by the point head with them), the plan round trip gives the same outputs, and what
cannot be run is refused by name before the model is touched.
"""

from __future__ import annotations

import copy
import uuid
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from mmengine.config import Config, ConfigDict
from mmengine.registry import MODELS, DefaultScope
from mmengine.runner import Runner
from mmengine.runner.checkpoint import load_checkpoint

import kcp_plugin
import kcp_plugin.integrations.mmseg as kmm
from kcp_plugin import UnprunableError, count_macs_params, get_plan

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "configs" / "mmseg" / "fcn_r18-tiny_kcp50_generated-64x64_cpu.py"
NUM_CLASSES = 5  # the generated scenes' classes
ITERS = 4
BN = dict(type="BN", requires_grad=True)
LOSS = dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0)
# mmseg's ResNetV1c at 8-64 channels (the CPU recipe's widths)
BACKBONE = dict(type="ResNetV1c", depth=18, stem_channels=16, base_channels=8, num_stages=4,
                out_indices=(0, 1, 2, 3), dilations=(1, 1, 1, 1), strides=(1, 2, 2, 2),
                norm_cfg=BN, norm_eval=False, style="pytorch", contract_dilation=True)
PREPROCESSOR = dict(type="SegDataPreProcessor", mean=[127.5] * 3, std=[64.0] * 3,
                    bgr_to_rgb=True, pad_val=0, seg_pad_val=255, size=(64, 64))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny convs gain nothing from intra-op threads; on a busy 2-core machine they lose."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pointrend_cfg() -> ConfigDict:
    """mmseg's ``_base_/models/pointrend_r50.py`` with a tiny ResNet and FPN."""
    return Config(dict(model=dict(
        type="CascadeEncoderDecoder", num_stages=2, data_preprocessor=PREPROCESSOR,
        pretrained=None, backbone=BACKBONE,
        neck=dict(type="FPN", in_channels=[8, 16, 32, 64], out_channels=16, num_outs=4),
        decode_head=[
            dict(type="FPNHead", in_channels=[16] * 4, in_index=[0, 1, 2, 3],
                 feature_strides=[4, 8, 16, 32], channels=16, dropout_ratio=-1,
                 num_classes=NUM_CLASSES, norm_cfg=BN, align_corners=False, loss_decode=LOSS),
            dict(type="PointHead", in_channels=[16], in_index=[0], channels=16, num_fcs=3,
                 coarse_pred_each_layer=True, dropout_ratio=-1, num_classes=NUM_CLASSES,
                 align_corners=False, loss_decode=LOSS)],
        train_cfg=dict(num_points=256, oversample_ratio=3, importance_sample_ratio=0.75),
        test_cfg=dict(mode="whole", subdivision_steps=2, subdivision_num_points=512,
                      scale_factor=2)))).model


def ocr_cfg() -> ConfigDict:
    """mmseg's ``_base_/models/ocrnet_r50-d8.py`` (FCNHead, then OCRHead) with a tiny ResNet."""
    return Config(dict(model=dict(
        type="CascadeEncoderDecoder", num_stages=2, data_preprocessor=PREPROCESSOR,
        pretrained=None, backbone=dict(BACKBONE, dilations=(1, 1, 2, 4), strides=(1, 2, 1, 1)),
        decode_head=[
            dict(type="FCNHead", in_channels=32, in_index=2, channels=16, num_convs=1,
                 concat_input=False, dropout_ratio=0.0, num_classes=NUM_CLASSES, norm_cfg=BN,
                 align_corners=False, loss_decode=dict(LOSS, loss_weight=0.4)),
            dict(type="OCRHead", in_channels=64, in_index=3, channels=16, ocr_channels=8,
                 dropout_ratio=0.0, num_classes=NUM_CLASSES, norm_cfg=BN, align_corners=False,
                 loss_decode=LOSS)],
        train_cfg=dict(), test_cfg=dict(mode="whole")))).model


CASCADES = {"pointrend": pointrend_cfg, "ocr": ocr_cfg}


def build_model(cfg: dict) -> nn.Module:
    """``cfg`` built as mmseg's configs are (its ``default_scope``)."""
    with DefaultScope.overwrite_default_scope("mmseg"):
        return MODELS.build(cfg)


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return build_model(CASCADES[name]()).eval()


def metas(x: torch.Tensor) -> list[dict]:
    shape = tuple(x.shape[-2:])
    return [dict(img_shape=shape, ori_shape=shape, pad_shape=shape)] * len(x)


def convs_out(module: nn.Module) -> list[int]:
    return [m.out_channels for m in module.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d))]


# --------------------------------------------------------------------------- the forward
def test_tensor_forward_is_mmseg_inference_where_tensor_mode_fails():
    model = build("pointrend")
    x = kmm.example_inputs(model)
    with torch.no_grad():
        with pytest.raises(TypeError):  # mmseg's own tensor mode (the error)
            model(x, mode="tensor")
        ours = kmm.tensor_forward(model, x)
        # encode_decode: the point head's predict, then the resize to the image (a no-op here:
        # the coarse 16 x 16 logits are refined twice at scale 2)
        assert torch.equal(ours, model.encode_decode(x, metas(x)))
        assert torch.equal(kmm.trace_forward(model, x)[0], ours)
    ocr = build("ocr")
    with torch.no_grad():  # where mmseg's tensor mode works, it is what runs
        assert torch.equal(kmm.tensor_forward(ocr, x), ocr(x, mode="tensor"))
        assert torch.equal(kmm.trace_forward(ocr, x)[0], ocr(x, mode="tensor"))


# --------------------------------------------------------------------------- prune + replay
@pytest.mark.parametrize("name", sorted(CASCADES))
def test_prune_cascade_and_round_trip(name, tmp_path):
    model = build(name)
    x = kmm.example_inputs(model)
    dense = copy.deepcopy(model)
    report = kcp_plugin.prune(model, x, "kcp", target_macs_ratio=0.5, progress=False)
    assert abs(report.macs_after / report.macs_before - 0.5) < 0.03
    # the MACs the target counts are the deployed network's (mmseg's inference)
    macs = count_macs_params(model, x, kmm.tensor_forward)[0]
    assert abs(macs / count_macs_params(dense, x, kmm.tensor_forward)[0] - 0.5) < 0.03
    heads = model.decode_head
    assert all(h.num_classes == NUM_CLASSES for h in heads)
    if name == "pointrend":
        point = heads[1]
        assert point.fc_seg.out_channels == NUM_CLASSES  # protected: it writes the logits
        # the fcs were pruned, and the neck level the point head samples with them: its first
        # fc reads that level's (pruned) channels plus the coarse logits
        assert max(f.conv.out_channels for f in point.fcs) < 16
        level0 = model.neck.fpn_convs[0].conv.out_channels
        assert level0 < 16
        assert point.fcs[0].conv.in_channels == level0 + NUM_CLASSES
    else:
        assert heads[0].conv_seg.out_channels == heads[1].conv_seg.out_channels == NUM_CLASSES
        assert sum(convs_out(heads[1])) < sum(convs_out(dense.decode_head[1]))
    assert sum(convs_out(model.backbone)) < sum(convs_out(dense.backbone))
    with torch.no_grad():
        out = model.encode_decode(x, metas(x))
        assert out.shape == (1, NUM_CLASSES, 64, 64)
        # the deployed logits before the resize to the image (OCRNet's are at 1/8 scale)
        deployed = out if name == "pointrend" else model(x, mode="tensor")
        assert torch.equal(kmm.tensor_forward(model, x), deployed)
    # training still runs (PointRend: random training points, mmseg's own loss)
    sample = _sample()
    model.train()
    losses = model(x.repeat(2, 1, 1, 1), [sample, copy.deepcopy(sample)], mode="loss")
    assert all(torch.isfinite(v).all() for k, v in losses.items() if "loss" in k)
    model.eval()
    # plan round trip: a fresh dense model, the plan replayed, the weights loaded
    kcp_plugin.save_pruned(model, tmp_path / "pruned.pth")
    loaded = kcp_plugin.load_pruned(lambda: build(name), tmp_path / "pruned.pth").eval()
    assert get_plan(loaded) == get_plan(model)
    with torch.no_grad():
        assert torch.equal(loaded.encode_decode(x, metas(x)), model.encode_decode(x, metas(x)))


def _sample():
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample

    gen = torch.Generator().manual_seed(0)
    sample = SegDataSample(gt_sem_seg=PixelData(
        data=torch.randint(0, NUM_CLASSES, (1, 64, 64), generator=gen)))
    sample.set_metainfo(dict(img_shape=(64, 64), ori_shape=(64, 64), pad_shape=(64, 64)))
    return sample


def test_mmseg_packaged_pointrend_config_prunes():
    """mmseg's own PointRend (R50 + FPN, 19 classes, its test_cfg: 8196 points, 2 steps),
    SyncBN made BN for one CPU process, at 64 x 64 (about 4 s)."""
    import mmseg

    path = Path(mmseg.__file__).parent / ".mim" / "configs" / "point_rend" / \
        "pointrend_r50_4xb2-80k_cityscapes-512x1024.py"
    cfg = Config.fromfile(str(path)).model
    cfg.pretrained = None
    for part in [cfg.backbone, *cfg.decode_head]:
        if "norm_cfg" in part:
            part.norm_cfg = BN
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    x = kmm.example_inputs(model, (64, 64))
    report = kcp_plugin.prune(model, x, "kcp", target_macs_ratio=0.5, progress=False)
    assert abs(report.macs_after / report.macs_before - 0.5) < 0.03
    point = model.decode_head[1]
    assert point.fc_seg.out_channels == 19
    assert point.fcs[0].conv.in_channels == model.neck.fpn_convs[0].conv.out_channels + 19
    with torch.no_grad():
        assert model.encode_decode(x, metas(x)).shape == (1, 19, 64, 64)


# --------------------------------------------------------------------------- refusals
def test_point_head_without_its_test_cfg_is_refused_by_name_before_pruning():
    cfg = pointrend_cfg()
    cfg.test_cfg = dict(mode="whole")  # no subdivision settings
    model = build_model(cfg)
    x = kmm.example_inputs(model)
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(UnprunableError, match=r"decode_head\.1 \(PointHead\).*"
                       r"subdivision_steps=None.*set test_cfg=dict"):
        kcp_plugin.prune(model, x, "kcp", target_macs_ratio=0.5, progress=False)
    assert {k: v.shape for k, v in model.state_dict().items()} == \
        {k: v.shape for k, v in state.items()}


def test_a_cascade_head_that_fails_is_named():
    model = build("ocr")

    def broken(feats, prev):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    model.decode_head[1].forward = broken
    with pytest.raises(UnprunableError, match=r"decode_head\.1 \(OCRHead\) could not be run on "
                       r"the features and decode_head\.0's logits \(RuntimeError: mat1"):
        kmm.tensor_forward(model, kmm.example_inputs(model))


# --------------------------------------------------------------------------- PruningHook
@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("kcp_cascade_scenes"))


def run_cfg(name: str, work_dir, data_root: str, **hook) -> Config:
    """The CPU recipe's runtime and generated scenes, training a tiny cascade for ITERS
    iterations with the hook (one-shot KCP to half the MACs), a checkpoint at the end."""
    cfg = Config.fromfile(str(RECIPE))
    cfg.model = CASCADES[name]()
    cfg.work_dir = str(work_dir)
    cfg.experiment_name = f"kcp-cascade-{uuid.uuid4().hex[:8]}"
    cfg.visualizer.name = cfg.experiment_name
    for loader, split, n in ((cfg.train_dataloader, "train", 16), (cfg.val_dataloader, "val", 2)):
        loader.dataset.data_root = f"{data_root}/{split}{n}"
        loader.dataset.num_images = n
        loader.dataset.pipeline = cfg.test_pipeline
    cfg.train_dataloader.batch_size = 2
    cfg.test_dataloader = cfg.val_dataloader
    cfg.train_cfg = dict(type="IterBasedTrainLoop", max_iters=ITERS, val_interval=10**6)
    cfg.param_scheduler = [dict(type="PolyLR", eta_min=1e-4, power=0.9, begin=0, end=ITERS,
                                by_epoch=False)]
    cfg.default_hooks.checkpoint = dict(type="CheckpointHook", by_epoch=False, interval=ITERS)
    cfg.default_hooks.logger = dict(type="LoggerHook", interval=1000)
    cfg.log_level = "WARNING"
    cfg.randomness = dict(seed=0)
    cfg.custom_hooks = [dict(type="kcp_plugin.PruningHook", importance="kcp",
                             target_macs_ratio=0.5, **hook)]
    return cfg


@pytest.mark.parametrize("name", sorted(CASCADES))
def test_pruning_hook_prunes_a_cascade_in_training(name, tmp_path, data_root):
    cfg = run_cfg(name, tmp_path, data_root)
    runner = Runner.from_cfg(cfg)
    runner.train()  # used to fail in before_train (PointRend): TypeError from the point head
    model = kmm.structure.unwrap(runner.model).eval()
    hook = next(h for h in runner.hooks if isinstance(h, kmm.PruningHook))
    x = kmm.example_inputs(model)
    macs = count_macs_params(model, x, kmm.tensor_forward)[0]
    assert abs(macs / hook.macs_dense - 0.5) < 0.03
    assert runner.message_hub.get_info("kcp_plugin/macs") == macs
    assert get_plan(model)["history"]
    # the hook's checkpoint, through the deploy path: the dense config + the plan it holds
    ckpt = str(tmp_path / f"iter_{ITERS}.pth")
    rebuilt = build_model(dict(type="kcp_plugin.PrunedSegmentor", model=cfg.model, plan=ckpt))
    load_checkpoint(rebuilt, ckpt, map_location="cpu", strict=True)
    rebuilt.eval()
    with torch.no_grad():
        assert torch.equal(rebuilt.encode_decode(x, metas(x)), model.encode_decode(x, metas(x)))


@pytest.mark.parametrize("change, error, match", [
    (dict(test_cfg=dict(mode="whole")), UnprunableError,
     r"decode_head\.1 \(PointHead\).*subdivision_steps"),
    ("distill", ValueError, r"decode_head\.1 \(PointHead\) classifies points.*output=None"),
])
def test_pruning_hook_refuses_what_it_cannot_trace_before_training(change, error, match,
                                                                  tmp_path, data_root):
    hook = dict(distill=dict(type="kl")) if change == "distill" else {}
    cfg = run_cfg("pointrend", tmp_path, data_root, **hook)
    if isinstance(change, dict):
        for key, value in change.items():  # replaced, not merged
            cfg.model[key] = value
    runner = Runner.from_cfg(cfg)
    with pytest.raises(error, match=match):
        runner.train()
    assert not get_plan(kmm.structure.unwrap(runner.model))["history"]
    assert not list(Path(tmp_path).glob("iter_*.pth"))
