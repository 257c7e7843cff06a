"""Losses: weighted mean squared errors of per-atom energy, force components and stress.

Labels missing from some structures of a batch are NaN (see AtomicData) and are masked out.
Per-structure weights (``AtomicData.energy_weight``/``forces_weight``, from
``data.energy_weight_key``/``forces_weight_key``) multiply each squared error; the mean is still
over the entries, so a weight below 1 lowers a structure's share of the loss. A teacher's
Hessian rows (``loss.hessian``, Hessian distillation) add a term on random rows of each
structure's Hessian, computed from the forces and the positions they came from
(``mlpot.hessian``).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from .. import keys as K
from ..hessian import sampled_row_loss
from .config import LossConfig


def _masked_mse(pred: torch.Tensor, target: torch.Tensor,
                weight: Optional[torch.Tensor] = None,
                count: Optional[float] = None) -> Tuple[torch.Tensor, int]:
    """Mean over the finite entries of ``target`` of weight * (pred - target)^2; ``weight``
    broadcasts against the targets (a per-structure or per-atom weight, 1 when None). With
    ``count``, the sum is divided by it instead (the entries of the global batch of several
    processes: see mlpot.train.distributed)."""
    mask = torch.isfinite(target)
    n = int(mask.sum())
    if n == 0:
        return pred.new_zeros((), dtype=torch.float64), 0
    sq = (pred - torch.where(mask, target, pred).detach()).to(torch.float64) ** 2
    if weight is not None:
        sq = sq * weight.to(torch.float64).reshape(weight.shape + (1,) * (sq.dim() - 1))
    return (sq[mask].mean() if count is None else sq[mask].sum() / count), n


def entry_counts(batch) -> torch.Tensor:
    """The finite energy, force-component, stress-component and atomic-energy labels of a batch
    [4] (float64): the denominators of the loss's means, summed over processes in data-parallel
    training."""
    return torch.tensor([0.0 if t is None else float(torch.isfinite(t).sum())
                         for t in (batch.energy, batch.forces, batch.stress,
                                   batch.atomic_energies)], dtype=torch.float64)


class Loss:
    """L = w_E mean((dE/N)^2) + w_F mean(dF^2) + w_S mean(dS^2) + w_A mean(dE_i^2)
    + w_H mean(dH^2), weights possibly scheduled; w_A over the atoms with an atomic-energy label
    (a teacher's), w_H over sampled labelled Hessian rows (in training only: it needs the
    positions the forces were computed from, with their graph)."""

    def __init__(self, cfg: LossConfig):
        self.cfg = cfg

    def weights(self, lr_ratio: float = 1.0) -> Dict[str, float]:
        out = {}
        for key in ("energy", "forces", "stress", "atomic_energies", "hessian"):
            final = getattr(self.cfg, key)
            start = getattr(self.cfg, key + "_start")
            out[key] = final if start is None else final + (start - final) * lr_ratio
        return out

    @property
    def needs_forces(self) -> bool:
        return self.cfg.forces > 0 or (self.cfg.forces_start or 0) > 0

    @property
    def needs_atomic_energies(self) -> bool:
        return self.cfg.atomic_energies > 0 or (self.cfg.atomic_energies_start or 0) > 0

    @property
    def needs_hessian(self) -> bool:
        return self.cfg.hessian > 0 or (self.cfg.hessian_start or 0) > 0

    @property
    def needs_stress(self) -> bool:
        return self.cfg.stress > 0 or (self.cfg.stress_start or 0) > 0

    def __call__(self, pred: Dict[str, torch.Tensor], batch, lr_ratio: float = 1.0,
                 counts: Optional[torch.Tensor] = None,
                 positions: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Dict[str, float]]:
        """The loss and its parts (the unweighted MSEs). ``counts`` [4]: divide the sums by these
        entry counts (of the global batch, ``entry_counts`` summed over processes) instead of
        this batch's own. ``positions``: the leaf the forces were computed from (with
        create_graph), for the Hessian term; without it the term is left out (validation). The
        Hessian term is each process's own mean."""
        w = self.weights(lr_ratio)
        c = [None] * 4 if counts is None else [max(float(x), 1.0) for x in counts]
        total = pred[K.ENERGY].new_zeros(())
        parts: Dict[str, float] = {}
        n_atoms = batch.num_atoms.to(torch.float64)
        if batch.energy is not None and w["energy"] > 0:
            mse, _ = _masked_mse(pred[K.ENERGY] / n_atoms, batch.energy / n_atoms,
                                 batch.energy_weight, c[0])
            total = total + w["energy"] * mse
            parts["energy"] = float(mse.detach())
        if batch.forces is not None and w["forces"] > 0 and K.FORCES in pred:
            per_atom = None if batch.forces_weight is None else \
                batch.forces_weight.repeat_interleave(batch.num_atoms)
            mse, _ = _masked_mse(pred[K.FORCES], batch.forces, per_atom, c[1])
            total = total + w["forces"] * mse
            parts["forces"] = float(mse.detach())
        if batch.stress is not None and w["stress"] > 0 and K.STRESS in pred:
            mse, _ = _masked_mse(pred[K.STRESS], batch.stress, count=c[2])
            total = total + w["stress"] * mse
            parts["stress"] = float(mse.detach())
        if batch.atomic_energies is not None and w["atomic_energies"] > 0:
            mse, _ = _masked_mse(pred[K.ATOMIC_ENERGIES], batch.atomic_energies, count=c[3])
            total = total + w["atomic_energies"] * mse
            parts["atomic_energies"] = float(mse.detach())
        if batch.hessian is not None and w["hessian"] > 0 and positions is not None \
                and K.FORCES in pred:
            mse, n = sampled_row_loss(pred[K.FORCES], positions, batch.hessian, batch.ptr,
                                      self.cfg.hessian_rows)
            if mse is not None:
                total = total + w["hessian"] * mse
                parts["hessian"] = float(mse.detach())
        return total, parts
