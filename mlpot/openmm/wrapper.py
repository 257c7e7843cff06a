"""The module OpenMM calls: an exported model behind OpenMM's units and conventions.

OpenMM gives positions and box vectors in nm (float32 or float64, depending on the platform's
precision) and wants energy in kJ/mol and forces in kJ/mol/nm. The wrapper converts at this
boundary only, with the named factors of ``mlpot.units``:

    x_A = x_nm * NM_TO_ANGSTROM,    box_A = box_nm * NM_TO_ANGSTROM  (rows are box vectors)
    E_kJ/mol = E_eV * EV_TO_KJ_PER_MOL,   F_kJ/mol/nm = F_eV/A * EV_PER_A_TO_KJ_PER_MOL_NM

Atom types are fixed at construction (a buffer). When ``indices`` is given, OpenMM passes every
atom of the System and the wrapper takes the ML atoms out of them, returning forces for all atoms
(zero outside the subset); without it the positions are those of the ML atoms only (as a
``PythonForce`` with ``setParticles`` passes them).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from .. import keys as K
from .. import units
from ..inputs import read_outputs, structure_inputs


class OpenMMWrapper(nn.Module):
    """forward(positions [N, 3] nm, boxvectors [3, 3] nm or None) -> (energy kJ/mol, forces
    [N, 3] kJ/mol/nm)."""

    def __init__(self, model: nn.Module, atom_types: torch.Tensor,
                 indices: Optional[torch.Tensor], periodic: bool, dtype: torch.dtype):
        super().__init__()
        self.model = model
        self.register_buffer("atom_types", atom_types.to(torch.long))  # [n_ml]
        self.use_indices = indices is not None
        if indices is None:
            indices = torch.zeros(0, dtype=torch.long)
        # particles OpenMM must pass: exactly n_ml without indices, at least max(indices) + 1
        self.n_atoms = int(atom_types.shape[0])
        self.min_particles = int(indices.max()) + 1 if indices.numel() else 0
        self.register_buffer("indices", indices.to(torch.long))  # [n_ml] or [0]
        self.periodic = bool(periodic)
        self.register_buffer("pbc", torch.full((1, 3), bool(periodic), dtype=torch.bool))
        self.dtype = dtype
        self.length_factor = float(units.NM_TO_ANGSTROM)
        self.energy_factor = float(units.EV_TO_KJ_PER_MOL)
        self.force_factor = float(units.EV_PER_A_TO_KJ_PER_MOL_NM)

    @torch.jit.export
    def particle_count_error(self, n: int) -> str:
        """Why OpenMM's `n` particles do not fit this force ("" when they do)."""
        if self.use_indices and n < self.min_particles:
            return ("mlpot.openmm: the System has " + str(n) + " particles but the mlpot force's "
                    "ML atom indices go up to " + str(self.min_particles - 1) + "; create the "
                    "force for this System (create_force(..., system=system) checks it)")
        if not self.use_indices and n != self.n_atoms:
            return ("mlpot.openmm: the System has " + str(n) + " particles but the mlpot force "
                    "was made for " + str(self.n_atoms) + " atoms; give one atomic number per "
                    "particle, or atoms=[...] for the ML atoms (create_force(..., system=system) "
                    "checks it)")
        return ""

    def forward(self, positions: torch.Tensor, boxvectors: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, torch.Tensor]:
        # openmm-torch passes positions with requires_grad=True; the forces come from the model,
        # so no graph back to OpenMM's tensor is needed
        pos = positions.detach()
        problem = self.particle_count_error(pos.shape[0])
        if problem != "":
            raise RuntimeError(problem)
        pos = pos.index_select(0, self.indices) if self.use_indices else pos
        pos = pos.to(self.dtype) * self.length_factor  # [n_ml, 3] Angstrom
        if self.periodic and boxvectors is not None:
            cell = (boxvectors.to(self.dtype) * self.length_factor).reshape(1, 3, 3)
        else:
            cell = torch.zeros(1, 3, 3, dtype=self.dtype, device=pos.device)
        out = read_outputs(self.model(structure_inputs(pos, self.atom_types, cell, self.pbc),
                                      True, False))
        energy = out[K.ENERGY].sum() * self.energy_factor  # kJ/mol, float64
        forces = (out[K.FORCES][0] * self.force_factor).to(positions.dtype)  # [n_ml, 3]
        if self.use_indices:
            full = torch.zeros_like(positions)
            forces = full.index_copy(0, self.indices, forces)
        return energy, forces
