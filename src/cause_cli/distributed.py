"""Several processes started by torchrun: data-parallel training, and segmenting in parts.

Below training and inference, which both use it (``cause segment --gpus N`` shares the
images out among its processes). ``cause train --gpus N`` starts ``N`` copies of itself
through ``torch.distributed.run`` (torchrun); a process started that way reads its rank from
the environment torchrun sets.
Every process trains on its own part of each global batch, gradients are averaged by
``DistributedDataParallel``, and only rank 0 writes into the run folder.

Unlike the reference, whose processes never average gradients and each keep their own concept
bank, the processes here compute exactly what one process computes with the global batch
(``N`` x ``--batch-size``): the teacher's projected tokens and their concepts are gathered
from every process, so each anchor sees the whole global batch, and the concept bank is filled
with every process's tokens in rank order, the same on every process. The only randomness
that differs is dropout.
"""

from __future__ import annotations

import gc
import inspect
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .errors import CauseError


@dataclass(frozen=True)
class ProcessGroup:
    """Where this process stands among the training processes (one process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def single_node(self) -> bool:
        return self.local_world_size == self.world_size

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_sum(self, values: torch.Tensor) -> torch.Tensor:
        """The sum over processes of ``values`` (in place; as it is with one process)."""
        if self.distributed:
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values

    def batch_sizes(self, local_size: int, device: torch.device) -> list[int]:
        """Every process's number of images in this step, in rank order."""
        if not self.distributed:
            return [local_size]
        sizes = torch.zeros(self.world_size, dtype=torch.long, device=device)
        sizes[self.rank] = local_size
        return [int(size) for size in self.all_sum(sizes).tolist()]

    def gather_objects(self, value: object) -> list[object]:
        """Every process's ``value`` (picklable), in rank order."""
        if not self.distributed:
            return [value]
        values: list[object] = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def gather_rows(self, tensor: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
        """Every process's ``tensor`` (``sizes[rank]`` rows each) concatenated in rank order.

        Not differentiable: the gathered rows are the teacher's, which trains by EMA.
        """
        if not self.distributed:
            return tensor
        longest = max(sizes)
        padded = tensor.new_zeros((longest, *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor.detach()
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded.contiguous())
        return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)])

    def parallel(self, module: nn.Module, device: torch.device) -> nn.Module:
        """``module`` wrapped so its gradients are averaged over the processes in backward
        (the module itself with one process). Call the wrapper, not the module: a module
        called directly is not averaged, which is how the reference's processes drifted
        apart."""
        if not self.distributed:
            return module
        # The buffers (the TR head's clusterbook) are the same everywhere: not resent each step.
        newer = "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
        buffers: dict[str, Any] = {"forward_sync_buffers": False} if newer else {"broadcast_buffers": False}
        return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None, **buffers)

    def seed_for_dropout(self, seed: int) -> None:
        """Give each process its own dropout masks; the processes' other random draws (the
        grid sampling, the initialisation) stay identical."""
        if self.distributed and self.rank > 0:
            torch.manual_seed((seed * 1_000_003 + self.rank) % 2**63)


SINGLE_PROCESS = ProcessGroup()
REFERENCE_RECIPE_ALONE = (
    "--recipe reference reproduces the reference's process 0 in a single process; train it without --gpus."
)


def from_environment() -> ProcessGroup:
    """This process's place as torchrun describes it (one process when not under torchrun)."""
    if "LOCAL_RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return SINGLE_PROCESS
    world_size = int(os.environ["WORLD_SIZE"])
    return ProcessGroup(
        rank=int(os.environ.get("RANK", "0")),
        world_size=world_size,
        local_rank=int(os.environ["LOCAL_RANK"]),
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size))),
    )


def start(group: ProcessGroup, device: torch.device) -> torch.device:
    """Join the process group (NCCL on GPUs, gloo on CPUs); the device this process uses."""
    if not group.distributed:
        return device
    if device.type == "cuda":
        if group.local_rank >= torch.cuda.device_count():
            raise CauseError(
                f"Process {group.local_rank} of this machine has no GPU: it has {torch.cuda.device_count()}."
            )
        device = torch.device("cuda", group.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def stop(group: ProcessGroup) -> None:
    """Leave the process group once nothing uses it any more."""
    if group.distributed and dist.is_initialized():
        # A DistributedDataParallel wrapper left in a reference cycle would otherwise outlive
        # the group and be freed at exit, when its communication threads can no longer be
        # joined: the process then aborts after training succeeded.
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def launch(processes: int, arguments: Sequence[str]) -> int:
    """Run ``cause <arguments>`` in ``processes`` processes on this machine through torchrun;
    the exit status of the whole group."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={processes}",
        "-m",
        "cause_cli",
        "--",  # what follows is cause's, even where it looks like one of torchrun's options
        *arguments,
    ]
    environment = dict(os.environ)
    # torchrun would set one thread per process and say so; share the CPUs out instead.
    threads = max(1, (os.cpu_count() or 1) // processes)
    environment.setdefault("OMP_NUM_THREADS", str(threads))
    return subprocess.call(command, env=environment)
