# fcn_r50-d8_4xb4-160k_ade20k-512x512:
# pruned to half its MACs with KCP while fine-tuning the trained model from mmseg's model zoo
# (load_from). Train with mmseg's tools/train.py or dist_train.sh; see docs/mmseg.md.
_base_ = [
    'mmseg::fcn/fcn_r50-d8_4xb4-160k_ade20k-512x512.py',
    './_base_/kcp_prune_finetune.py',
]
model = dict(pretrained=None)  # the trained weights come from load_from
# fine-tuning: 40k iterations (half of training from scratch)
train_cfg = dict(max_iters=40000, val_interval=4000)
param_scheduler = [
    dict(type='PolyLR', eta_min=1e-4, power=0.9, begin=0, end=40000, by_epoch=False)
]
load_from = (
    'https://download.openmmlab.com/mmsegmentation/v0.5/fcn/fcn_r50-d8_512x512_160k_ade20k/'
    'fcn_r50-d8_512x512_160k_ade20k_20200615_100713-4edbc3b4.pth')
