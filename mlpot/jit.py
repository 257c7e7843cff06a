"""TorchScript calls without torch's deprecation warning.

torch >= 2.11 warns at every ``torch.jit.script``/``save``/``load`` that TorchScript is
deprecated. The TorchScript file is mlpot's portable format by design (openmm-torch, the LAMMPS
plugin and C++ read it; the AOTInductor ``.pt2`` export is the path beside it), so mlpot's own
calls are intended: they run inside ``quiet()``, which also holds where a user's script turns
warnings into errors. ``mlpot/__init__`` ignores the same warning process-wide.
"""
from __future__ import annotations

import contextlib
import warnings

DEPRECATION = r"`torch\.jit\.(script|save|load|trace)` is (deprecated|not supported)"


@contextlib.contextmanager
def quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=DEPRECATION, category=FutureWarning)
        yield


class _SortedSet(set):
    """A set that iterates in sorted order (by ``str``), whatever the string hash seed."""

    def __iter__(self):
        return iter(sorted(set.__iter__(self), key=str))


@contextlib.contextmanager
def ordered_constants():
    """Scripting with a module's constants in one order in every process.

    torch's scripting gathers a module's ``__constants__`` and ``Final`` attributes in a Python
    ``set`` (``torch.jit._recursive.infer_concrete_type_builder``) and writes them into the
    generated code in its iteration order, which follows the per-process string hash seed: the
    same model exported by two processes gave two files (``torch.nn.Linear``'s ``in_features``
    and ``out_features`` swapped places). Inside this context that module's ``set`` iterates in
    sorted order; ``tests/test_export.py`` exports in two processes with different hash seeds
    and compares the bytes, so a torch that gathers them differently shows up there.
    """
    import torch.jit._recursive as recursive

    had = "set" in vars(recursive)
    previous = vars(recursive).get("set")
    recursive.set = _SortedSet
    try:
        yield
    finally:
        if had:
            recursive.set = previous
        else:
            del recursive.set
