# Prune with KCP to half the MACs in 5 steps, 2k iterations apart, from the first iteration
# (linear ramp), keeping channel counts multiples of 8; training then goes on as fine-tuning.
# Only `custom_hooks` (and the integration's import) here, so it combines with any mmseg config
# as a second base.
# Imported when the config is loaded (Config.fromfile), so that mmengine's checkpoint loading
# knows pruned checkpoints in every entry point, init_model and tools/test.py included.
custom_imports = dict(imports=['kcp_plugin.integrations.mmseg'], allow_failed_imports=False)
custom_hooks = [
    dict(
        type='kcp_plugin.PruningHook',
        importance='kcp',
        target_macs_ratio=0.5,
        schedule=dict(num_prunes=5, start=0, every=2000, ramp='linear', mode='hard'),
        prune_kwargs=dict(round_to=8)),
]
