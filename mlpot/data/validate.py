"""Checks every structure passes before mlpot uses it; each failure names the frame."""
from __future__ import annotations

from typing import Optional

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
    if min_distance is not None and n > 1:
        i, j, s = neighbor_list_batch(data.positions, data.cell, data.pbc, data.ptr,
                                      float(min_distance))
        if i.numel():
            d = pair_vectors(data.positions, data.cell[0], data.batch, i, j, s).norm(dim=1)
            k = int(torch.argmin(d))
            raise DataError(
                f"{where}: atoms {int(i[k])} and {int(j[k])} are {float(d[k]):.3f} A apart, closer "
                f"than {min_distance} A: not a physical structure (wrong units? duplicated atoms?). "
                "Fix or drop the frame, or lower min_distance")


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
