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
  divides its sums by the global batch's entry counts and multiplies by N, so DDP's gradient
  average is the gradient of the global loss (``Loss(..., counts=...)``). Every process knows
  the global batch's frames (``ShardedBatches.with_global``) and counts them itself: no
  collective before the forward pass, so the gradient average is a step's only meeting point.
* **Decisions on rank 0.** The wall time is rank 0's: broadcast at every step when it decides
  (``training.max_time_min``: the learning-rate schedule and the time limit), at the end of each
  epoch otherwise; validation is run by rank 0 and its loss broadcast, so "best", early
  stopping and the plateau schedule are decided from one number. Only rank 0 writes checkpoints,
  logs and plots.

**The gradient average on one machine's CPUs.** gloo averages DDP's gradient buckets over TCP,
even between processes of one host: about 10 ms per step for a Deep Potential's 2 M parameters
(8 MB) here, most of what 2 processes lost against two independent runs. When every process is
on this host and the backend is gloo, DDP's communication hook is ``SharedMemoryAverage``: at
the end of backward each process writes its gradients / N into its slot of one shared-memory
file, one gloo barrier (a few bytes), then every process sums the slots in rank order (the same
floats on every process, as gloo's ring gives). ``MLPOT_DDP_ALLREDUCE=gloo`` keeps gloo's
all-reduce (``shm`` insists on shared memory; the default ``auto`` falls back to gloo, on every
process alike, where shared memory cannot be set up).
"""
from __future__ import annotations

import datetime
import os
import warnings
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..errors import UserError

# benchmarks/ddp_bench.py only: DDP runs with gradients kept local (no all-reduce), which tells
# the cost of the gradient communication apart from the rest; the training is then wrong
NO_GRADIENT_SYNC = "MLPOT_BENCH_NO_GRADIENT_SYNC"


ALLREDUCE = "MLPOT_DDP_ALLREDUCE"  # auto (default), shm or gloo: see the module's docstring


class SharedMemoryAverage:
    """DDP's gradient average through one shared-memory file for processes on one host (gloo).

    The file (in /dev/shm, private to the user, unlinked as soon as every process has mapped it
    at start-up, so a kill -9 later leaves nothing behind) holds two sets of N slots of
    ``slot_bytes`` (room for all of a model's gradients). DDP hands over its buckets in order
    during backward; they are kept until the last one, then each process writes them all / N
    into its slot, one gloo barrier (a few bytes) says every slot is written, and each process
    sums the slots in rank order (the same floats on every process, as gloo's ring gives): two
    passes over the gradients, and one wait for the other processes per step, not one per
    bucket. Steps alternate between the two sets: a process writes set s again only after the
    next step's barrier, which every process passed after it had read set s. ``create`` is
    collective; it returns None on every process if any of them could not map the file (another
    host, no /dev/shm, too little room)."""

    def __init__(self, data: torch.Tensor, world_size: int, rank: int, slot_bytes: int):
        self.data, self.world_size, self.rank, self.slot_bytes = data, world_size, rank, slot_bytes
        self.steps = 0
        self.pending: List[tuple] = []  # (buffer, future) of this step's buckets so far

    @classmethod
    def create(cls, slot_bytes: int, world_size: int, rank: int,
               folder: str = "/dev/shm") -> Optional["SharedMemoryAverage"]:
        import secrets

        import torch.distributed as dist

        slot_bytes = _aligned(max(int(slot_bytes), 1))
        total = 2 * world_size * slot_bytes
        token = torch.tensor([secrets.randbits(62) if rank == 0 else 0], dtype=torch.int64)
        dist.broadcast(token, src=0)
        path = os.path.join(folder, f"mlpot-ddp-{int(token[0]):x}")
        data, ok = None, 1
        try:
            if rank == 0:
                room = os.statvfs(folder)
                if room.f_bavail * room.f_frsize < 2 * total:
                    raise OSError(f"{folder} has too little room for {total} bytes")
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
                try:
                    os.ftruncate(fd, total)
                finally:
                    os.close(fd)
        except OSError:
            ok = 0
        flag = torch.tensor([ok], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)  # rank 0 made the file
        if int(flag[0]) == 1:
            try:
                st = os.stat(path)
                if st.st_size != total or st.st_uid != os.getuid():
                    raise OSError(f"{path} is not the file rank 0 made")
                data = torch.from_file(path, shared=True, size=total, dtype=torch.uint8)
            except (OSError, RuntimeError):
                ok = 0
            flag = torch.tensor([ok], dtype=torch.int64)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)  # every process mapped it
        if rank == 0:
            try:
                os.unlink(path)
            except OSError:
                pass
        dist.barrier()  # no process goes on before the file's name is gone
        if int(flag[0]) != 1:
            return None
        return cls(data, world_size, rank, slot_bytes)

    def _views(self, which: int, rank: int, buffers: List[torch.Tensor]) -> List[torch.Tensor]:
        """``buffers`` laid out one after the other in slot ``rank`` of set ``which``."""
        start = (which * self.world_size + rank) * self.slot_bytes
        views = []
        for b in buffers:
            nbytes = b.numel() * b.element_size()
            views.append(self.data[start:start + nbytes].view(b.dtype))
            start += _aligned(nbytes)
        return views

    def average(self, buffers: List[torch.Tensor]) -> List[torch.Tensor]:
        """The means of ``buffers`` (flat, contiguous; the same shapes on every process) over
        the processes, in place."""
        import torch.distributed as dist

        if sum(_aligned(b.numel() * b.element_size()) for b in buffers) > self.slot_bytes:
            raise RuntimeError("the gradient buckets are larger than the shared-memory slot")
        which = self.steps % 2
        self.steps += 1
        # two passes over the gradients: each process writes its share g / N, then sums
        for view, b in zip(self._views(which, self.rank, buffers), buffers):
            torch.mul(b, 1.0 / self.world_size, out=view)
        dist.barrier()  # every slot of this set is written
        slots = [self._views(which, r, buffers) for r in range(self.world_size)]
        for k, b in enumerate(buffers):
            if self.world_size == 1:
                b.copy_(slots[0][k])
                continue
            torch.add(slots[0][k], slots[1][k], out=b)
            for r in range(2, self.world_size):  # rank order: the same sum on every process
                b.add_(slots[r][k])
        return buffers

    def hook(self, bucket) -> torch.futures.Future:
        """DDP's communication hook (via ``_shared_memory_hook``): buckets wait for the last."""
        fut: torch.futures.Future = torch.futures.Future()
        self.pending.append((bucket.buffer(), fut))
        if bucket.is_last():
            pending, self.pending = self.pending, []
            self.average([b for b, _ in pending])
            for b, f in pending:
                f.set_result(b)
        return fut


def _aligned(nbytes: int) -> int:
    return -(-nbytes // 64) * 64  # slots and buffers start on 64-byte boundaries


def _shared_memory_hook(state, bucket):  # no annotation: DDP checks it, and strings fail
    """A DDP communication hook: the buckets' means over processes through shared memory."""
    return state.hook(bucket)


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
    averaging: str = ""  # how DDP averages gradients, once wrapped: for the log
    shared_average: Optional["SharedMemoryAverage"] = field(default=None, repr=False)

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
        average = self.shared_memory_average(module)
        if average is not None:
            ddp.register_comm_hook(average, _shared_memory_hook)
        self.averaging = "shared memory" if average is not None else f"{self.backend}'s all-reduce"
        return ddp

    def shared_memory_average(self, module: torch.nn.Module) -> Optional[SharedMemoryAverage]:
        """The shared-memory gradient average for ``module`` (one per process, reused by the
        members of a committee, which step one after the other), or None for gloo's all-reduce:
        NCCL, processes on several hosts, ``MLPOT_DDP_ALLREDUCE=gloo``, or no shared memory.
        Collective: every process calls it with the same module shapes."""
        mode = os.environ.get(ALLREDUCE, "auto").strip().lower() or "auto"
        if mode not in ("auto", "shm", "gloo"):
            raise UserError(f"{ALLREDUCE}={mode!r}: use auto, shm or gloo (or unset it)")
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "0")) == self.world_size
        if mode == "gloo" or self.backend != "gloo" or not (local or mode == "shm"):
            return None
        # every bucket starts aligned: the parameters' aligned sizes bound any bucketing
        need = sum(_aligned(p.numel() * p.element_size()) for p in module.parameters()
                   if p.requires_grad)
        current = self.shared_average
        if current is None or current.slot_bytes < need:
            current = SharedMemoryAverage.create(need, self.world_size, self.rank)
            if current is None and mode == "shm":
                raise UserError(f"{ALLREDUCE}=shm: the processes could not share memory "
                                   "(not all on one host, or /dev/shm missing or full); unset it "
                                   "to fall back to gloo's all-reduce")
            self.shared_average = current
        return current

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
        for part, _ in self.with_global():
            yield part

    def with_global(self) -> Iterator[Tuple[List[int], List[int]]]:
        """(this process's frames, the whole global batch's frames) per step: every process
        knows the global batch, so its label counts need no communication."""
        n = len(self.frames)
        perm = torch.randperm(n, generator=self.generator).tolist()
        g = self.batch_size * self.world_size
        for start in range(0, n, g):
            chunk = perm[start:start + g]
            if len(chunk) < self.world_size:
                break
            part = np.array_split(np.asarray(chunk), self.world_size)[self.rank]
            yield [self.frames[int(i)] for i in part], [self.frames[i] for i in chunk]
