"""What every engine hands a model, and what it reads back: the one home of that contract.

``structure_inputs`` turns one structure (positions, atom types, cell, pbc) into the model's
input dict; ``replica_inputs`` does the same for R copies of one system run as one batch (mlpot's
integrators). ``read_outputs`` turns the model's output dict into detached per-structure tensors
(energy in float64, forces [R, N, 3], stress [R, 3, 3], atomic energies [R, N]). The ASE
calculator, OpenMM (TorchForce and PythonForce), ``integrators`` and the export self-check all go
through these functions, so a new input (a local-atom mask for LAMMPS) or output (committee
deviations) is added here once. The functions are TorchScript-able: OpenMM's scripted wrapper
calls them too.

Units: Angstrom, eV (mlpot's); engines convert at their own boundary (``mlpot.units``).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from . import keys as K

Tensor = torch.Tensor


def structure_inputs(positions: Tensor, atom_types: Tensor, cell: Optional[Tensor] = None,
                     pbc: Optional[Tensor] = None) -> Dict[str, Tensor]:
    """The input dict of one structure.

    Args:
        positions: [N, 3] Angstrom, in the model's dtype and on its device.
        atom_types: [N] int64 indices into the model's type map.
        cell: [3, 3] or [1, 3, 3] Angstrom, rows are lattice vectors; None or zeros: no cell.
        pbc: [3] or [1, 3] bool; None: not periodic.
    """
    if cell is None:
        cell = torch.zeros(1, 3, 3, dtype=positions.dtype, device=positions.device)
    if pbc is None:
        pbc = torch.zeros(1, 3, dtype=torch.bool, device=positions.device)
    return {K.POSITIONS: positions, K.ATOM_TYPES: atom_types,
            K.CELL: cell.to(positions.dtype).reshape(1, 3, 3), K.PBC: pbc.reshape(1, 3)}


def replica_index(replicas: int, atoms: int, device: torch.device) -> Dict[str, Tensor]:
    """The batch bookkeeping of ``replicas`` copies of one system of ``atoms`` atoms."""
    return {K.PTR: torch.arange(replicas + 1, device=device) * atoms,
            K.BATCH: torch.arange(replicas, device=device).repeat_interleave(atoms),
            K.NUM_ATOMS: torch.full((replicas,), atoms, dtype=torch.long, device=device)}


def replica_inputs(positions: Tensor, atom_types: Tensor, cell: Tensor, pbc: Tensor,
                   index: Optional[Dict[str, Tensor]] = None) -> Dict[str, Tensor]:
    """The input dict of R replicas of one system as one batch.

    Args:
        positions: [R, N, 3] Angstrom; ``atom_types``: [N] or [R * N]; ``cell``: [R, 3, 3];
        pbc: [3] or [R, 3]; index: ``replica_index(R, N, device)`` when the caller keeps it.
    """
    r, n = positions.shape[0], positions.shape[1]
    if index is None:
        index = replica_index(r, n, positions.device)
    data = dict(index)
    data[K.POSITIONS] = positions.reshape(r * n, 3)
    data[K.ATOM_TYPES] = atom_types.repeat(r) if atom_types.numel() == n else atom_types
    data[K.CELL] = cell.reshape(r, 3, 3)
    data[K.PBC] = pbc.reshape(-1, 3).expand(r, 3)
    return data


def read_outputs(out: Dict[str, Tensor], replicas: int = 1,
                 compute_stress: bool = False) -> Dict[str, Tensor]:
    """The model's outputs per structure, detached: ``energy`` [R] float64 (eV), ``forces``
    [R, N, 3] (eV/A), ``atomic_energies`` [R, N] (eV) and ``atomic_virial`` [R, N, 3, 3] (eV)
    when the model gives them, and with
    ``compute_stress`` ``stress`` [R, 3, 3] (eV/A^3, ASE's sign). For a committee also its
    members (``energy_members`` [R, K], ``forces_members`` [R, K, N, 3], ``virial_members``
    [R, K, 3, 3]) and deviations (``forces_dev`` [R, N]; ``max_force_dev``, ``energy_dev``,
    ``virial_dev`` [R]; the same for ``*_calibrated``)."""
    forces = out[K.FORCES].detach()
    n = forces.shape[0] // replicas
    res = {K.ENERGY: out[K.ENERGY].detach().reshape(replicas).to(torch.float64),
           K.FORCES: forces.reshape(replicas, n, 3)}
    if K.ATOMIC_ENERGIES in out:
        res[K.ATOMIC_ENERGIES] = out[K.ATOMIC_ENERGIES].detach().reshape(replicas, n)
    if compute_stress:
        res[K.STRESS] = out[K.STRESS].detach().reshape(replicas, 3, 3)
    if K.ATOMIC_VIRIAL in out:
        res[K.ATOMIC_VIRIAL] = out[K.ATOMIC_VIRIAL].detach().reshape(replicas, n, 3, 3)
    if K.MAX_FORCE_DEV in out:  # a committee: its members and deviations, per replica
        for key in out.keys():
            value = out[key].detach()
            if key == K.ENERGY_MEMBERS:
                res[key] = value.transpose(0, 1)  # [R, K]
            elif key == K.FORCES_MEMBERS:
                res[key] = value.reshape(value.shape[0], replicas, n, 3).transpose(0, 1)
            elif key == K.VIRIAL_MEMBERS:
                res[key] = value.transpose(0, 1)  # [R, K, 3, 3]
            elif key.startswith(K.FORCES_DEV):  # forces_dev and forces_dev_calibrated
                res[key] = value.reshape(replicas, n)
            elif key.startswith(K.MAX_FORCE_DEV) or key.startswith(K.ENERGY_DEV) \
                    or key.startswith(K.VIRIAL_DEV):
                res[key] = value.reshape(replicas)
    return res
