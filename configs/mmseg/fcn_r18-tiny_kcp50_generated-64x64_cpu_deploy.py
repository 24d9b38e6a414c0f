# Test / deploy the pruned model trained by fcn_r18-tiny_kcp50_generated-64x64_cpu.py: the
# original architecture is built from that config and given the saved pruning structure, then
# mmseg loads the checkpoint as usual:
#   python mmseg/.mim/tools/test.py configs/mmseg/fcn_r18-tiny_kcp50_generated-64x64_cpu_deploy.py \
#       work_dirs/fcn_r18-tiny_kcp50_generated-64x64_cpu/iter_1500.pth
# `plan` may name the checkpoint itself, or the kcp_pruning_plan.json the hook writes next to it
# (--cfg-options model.plan=...).
_base_ = ['./fcn_r18-tiny_kcp50_generated-64x64_cpu.py']
custom_hooks = []  # no pruning at test time
model = dict(
    _delete_=True,
    type='kcp_plugin.PrunedSegmentor',
    model={{_base_.model}},
    plan='work_dirs/fcn_r18-tiny_kcp50_generated-64x64_cpu/kcp_pruning_plan.json')
