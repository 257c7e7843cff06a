"""The default thread count of the compute commands (mlpot/threads.py)."""
import os
import subprocess
import sys
import time

import pytest
import torch

from mlpot import threads as th
from mlpot.cli import main


@pytest.mark.parametrize("n_cores, busy, expected", [
    (2, 0.0, 2), (2, 0.2, 2), (2, 0.4, 1), (2, 1.0, 1), (2, 2.0, 1), (4, 1.3, 2), (4, 0.9, 3),
    (1, 0.0, 1)])
def test_threads_for(n_cores, busy, expected):
    assert th.threads_for(n_cores, busy) == expected


@pytest.mark.skipif(not os.path.exists("/proc/stat") or not hasattr(os, "sched_setaffinity"),
                    reason="needs Linux's /proc/stat")
def test_busy_cores_sees_a_busy_process():
    cpu = min(os.sched_getaffinity(0))
    child = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        os.sched_setaffinity(child.pid, {cpu})
        time.sleep(0.3)
        busy = th.busy_cores({cpu}, sample_s=0.5)
    finally:
        child.kill()
        child.wait()
    assert busy is not None and busy > 0.7


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_apply_uses_the_free_cores_and_says_so(monkeypatch, capsys, two_threads):
    monkeypatch.setattr(th.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(th, "busy_cores", lambda cpus, sample_s=0.25: 1.0)
    assert th.apply_default_threads("train", environ={}) == 2
    assert torch.get_num_threads() == 1
    assert capsys.readouterr().err == ""  # said when the work starts: the first poll
    th.poll_threads()
    th.poll_threads()
    assert capsys.readouterr().err.count("using 1 thread") == 1
    th.restore_threads(2)
    assert torch.get_num_threads() == 2
    # the user's OMP_NUM_THREADS, a quiet machine and a command that computes nothing: unchanged
    assert th.apply_default_threads("train", environ={"OMP_NUM_THREADS": "2"}) is None
    assert th.apply_default_threads("export", environ={}) is None
    monkeypatch.setattr(th, "busy_cores", lambda cpus, sample_s=0.25: 0.1)
    assert th.apply_default_threads("train", environ={}) == 2  # quiet: 2 threads, watched
    assert torch.get_num_threads() == 2 and th._watch is not None
    th.restore_threads(2)
    assert th._watch is None


def test_cli_restores_the_threads_after_a_command(monkeypatch, capsys, tmp_path, two_threads):
    """On a busy machine too, bad input gives its one line and nothing else (the thread count
    is said when the work starts), and the threads are back afterwards."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(th.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(th, "busy_cores", lambda cpus, sample_s=0.25: 1.0)
    code = main(["test", str(tmp_path / "missing.pt"), "--data", str(tmp_path / "missing.xyz")])
    assert code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "error" in err and "using 1 thread" not in err
    assert torch.get_num_threads() == 2 and th._watch is None


def test_doctor_warns_when_cores_are_taken(monkeypatch, two_threads):
    import io

    from mlpot.doctor import Report, threads

    monkeypatch.setattr(th.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(th, "busy_cores", lambda cpus, sample_s=0.25: 1.0)
    report = Report(io.StringIO())
    threads(report)
    assert report.warned == 1 and "torch.set_num_threads(1)" in report.advice[0]
    monkeypatch.setattr(th, "busy_cores", lambda cpus, sample_s=0.25: 0.0)
    report = Report(io.StringIO())
    threads(report)
    assert report.warned == 0 and "torch uses 2 thread(s) on 2 core(s)" in report.out.getvalue()


class FakeLoad:
    """Readings for ThreadWatch: each ``tick(others, own)`` advances 5 s during which the
    cores {0, 1} did ``others + own`` cores' worth of work, ``own`` of it this process's."""

    def __init__(self):
        self.t, self.busy, self.own = 0.0, 0, 0.0

    def tick(self, others, own):
        self.t += 5.0
        self.busy += round((others + own) * 500)  # jiffies over 2 cores of 500 each
        self.own += own * 5.0

    def clock(self):
        return self.t

    def read(self):
        half = self.busy // 2
        return self.t, {0: (half, int(self.t * 100)), 1: (self.busy - half, int(self.t * 100))}, \
            self.own


def test_the_watch_follows_a_process_that_comes_and_goes(capsys, two_threads):
    load = FakeLoad()
    watch = th.ThreadWatch({0, 1}, 2, "train", interval_s=5.0, clock=load.clock, read=load.read)
    assert watch.poll() is None  # no interval has passed: nothing read
    load.tick(others=0.0, own=2.0)  # our 2 threads alone: stay
    assert watch.poll() is None and torch.get_num_threads() == 2
    load.tick(others=0.7, own=1.3)  # another process starts: one reading is not enough ...
    assert watch.poll() is None and torch.get_num_threads() == 2
    load.tick(others=0.7, own=1.3)  # ... the second one agrees
    assert watch.poll() == 1 and torch.get_num_threads() == 1
    assert "now keep 0.7 of 2 cores busy; using 1 thread" in capsys.readouterr().err
    load.tick(others=1.0, own=1.0)
    assert watch.poll() is None
    load.tick(others=0.0, own=1.0)  # it ended
    load.tick(others=0.0, own=1.0)  # (no poll in between: one reading over 10 s)
    assert watch.poll() is None
    load.tick(others=0.0, own=1.0)
    assert watch.poll() == 2 and torch.get_num_threads() == 2
    load.tick(others=0.0, own=1.0)
    load.tick(others=0.0, own=1.0)
    assert watch.poll() is None  # never above the count the command started with
    assert watch.used == {1, 2}  # what the demo's summary reports


def test_the_watch_leaves_out_this_process_own_work():
    """Real readings: this process keeping a core busy is not another process's work; a pinned
    busy child is."""
    if not os.path.exists("/proc/stat") or not hasattr(os, "sched_setaffinity"):
        pytest.skip("needs Linux's /proc/stat")
    allowed = os.sched_getaffinity(0)
    cpu = min(allowed)
    watch = th.ThreadWatch({cpu}, 1, "train")
    os.sched_setaffinity(0, {cpu})  # this process's busy loop on the core that is read
    try:
        before = watch.read()
        end = time.monotonic() + 0.6
        while time.monotonic() < end:  # busy here
            pass
        after = watch.read()
    finally:
        os.sched_setaffinity(0, allowed)
    total = th._busy_between(before[1], after[1])
    others = watch.others_busy(before, after)
    assert total > 0.5 and others < total - 0.4
    child = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        os.sched_setaffinity(child.pid, {cpu})
        time.sleep(0.3)
        before = watch.read()
        time.sleep(0.6)
        others = watch.others_busy(before, watch.read())
    finally:
        child.kill()
        child.wait()
    assert others > 0.7


class CountingWatch:
    def __init__(self):
        self.polls = 0

    def poll(self):
        self.polls += 1


def test_training_and_md_loops_poll_the_watch(monkeypatch, tmp_path):
    from ase.build import bulk

    import integrators as I
    from mlpot.train import Trainer, config_from_dict

    watch = CountingWatch()
    monkeypatch.setattr(th, "_watch", watch)
    atoms = bulk("Ar", "fcc", a=5.26, cubic=True)
    state = I.state_from_ase(atoms, dtype=torch.float64)
    I.simulate(state, I.VelocityVerlet(1.0), I.LennardJones(0.0104, 3.4, 6.0), 7,
               last_good_path=None)
    assert watch.polls == 7
    from _fitting import labelled_cu_cells, write_frames

    class Factory:
        def mktemp(self, name):
            path = tmp_path / name
            path.mkdir()
            return path

    data = write_frames(Factory(), labelled_cu_cells(6, seed=1, stress=False))
    cfg = config_from_dict({
        "data": {"train": data, "validation_fraction": 0.34},
        "model": {"name": "egnn", "cutoff": 3.6, "hparams": {"hidden": 8, "num_layers": 1}},
        "training": {"batch_size": 2, "max_epochs": 1, "out_dir": str(tmp_path / "run"),
                     "progress": False}})
    watch.polls = 0
    Trainer(cfg).fit()
    assert watch.polls == 2  # 4 training frames in batches of 2
    cfg.training.threads = 1  # the config's count: no more watching
    Trainer(cfg)
    assert th._watch is None
