"""Data-parallel training with torch.distributed: the process group, the shard of frames each
process trains on, and the few values every process must agree on.

``mlpot train CONFIG.yaml`` runs unchanged under ``torchrun --nproc-per-node N``: torchrun sets
``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK`` and the rendezvous address, and ``Distributed.from_env``
joins the group (gloo on CPUs, NCCL on GPUs). Without torchrun (``WORLD_SIZE`` unset or 1) it is a
single process and every collective below is the identity.

The rules that keep the processes identical (they hold the same weights after every step, so a
single process's checkpoint, validation and decisions are valid for all):

* **Same data, same statistics.** Every process reads the same files and fits the same reference
  energies and statistics; DDP then broadcasts rank 0's parameters and buffers when it wraps the
  model, so any difference (there should be none) is overwritten by rank 0's values.
* **One shuffle, disjoint shards.** All processes draw the epoch's permutation from the same
  generator; global batch i is frames ``perm[i*B*N : (i+1)*B*N]`` and process r takes its r-th
  contiguous part (B = ``training.batch_size`` per process, N processes). With the same seed, N
  processes with batch B see exactly the global batches of one process with batch B*N.
* **Global normalisation.** Losses are means over the entries of the global batch: each process
  divides its sums by the all-reduced entry counts and multiplies by N, so DDP's gradient average
  is the gradient of the global loss (``Loss(..., counts=...)``).
* **Decisions on rank 0.** The wall time (learning-rate schedule, ``max_time_min``) is rank 0's,
  broadcast at every step; validation is run by rank 0 and its loss broadcast, so "best", early
  stopping and the plateau schedule are decided from one number. Only rank 0 writes checkpoints,
  logs and plots.
"""
from __future__ import annotations

import datetime
import os
import warnings
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence

import numpy as np
import torch

# benchmarks/ddp_bench.py only: DDP runs with gradients kept local (no all-reduce), which tells
# the cost of the gradient communication apart from the rest; the training is then wrong
NO_GRADIENT_SYNC = "MLPOT_BENCH_NO_GRADIENT_SYNC"


def _local_gradients(state, bucket):  # no annotation: DDP checks it, and strings fail
    """A DDP communication hook that returns the bucket's local gradients unchanged."""
    fut: torch.futures.Future = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut


@dataclass
class Distributed:
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    backend: str = ""

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: str = "cpu") -> "Distributed":
        """Join the process group that torchrun describes in the environment (once per process);
        a single process when WORLD_SIZE is unset or 1."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as dist

        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if not dist.is_initialized():
            if device.startswith("cuda"):
                torch.cuda.set_device(local_rank)
            dist.init_process_group(backend, timeout=datetime.timedelta(minutes=60))
        return cls(world, rank, local_rank, backend)

    def device(self, configured: str) -> torch.device:
        """The process's device: ``cuda`` becomes ``cuda:LOCAL_RANK`` under torchrun."""
        if self.active and configured == "cuda":
            return torch.device(f"cuda:{self.local_rank}")
        return torch.device(configured)

    def wrap(self, module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """The module to call in training steps: DDP around it (which broadcasts rank 0's
        parameters and buffers now and averages gradients in backward), or the module itself."""
        if not self.active:
            return module
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        # a [1, F] weight's gradient may come out with strides (1, 1): harmless, said once per
        # process by DDP as a performance hint that is not about anything a user can change
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view")
        ddp = DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False,
                                      gradient_as_bucket_view=True)
        if os.environ.get(NO_GRADIENT_SYNC) == "1":
            warnings.warn(f"{NO_GRADIENT_SYNC}=1: gradients are not averaged over processes, so "
                          "this training is wrong (a benchmark's measure of the all-reduce cost)",
                          stacklevel=2)
            ddp.register_comm_hook(None, _local_gradients)
        return ddp

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        """The sum over processes (float64 on the CPU with gloo; the tensor itself when single)."""
        if not self.active:
            return values
        import torch.distributed as dist

        out = values.clone()
        if self.backend == "nccl":
            out = out.cuda()
        dist.all_reduce(out)
        return out.cpu()

    def from_main(self, value: float) -> float:
        """Rank 0's value of a float (a wall time, a validation loss) on every process."""
        if not self.active:
            return value
        import torch.distributed as dist

        t = torch.tensor([value if self.is_main else 0.0], dtype=torch.float64)
        if self.backend == "nccl":
            t = t.cuda()
        dist.broadcast(t, src=0)
        return float(t.cpu()[0])

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.active:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


class ShardedBatches:
    """One epoch's batches of one process: a shuffle of ``frames`` drawn from ``generator``
    (the same on every process), cut into global batches of ``batch_size * world_size`` frames,
    of which this process takes its contiguous ``rank``-th part (``batch_size`` frames; the last,
    shorter global batch is split as evenly as possible, and dropped for this epoch if it has
    fewer frames than processes, so that no process has an empty batch)."""

    def __init__(self, frames: Sequence[int], batch_size: int, world_size: int = 1,
                 rank: int = 0, generator: Optional[torch.Generator] = None):
        self.frames = list(frames)
        self.batch_size = batch_size
        self.world_size = world_size
        self.rank = rank
        self.generator = generator

    def global_batches(self) -> int:
        n, g = len(self.frames), self.batch_size * self.world_size
        full, rest = divmod(n, g)
        return full + (1 if rest >= self.world_size else 0)

    def __len__(self) -> int:
        return self.global_batches()

    def __iter__(self) -> Iterator[List[int]]:
        n = len(self.frames)
        perm = torch.randperm(n, generator=self.generator).tolist()
        g = self.batch_size * self.world_size
        for start in range(0, n, g):
            chunk = perm[start:start + g]
            if len(chunk) < self.world_size:
                break
            part = np.array_split(np.asarray(chunk), self.world_size)[self.rank]
            yield [self.frames[int(i)] for i in part]
