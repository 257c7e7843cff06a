"""Statistics of the training data that models are initialised with."""
from __future__ import annotations

from typing import Optional, Sequence

import torch


def fit_reference_energies(structures, num_types: int, ridge: float = 1e-8,
                           offsets: Optional[Sequence[float]] = None) -> torch.Tensor:
    """Per-element reference energies E0 by least squares: E_b ~ sum_t count_bt E0_t  # [T]

    ``offsets``: an energy per structure that the model adds by itself (a repulsion prior,
    ``Potential.prior_energies``), subtracted from the labels first. Structures without an
    energy label are skipped. A small ridge keeps elements whose counts
    never vary (e.g. always 64 O : 128 H in water) determined; least squares then spreads the
    energy over them by the minimum-norm solution.
    """
    rows, targets = [], []
    for k, s in enumerate(structures):
        if s.energy is None or not torch.isfinite(s.energy).all():
            continue
        rows.append(torch.bincount(s.atom_types, minlength=num_types).to(torch.float64))
        offset = float(offsets[k]) if offsets is not None else 0.0
        targets.append(s.energy.to(torch.float64).reshape(()) - offset)
    if not rows:
        return torch.zeros(num_types, dtype=torch.float64)
    a = torch.stack(rows)  # [S, T]
    y = torch.stack(targets)  # [S]
    lhs = a.T @ a + ridge * torch.eye(num_types, dtype=torch.float64) * a.shape[0]
    return torch.linalg.solve(lhs, a.T @ y)


def atomic_reference_energies(structures, num_types: int,
                              fallback: torch.Tensor) -> torch.Tensor:
    """Per-element reference energies from per-atom energy labels (a teacher's): the mean label
    of each element's atoms, the least-squares E0 for these labels  # [T]. Elements without a
    labelled atom keep ``fallback``'s value."""
    sums = torch.zeros(num_types, dtype=torch.float64)
    counts = torch.zeros(num_types, dtype=torch.float64)
    for s in structures:
        a = s.atomic_energies
        if a is None:
            continue
        ok = torch.isfinite(a)
        sums.index_add_(0, s.atom_types[ok], a[ok].to(torch.float64))
        counts.index_add_(0, s.atom_types[ok], torch.ones_like(a[ok], dtype=torch.float64))
    out = torch.as_tensor(fallback, dtype=torch.float64).clone()
    has = counts > 0
    out[has] = sums[has] / counts[has]
    return out


def force_rms(structures) -> float:
    """Root mean square of the force components over labelled structures (eV/A), or 1.0."""
    total, count = 0.0, 0
    for s in structures:
        if s.forces is None or not torch.isfinite(s.forces).all():
            continue
        total += float((s.forces.double() ** 2).sum())
        count += s.forces.numel()
    return (total / count) ** 0.5 if count else 1.0
