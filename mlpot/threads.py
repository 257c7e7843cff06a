"""How many threads a command uses when the user has not said.

PyTorch starts one OpenMP thread per core. On a machine where another process already keeps a
core busy, one of those threads is descheduled again and again, and every parallel region
waits for it at its barrier: measured on a 2-core machine beside one busy process, 30 training
steps of the demo's model took 207 s with 2 threads against 13 s with 1 thread (7 s with 2 on a
quiet machine). So, unless ``OMP_NUM_THREADS`` is set, the compute commands look at how busy the
cores they may run on were over a fraction of a second and leave the busy ones alone, and say
so on stderr when their work starts (the first ``poll_threads()`` of the training, MD or test
loop), so that a command stopped by bad input still prints its one line and nothing else.
``training.threads`` in a config still decides for ``mlpot train``.

A process that starts (or ends) while a command runs changes the answer, so the choice is
watched too: the training loop and the MD loop call ``poll_threads()`` every step, and every
``WATCH_INTERVAL_S`` seconds it compares the cores' busy time with this process's own CPU time
over that interval (what is left is other processes' work) and, when two readings in a row
agree on another thread count, switches to it (never above the count the command started with).
"""
from __future__ import annotations

import math
import os
import sys
import time
from typing import Dict, Iterable, List, Optional, Tuple

# Commands that run models long enough for the thread count to matter.
COMPUTE_COMMANDS = frozenset({"train", "test", "demo", "md", "learn", "distill", "check"})
# A core counts as taken when other processes kept it busy more than this fraction of the time.
BUSY_SLACK = 0.25
# Seconds between two readings of the load while a command runs (``poll_threads``).
WATCH_INTERVAL_S = 5.0


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


def _busy_between(before: Dict[int, Tuple[int, int]], after: Dict[int, Tuple[int, int]]) -> float:
    """Cores' worth of busy time between two ``_cpu_times`` readings (each core counts 0 to 1)."""
    busy = 0.0
    for cpu in before:
        d_busy, d_total = (after[cpu][0] - before[cpu][0]), (after[cpu][1] - before[cpu][1])
        if d_total > 0:
            busy += min(1.0, max(0.0, d_busy / d_total))
    return busy


def busy_cores(cpus: Iterable[int], sample_s: float = 0.25) -> Optional[float]:
    """Cores' worth of work other processes did on ``cpus`` during ``sample_s`` (0 when idle,
    1.0 when one core was fully busy); None where /proc/stat cannot tell (not Linux). The
    caller sleeps meanwhile, so all the work is others'."""
    cpus = sorted(cpus)
    before = _cpu_times(cpus)
    if before is None:
        return None
    time.sleep(sample_s)
    after = _cpu_times(cpus)
    if after is None:
        return None
    return _busy_between(before, after)


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


def _message(command: str, busy: float, n_cores: int, threads: int, now: str = "") -> str:
    return (f"mlpot {command}: other processes {now}keep {busy:.1f} of {n_cores} cores busy; "
            f"using {threads} thread{'s' if threads > 1 else ''} (set OMP_NUM_THREADS to choose)")


class ThreadWatch:
    """Follows the load while a command runs (``poll``): every ``interval_s`` seconds, the
    cores' busy time minus this process's own CPU time is other processes' work; when two
    readings in a row ask for the same thread count (``threads_for``, at most ``ceiling``) and
    it differs from torch's, torch switches to it. ``read`` returns (``clock()``, ``_cpu_times``
    of the cores, this process's CPU seconds); tests pass their own ``clock`` and ``read``."""

    def __init__(self, cpus: Iterable[int], ceiling: int, command: str,
                 interval_s: float = WATCH_INTERVAL_S, clock=time.monotonic, read=None,
                 announce: Optional[str] = None):
        self.cpus, self.ceiling, self.command = sorted(cpus), int(ceiling), command
        self.announce = announce  # printed by the first poll: the command's work has started
        self.interval_s, self.clock = float(interval_s), clock
        self.read = read or (lambda: (self.clock(), _cpu_times(self.cpus), time.process_time()))
        self.last = self.read()
        self.pending: Optional[int] = None
        import torch

        self.used = {torch.get_num_threads()}  # every count the command ran with

    def others_busy(self, before, after) -> Optional[float]:
        """Cores' worth of other processes' work between two readings; None if unknown."""
        (t0, cpu0, own0), (t1, cpu1, own1) = before, after
        if cpu0 is None or cpu1 is None or t1 <= t0:
            return None
        return max(0.0, _busy_between(cpu0, cpu1) - (own1 - own0) / (t1 - t0))

    def poll(self) -> Optional[int]:
        """Called often (every step): cheap until ``interval_s`` has passed. Returns the new
        thread count when it switched, else None."""
        if self.announce:
            print(self.announce, file=sys.stderr)
            self.announce = None
        if self.clock() - self.last[0] < self.interval_s:
            return None
        now = self.read()
        others, self.last = self.others_busy(self.last, now), now
        if others is None:
            return None
        import torch

        want = min(self.ceiling, threads_for(len(self.cpus), others))
        if want == torch.get_num_threads():
            self.pending = None
            return None
        if self.pending != want:  # one reading may be a passing burst: wait for a second
            self.pending = want
            return None
        self.pending = None
        torch.set_num_threads(want)
        self.used.add(want)
        print(_message(self.command, others, len(self.cpus), want, now="now "), file=sys.stderr)
        return want


_watch: Optional[ThreadWatch] = None


def poll_threads() -> Optional[int]:
    """Let the thread watch of the running command (if any) look at the load; see
    ``ThreadWatch.poll``. Costs a clock reading when no reading is due."""
    return None if _watch is None else _watch.poll()


def threads_used() -> Optional[List[int]]:
    """The thread counts the running command has used so far (sorted), or None where no watch
    runs (the count was chosen by the user or was 1). A command whose count changed computed
    its sums in more than one order, so its numbers differ a little from a run at one count."""
    return None if _watch is None else sorted(_watch.used)


def stop_watching() -> None:
    """The user chose the thread count (``training.threads``): stop adjusting it."""
    global _watch
    _watch = None


def apply_default_threads(command: str, environ=os.environ) -> Optional[int]:
    """For a compute command without ``OMP_NUM_THREADS``: use fewer torch threads than cores
    where other processes keep cores busy, saying so on stderr when the work starts (the first
    ``poll_threads``); then watch the load while the command runs. Returns the thread count from before (for
    ``restore_threads``), or None where the default does not apply."""
    global _watch
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
    announce = None
    if threads < current:
        torch.set_num_threads(threads)
        announce = _message(command, busy, n_cores, threads)
    _watch = ThreadWatch(os.sched_getaffinity(0), current, command, announce=announce)
    return current


def restore_threads(previous: Optional[int]) -> None:
    """Undo ``apply_default_threads`` (``mlpot.cli.main`` called in-process, as tests do)."""
    stop_watching()
    if previous is not None:
        import torch

        torch.set_num_threads(previous)
