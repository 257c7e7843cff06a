"""Hessian rows: labels by central differences of forces, the file layout, and the training term.

Hessian distillation (Amin, Raja, Krishnapriyan, ICLR 2025, arXiv 2501.09009): a student learns
the second derivatives of its teacher's energy, 3N numbers per row where a force component gives
one. The teacher's rows come from any labeller that gives forces, by central differences,

    H[r, :] = d^2E / dR_r dR = -(F(R + h e_r) - F(R - h e_r)) / (2 h)       (eV/A^2)

(the Hessian is symmetric, so the column found by displacing coordinate r is row r), for the
three coordinates of each of ``k`` atoms of a structure: 6k force calls per structure. A model
labeller evaluates the displaced copies in batches.

In a file (extxyz), a structure of N atoms carries its 3N x 3N Hessian as a per-atom array of
9N numbers: atom a holds rows 3a, 3a+1, 3a+2 (x, y, z), each over all 3N coordinates in the
order atom 0 x y z, atom 1 x y z, ...; the rows of atoms without a label are NaN. In a batch
(``AtomicData.hessian``) each structure's matrix is flattened row-major and the structures are
concatenated.

Training (``loss.hessian``): each step takes ``loss.hessian_rows`` labelled rows of each
structure at random, the student's same rows by one more backward pass through its forces
(-dF_r/dR, which keeps the graph for the parameters' gradient), and adds the weighted mean
squared difference.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch

def choose_atoms(n_atoms: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """``k`` distinct atoms of ``n_atoms`` at random (all of them when ``k`` < 0 or >= N),
    sorted."""
    if k < 0 or k >= n_atoms:
        return np.arange(n_atoms)
    return np.sort(rng.choice(n_atoms, size=k, replace=False))


def finite_difference_rows(forces_fn: Callable[[List], List[np.ndarray]], atoms,
                           atom_indices: Sequence[int], delta: float) -> np.ndarray:
    """The rows of the Hessian of the chosen atoms' coordinates [3k, 3N] (eV/A^2) by central
    differences of ``forces_fn`` (a list of ase.Atoms -> a list of [N, 3] forces, eV/A) with
    displacements of ``delta`` A; row 3m + c is coordinate c of ``atom_indices[m]``."""
    if delta <= 0:
        raise ValueError(f"hessian delta {delta}: give a displacement > 0 (A)")
    displaced = []
    for a in atom_indices:
        for c in range(3):
            for sign in (1.0, -1.0):
                d = atoms.copy()
                d.calc = None
                d.positions[a, c] += sign * delta
                displaced.append(d)
    forces = forces_fn(displaced)
    n = len(atoms)
    rows = np.empty((3 * len(atom_indices), 3 * n), dtype=np.float64)
    for r in range(rows.shape[0]):
        plus = np.asarray(forces[2 * r], dtype=np.float64).reshape(3 * n)
        minus = np.asarray(forces[2 * r + 1], dtype=np.float64).reshape(3 * n)
        rows[r] = -(plus - minus) / (2.0 * delta)
    return rows


def rows_to_array(n_atoms: int, atom_indices: Sequence[int], rows: np.ndarray) -> np.ndarray:
    """The file layout [N, 9N] of the rows of ``atom_indices`` (NaN for the other atoms)."""
    full = np.full((3 * n_atoms, 3 * n_atoms), np.nan, dtype=np.float64)
    for m, a in enumerate(atom_indices):
        full[3 * a:3 * a + 3] = rows[3 * m:3 * m + 3]
    return full.reshape(n_atoms, 9 * n_atoms)


def array_to_matrix(values, n_atoms: int, where: str = "", key: str = "hessian") -> np.ndarray:
    """The [3N, 3N] Hessian of the file layout (ValueError naming ``where`` for another shape
    or an infinite entry; NaN rows are missing labels)."""
    a = np.asarray(values, dtype=np.float64)
    if a.size != 9 * n_atoms * n_atoms:
        raise ValueError(f"{where}: {key} has {a.size} numbers; a structure of {n_atoms} atoms "
                         f"needs {9 * n_atoms} per atom (3 Hessian rows over 3N coordinates)")
    m = a.reshape(3 * n_atoms, 3 * n_atoms)
    if np.isinf(m).any():
        raise ValueError(f"{where}: {key} holds an infinite value; fix the file or drop the "
                         "frame")
    rows_ok = np.isfinite(m).all(axis=1)
    if not (rows_ok | np.isnan(m).all(axis=1)).all():
        raise ValueError(f"{where}: {key} has a row that is partly NaN; a row is either all "
                         "numbers (a label) or all NaN (none)")
    return m


def _blocks(ptr: torch.Tensor) -> List[Tuple[int, int, int]]:
    """(first atom, atoms, offset into the flattened Hessians) of each structure."""
    out, off = [], 0
    p = ptr.tolist()
    for a0, a1 in zip(p[:-1], p[1:]):
        n = a1 - a0
        out.append((a0, n, off))
        off += 9 * n * n
    return out


def sampled_row_loss(forces: torch.Tensor, positions: torch.Tensor, hessian: torch.Tensor,
                     ptr: torch.Tensor, rows_per_structure: int = 1,
                     generator: Optional[torch.Generator] = None
                     ) -> Tuple[Optional[torch.Tensor], int]:
    """Mean squared difference (eV^2/A^4) between ``rows_per_structure`` random labelled rows
    of each structure's Hessian label and the model's same rows, -d(forces_r)/d(positions),
    with the graph kept (create_graph) so the parameters' gradient flows through it. ``forces``
    [N, 3] must have been computed from ``positions`` [N, 3] with create_graph. (None, 0) when
    no structure of the batch has a labelled row."""
    picks: List[List[Tuple[int, int]]] = [[] for _ in range(rows_per_structure)]
    targets: List[List[torch.Tensor]] = [[] for _ in range(rows_per_structure)]
    blocks = _blocks(ptr)
    for b, (a0, n, off) in enumerate(blocks):
        m = hessian[off:off + 9 * n * n].reshape(3 * n, 3 * n)
        labelled = torch.nonzero(torch.isfinite(m).all(dim=1)).reshape(-1)
        if labelled.numel() == 0:
            continue
        k = min(rows_per_structure, int(labelled.numel()))
        chosen = labelled[torch.randperm(int(labelled.numel()), generator=generator)[:k]]
        for s, r in enumerate(chosen.tolist()):
            picks[s].append((b, r))
            targets[s].append(m[r])
    if not picks[0]:
        return None, 0
    sq_sum = forces.new_zeros((), dtype=torch.float64)
    count = 0
    for s in range(rows_per_structure):
        if not picks[s]:
            continue
        # one backward pass gives one row per structure: the structures do not interact
        atoms = torch.tensor([blocks[b][0] + r // 3 for b, r in picks[s]], device=forces.device)
        comps = torch.tensor([r % 3 for b, r in picks[s]], device=forces.device)
        selected = forces[atoms, comps].sum()
        (grad,) = torch.autograd.grad([selected], [positions], create_graph=True)
        for (b, r), t in zip(picks[s], targets[s]):
            a0, n, _ = blocks[b]
            pred = -grad[a0:a0 + n].reshape(3 * n).to(torch.float64)  # H[r, :] = -dF_r/dR
            sq_sum = sq_sum + ((pred - t.to(pred.device)) ** 2).sum()
            count += 3 * n
    return sq_sum / count, count
