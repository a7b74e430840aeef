"""Several processes under torchrun (DDP: gloo on CPU, nccl on GPU): the process group, and
rank 0 doing the work the others then read (downloads, validation, files)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed

from mmdet_mlflow.training.settings import FinetuneError


@dataclass
class Processes:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def join_process_group(device: str) -> Processes:
    """torchrun's environment; the process group is set up here (mmengine's own setup calls
    torch.cuda.set_device, which a CPU-only torch does not have)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Processes()
    processes = Processes(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not torch.distributed.is_initialized():
        if device == "cuda":
            torch.cuda.set_device(processes.local_rank)
        torch.distributed.init_process_group(backend="nccl" if device == "cuda" else "gloo")
    return processes


def main_first(processes: Processes, work):
    """``work(main=True)`` on rank 0 (downloads, validation, files), then ``work(main=False)``
    on the others; a failure on rank 0 stops them all with its message instead of a hang."""
    if processes.world_size == 1:
        return work(True)
    failure, value = [None], None
    if processes.is_main:
        try:
            value = work(True)
        except Exception as err:
            failure = [f"{type(err).__name__}: {err}"]
            torch.distributed.broadcast_object_list(failure, src=0)
            raise
    torch.distributed.broadcast_object_list(failure, src=0)
    if failure[0] is not None:
        raise FinetuneError(f"rank 0 failed: {failure[0]}")
    return value if processes.is_main else work(False)
