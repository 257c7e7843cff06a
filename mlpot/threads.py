"""How many threads a command uses when the user has not said.

PyTorch starts one OpenMP thread per core. On a machine where another process already keeps a
core busy, one of those threads is descheduled again and again, and every parallel region
waits for it at its barrier: measured on a 2-core machine beside one busy process, 30 training
steps of the demo's model took 207 s with 2 threads against 13 s with 1 thread (7 s with 2 on a
quiet machine). So, unless ``OMP_NUM_THREADS`` is set, the compute commands look at how busy the
cores they may run on were over a fraction of a second and leave the busy ones alone.
``training.threads`` in a config still decides for ``mlpot train``.
"""
from __future__ import annotations

import math
import os
import sys
import time
from typing import Dict, Iterable, Optional, Tuple

# Commands that run models long enough for the thread count to matter.
COMPUTE_COMMANDS = frozenset({"train", "test", "demo", "md", "learn", "distill", "check"})
# A core counts as taken when other processes kept it busy more than this fraction of the time.
BUSY_SLACK = 0.25


def _cpu_times(cpus: Iterable[int]) -> Optional[Dict[int, Tuple[int, int]]]:
    """(busy, total) jiffies of each CPU in ``cpus`` from /proc/stat; None where unavailable."""
    try:
        with open("/proc/stat") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    wanted, times = set(cpus), {}
    for line in lines:
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu":
            continue
        try:
            cpu, values = int(name[3:]), [int(v) for v in fields[:8]]
        except ValueError:
            continue
        if cpu in wanted and len(values) >= 5:
            idle = values[3] + values[4]  # idle + iowait
            times[cpu] = (sum(values) - idle, sum(values))
    return times if set(times) == wanted else None


def busy_cores(cpus: Iterable[int], sample_s: float = 0.25) -> Optional[float]:
    """Cores' worth of work other processes did on ``cpus`` during ``sample_s`` (0 when idle,
    1.0 when one core was fully busy); None where /proc/stat cannot tell (not Linux)."""
    cpus = sorted(cpus)
    before = _cpu_times(cpus)
    if before is None:
        return None
    time.sleep(sample_s)
    after = _cpu_times(cpus)
    if after is None:
        return None
    busy = 0.0
    for cpu in cpus:
        d_busy, d_total = (after[cpu][0] - before[cpu][0]), (after[cpu][1] - before[cpu][1])
        if d_total > 0:
            busy += min(1.0, max(0.0, d_busy / d_total))
    return busy


def threads_for(n_cores: int, busy: float) -> int:
    """Threads to use on ``n_cores`` of which ``busy`` cores' worth are taken by others: one per
    core that is free, a core counting as taken above ``BUSY_SLACK`` of its time; at least 1."""
    taken = math.ceil(max(0.0, busy - BUSY_SLACK))
    return max(1, min(n_cores, n_cores - taken))


def free_core_threads() -> Optional[Tuple[int, float, int]]:
    """(cores this process may run on, cores' worth that others keep busy, threads to use:
    ``threads_for``); None where the load cannot be read (not Linux)."""
    try:
        cpus = os.sched_getaffinity(0)
    except (AttributeError, OSError):
        return None
    busy = busy_cores(cpus)
    if busy is None:
        return None
    return len(cpus), busy, threads_for(len(cpus), busy)


def apply_default_threads(command: str, environ=os.environ) -> Optional[int]:
    """For a compute command without ``OMP_NUM_THREADS``: use fewer torch threads than cores
    where other processes keep cores busy, and say so on stderr. Returns the thread count from
    before (for ``restore_threads``), or None where nothing was changed."""
    if command not in COMPUTE_COMMANDS or environ.get("OMP_NUM_THREADS"):
        return None
    import torch

    current = torch.get_num_threads()
    if current < 2:
        return None
    found = free_core_threads()
    if found is None:
        return None
    n_cores, busy, threads = found
    threads = min(current, threads)
    if threads >= current:
        return None
    torch.set_num_threads(threads)
    print(f"mlpot {command}: other processes keep {busy:.1f} of {n_cores} cores busy; using "
          f"{threads} thread{'s' if threads > 1 else ''} (set OMP_NUM_THREADS to choose)",
          file=sys.stderr)
    return current


def restore_threads(previous: Optional[int]) -> None:
    """Undo ``apply_default_threads`` (``mlpot.cli.main`` called in-process, as tests do)."""
    if previous is not None:
        import torch

        torch.set_num_threads(previous)
