"""Systems: all-ML (``create_system``) and ML/MM with mechanical embedding
(``create_mixed_system``).

Mechanical embedding (the semantics of openmm-ml's ``createMixedSystem`` for a short-ranged ML
model): starting from an all-MM System,

1. bonded terms (bonds, angles, torsions, CMAP, custom bonded forces) whose atoms are all ML
   atoms are removed;
2. in every ``NonbondedForce`` each pair of ML atoms becomes an exception with zero charge
   product and zero epsilon (so Coulomb and Lennard-Jones between ML atoms vanish, 1-4 pairs
   included; with PME the exceptions use periodic boundaries), and in every
   ``CustomNonbondedForce`` each pair of ML atoms becomes an exclusion;
3. constraints between two ML atoms are removed (``remove_constraints``);
4. the ML force, acting on the ML atoms only, is added.

Everything between ML and MM atoms stays with the MM force field (Coulomb with the MM charges,
Lennard-Jones), as do all MM-MM terms, so ``E = E_MM(system without ML-ML terms) + E_ML(ML atoms)``.
The MM force field's long-range dispersion correction, GB/implicit-solvent and other many-body
terms are left as they are. Covalent bonds crossing the ML/MM boundary are not capped (a warning
says so).
"""
from __future__ import annotations

import copy
import re
import warnings
import xml.etree.ElementTree as ET
from typing import Iterable, List, Optional, Set

import openmm
from openmm import app

from .forces import create_force

__all__ = ["create_system", "create_mixed_system", "atomic_numbers_of", "topology_from_ase",
           "ml_atoms_of"]

_BONDED = {"HarmonicBondForce", "HarmonicAngleForce", "PeriodicTorsionForce", "RBTorsionForce",
           "CMAPTorsionForce", "CustomBondForce", "CustomAngleForce", "CustomTorsionForce",
           "CustomCompoundBondForce"}
_TERM_TAGS = {"Bond", "Angle", "Torsion"}
_PARTICLE_ATTR = re.compile(r"^[pab]\d+$")  # p1..pN; CMAP's a1..a4 and b1..b4


def atomic_numbers_of(topology: app.Topology) -> List[int]:
    """The atomic number of every atom of a Topology (an error for atoms without element, such
    as virtual sites, which an ML model cannot treat)."""
    out = []
    for atom in topology.atoms():
        if atom.element is None:
            raise ValueError(f"mlpot.openmm: atom {atom.index} ({atom.name} in residue "
                             f"{atom.residue.name}) has no element; exclude it from the ML atoms")
        out.append(atom.element.atomic_number)
    return out


def create_system(model, topology: app.Topology, backend: str = "auto", device: str = "cpu",
                  remove_cm_motion: bool = True, force_group: int = 0,
                  jit_optimize: bool = False) -> openmm.System:
    """An all-ML System for ``topology``: masses from the elements, the topology's box (periodic
    when it has one) and one mlpot force.

    Args:
        model: an exported model file, an ``ExportedModel`` or a ``Potential``.
        backend: 'torch' (TorchForce), 'python' (PythonForce) or 'auto'.
        device: torch device for the PythonForce backend.
        remove_cm_motion: add a ``CMMotionRemover``.
        jit_optimize: TorchForce only; see ``create_force`` (False switches TorchScript's
            optimizing executor off in this thread: faster on CPU).
    """
    numbers = atomic_numbers_of(topology)
    system = openmm.System()
    box = topology.getPeriodicBoxVectors()
    if box is not None:
        system.setDefaultPeriodicBoxVectors(*box)
    for atom in topology.atoms():
        system.addParticle(atom.element.mass)
    system.addForce(create_force(model, numbers, periodic=box is not None, backend=backend,
                                 device=device, force_group=force_group,
                                 jit_optimize=jit_optimize, system=system))
    if remove_cm_motion:
        system.addForce(openmm.CMMotionRemover())
    return system


def _drop_ml_terms(force: openmm.Force, ml: Set[int]) -> openmm.Force:
    """A copy of a bonded force without the terms whose particles are all ML atoms (through the
    force's XML, so every bonded force type, custom ones included, is handled alike)."""
    root = ET.fromstring(openmm.XmlSerializer.serialize(force))
    for group in root:
        for term in [t for t in group if t.tag in _TERM_TAGS]:
            atoms = [int(v) for k, v in term.attrib.items() if _PARTICLE_ATTR.match(k)]
            if atoms and all(a in ml for a in atoms):
                group.remove(term)
    return openmm.XmlSerializer.deserialize(ET.tostring(root, encoding="unicode"))


def _exclude_ml_pairs(force: openmm.Force, ml_atoms: List[int], periodic: bool) -> None:
    if isinstance(force, openmm.NonbondedForce):
        for a, i in enumerate(ml_atoms):
            for j in ml_atoms[:a]:
                force.addException(i, j, 0.0, 1.0, 0.0, True)
        if periodic:
            force.setExceptionsUsePeriodicBoundaryConditions(True)
    elif isinstance(force, openmm.CustomNonbondedForce):
        existing = set()
        for k in range(force.getNumExclusions()):
            p, q = force.getExclusionParticles(k)
            existing.add((min(p, q), max(p, q)))
        for a, i in enumerate(ml_atoms):
            for j in ml_atoms[:a]:
                if (min(i, j), max(i, j)) not in existing:
                    force.addExclusion(i, j)


