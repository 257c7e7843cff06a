"""Model deviation of a committee: one definition for training, export and every engine.

The definitions are DeePMD-kit's (``dp model-devi``), so that DP-GEN users' trust levels
(typically 0.05-0.15 eV/A on ``max_devi_f``) carry over. With K members, population statistics
(divide by K, not K - 1):

* ``forces_dev`` [N] (eV/A): for atom i, sqrt( mean_k |F_ik - mean_k F_ik|^2 ), the norm of the
  per-atom force standard deviation;
* ``max_force_dev`` [B] (eV/A): the largest ``forces_dev`` of each structure (``max_devi_f``);
* ``energy_dev`` [B] (eV/atom): the standard deviation of the total energy divided by the number
  of atoms (``devi_e``);
* ``virial_dev`` [B] (eV/atom): the largest over the nine components of the standard deviation of
  the virial, divided by the number of atoms (``max_devi_v``); periodic cells only.

For ranking structures of very different force magnitudes, DeePMD-kit's *relative* force
deviation (``dp model-devi --relative L``, ``pair_style deepmd ... relative L``) divides each
atom's ``forces_dev`` by the norm of its mean force plus a level L (eV/A):
``relative_max_force_dev``.

Calibrated values (``<name>_calibrated``) are the raw ones times a factor fitted on validation
data; the raw values are what thresholds such as ``--stop-uncertainty`` use. The functions are
TorchScript-able (an exported committee calls them).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from . import keys as K

Tensor = torch.Tensor


def _population_std(x: Tensor) -> Tensor:
    """Standard deviation over dim 0, dividing by the number of members."""
    mean = x.mean(dim=0, keepdim=True)
    return (x - mean).pow(2).mean(dim=0).sqrt()


def model_deviation(energy_members: Tensor, forces_members: Tensor, batch: Tensor,
                    num_atoms: Tensor, virial_members: Optional[Tensor] = None
                    ) -> Dict[str, Tensor]:
    """The deviations of a committee from its members' outputs.

    Args:
        energy_members: [K, B] total energies (eV).
        forces_members: [K, N, 3] forces (eV/A).
        batch: [N] int64 structure index of each atom.
        num_atoms: [B] atoms per structure.
        virial_members: [K, B, 3, 3] virials (eV), or None.
    """
    f = forces_members.to(torch.float64)
    mean = f.mean(dim=0, keepdim=True)
    forces_dev = (f - mean).pow(2).sum(dim=-1).mean(dim=0).sqrt()  # [N]
    n_struct = energy_members.shape[1]
    max_dev = torch.zeros(n_struct, dtype=torch.float64, device=f.device)
    max_dev = max_dev.scatter_reduce(0, batch, forces_dev, reduce="amax", include_self=True)
    atoms = num_atoms.to(torch.float64).clamp(min=1.0)
    out = {K.FORCES_DEV: forces_dev, K.MAX_FORCE_DEV: max_dev,
           K.ENERGY_DEV: _population_std(energy_members.to(torch.float64)) / atoms}
    if virial_members is not None:
        v = _population_std(virial_members.to(torch.float64)).reshape(n_struct, 9)
        out[K.VIRIAL_DEV] = v.max(dim=1).values / atoms
    return out


def calibrated(deviations: Dict[str, Tensor], factor: float) -> Dict[str, Tensor]:
    """``<name>_calibrated`` entries: each deviation times the calibration ``factor``."""
    out: Dict[str, Tensor] = {}
    for name in (K.FORCES_DEV, K.MAX_FORCE_DEV, K.ENERGY_DEV, K.VIRIAL_DEV):
        if name in deviations:
            out[name + K.CALIBRATED_SUFFIX] = deviations[name] * factor
    return out


def relative_max_force_dev(forces_dev, forces, level: float):
    """DeePMD-kit's relative force deviation, the largest over the atoms of one structure:
    max_i forces_dev_i / (|F_i| + level), with F_i the committee's mean force on atom i (eV/A)
    and ``level`` (eV/A, > 0) keeping atoms with small forces from dominating. numpy arrays
    (or anything with the same operations): forces_dev [..., N], forces [..., N, 3]; returns
    [...] (dimensionless)."""
    import numpy as np

    if not level > 0:
        raise ValueError(f"the relative deviation's level must be > 0 eV/A, got {level!r}")
    dev = np.asarray(forces_dev, dtype=np.float64)
    norm = np.linalg.norm(np.asarray(forces, dtype=np.float64), axis=-1)
    return (dev / (norm + float(level))).max(axis=-1)
