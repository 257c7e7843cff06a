"""Physics checks every mlpot model must pass, importable by tests of any model.

Each ``assert_*`` takes a ``Potential`` (float64 for the finite-difference checks) and an
``AtomicData`` and raises ``AssertionError`` with the size of the violation.
"""
from __future__ import annotations

import io
from dataclasses import replace
from typing import Optional

import numpy as np
import torch
from ase import Atoms
from ase.build import molecule

from . import keys as K
from .data import AtomicData, TypeMap


# ---------------------------------------------------------------------------- structures
def random_periodic(symbols=("O", "H"), n_atoms: int = 12, seed: int = 0,
                    triclinic: bool = True, min_dist: float = 0.9, density: float = 0.1
                    ) -> Atoms:
    """Random atoms in a (triclinic) periodic cell at ``density`` atoms/A^3, no pair closer than
    ``min_dist``."""
    rng = np.random.default_rng(seed)
    length = (n_atoms / density) ** (1 / 3)
    cell = np.eye(3) * length
    if triclinic:
        cell = cell + rng.uniform(-0.25, 0.25, (3, 3)) * length
    pos = []
    tries = 0
    while len(pos) < n_atoms:
        tries += 1
        if tries > 100000:
            raise RuntimeError("could not place atoms; lower min_dist or density")
        p = rng.uniform(0, 1, 3) @ cell
        atoms = Atoms("H" * (len(pos) + 1), positions=pos + [p], cell=cell, pbc=True)
        if len(pos) and atoms.get_distances(len(pos), list(range(len(pos))), mic=True).min() < min_dist:
            continue
        pos.append(p)
    names = [symbols[k % len(symbols)] for k in range(n_atoms)]
    return Atoms(names, positions=pos, cell=cell, pbc=True)


def small_molecule(name: str = "CH3CH2OH", seed: int = 0, rattle: float = 0.05) -> Atoms:
    atoms = molecule(name)
    atoms.rattle(rattle, seed=seed)
    return atoms


def to_data(atoms: Atoms, model, dtype: torch.dtype = torch.float64) -> AtomicData:
    """Typed AtomicData for ``model`` (no neighbors: the model finds them)."""
    d = AtomicData.from_ase(atoms, dtype=dtype)
    d.atom_types = TypeMap(model.type_map).types(d.atomic_numbers.numpy())
    return d


def _run(model, data: AtomicData, stress: bool = False):
    out = model(data.as_dict(), compute_forces=True, compute_stress=stress)
    return {k: v.detach() for k, v in out.items()}


def _rotation(seed: int) -> torch.Tensor:
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return torch.tensor(q)


# ---------------------------------------------------------------------------- symmetry
def assert_invariance(model, data: AtomicData, seed: int = 0, atol: float = 1e-8) -> None:
    """Energy invariant and forces equivariant under a rotation, a translation and a permutation
    of atoms (and, for periodic cells, under wrapping atoms into other images)."""
    ref = _run(model, data)
    n = data.positions.shape[0]
    dt = data.positions.dtype
    rot = _rotation(seed).to(dt)
    moved = replace(data)
    moved.positions = data.positions @ rot.T + torch.tensor([1.3, -0.7, 2.1], dtype=dt)
    moved.cell = data.cell @ rot.T
    out = _run(model, moved)
    _close(out[K.ENERGY], ref[K.ENERGY], atol, "energy under rotation + translation")
    _close(out[K.FORCES], ref[K.FORCES] @ rot.T, atol, "forces under rotation + translation")

    perm = torch.from_numpy(np.random.default_rng(seed + 1).permutation(n))
    permuted = replace(data)
    permuted.positions = data.positions[perm]
    permuted.atomic_numbers = data.atomic_numbers[perm]
    permuted.atom_types = data.atom_types[perm]
    out = _run(model, permuted)
    _close(out[K.ENERGY], ref[K.ENERGY], atol, "energy under permutation")
    _close(out[K.FORCES], ref[K.FORCES][perm], atol, "forces under permutation")

    if bool(data.pbc.all()):
        shifted = replace(data)
        images = torch.from_numpy(np.random.default_rng(seed + 2).integers(-2, 3, (n, 3))).to(dt)
        shifted.positions = data.positions + images @ data.cell[0]
        out = _run(model, shifted)
        _close(out[K.ENERGY], ref[K.ENERGY], atol, "energy under moving atoms to other images")
        _close(out[K.FORCES], ref[K.FORCES], atol, "forces under moving atoms to other images")