def _warn_about_cut_bonds(topology: app.Topology, ml: Set[int]) -> None:
    cut = [(b[0].index, b[1].index) for b in topology.bonds()
           if (b[0].index in ml) != (b[1].index in ml)]
    if cut:
        warnings.warn(f"mlpot.openmm: {len(cut)} covalent bond(s) cross the ML/MM boundary, "
                      f"e.g. {cut[0]}; the ML region is not capped (no link atoms), so its ML "
                      "energy is that of a radical fragment", RuntimeWarning, stacklevel=3)


def create_mixed_system(model, topology: app.Topology, mm_system: openmm.System,
                        ml_atoms: Iterable[int], remove_constraints: bool = True,
                        backend: str = "auto", device: str = "cpu",
                        force_group: int = 0, jit_optimize: bool = False) -> openmm.System:
    """An ML/MM System: the ML atoms' internal interactions from the model, everything else
    (MM-MM and ML-MM) from ``mm_system`` (mechanical embedding; see the module docstring).

    Args:
        model: an exported model file, an ``ExportedModel`` or a ``Potential``.
        topology: the Topology ``mm_system`` was made from.
        mm_system: the all-MM System (not modified).
        ml_atoms: indices of the atoms the model treats.
        remove_constraints: remove constraints between two ML atoms.
        backend, device, jit_optimize: as for ``create_system``.
        force_group: the force group of the ML force (e.g. to read its energy separately).
    """
    ml_list = sorted({int(i) for i in ml_atoms})
    n = mm_system.getNumParticles()
    if not ml_list:
        raise ValueError("mlpot.openmm: ml_atoms is empty")
    if ml_list[0] < 0 or ml_list[-1] >= n:
        raise ValueError(f"mlpot.openmm: ML atom indices must lie in [0, {n}), got "
                         f"{ml_list[0]}..{ml_list[-1]}")
    if topology.getNumAtoms() != n:
        raise ValueError(f"mlpot.openmm: the topology has {topology.getNumAtoms()} atoms but the "
                         f"System {n} particles")
    ml = set(ml_list)
    _warn_about_cut_bonds(topology, ml)
    periodic = mm_system.usesPeriodicBoundaryConditions()
    system = copy.deepcopy(mm_system)
    forces = [copy.deepcopy(system.getForce(k)) for k in range(system.getNumForces())]
    for k in reversed(range(system.getNumForces())):
        system.removeForce(k)
    for force in forces:
        if force.__class__.__name__ in _BONDED:
            force = _drop_ml_terms(force, ml)
        else:
            _exclude_ml_pairs(force, ml_list, periodic)
        system.addForce(force)
    if remove_constraints:
        for k in reversed(range(system.getNumConstraints())):
            i, j, _ = system.getConstraintParameters(k)
            if i in ml and j in ml:
                system.removeConstraint(k)
    numbers = atomic_numbers_of(topology)
    system.addForce(create_force(model, [numbers[i] for i in ml_list], atoms=ml_list,
                                 periodic=periodic, backend=backend, device=device,
                                 force_group=force_group, jit_optimize=jit_optimize,
                                 system=system))
    return system


def topology_from_ase(atoms, residue_name: str = "MOL") -> app.Topology:
    """An OpenMM Topology for ASE ``Atoms``: one residue (and chain) per covalently bonded
    fragment (ASE's natural cutoffs x 1.2; a fragment whose atoms are not consecutive is split into
    runs of consecutive atoms, as OpenMM wants), bonds included, and the cell as periodic box
    when the atoms are periodic (OpenMM needs a reduced cell: a along x, b in the xy plane).
    Waters are named HOH."""
    import numpy as np
    from ase.neighborlist import natural_cutoffs, neighbor_list
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    from .. import units

    n = len(atoms)
    i, j = neighbor_list("ij", atoms, natural_cutoffs(atoms, mult=1.2))
    graph = coo_matrix((np.ones(len(i)), (i, j)), shape=(n, n))
    _, label = connected_components(graph, directed=False)
    starts = [k for k in range(n) if k == 0 or label[k] != label[k - 1]] + [n]
    top = app.Topology()
    symbols = atoms.get_chemical_symbols()
    for a, b in zip(starts[:-1], starts[1:]):
        water = sorted(atoms.numbers[a:b].tolist()) == [1, 1, 8]
        residue = top.addResidue("HOH" if water else residue_name, top.addChain())
        for k in range(a, b):
            top.addAtom(symbols[k], app.Element.getBySymbol(symbols[k]), residue)
    atom_list = list(top.atoms())
    for a, b in zip(i, j):
        if a < b:
            top.addBond(atom_list[a], atom_list[b])
    if atoms.pbc.all():
        cell = atoms.cell.array * units.ANGSTROM_TO_NM
        top.setPeriodicBoxVectors([openmm.Vec3(*row) for row in cell])
    return top


def ml_atoms_of(topology: app.Topology, residues: Optional[Iterable[str]] = None,
                chains: Optional[Iterable[int]] = None) -> List[int]:
    """Indices of the atoms in the named residues and/or chain indices (a convenience for
    choosing the ML region)."""
    residues = set(residues or [])
    chains = set(chains or [])
    return [a.index for a in topology.atoms()
            if a.residue.name in residues or a.residue.chain.index in chains]
