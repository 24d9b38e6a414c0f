"""One rank of the 2-process (gloo, CPU) DDP test of training-time pruning in timm.

    python -m torch.distributed.run --nproc_per_node 2 tests/timm_ddp.py script WORK_DIR DATA_DIR
    python -m torch.distributed.run --nproc_per_node 2 tests/timm_ddp.py loop WORK_DIR

Two runs, one launch each (a process group made again in the same processes hangs), each
writing what tests/test_timm.py compares across ranks to ``WORK_DIR/{run}_rank{r}.json``
(final plan, MACs, a checksum of the weights, whether the DDP wrapper holds the pruned model's
own parameters):

* ``script``: pytorch-image-models' real ``train.py`` (``tests/timm_scripts/train.py``) under
  ``tools/timm_train.py --train-script``, pruned with KCP at two points. timm creates the DDP
  wrapper itself; every rank sees other images (DistributedSampler), so equal final weights
  show that gradients were still all-reduced after the wrapper was re-made.
* ``loop``: a loop of one's own with ``TimmPruningSchedule(..., ddp=wrapper)`` and ``taylor``,
  a criterion scored from gradients of each rank's own batch: ranks agree only because the
  gradients are averaged over the ranks before scoring.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]


def _checksum(model: torch.nn.Module) -> float:
    return float(sum(p.detach().double().sum() for p in model.parameters()))


def _write(work_dir: str, run: str, model: torch.nn.Module, wrapper: torch.nn.Module,
           x: torch.Tensor, **extra) -> None:
    from kcp_plugin import count_macs_params, get_plan

    out = {"plan": get_plan(model), "macs": count_macs_params(model, x)[0],
           "checksum": _checksum(model), "world_size": int(os.environ["WORLD_SIZE"]),
           "wrapper_holds_model_params": {id(p) for p in wrapper.parameters()}
           == {id(p) for p in model.parameters()}, **extra}
    with open(os.path.join(work_dir, f"{run}_rank{os.environ['RANK']}.json"), "w") as f:
        json.dump(out, f)


def run_script(work_dir: str, data_dir: str) -> None:
    spec = importlib.util.spec_from_file_location("timm_train_tool", REPO / "tools/timm_train.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    import kcp_plugin.integrations.timm  # noqa: F401

    argv = [data_dir, "--model", "resnet18", "--num-classes", "2", "--input-size", "3", "16",
            "16", "-b", "2", "--lr", "0.01", "--epochs", "1", "--warmup-epochs", "0", "-j", "0",
            "--device", "cpu", "--output", os.path.join(work_dir, "out"), "--experiment", "ddp",
            "--log-interval", "1", "--kcp-target-macs", "0.5", "--kcp-num-prunes", "2",
            "--kcp-start", "1", "--kcp-every", "1"]
    kcp, rest = tool.parse_kcp(argv)
    schedule = tool.run_train_script(str(REPO / "tests/timm_scripts/train.py"), kcp, rest)
    assert schedule is not None and len(schedule.ddp) == 1, "the DDP wrapper was not captured"
    _write(work_dir, "script", schedule.model, schedule.ddp[0], torch.zeros(1, 3, 16, 16),
           pruned_at=schedule.pruned_at)


def run_loop(work_dir: str) -> None:
    import timm
    from torch.nn.parallel import DistributedDataParallel

    from kcp_plugin.integrations.timm import TimmPruningSchedule

    torch.manual_seed(0)  # same initial weights (DDP would broadcast rank 0's anyway)
    model = timm.create_model("resnet18", num_classes=3)
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(100 + dist.get_rank())  # each rank its own data
    batches = [(torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 3, (4,), generator=g))
               for _ in range(5)]
    latest = {}

    def loss_fn(m: torch.nn.Module) -> torch.Tensor:
        inputs, target = latest["batch"]
        return torch.nn.functional.cross_entropy(m(inputs), target)

    schedule = TimmPruningSchedule(model, optimizer, "taylor", input_size=16,
                                   target_macs_ratio=0.5, num_prunes=2, start=1, every=2,
                                   loss_fn=loss_fn, ddp=ddp).attach()
    for inputs, target in batches:
        latest["batch"] = (inputs, target)
        loss = torch.nn.functional.cross_entropy(ddp(inputs), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    _write(work_dir, "loop", model, ddp, torch.zeros(1, 3, 16, 16), pruned_at=schedule.pruned_at)


def main() -> None:
    run, work_dir = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    if run == "script":
        # train.py initialises (timm.utils.init_distributed_device) and destroys its own group
        run_script(work_dir, sys.argv[3])
    else:
        dist.init_process_group("gloo")
        run_loop(work_dir)
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
