"""An ASE calculator for mlpot models.

>>> from mlpot.ase import MLPotCalculator
>>> atoms.calc = MLPotCalculator("model.pt", device="cpu")
>>> atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()

Units are ASE's and mlpot's (eV, Angstrom, eV/Angstrom^3), so nothing is converted. Energy and
forces are computed together (MD and optimizers ask for both of the same positions); the stress
only when asked for, and only for fully periodic cells. ASE's caching means nothing is recomputed
while the atoms are unchanged; the atom types and cell tensors are rebuilt only when the atomic
numbers or the cell change.
"""
from __future__ import annotations

import warnings
from typing import List, Optional

import numpy as np
import torch
from ase.calculators.calculator import (Calculator, PropertyNotImplementedError,
                                        all_changes)

from . import keys as K
from .export import as_exported
from .inputs import read_outputs, structure_inputs

__all__ = ["MLPotCalculator"]

#: The committee's outputs copied into ``results`` (plus their ``*_calibrated`` values).
UNCERTAINTY = (K.MAX_FORCE_DEV, K.FORCES_DEV, K.ENERGY_DEV, K.VIRIAL_DEV, K.ENERGY_MEMBERS,
               K.FORCES_MEMBERS)

# Voigt order used by ASE: xx, yy, zz, yz, xz, xy
_VOIGT = ([0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1])