def _close(a: torch.Tensor, b: torch.Tensor, atol: float, what: str, rtol: float = 0.0) -> None:
    err = float((a - b).abs().max()) if a.numel() else 0.0
    tol = atol + rtol * float(b.abs().max()) if b.numel() else atol
    assert err <= tol, f"{what}: max deviation {err:.3e} > {tol:.1e}"


# ---------------------------------------------------------------------------- derivatives
def assert_forces_are_gradients(model, data: AtomicData, delta: float = 1e-4,
                                n_checks: int = 6, rtol: float = 1e-5, atol: float = 1e-6,
                                seed: int = 0) -> None:
    """Forces equal -dE/dx by central finite differences (float64 models)."""
    ref = _run(model, data)
    rng = np.random.default_rng(seed)
    n = data.positions.shape[0]
    for a, c in zip(rng.integers(0, n, n_checks), rng.integers(0, 3, n_checks)):
        e = []
        for sign in (1.0, -1.0):
            d = replace(data)
            d.positions = data.positions.clone()
            d.positions[a, c] += sign * delta
            e.append(float(_run(model, d)[K.ENERGY].sum()))
        fd = -(e[0] - e[1]) / (2 * delta)
        an = float(ref[K.FORCES][a, c])
        assert abs(fd - an) <= atol + rtol * abs(an) + 1e-3 * delta, \
            f"force on atom {a} along {'xyz'[c]}: autograd {an:.8f}, finite differences {fd:.8f}"


def assert_stress_is_strain_derivative(model, data: AtomicData, delta: float = 1e-5,
                                       rtol: float = 1e-5, atol: float = 1e-7) -> None:
    """stress = (1/V) dE/d(eps) by central finite differences of a homogeneous strain."""
    ref = _run(model, data, stress=True)
    volume = float(torch.linalg.det(data.cell[0]).abs())
    fd = np.zeros((3, 3))
    for a in range(3):
        for b in range(3):
            e = []
            for sign in (1.0, -1.0):
                eps = torch.zeros(3, 3, dtype=data.positions.dtype)
                eps[a, b] += 0.5 * sign * delta
                eps[b, a] += 0.5 * sign * delta
                d = replace(data)
                d.positions = data.positions @ (torch.eye(3, dtype=eps.dtype) + eps)
                d.cell = data.cell @ (torch.eye(3, dtype=eps.dtype) + eps)
                e.append(float(_run(model, d)[K.ENERGY].sum()))
            fd[a, b] = (e[0] - e[1]) / (2 * delta) / volume
    an = ref[K.STRESS][0].numpy()
    err = np.abs(fd - an).max()
    assert err <= atol + rtol * np.abs(an).max(), \
        f"stress: autograd {an.tolist()} vs finite differences {fd.tolist()} (max dev {err:.2e})"


# ---------------------------------------------------------------------------- locality
def assert_extensive(model, atoms: Atoms, rtol: float = 1e-10, atol: float = 1e-8) -> None:
    """The energy of a 2x2x2 supercell is 8 times the cell's; forces repeat."""
    small = _run(model, to_data(atoms, model))
    big = _run(model, to_data(atoms.repeat((2, 2, 2)), model))
    _close(big[K.ENERGY], 8 * small[K.ENERGY], atol, "supercell energy vs 8x cell energy",
           rtol=rtol)
    _close(big[K.FORCES][: len(atoms)], small[K.FORCES], 10 * atol, "supercell forces")


