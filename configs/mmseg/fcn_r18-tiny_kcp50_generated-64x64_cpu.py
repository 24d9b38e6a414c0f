# A recipe that runs anywhere in minutes, on the CPU: a narrow FCN-ResNet18 (mmseg's FCN config,
# channels cut to 8-64) on kcp_plugin's generated scenes (written as PNGs on first use), pruned
# to half its MACs with KCP in 3 steps during a 60-iteration training. CI trains it.
#   python mmseg/.mim/tools/train.py configs/mmseg/fcn_r18-tiny_kcp50_generated-64x64_cpu.py
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
    decode_head=dict(
        in_channels=64, channels=16, num_classes=num_classes, norm_cfg=norm_cfg),
    auxiliary_head=dict(
        in_channels=32, channels=8, num_classes=num_classes, norm_cfg=norm_cfg))

dataset_type = 'kcp_plugin.GeneratedSegDataset'
data_root = 'data/kcp_generated'
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
    batch_size=4,
    num_workers=0,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(
        type=dataset_type,
        data_root=data_root + '/train',
        num_images=32,
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
        data_root=data_root + '/val',
        num_images=8,
        size=crop_size,
        num_classes=num_classes,
        seed=1,
        pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(type='IoUMetric', iou_metrics=['mIoU'])
test_evaluator = val_evaluator

optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='SGD', lr=0.05, momentum=0.9, weight_decay=1e-4))
max_iters = 60
param_scheduler = [
    dict(type='PolyLR', eta_min=1e-4, power=0.9, begin=0, end=max_iters, by_epoch=False)
]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=max_iters)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=10, log_metric_by_epoch=False),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=20),
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
