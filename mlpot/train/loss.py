"""Losses: weighted mean squared errors of per-atom energy, force components and stress.

Labels missing from some structures of a batch are NaN (see AtomicData) and are masked out.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch

from .. import keys as K
from .config import LossConfig


def _masked_mse(pred: torch.Tensor, target: torch.Tensor) -> Tuple[torch.Tensor, int]:
    mask = torch.isfinite(target)
    n = int(mask.sum())
    if n == 0:
        return pred.new_zeros(()), 0
    diff = (pred - torch.where(mask, target, pred).detach())[mask]
    return (diff.to(torch.float64) ** 2).mean(), n


class Loss:
    """L = w_E mean((dE/N)^2) + w_F mean(dF^2) + w_S mean(dS^2), weights possibly scheduled."""

    def __init__(self, cfg: LossConfig):
        self.cfg = cfg

    def weights(self, lr_ratio: float = 1.0) -> Dict[str, float]:
        out = {}
        for key in ("energy", "forces", "stress"):
            final = getattr(self.cfg, key)
            start = getattr(self.cfg, key + "_start")
            out[key] = final if start is None else final + (start - final) * lr_ratio
        return out

    @property
    def needs_forces(self) -> bool:
        return self.cfg.forces > 0 or (self.cfg.forces_start or 0) > 0

    @property
    def needs_stress(self) -> bool:
        return self.cfg.stress > 0 or (self.cfg.stress_start or 0) > 0

    def __call__(self, pred: Dict[str, torch.Tensor], batch, lr_ratio: float = 1.0
                 ) -> Tuple[torch.Tensor, Dict[str, float]]:
        w = self.weights(lr_ratio)
        total = pred[K.ENERGY].new_zeros(())
        parts: Dict[str, float] = {}
        n_atoms = batch.num_atoms.to(torch.float64)
        if batch.energy is not None and w["energy"] > 0:
            mse, _ = _masked_mse(pred[K.ENERGY] / n_atoms, batch.energy / n_atoms)
            total = total + w["energy"] * mse
            parts["energy"] = float(mse.detach())
        if batch.forces is not None and w["forces"] > 0 and K.FORCES in pred:
            mse, _ = _masked_mse(pred[K.FORCES], batch.forces)
            total = total + w["forces"] * mse
            parts["forces"] = float(mse.detach())
        if batch.stress is not None and w["stress"] > 0 and K.STRESS in pred:
            mse, _ = _masked_mse(pred[K.STRESS], batch.stress)
            total = total + w["stress"] * mse
            parts["stress"] = float(mse.detach())
        return total, parts
