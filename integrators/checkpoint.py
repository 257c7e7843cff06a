"""MD checkpoints: the whole state (random stream included) and the integrator, written atomically.

A run resumed from a checkpoint continues the uninterrupted run exactly (same numbers, bit for
bit, on the same device and build), because the checkpoint holds everything a step reads: positions,
velocities, cell, forces, energy, stress, bath variables and the generator state.

The file is a ``torch.save`` dict of tensors, numbers and strings (loadable with
``weights_only=True``), written to a temporary file in the same folder, flushed, then moved over the
old one with ``os.replace`` so that a crash never leaves a half-written checkpoint.
"""
from __future__ import annotations

import hashlib
import os
from typing import Dict, Optional, Tuple

import torch

from mlpot.files import atomic_save

from .base import Integrator
from .bussi import Bussi
from .langevin import Langevin
from .nose_hoover import NoseHooverChain
from .npt import StochasticCellRescaling
from .nve import VelocityVerlet
from .state import MDState

FORMAT = "mlpot-md-checkpoint"
VERSION = 1
INTEGRATORS = {cls.__name__: cls for cls in
               (VelocityVerlet, Langevin, NoseHooverChain, Bussi, StochasticCellRescaling)}
_TENSORS = ("positions", "velocities", "masses", "cell", "pbc", "atomic_numbers", "forces",
            "energy", "stress", "bath_energy")
_FLOAT = ("positions", "velocities", "masses", "cell", "forces", "stress")


def state_to_dict(state: MDState) -> Dict:
    """The state as plain tensors/numbers (on the CPU)."""
    out = {k: None if getattr(state, k) is None else getattr(state, k).detach().cpu()
           for k in _TENSORS}
    out.update(step=int(state.step), time_fs=float(state.time_fs), fixed_com=bool(state.fixed_com),
               extras={k: v.detach().cpu() for k, v in state.extras.items()},
               rng_state=None if state.rng is None else state.rng.get_state(),
               rng_device=None if state.rng is None else state.rng.device.type)
    return out


def _generator(d: Dict, device: torch.device) -> torch.Generator:
    """The saved random stream on ``device``. Generator states are device-type specific: on
    another device type the stream restarts from a seed derived from the saved state (still
    deterministic, no longer the same numbers)."""
    rng = torch.Generator(device=device)
    saved = d.get("rng_state")
    if saved is None:
        return rng
    if d.get("rng_device", "cpu") == device.type:
        rng.set_state(saved)
    else:
        seed = int.from_bytes(hashlib.sha256(saved.numpy().tobytes()).digest()[:8], "little")
        rng.manual_seed(seed & ((1 << 63) - 1))
    return rng


def state_from_dict(d: Dict, device=None, dtype: Optional[torch.dtype] = None) -> MDState:
    """Inverse of ``state_to_dict``; ``dtype`` changes the working precision (energies stay
    float64)."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    kw = {}
    for k in _TENSORS:
        v = d.get(k)
        if v is not None:
            v = v.to(dev)
            if dtype is not None and k in _FLOAT:
                v = v.to(dtype)
        kw[k] = v
    return MDState(**kw, step=int(d["step"]), time_fs=float(d["time_fs"]),
                   fixed_com=bool(d["fixed_com"]),
                   extras={k: v.to(dev) for k, v in d.get("extras", {}).items()},
                   rng=_generator(d, dev))


def save_checkpoint(path: str, state: MDState, integrator: Integrator) -> None:
    """Write state and integrator to ``path`` atomically (temporary file + os.replace)."""
    payload = {"format": FORMAT, "version": VERSION, "state": state_to_dict(state),
               "integrator": {"name": type(integrator).__name__, "params": integrator.params()}}
    atomic_save(payload, path)


def load_checkpoint(path: str, device=None) -> Tuple[MDState, Integrator]:
    """(state, integrator) from a checkpoint written by ``save_checkpoint``."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no MD checkpoint at {path}")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not an mlpot MD checkpoint")
    if payload.get("version") != VERSION:
        raise ValueError(f"{path}: checkpoint version {payload.get('version')}, "
                         f"this mlpot reads version {VERSION}")
    spec = payload["integrator"]
    if spec["name"] not in INTEGRATORS:
        raise ValueError(f"{path}: unknown integrator {spec['name']!r}")
    integrator = INTEGRATORS[spec["name"]](**spec["params"])
    return state_from_dict(payload["state"], device=device), integrator
