"""Checks every structure passes before mlpot uses it; each failure names the frame."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..neighbors import neighbor_list_batch, pair_vectors
from .errors import DataError

_AXES = "xyz"


def check_structure(data, where: str, min_distance: Optional[float] = 0.5) -> None:
    """Raise ``DataError`` for NaN/inf values, inconsistent sizes, a zero-volume periodic cell, or
    atoms closer than ``min_distance`` Angstrom (None: no distance check)."""
    n = data.positions.shape[0]
    if n == 0:
        raise DataError(f"{where}: the frame has no atoms")
    if data.atomic_numbers.shape[0] != n:
        raise DataError(f"{where}: {data.atomic_numbers.shape[0]} atomic numbers for {n} positions")
    if (data.atomic_numbers <= 0).any():
        raise DataError(f"{where}: atomic number 0 or negative (a dummy 'X' atom?); "
                        "give real elements")
    _finite(data.positions, "positions", where)
    _finite(data.cell, "cell", where)
    for name in ("energy", "forces", "stress", "virial"):
        value = getattr(data, name)
        if value is not None:
            _finite(value, name, where)
    if data.forces is not None and data.forces.shape != (n, 3):
        raise DataError(f"{where}: forces have shape {tuple(data.forces.shape)}; expected ({n}, 3)")
    check_cell(data.cell[0], data.pbc[0], where)
    if min_distance is not None:
        pair = closest_pair(data.positions, data.cell[0], data.pbc[0], min_distance)
        if pair is not None:
            i, j, d = pair
            raise DataError(
                f"{where}: atoms {i} and {j} are {d:.3f} A apart, closer "
                f"than {min_distance} A: not a physical structure (wrong units? duplicated atoms?). "
                "Fix or drop the frame, or lower min_distance")


def closest_pair(positions: torch.Tensor, cell: torch.Tensor, pbc: torch.Tensor,
                 min_distance: float) -> Optional[Tuple[int, int, float]]:
    """(i, j, distance in A) of the closest pair of atoms (periodic images included) closer than
    `min_distance` Angstrom, or None. A neighbor list with `min_distance` as cutoff: O(N), and
    with so short a cutoff it finds few or no pairs (cheap enough to run at every MD step)."""
    n = positions.shape[0]
    if n < 2 and not bool(torch.as_tensor(pbc).any()):
        return None
    positions = positions.detach()
    cell = torch.as_tensor(cell).to(device=positions.device, dtype=positions.dtype).reshape(1, 3, 3)
    pbc = torch.as_tensor(pbc).to(device=positions.device, dtype=torch.bool).reshape(1, 3)
    ptr = torch.tensor([0, n], dtype=torch.long, device=positions.device)
    i, j, s = neighbor_list_batch(positions, cell, pbc, ptr, float(min_distance))
    if i.numel() == 0:
        return None
    batch = torch.zeros(n, dtype=torch.long, device=positions.device)
    d = pair_vectors(positions, cell[0], batch, i, j, s).norm(dim=1)
    k = int(torch.argmin(d))
    return int(i[k]), int(j[k]), float(d[k])


def _finite(t: torch.Tensor, name: str, where: str) -> None:
    bad = ~torch.isfinite(t)
    if bad.any():
        first = torch.nonzero(bad)[0].tolist()
        raise DataError(f"{where}: {name} contain NaN or infinite values (first at index {first}); "
                        "fix or drop the frame")


def check_cell(cell: torch.Tensor, pbc: torch.Tensor, where: str) -> None:
    """A periodic direction needs lattice vectors that span a non-zero volume (area, length)."""
    dims = [k for k in range(3) if bool(pbc[k])]
    if not dims:
        return
    rows = cell[dims].double()
    gram = rows @ rows.T
    measure = float(torch.linalg.det(gram)) ** 0.5 if len(dims) > 1 else float(rows.norm())
    lengths = rows.norm(dim=1)
    if float(lengths.min()) < 1e-6 or measure < 1e-6 * float(lengths.prod()):
        axes = "".join(_AXES[k] for k in dims)
        raise DataError(
            f"{where}: the cell is periodic along {axes} but its lattice vectors there span zero "
            f"volume ({cell.tolist()}); give the cell (extxyz: Lattice=\"...\") or set pbc=False "
            "for a molecule")
