"""AtomicData: the one representation of a structure and of a batch of structures.

A single structure is a batch of one. Every model, the trainer and every interface (ASE, OpenMM,
integrators) take this object, or the plain ``Dict[str, Tensor]`` of ``as_dict()`` inside
TorchScript. Tensor names, shapes and units are those of ``mlpot.keys``.

Targets (energy, forces, stress, virial) are optional. In a batch where some structures have a
target and others do not, the missing entries are NaN: labels are checked to be finite when
read, so NaN in a batch only ever means "no label" and losses mask it out.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from .. import keys as K
from ..neighbors import neighbor_list_batch, pair_vectors

_PER_ATOM = (K.FORCES,)
_PER_STRUCTURE = (K.ENERGY, K.STRESS, K.VIRIAL)
_TARGET_SHAPES = {K.ENERGY: (), K.STRESS: (3, 3), K.VIRIAL: (3, 3), K.FORCES: (3,),
                  K.ATOMIC_ENERGIES: ()}
# per-structure loss weights (1 where a structure has none): data.energy_weight_key & co.
_WEIGHTS = ("energy_weight", "forces_weight")
# per-atom labels that models do not take as input (not in ``as_dict``): a teacher's atomic
# energies (data.atomic_energies_key, loss.atomic_energies), float64 like the energy
_ATOM_LABELS = (K.ATOMIC_ENERGIES,)
# second derivatives of the energy (a teacher's, for Hessian distillation): per structure a
# flattened 3N x 3N matrix, float64 (mlpot.hessian)
_HESSIAN = "hessian"


@dataclass
class AtomicData:
    """Atoms of B structures, concatenated (N atoms in all).

    Attributes:
        positions: [N, 3] Angstrom.
        atomic_numbers: [N] int64.
        cell: [B, 3, 3] Angstrom, rows are lattice vectors (zeros for a molecule).
        pbc: [B, 3] bool.
        ptr: [B + 1] int64; structure b holds atoms ptr[b]:ptr[b+1].
        atom_types: [N] int64 index into the type map, or None before a type map is applied.
        edge_index: [2, P] int64 (i, j) after ``with_neighbors``; None before.
        edge_cell_shift: [P, 3] int64 integer cell shifts S, pair vector x_j - x_i + S @ cell.
        cutoff: the cutoff (Angstrom) the neighbors were computed with, or None.
        energy: [B] float64 eV; forces: [N, 3] eV/A; stress: [B, 3, 3] eV/A^3 (= -virial/volume);
            virial: [B, 3, 3] eV. Each optional; NaN marks a missing label inside a batch.
        atomic_energies: [N] float64 eV, a teacher's per-atom energies (distillation), NaN where
            a structure has none; a label only, never a model input.
        hessian: [sum_b (3 N_b)^2] float64 eV/A^2, each structure's Hessian d^2E/dR dR
            flattened row-major (structures concatenated), NaN rows where unlabelled
            (mlpot.hessian); a label only.
        energy_weight, forces_weight: [B] float64 per-structure weights of the energy and force
            loss terms (distillation: lower force weights where teachers disagree); None and,
            inside a batch, a structure without one: 1.
        sources: a label per structure ("file.xyz:frame 12"), used in error messages.
    """

    positions: torch.Tensor
    atomic_numbers: torch.Tensor
    cell: torch.Tensor
    pbc: torch.Tensor
    ptr: torch.Tensor
    atom_types: Optional[torch.Tensor] = None
    edge_index: Optional[torch.Tensor] = None
    edge_cell_shift: Optional[torch.Tensor] = None
    cutoff: Optional[float] = None
    energy: Optional[torch.Tensor] = None
    forces: Optional[torch.Tensor] = None
    stress: Optional[torch.Tensor] = None
    virial: Optional[torch.Tensor] = None
    energy_weight: Optional[torch.Tensor] = None
    forces_weight: Optional[torch.Tensor] = None
    atomic_energies: Optional[torch.Tensor] = None
    hessian: Optional[torch.Tensor] = None
    sources: List[str] = field(default_factory=list)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_arrays(
        cls,
        positions,
        atomic_numbers,
        cell=None,
        pbc=None,
        energy: Optional[float] = None,
        forces=None,
        stress=None,
        virial=None,
        source: str = "",
        dtype: torch.dtype = torch.float64,
    ) -> "AtomicData":
        """One structure from array-likes. A missing cell means a molecule (no periodicity)."""
        pos = torch.as_tensor(np.asarray(positions, dtype=np.float64), dtype=dtype).reshape(-1, 3)
        n = pos.shape[0]
        z = torch.as_tensor(np.asarray(atomic_numbers, dtype=np.int64)).reshape(-1)
        c = torch.zeros(3, 3, dtype=dtype) if cell is None else torch.as_tensor(
            np.asarray(cell, dtype=np.float64), dtype=dtype).reshape(3, 3)
        if pbc is None:
            pbc = (c.abs().sum(dim=1) > 0).tolist()
        p = torch.as_tensor(np.broadcast_to(np.asarray(pbc, dtype=bool), (3,)).copy())

        def opt(value, shape):
            if value is None:
                return None
            t = torch.as_tensor(np.asarray(value, dtype=np.float64), dtype=dtype)
            return t.reshape(shape)

        return cls(
            positions=pos,
            atomic_numbers=z,
            cell=c[None],
            pbc=p[None],
            ptr=torch.tensor([0, n], dtype=torch.long),
            energy=None if energy is None else torch.tensor([float(energy)], dtype=torch.float64),
            forces=opt(forces, (-1, 3)),
            stress=opt(stress, (1, 3, 3)),
            virial=opt(virial, (1, 3, 3)),
            sources=[source],
        )

    @classmethod
    def from_ase(cls, atoms, source: str = "", dtype: torch.dtype = torch.float64, **targets):
        """One structure from an ``ase.Atoms`` (targets given as keyword arguments)."""
        return cls.from_arrays(
            atoms.positions, atoms.numbers, atoms.cell.array, atoms.pbc, source=source,
            dtype=dtype, **targets)

    # ------------------------------------------------------------------ sizes
    @property
    def num_structures(self) -> int:
        return self.ptr.shape[0] - 1

    @property
    def num_atoms(self) -> torch.Tensor:
        """Atoms per structure  # [B] int64"""
        return self.ptr[1:] - self.ptr[:-1]

    @property
    def batch(self) -> torch.Tensor:
        """Structure index of each atom  # [N] int64"""
        return torch.repeat_interleave(
            torch.arange(self.num_structures, device=self.ptr.device), self.num_atoms)

    def __len__(self) -> int:
        return self.num_structures

    # ------------------------------------------------------------------ neighbors
    def with_neighbors(self, cutoff: float) -> "AtomicData":
        """A copy with the neighbor pairs (edge_index, edge_cell_shift) at this cutoff."""
        i, j, s = neighbor_list_batch(self.positions, self.cell, self.pbc, self.ptr, cutoff)
        return replace(self, edge_index=torch.stack([i, j]), edge_cell_shift=s, cutoff=float(cutoff))

    def edge_vectors(self) -> torch.Tensor:
        """Differentiable pair vectors x_j - x_i + S @ cell  # [P, 3]"""
        if self.edge_index is None or self.edge_cell_shift is None:
            raise RuntimeError("no neighbors yet: call data.with_neighbors(cutoff) first")
        return pair_vectors(self.positions, self.cell, self.batch, self.edge_index[0],
                            self.edge_index[1], self.edge_cell_shift)

    # ------------------------------------------------------------------ batching
    @classmethod
    def collate(cls, items: Sequence["AtomicData"]) -> "AtomicData":
        """Concatenate structures (or batches) into one batch; pair indices are offset."""
        if len(items) == 0:
            raise ValueError("cannot collate an empty list of structures")
        if len(items) == 1:
            return items[0]
        counts = torch.tensor([it.positions.shape[0] for it in items], dtype=torch.long)
        offsets = torch.cumsum(counts, 0) - counts
        ptr = torch.cat([torch.zeros(1, dtype=torch.long)]
                        + [it.ptr[1:] + off for it, off in zip(items, offsets.tolist())])
        out = dict(
            positions=torch.cat([it.positions for it in items]),
            atomic_numbers=torch.cat([it.atomic_numbers for it in items]),
            cell=torch.cat([it.cell for it in items]),
            pbc=torch.cat([it.pbc for it in items]),
            ptr=ptr,
            sources=[s for it in items for s in it.sources],
        )
        if all(it.atom_types is not None for it in items):
            out["atom_types"] = torch.cat([it.atom_types for it in items])
        cutoffs = {it.cutoff for it in items}
        if len(cutoffs) == 1 and None not in cutoffs:
            out["edge_index"] = torch.cat(
                [it.edge_index + off for it, off in zip(items, offsets.tolist())], dim=1)
            out["edge_cell_shift"] = torch.cat([it.edge_cell_shift for it in items])
            out["cutoff"] = cutoffs.pop()
        for key in _PER_ATOM + _PER_STRUCTURE + _ATOM_LABELS:
            values = [getattr(it, key) for it in items]
            if all(v is None for v in values):
                continue
            ref = next(v for v in values if v is not None)
            parts = []
            for it, v in zip(items, values):
                n = it.num_structures if key in _PER_STRUCTURE else it.positions.shape[0]
                parts.append(v if v is not None else torch.full(
                    (n,) + _TARGET_SHAPES[key], float("nan"), dtype=ref.dtype))
            out[key] = torch.cat(parts)
        if any(it.hessian is not None for it in items):
            out[_HESSIAN] = torch.cat([it.hessian if it.hessian is not None else torch.full(
                (int((9 * it.num_atoms ** 2).sum()),), float("nan"), dtype=torch.float64)
                for it in items])
        for key in _WEIGHTS:
            values = [getattr(it, key) for it in items]
            if any(v is not None for v in values):
                out[key] = torch.cat([v if v is not None else torch.ones(
                    it.num_structures, dtype=torch.float64) for it, v in zip(items, values)])
        return cls(**out)

    def __getitem__(self, b: int) -> "AtomicData":
        """Structure b of a batch, as a batch of one."""
        nb = self.num_structures
        if b < 0:
            b += nb
        if not 0 <= b < nb:
            raise IndexError(f"structure {b} out of range ({nb} structures)")
        a0, a1 = int(self.ptr[b]), int(self.ptr[b + 1])
        out = dict(
            positions=self.positions[a0:a1],
            atomic_numbers=self.atomic_numbers[a0:a1],
            cell=self.cell[b:b + 1],
            pbc=self.pbc[b:b + 1],
            ptr=torch.tensor([0, a1 - a0], dtype=torch.long, device=self.ptr.device),
            sources=self.sources[b:b + 1],
            cutoff=self.cutoff,
        )
        if self.atom_types is not None:
            out["atom_types"] = self.atom_types[a0:a1]
        if self.edge_index is not None:
            mask = (self.edge_index[0] >= a0) & (self.edge_index[0] < a1)
            out["edge_index"] = self.edge_index[:, mask] - a0
            out["edge_cell_shift"] = self.edge_cell_shift[mask]
        for key in _PER_STRUCTURE + _WEIGHTS:
            v = getattr(self, key)
            out[key] = None if v is None else v[b:b + 1]
        for key in _PER_ATOM + _ATOM_LABELS:
            v = getattr(self, key)
            if v is not None:
                out[key] = v[a0:a1]
        if self.hessian is not None:
            h0 = int((9 * self.num_atoms[:b] ** 2).sum())
            out[_HESSIAN] = self.hessian[h0:h0 + 9 * (a1 - a0) ** 2]
        return AtomicData(**out)

    def split(self) -> List["AtomicData"]:
        return [self[b] for b in range(self.num_structures)]

    # ------------------------------------------------------------------ conversion
    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "AtomicData":
        """Move to a device; ``dtype`` converts positions, cell, forces, stress, virial
        (energy, atomic energies and the Hessian stay float64)."""
        changes = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, torch.Tensor):
                continue
            if dtype is not None and v.is_floating_point() and f.name != K.ENERGY \
                    and f.name not in _WEIGHTS + _ATOM_LABELS + (_HESSIAN,):
                v = v.to(dtype)
            changes[f.name] = v.to(device) if device is not None else v
        return replace(self, **changes)

    def as_dict(self) -> Dict[str, torch.Tensor]:
        """The tensors under the names of ``mlpot.keys`` (what models take in TorchScript)."""
        out = {
            K.POSITIONS: self.positions,
            K.ATOMIC_NUMBERS: self.atomic_numbers,
            K.CELL: self.cell,
            K.PBC: self.pbc,
            K.PTR: self.ptr,
            K.BATCH: self.batch,
            K.NUM_ATOMS: self.num_atoms,
        }
        if self.atom_types is not None:
            out[K.ATOM_TYPES] = self.atom_types
        if self.edge_index is not None:
            out[K.EDGE_INDEX] = self.edge_index
            out[K.EDGE_SHIFTS] = self.edge_cell_shift
        for key in _PER_ATOM + _PER_STRUCTURE:
            v = getattr(self, key)
            if v is not None:
                out[key] = v
        return out

    def to_ase(self) -> list:
        """The structures as ``ase.Atoms`` with labels in a SinglePointCalculator."""
        from ase import Atoms
        from ase.calculators.singlepoint import SinglePointCalculator
        from ase.stress import full_3x3_to_voigt_6_stress

        out = []
        for s in self.split():
            atoms = Atoms(numbers=s.atomic_numbers.cpu().numpy(),
                          positions=s.positions.detach().cpu().double().numpy(),
                          cell=s.cell[0].detach().cpu().double().numpy(),
                          pbc=s.pbc[0].cpu().numpy())
            res = {}
            if s.energy is not None and torch.isfinite(s.energy).all():
                res["energy"] = float(s.energy[0])
            if s.forces is not None and torch.isfinite(s.forces).all():
                res["forces"] = s.forces.detach().cpu().double().numpy()
            if s.stress is not None and torch.isfinite(s.stress).all():
                res["stress"] = full_3x3_to_voigt_6_stress(s.stress[0].detach().cpu().double().numpy())
            if res:
                atoms.calc = SinglePointCalculator(atoms, **res)
            out.append(atoms)
        return out

    def volume(self) -> torch.Tensor:
        """Cell volume of each structure  # [B] A^3 (0 for molecules)"""
        return torch.linalg.det(self.cell).abs()
