"""Names of precisions and devices: the one map between 'float32'/'float64' and torch dtypes,
and the one check that a device named by a user exists here.

Configs, checkpoints, exported files and the command line name a precision by string; code uses
``torch.dtype``. Every conversion between the two goes through ``dtype_of`` and ``dtype_name``;
every device a user names goes through ``usable_device``.
"""
from __future__ import annotations

from typing import Union

import torch

from .errors import UserError

DTYPES = {"float32": torch.float32, "float64": torch.float64}
NAMES = tuple(DTYPES)


def dtype_of(name: Union[str, torch.dtype]) -> torch.dtype:
    """``torch.float32`` for 'float32' (a ``torch.dtype`` passes through); ValueError otherwise."""
    if isinstance(name, torch.dtype):
        if name not in DTYPES.values():
            raise ValueError(f"dtype must be float32 or float64, not {name}")
        return name
    try:
        return DTYPES[name]
    except (KeyError, TypeError):
        raise ValueError(f"dtype must be 'float32' or 'float64', not {name!r}") from None


def dtype_name(dtype: Union[str, torch.dtype]) -> str:
    """'float32' for ``torch.float32`` (a valid name passes through)."""
    dtype = dtype_of(dtype)
    return "float64" if dtype == torch.float64 else "float32"


class DeviceError(UserError, ValueError):
    """A device name that is malformed or names a device this machine lacks (exit code 2)."""


def usable_device(device: Union[str, torch.device], where: str = "") -> torch.device:
    """``device`` as a ``torch.device``; a one-line DeviceError when it is not a device name or
    this machine lacks it (``cuda`` without a GPU)."""
    prefix = f"{where}: " if where else ""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise DeviceError(f"{prefix}'{device}' is not a device name: use cpu, cuda or cuda:N "
                          f"({err})") from None
    if dev.type == "cuda" and (not torch.cuda.is_available()
                               or (dev.index or 0) >= torch.cuda.device_count()):
        raise DeviceError(f"{prefix}device '{device}' is not available here "
                          f"({torch.cuda.device_count()} CUDA devices visible to torch "
                          f"{torch.__version__}); use cpu")
    return dev
