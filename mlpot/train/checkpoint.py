"""Checkpoints written atomically: a kill at any moment leaves the previous file readable."""
from __future__ import annotations

import os
from typing import Dict

import torch

from ..files import atomic_save  # noqa: F401 - re-exported for the trainer


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