class MLPotCalculator(Calculator):
    """ASE calculator for an exported mlpot model (a path), an ``ExportedModel`` or a
    ``Potential`` (scripted on the fly).

    Args:
        model: path of a file written by ``mlpot export``, or a loaded/in-memory model.
        device: torch device to run on ('cpu', 'cuda', 'cuda:1').
        min_distance: warn (once per calculator) when two atoms come closer than this many
            Angstrom, as the readers refuse such training data; None: no check.
    Properties: energy, free_energy (= energy), forces, stress (periodic cells), energies
    (per-atom energies, summing to the energy), stresses (periodic cells: per-atom stresses
    [N, 6], Voigt, eV/A^3, summing to the stress as ASE's own calculators' do: -W_i / V with the
    per-atom virial W_i of ``mlpot.keys.ATOMIC_VIRIAL``, LAMMPS's compute stress/atom).

    Committees (``mlpot.models.committee``): energy, forces and stress are the members' mean,
    and ``results`` also holds the committee's values for the same structure (``UNCERTAINTY``,
    DeePMD-kit's definitions, ``mlpot.uncertainty``): ``max_force_dev`` (float, eV/A),
    ``forces_dev`` (array [N], eV/A), ``energy_dev`` (float, eV/atom), ``virial_dev`` (float,
    eV/atom; only when the stress was computed), their ``*_calibrated`` values, and the
    members' ``energy_members`` [K] (eV) and ``forces_members`` [K, N, 3] (eV/A). They ride
    along in ``results`` (read them after ``get_potential_energy()`` or ``get_forces()``, as
    with other calculators' extra results) rather than being ASE properties, so ASE's own
    machinery (trajectories, ``SinglePointCalculator``) stays untouched.
    """

    implemented_properties = ["energy", "free_energy", "forces", "stress", "energies", "stresses"]

    def __init__(self, model, device: str = "cpu", min_distance: Optional[float] = 0.5,
                 **kwargs):
        super().__init__(**kwargs)
        self.min_distance = min_distance
        self._overlap_warned = False
        self.model = as_exported(model, device)
        self.device = torch.device(device)
        self.dtype = self.model.dtype
        self.type_map = list(self.model.type_map)
        self._numbers: Optional[np.ndarray] = None
        self._types: Optional[torch.Tensor] = None
        self._cell_key: Optional[tuple] = None
        self._cell: Optional[torch.Tensor] = None
        self._pbc: Optional[torch.Tensor] = None

    # ------------------------------------------------------------------ inputs
    def _atom_types(self, numbers: np.ndarray) -> torch.Tensor:
        if self._numbers is None or not np.array_equal(numbers, self._numbers):
            types_ = self.model.atom_types(numbers, where="MLPotCalculator")
            self._types = types_.to(self.device)
            self._numbers = numbers.copy()
        return self._types

    def _cell_tensors(self, atoms):
        cell = np.asarray(atoms.cell.array, dtype=np.float64)
        key = (cell.tobytes(), tuple(bool(p) for p in atoms.pbc))
        if key != self._cell_key:
            self._cell = torch.as_tensor(cell, dtype=self.dtype, device=self.device)[None]
            self._pbc = torch.as_tensor(np.asarray(atoms.pbc, dtype=bool),
                                        device=self.device)[None]
            self._cell_key = key
        return self._cell, self._pbc

    def _warn_about_overlap(self, positions, cell, pbc) -> None:
        """One warning when two atoms are closer than ``min_distance`` (an O(N) neighbor list
        with that short cutoff, run until the first warning)."""
        from .data.validate import closest_pair

        pair = closest_pair(positions, cell, pbc, float(self.min_distance))
        if pair is not None:
            self._overlap_warned = True
            i, j, d = pair
            warnings.warn(f"MLPotCalculator: atoms {i} and {j} are {d:.3f} A apart, closer than "
                          f"{self.min_distance} A (mlpot's readers refuse such training data), so "
                          "the energy and forces are not to be trusted (overlapping atoms, wrong "
                          "units or an MD run blowing up?); warned once", RuntimeWarning,
                          stacklevel=4)

    # ------------------------------------------------------------------ ASE API
    def calculate(self, atoms=None, properties: Optional[List[str]] = None,
                  system_changes=all_changes):
        properties = properties or ["energy"]
        old = self.results if not system_changes else {}
        Calculator.calculate(self, atoms, properties, system_changes)
        self.results = dict(old)
        want_stress = "stress" in properties and "stress" not in self.results
        want_stresses = "stresses" in properties and "stresses" not in self.results
        need_energy = "energy" not in self.results
        if not (want_stress or want_stresses or need_energy):
            return
        if (want_stress or want_stresses) and not self.atoms.pbc.all():
            raise PropertyNotImplementedError(
                "MLPotCalculator: stress needs a cell periodic in all three directions")
        cell, pbc = self._cell_tensors(self.atoms)
        data = structure_inputs(
            torch.as_tensor(self.atoms.positions, dtype=self.dtype, device=self.device),
            self._atom_types(self.atoms.numbers), cell, pbc)
        if self.min_distance is not None and not self._overlap_warned:
            self._warn_about_overlap(data[K.POSITIONS], cell, pbc)
        if want_stresses:
            data[K.COMPUTE_ATOMIC_VIRIAL] = torch.tensor(True, device=self.device)
        out = read_outputs(self.model(data, True, want_stress), 1, want_stress)
        energy = float(out[K.ENERGY][0])
        self.results["energy"] = energy
        self.results["free_energy"] = energy
        self.results["energies"] = out[K.ATOMIC_ENERGIES][0].cpu().numpy()
        self.results["forces"] = out[K.FORCES][0].cpu().numpy().astype(np.float64)
        if want_stress:
            s = out[K.STRESS][0].cpu().numpy().astype(np.float64)
            self.results["stress"] = s[_VOIGT[0], _VOIGT[1]]
        if want_stresses:
            if K.ATOMIC_VIRIAL not in out:
                raise PropertyNotImplementedError(
                    "MLPotCalculator: this model gives no per-atom virials (a .pt2 package, or "
                    "a file exported by an older mlpot), so no per-atom stresses; use the "
                    "TorchScript file of `mlpot export` (model.pt) for get_stresses()")
            w = out[K.ATOMIC_VIRIAL][0].cpu().numpy()
            self.results["stresses"] = -w[:, _VOIGT[0], _VOIGT[1]] / self.atoms.get_volume()
        self._committee_results(out)

    def _committee_results(self, out) -> None:
        """A committee's deviations and members (one structure) into ``results``."""
        for key in UNCERTAINTY + tuple(k + K.CALIBRATED_SUFFIX for k in UNCERTAINTY[:4]):
            if key not in out:
                continue
            value = out[key][0].detach().cpu().numpy().astype(np.float64)
            self.results[key] = float(value) if value.ndim == 0 else value
