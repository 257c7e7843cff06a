"""The one map between precision names ('float32', 'float64') and torch dtypes.

Configs, checkpoints, exported files and the command line name a precision by string; code uses
``torch.dtype``. Every conversion between the two goes through ``dtype_of`` and ``dtype_name``.
"""
from __future__ import annotations

from typing import Union

import torch

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
