# Prune with KCP to half the MACs in 5 steps, 2k iterations apart, from the first iteration
# (linear ramp), keeping channel counts multiples of 8; training then goes on as fine-tuning.
# Only `custom_hooks` here, so it combines with any mmseg config as a second base.
custom_hooks = [
    dict(
        type='kcp_plugin.PruningHook',
        importance='kcp',
        target_macs_ratio=0.5,
        schedule=dict(num_prunes=5, start=0, every=2000, ramp='linear', mode='hard'),
        prune_kwargs=dict(round_to=8)),
]
