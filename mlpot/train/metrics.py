"""Error metrics in the units people report: meV/atom for energies, meV/A for forces (per
component), meV/A^3 for stress (and GPa)."""
from __future__ import annotations

from typing import Dict, List

import torch

from .. import keys as K
from ..units import EV_PER_A3_TO_GPA


class MetricAccumulator:
    """Collects predictions and labels batch by batch; ``result()`` gives MAE and RMSE."""

    def __init__(self):
        self.e_pred: List[torch.Tensor] = []
        self.e_ref: List[torch.Tensor] = []
        self.n_atoms: List[torch.Tensor] = []
        self.f_err: List[torch.Tensor] = []
        self.f_pred: List[torch.Tensor] = []
        self.f_ref: List[torch.Tensor] = []
        self.s_err: List[torch.Tensor] = []

    def add(self, pred: Dict[str, torch.Tensor], batch) -> None:
        if batch.energy is not None:
            ok = torch.isfinite(batch.energy)
            self.e_pred.append(pred[K.ENERGY].detach().double().cpu()[ok.cpu()])
            self.e_ref.append(batch.energy.double().cpu()[ok.cpu()])
            self.n_atoms.append(batch.num_atoms.double().cpu()[ok.cpu()])
        if batch.forces is not None and K.FORCES in pred:
            ok = torch.isfinite(batch.forces).all(dim=1).cpu()
            fp = pred[K.FORCES].detach().double().cpu()[ok]
            fr = batch.forces.double().cpu()[ok]
            self.f_pred.append(fp)
            self.f_ref.append(fr)
        if batch.stress is not None and K.STRESS in pred:
            ok = torch.isfinite(batch.stress).reshape(-1, 9).all(dim=1).cpu()
            self.s_err.append((pred[K.STRESS].detach().double().cpu() - batch.stress.double().cpu())[ok])

    def result(self) -> Dict[str, float]:
        out: Dict[str, float] = {}
        if self.e_pred and sum(len(x) for x in self.e_pred):
            ep, er, n = torch.cat(self.e_pred), torch.cat(self.e_ref), torch.cat(self.n_atoms)
            d = (ep - er) / n * 1e3
            out["energy_mae_meV_per_atom"] = float(d.abs().mean())
            out["energy_rmse_meV_per_atom"] = float(d.pow(2).mean().sqrt())
            out["energy_rmse_meV"] = float(((ep - er) * 1e3).pow(2).mean().sqrt())
            out["frames"] = float(len(ep))
        if self.f_pred and sum(len(x) for x in self.f_pred):
            d = (torch.cat(self.f_pred) - torch.cat(self.f_ref)) * 1e3
            out["forces_mae_meV_per_A"] = float(d.abs().mean())
            out["forces_rmse_meV_per_A"] = float(d.pow(2).mean().sqrt())
        if self.s_err and sum(len(x) for x in self.s_err):
            d = torch.cat(self.s_err)
            out["stress_mae_meV_per_A3"] = float(d.abs().mean() * 1e3)
            out["stress_rmse_meV_per_A3"] = float(d.pow(2).mean().sqrt() * 1e3)
            out["stress_rmse_GPa"] = float(d.pow(2).mean().sqrt() * EV_PER_A3_TO_GPA)
        return out

    def parity(self) -> Dict[str, torch.Tensor]:
        """Arrays for parity plots: per-atom energies and force components, predicted and ref."""
        out = {}
        if self.e_pred:
            n = torch.cat(self.n_atoms)
            out["energy_pred"] = torch.cat(self.e_pred) / n
            out["energy_ref"] = torch.cat(self.e_ref) / n
        if self.f_pred:
            out["forces_pred"] = torch.cat(self.f_pred).reshape(-1)
            out["forces_ref"] = torch.cat(self.f_ref).reshape(-1)
        return out
