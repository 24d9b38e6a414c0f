# pspnet_r50-d8_kcp50_4xb2-40k_cityscapes-512x1024, distilling from the dense model while it is
# pruned: mmseg's trained PSPNet-R50 (load_from) is the frozen teacher, and channel-wise
# distillation of the decode head's logits (Shu et al., ICCV 2021: T = 4, weight 3, their
# Cityscapes setting) joins the loss. Logged as `loss_distill_out` beside mmseg's losses; the
# teacher is written once to work_dir/distill_teacher.pth (resume reads it). See docs/mmseg.md.
# Not trained here (no GPU, no Cityscapes).
_base_ = ['./pspnet_r50-d8_kcp50_4xb2-40k_cityscapes-512x1024.py']
custom_hooks = [
    dict(
        type='kcp_plugin.PruningHook',
        importance='kcp',
        target_macs_ratio=0.5,
        schedule=dict(num_prunes=5, start=0, every=2000, ramp='linear', mode='hard'),
        prune_kwargs=dict(round_to=8),
        distill=dict(
            type='cwd',
            temperature=4.0,
            weight=3.0,
            # feature terms as well (MSE to the teacher's kept channels):
            # layers=['backbone.layer4'], layer_weight=1.0,
        )),
]
