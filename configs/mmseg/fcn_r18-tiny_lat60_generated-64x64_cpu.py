# The CPU recipe (fcn_r18-tiny_kcp50_generated-64x64_cpu.py: a narrow FCN-ResNet18 on generated
# scenes) pruned to a LATENCY target instead of a MACs target: the network keeps 60% of the
# dense network's latency in eager PyTorch on this CPU (1 thread, batch 8, the training batch),
# measured on the traced forward at the 64 x 64 training crop. Three pruning points at iterations
# 0, 10 and 20: the first two follow the MACs ramp (to 0.6 read as a MACs fraction), the last
# measures what they kept of the dense latency and prunes with kcp_plugin.prune's latency target
# for the rest (a latency table of the net's layers, widths chosen by a knapsack on the KCP
# scores, verified end to end). The latency table is measured on first use (about half a
# minute) and cached under $KCP_CACHE/latency. Run as the MACs recipe (docs/mmseg.md):
#   OMP_NUM_THREADS=1 python mmseg/.mim/tools/train.py \
#       configs/mmseg/fcn_r18-tiny_lat60_generated-64x64_cpu.py
# The log line "kcp_plugin: latency target at iter 20: ..." gives the latency kept; test the
# checkpoint with the MACs recipe's deploy config and --cfg-options model.plan=<checkpoint>.
# At batch 1 this net's latency is mostly per-layer overhead: 0.5 of it is out of reach there.
_base_ = ['./fcn_r18-tiny_kcp50_generated-64x64_cpu.py']

custom_hooks = [
    dict(
        type='kcp_plugin.PruningHook',
        importance='kcp',
        target_latency_ratio=0.6,
        latency_backend=dict(name='torch', threads=1, batch=8, runs=20),
        latency_allocation='table',
        schedule=dict(num_prunes=3, start=0, every=10)),
]
