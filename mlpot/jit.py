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
