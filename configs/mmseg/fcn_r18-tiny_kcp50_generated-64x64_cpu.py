# A recipe that runs anywhere in minutes, on the CPU: a narrow FCN-ResNet18 (mmseg's FCN config,
# backbone channels cut to 8-64) on kcp_plugin's generated scenes (written as PNGs on first use),
# pruned to half its MACs with KCP in 3 steps (iterations 0, 10, 20) of a 1500-iteration training
# that ends near 47 mIoU (dense: 53; background only: 15.5). About 2 minutes on one core:
#   OMP_NUM_THREADS=1 python mmseg/.mim/tools/train.py \
#       configs/mmseg/fcn_r18-tiny_kcp50_generated-64x64_cpu.py
# (measurements and the dense run in docs/mmseg.md). The tests train it for fewer iterations.
_base_ = [
    'mmseg::_base_/models/fcn_r50-d8.py',
    'mmseg::_base_/default_runtime.py',
]
# Imported when the config is loaded (Config.fromfile), so that mmengine's checkpoint loading
# knows pruned checkpoints in every entry point, init_model and tools/test.py included.
custom_imports = dict(imports=['kcp_plugin.integrations.mmseg'], allow_failed_imports=False)
norm_cfg = dict(type='BN', requires_grad=True)  # not SyncBN: CPU, one process
crop_size = (64, 64)
num_classes = 5
# Background is ~77% of the pixels and its loss counts a fifth: unweighted, the net learns the
# other classes later and ends lower (39.5 instead of 48.4 mIoU; docs/mmseg.md).
class_weight = [0.2] + [1.0] * (num_classes - 1)
data_preprocessor = dict(
    type='SegDataPreProcessor',
    mean=[127.5, 127.5, 127.5],
    std=[64.0, 64.0, 64.0],
    bgr_to_rgb=True,
    pad_val=0,
    seg_pad_val=255,
    size=crop_size)
model = dict(
    data_preprocessor=data_preprocessor,
    pretrained=None,
    backbone=dict(depth=18, stem_channels=16, base_channels=8, norm_cfg=norm_cfg),
    # a 64-channel FCN head (16 channels: 33 instead of 45 mIoU in a 1000-iteration test run)
    decode_head=dict(
        in_channels=64, channels=64, num_classes=num_classes, norm_cfg=norm_cfg,
        loss_decode=dict(class_weight=class_weight)),
    auxiliary_head=dict(
        in_channels=32, channels=8, num_classes=num_classes, norm_cfg=norm_cfg,
        loss_decode=dict(class_weight=class_weight)))

dataset_type = 'kcp_plugin.GeneratedSegDataset'
# A split is generated once and reused while its directory holds a DONE file, whatever
# num_images / size / seed say now: a new setting needs a new directory name.
data_root = 'data/kcp_generated_64x64_c5'
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='PackSegInputs'),
]
train_dataloader = dict(
    batch_size=8,
    num_workers=0,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(
        type=dataset_type,
        data_root=data_root + '/train1024',
        num_images=1024,
        size=crop_size,
        num_classes=num_classes,
        seed=0,
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1,
    num_workers=0,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        type=dataset_type,
        data_root=data_root + '/val64',
        num_images=64,
        size=crop_size,
        num_classes=num_classes,
        seed=1,
        pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(type='IoUMetric', iou_metrics=['mIoU'])
test_evaluator = val_evaluator

optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='SGD', lr=0.1, momentum=0.9, weight_decay=1e-4))
max_iters = 1500
param_scheduler = [
    dict(type='PolyLR', eta_min=1e-5, power=0.9, begin=0, end=max_iters, by_epoch=False)
]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=500)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=100, log_metric_by_epoch=False),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=500),
    sampler_seed=dict(type='DistSamplerSeedHook'),
    visualization=dict(type='SegVisualizationHook'))
env_cfg = dict(dist_cfg=dict(backend='gloo'))
randomness = dict(seed=0)

custom_hooks = [
    dict(
        type='kcp_plugin.PruningHook',
        importance='kcp',
        target_macs_ratio=0.5,
        schedule=dict(num_prunes=3, start=0, every=10)),
]
