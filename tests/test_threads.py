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
    assert "using 1 thread" in capsys.readouterr().err
    th.restore_threads(2)
    assert torch.get_num_threads() == 2
    # the user's OMP_NUM_THREADS, a quiet machine and a command that computes nothing: unchanged
    assert th.apply_default_threads("train", environ={"OMP_NUM_THREADS": "2"}) is None
    assert th.apply_default_threads("export", environ={}) is None
    monkeypatch.setattr(th, "busy_cores", lambda cpus, sample_s=0.25: 0.1)
    assert th.apply_default_threads("train", environ={}) is None
    assert torch.get_num_threads() == 2


def test_cli_restores_the_threads_after_a_command(monkeypatch, capsys, tmp_path, two_threads):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(th.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(th, "busy_cores", lambda cpus, sample_s=0.25: 1.0)
    code = main(["test", str(tmp_path / "missing.pt"), "--data", str(tmp_path / "missing.xyz")])
    assert code == 2
    assert "using 1 thread" in capsys.readouterr().err
    assert torch.get_num_threads() == 2


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
