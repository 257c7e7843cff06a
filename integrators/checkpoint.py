"""MD checkpoints: the whole state (random stream included) and the integrator, written atomically.

A run resumed from a checkpoint continues the uninterrupted run exactly (same numbers, bit for
bit, on the same device and build), because the checkpoint holds everything a step reads: positions,
velocities, cell, forces, energy, stress, bath variables and the generator state.

The file is a ``torch.save`` dict of tensors, numbers and strings (loadable with
``weights_only=True``), written to a temporary file in the same folder, flushed, then moved over the
old one with ``os.replace`` so that a crash never leaves a half-written checkpoint.
"""
from __future__ import annotations

import os
from typing import Dict, Optional, Tuple

import torch

from mlpot.errors import UserError
from mlpot.files import atomic_save

from .base import REGISTRY, Integrator
from .state import FLOAT_FIELDS, TENSOR_FIELDS, MDState, moved_generator

FORMAT = "mlpot-md-checkpoint"
VERSION = 1


def state_to_dict(state: MDState) -> Dict:
    """The state as plain tensors/numbers (on the CPU)."""
    out = {k: None if getattr(state, k) is None else getattr(state, k).detach().cpu()
           for k in TENSOR_FIELDS}
    out.update(step=int(state.step), time_fs=float(state.time_fs), fixed_com=bool(state.fixed_com),
               extras={k: v.detach().cpu() for k, v in state.extras.items()},
               rng_state=None if state.rng is None else state.rng.get_state(),
               rng_device=None if state.rng is None else state.rng.device.type)
    return out


def state_from_dict(d: Dict, device=None, dtype: Optional[torch.dtype] = None) -> MDState:
    """Inverse of ``state_to_dict``; ``dtype`` changes the working precision (energies stay
    float64)."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    kw = {}
    for k in TENSOR_FIELDS:
        v = d.get(k)
        if v is not None:
            v = v.to(dev)
            if dtype is not None and k in FLOAT_FIELDS:
                v = v.to(dtype)
        kw[k] = v
    return MDState(**kw, step=int(d["step"]), time_fs=float(d["time_fs"]),
                   fixed_com=bool(d["fixed_com"]),
                   extras={k: v.to(dev) for k, v in d.get("extras", {}).items()},
                   rng=moved_generator(d.get("rng_state"), d.get("rng_device", "cpu"), dev))


class MDCheckpointError(UserError, ValueError):
    """A file that is not a readable MD checkpoint of this version (exit code 2)."""


class MDCheckpointMissing(UserError, FileNotFoundError):
    """No MD checkpoint at the given path (exit code 2)."""


def save_md_checkpoint(path: str, state: MDState, integrator: Integrator) -> None:
    """Write state and integrator to ``path`` atomically (temporary file + os.replace)."""
    payload = {"format": FORMAT, "version": VERSION, "state": state_to_dict(state),
               "integrator": {"name": type(integrator).__name__, "params": integrator.params()}}
    atomic_save(payload, path)


def load_md_checkpoint(path: str, device=None) -> Tuple[MDState, Integrator]:
    """(state, integrator) from a checkpoint written by ``save_md_checkpoint``.

    The file is read with ``weights_only=True`` (no code runs from it). Raises
    ``MDCheckpointMissing`` or ``MDCheckpointError`` (both exit code 2 in ``mlpot md``).
    """
    if not os.path.exists(path):
        raise MDCheckpointMissing(f"no MD checkpoint at {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same bad input
        raise MDCheckpointError(f"{path} is not an mlpot MD checkpoint (torch.load with "
                                f"weights_only=True cannot read it: {type(err).__name__})"
                                ) from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise MDCheckpointError(f"{path} is not an mlpot MD checkpoint")
    if payload.get("version") != VERSION:
        raise MDCheckpointError(f"{path}: checkpoint version {payload.get('version')}, "
                                f"this mlpot reads version {VERSION}")
    spec = payload["integrator"]
    if spec["name"] not in REGISTRY:
        raise MDCheckpointError(f"{path}: unknown integrator {spec['name']!r} (known: "
                                f"{', '.join(sorted(REGISTRY))})")
    integrator = REGISTRY[spec["name"]](**spec["params"])
    return state_from_dict(payload["state"], device=device), integrator
