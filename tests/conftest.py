"""Fixtures shared by several test files."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Torch (and BLAS, e.g. scipy in ASE's cell filters) on one thread for a module's tests.

    The test systems are small: a second thread only adds synchronisation, and on a busy shared
    machine oversubscribed threads spin and make timings erratic. Use it with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        limits = None
    else:
        limits = threadpool_limits(1)
    try:
        yield
    finally:
        if limits is not None:
            limits.restore_original_limits()
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def fixed_threads(monkeypatch):
    """The tests do not depend on how busy the machine is: with ``OMP_NUM_THREADS`` set, the
    commands keep torch's thread count instead of choosing one from the load
    (``mlpot.threads``, whose own tests unset it)."""
    monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))
