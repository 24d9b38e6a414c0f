"""One rank of the 2-process (gloo, CPU) DDP test of the mmseg PruningHook; run with torchrun.

    python -m torch.distributed.run --nproc_per_node 2 tests/mmseg_ddp.py WORK_DIR DATA_ROOT

Trains the generated CPU recipe with ``taylor`` (a criterion whose scores depend on each rank's
batch, so ranks deciding on their own would diverge) for a few iterations with two pruning
points, and writes, per rank, the final pruning plan, the model's MACs and a checksum of its
weights to ``WORK_DIR/rank{r}.json`` for tests/test_mmseg.py to compare.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    work_dir, data_root = sys.argv[1], sys.argv[2]
    # mmengine's pytorch launcher calls torch.cuda.set_device, which fails on a CPU-only
    # machine; with the process group already up, the Runner skips its own initialisation.
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)

    from mmengine.config import Config
    from mmengine.model import is_model_wrapper
    from mmengine.runner import Runner

    import kcp_plugin.integrations.mmseg  # noqa: F401  (registers kcp_plugin.* types)
    from kcp_plugin import count_macs_params, get_plan

    cfg = Config.fromfile(str(REPO / "configs/mmseg/fcn_r18-tiny_kcp50_generated-64x64_cpu.py"))
    cfg.work_dir = work_dir
    cfg.launcher = "pytorch"
    # DDP on CPU modules takes no device_ids (mmengine would pass [LOCAL_RANK])
    cfg.model_wrapper_cfg = dict(type="MMDistributedDataParallel", device_ids=None)
    cfg.train_dataloader.dataset.data_root = f"{data_root}/train"
    cfg.val_dataloader.dataset.data_root = f"{data_root}/val"
    cfg.test_dataloader = cfg.val_dataloader
    cfg.train_dataloader.batch_size = 2
    cfg.train_cfg = dict(type="IterBasedTrainLoop", max_iters=8, val_interval=1000)
    cfg.param_scheduler = []
    cfg.default_hooks.checkpoint = dict(type="CheckpointHook", by_epoch=False, interval=1000)
    cfg.default_hooks.logger = dict(type="LoggerHook", interval=1000)
    cfg.log_level = "WARNING"
    cfg.custom_hooks = [dict(type="kcp_plugin.PruningHook", importance="taylor",
                             target_macs_ratio=0.5, schedule=dict(num_prunes=2, start=1,
                                                                  every=3))]
    runner = Runner.from_cfg(cfg)
    runner.train()
    assert is_model_wrapper(runner.model), "the model should still be DDP-wrapped"
    model = runner.model.module
    # the wrapper must hold the pruned module's own parameters (it was re-made around it)
    assert {id(p) for p in runner.model.parameters()} == {id(p) for p in model.parameters()}
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    macs = count_macs_params(model, x, lambda m, t: m(t, mode="tensor"))[0]
    checksum = float(sum(p.detach().double().sum() for p in model.parameters()))
    out = {"rank": rank, "plan": get_plan(model), "macs": macs, "checksum": checksum,
           "world_size": dist.get_world_size()}
    with open(os.path.join(work_dir, f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