def assert_smooth_at_cutoff(model, symbols=("O", "H"), atol: float = 1e-6) -> None:
    """A pair of atoms just inside and just outside the cutoff: the energy changes continuously
    (no jump) and the force goes to zero."""
    rc = model.cutoff
    energies, forces = [], []
    for r in (rc - 1e-4, rc - 1e-6, rc + 1e-6, rc + 1e-4):
        atoms = Atoms(list(symbols[:2]), positions=[[0, 0, 0], [r, 0, 0]])
        out = _run(model, to_data(atoms, model))
        energies.append(float(out[K.ENERGY][0]))
        forces.append(float(out[K.FORCES].abs().max()))
    assert abs(energies[1] - energies[2]) < atol, \
        f"energy jumps by {energies[1] - energies[2]:.3e} eV across the cutoff"
    assert energies[2] == energies[3], "energy changes beyond the cutoff"
    assert forces[1] < 100 * atol and forces[2] == 0.0, \
        f"force just inside the cutoff {forces[1]:.3e} eV/A, just outside {forces[2]:.3e}"


def assert_batch_equals_single(model, items, atol: float = 1e-9) -> None:
    """A batch of structures gives the per-structure results (and no cross-structure terms)."""
    batch = AtomicData.collate(items)
    out = _run(model, batch, stress=bool(batch.pbc.all()))
    for b, item in enumerate(items):
        single = _run(model, item, stress=bool(batch.pbc.all()))
        a0, a1 = int(batch.ptr[b]), int(batch.ptr[b + 1])
        _close(out[K.ENERGY][b], single[K.ENERGY][0], atol, f"batched energy of structure {b}")
        _close(out[K.FORCES][a0:a1], single[K.FORCES], atol, f"batched forces of structure {b}")
        if K.STRESS in single:
            _close(out[K.STRESS][b], single[K.STRESS][0], atol, f"batched stress of {b}")


# ---------------------------------------------------------------------------- scripting
def assert_script_equals_eager(model, data: AtomicData, atol: float = 1e-10,
                               scripted: Optional[torch.jit.ScriptModule] = None) -> None:
    """TorchScript gives the eager numbers, also after a save/load round trip."""
    from .models import script

    scripted = scripted if scripted is not None else script(model)
    stress = bool(data.pbc.all())
    eager = _run(model, data, stress)
    got = _run(scripted, data, stress)
    from . import jit

    buf = io.BytesIO()
    with jit.quiet():
        torch.jit.save(scripted, buf)
        buf.seek(0)
        loaded = torch.jit.load(buf)
    again = _run(loaded, data, stress)
    for key in eager:
        _close(got[key], eager[key], atol, f"scripted vs eager {key}", rtol=1e-6)
        _close(again[key], eager[key], atol, f"saved+loaded vs eager {key}", rtol=1e-6)


# ---------------------------------------------------------------------------- all of them
def assert_model_contract(model, seed: int = 1) -> None:
    """Every check above on one float64 model, on small random periodic structures and a
    molecule of its first two elements: invariance, forces and stress against finite
    differences, extensivity, smoothness at the cutoff, batch == single, TorchScript == eager
    (also after save/load). tests/test_model_contract.py runs it on every registered family; a
    package that adds a family can run it in its own tests."""
    symbols = tuple(model.type_map[:2]) if len(model.type_map) > 1 else tuple(model.type_map) * 2
    periodic = to_data(random_periodic(symbols, n_atoms=10, seed=seed), model)
    mol = to_data(Atoms(list(symbols) + [symbols[0]],
                        positions=[[0.0, 0.0, 0.0], [0.96, 0.0, 0.0], [-0.24, 0.93, 0.1]]), model)
    for data in (periodic, mol):
        assert_invariance(model, data, seed=seed)
    assert_forces_are_gradients(model, periodic, n_checks=3, seed=seed)
    assert_stress_is_strain_derivative(model, periodic)
    assert_extensive(model, random_periodic(symbols, n_atoms=6, seed=seed + 1))
    assert_smooth_at_cutoff(model, symbols)
    other = to_data(random_periodic(symbols, n_atoms=5, seed=seed + 2), model)
    assert_batch_equals_single(model, [periodic, other])
    assert_script_equals_eager(model, periodic)
