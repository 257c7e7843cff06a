"""Checkpoints written atomically: a kill at any moment leaves the previous file readable."""
from __future__ import annotations

import os
import tempfile
from typing import Dict

import torch


def atomic_save(obj, path: str) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_trainer_checkpoint(path: str) -> Dict:
    """A training checkpoint written by mlpot; a clear error for anything else."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - re-raised with what to do
        raise ValueError(f"{path}: not a readable mlpot checkpoint ({type(err).__name__}: {err}); "
                         "if this is an exported TorchScript model, use mlpot.load") from err
    if not isinstance(state, dict) or "config" not in state or "model" not in state:
        raise ValueError(f"{path}: not an mlpot checkpoint (no 'config' and 'model' entries)")
    return state
