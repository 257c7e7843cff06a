"""Error metrics in the units people report: meV/atom for energies, meV/A for forces (per
component), meV/A^3 for stress (and GPa); for a committee, how well its force deviation ranks
and sizes the true force error.

Uncertainty measures (``uq_*``; per atom i: the error e_i = |F_pred,i - F_ref,i| and the
deviation d_i = ``forces_dev_calibrated`` of the committee; per frame: the largest e_i and
``max_force_dev``):

* ``uq_calibration``: the factor c the model applies (calibrated / raw deviation);
* ``uq_spearman_frame``: Spearman rank correlation of each frame's ``max_force_dev`` with its
  largest per-atom force error norm; ``uq_spearman_atom``: the same over atoms (d_i vs e_i);
* ``uq_rms_ratio``: sqrt(mean e_i^2) / sqrt(mean d_i^2), 1 when the calibrated deviation is an
  RMS-calibrated error estimate over the whole set;
* ``uq_ence``: the expected normalized calibration error (Levi et al., Sensors 22, 5540 (2022)):
  atoms sorted by d_i into ``UQ_BINS`` equal-count bins, mean over bins of
  |RMV_b - RMSE_b| / RMV_b with RMV_b = sqrt(mean d_i^2) and RMSE_b = sqrt(mean e_i^2) in the
  bin; 0 is perfect, 0.5 means the error is typically off by half the prediction.

The fitted factor (``calibration_factor``) is c = sqrt( mean_i e_i^2 / mean_i d_raw,i^2 ) over
the validation atoms, which makes ``uq_rms_ratio`` exactly 1 on the validation split.
"""
from __future__ import annotations

from typing import Dict, List

import numpy as np
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
        self.f_dev: List[torch.Tensor] = []      # committee: raw forces_dev of kept atoms
        self.f_dev_cal: List[torch.Tensor] = []  # and the calibrated one
        self.f_frame: List[torch.Tensor] = []    # frame index of each kept atom (global)
        self.frame_dev: List[torch.Tensor] = []  # max_force_dev of each frame
        self.frame_ids: List[torch.Tensor] = []
        self._frames_seen = 0

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
            if K.FORCES_DEV in pred:
                cal = K.FORCES_DEV + K.CALIBRATED_SUFFIX
                self.f_dev.append(pred[K.FORCES_DEV].detach().double().cpu()[ok])
                self.f_dev_cal.append(pred[cal].detach().double().cpu()[ok] if cal in pred
                                      else self.f_dev[-1])
                self.f_frame.append(batch.batch.cpu()[ok] + self._frames_seen)
                self.frame_dev.append(pred[K.MAX_FORCE_DEV].detach().double().cpu())
                self.frame_ids.append(torch.arange(int(batch.num_structures)) + self._frames_seen)
        self._frames_seen += int(batch.num_structures)
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
            # signed: a constant offset shows here (MAE = RMSE = |mean error| for a pure offset)
            out["energy_mean_error_meV_per_atom"] = float(d.mean())
            out["frames"] = float(len(ep))
            # least-squares slope of predicted on reference energy per atom: 1 for no scale
            # error (a slope below 1 is the "compressed parity plot" of an under-fitted energy)
            x, y = er / n, ep / n
            if len(x) >= 3 and float(x.var()) > 1e-12:
                out["energy_slope"] = float(((x - x.mean()) * (y - y.mean())).mean() / x.var(
                    unbiased=False))
        if self.f_pred and sum(len(x) for x in self.f_pred):
            d = (torch.cat(self.f_pred) - torch.cat(self.f_ref)) * 1e3
            out["forces_mae_meV_per_A"] = float(d.abs().mean())
            out["forces_rmse_meV_per_A"] = float(d.pow(2).mean().sqrt())
        if self.s_err and sum(len(x) for x in self.s_err):
            d = torch.cat(self.s_err)
            out["stress_mae_meV_per_A3"] = float(d.abs().mean() * 1e3)
            out["stress_rmse_meV_per_A3"] = float(d.pow(2).mean().sqrt() * 1e3)
            out["stress_rmse_GPa"] = float(d.pow(2).mean().sqrt() * EV_PER_A3_TO_GPA)
        out.update(self.uncertainty())
        return out

    def calibration_factor(self) -> float:
        """c = sqrt( mean_i |F_pred,i - F_ref,i|^2 / mean_i forces_dev_i^2 ) over the atoms seen
        (raw deviations): the factor that makes the calibrated deviation RMS-calibrated."""
        if not self.f_dev or not sum(len(x) for x in self.f_dev):
            raise ValueError("no deviations with reference forces were collected (a model "
                             "without an uncertainty, or validation data without forces)")
        err2 = (torch.cat(self.f_pred) - torch.cat(self.f_ref)).pow(2).sum(dim=1)
        dev2 = torch.cat(self.f_dev).pow(2)
        if float(dev2.mean()) <= 0:
            raise ValueError("the committee members agree exactly on every validation atom; "
                             "no calibration factor can be fitted (members with equal seeds?)")
        return float((err2.mean() / dev2.mean()).sqrt())

    def uncertainty(self) -> Dict[str, float]:
        """The ``uq_*`` measures of the module docstring; empty for a single model."""
        if not self.f_dev or not sum(len(x) for x in self.f_dev):
            return {}
        from scipy.stats import spearmanr

        err = (torch.cat(self.f_pred) - torch.cat(self.f_ref)).pow(2).sum(dim=1).sqrt().numpy()
        raw = torch.cat(self.f_dev).numpy()
        dev = torch.cat(self.f_dev_cal).numpy()
        frame = torch.cat(self.f_frame).numpy()
        frame_dev = np.zeros(self._frames_seen)
        frame_dev[torch.cat(self.frame_ids).numpy()] = torch.cat(self.frame_dev).numpy()
        frames = np.unique(frame)
        frame_err = np.full(self._frames_seen, -np.inf)
        np.maximum.at(frame_err, frame, err)
        out = {"uq_calibration": float(dev.mean() / raw.mean()) if raw.mean() > 0 else 1.0,
               "uq_rms_ratio": float(np.sqrt((err ** 2).mean() / max((dev ** 2).mean(), 1e-300))),
               "uq_ence": ence(err, dev)}
        with np.errstate(invalid="ignore", divide="ignore"):
            if len(frames) >= 2:
                out["uq_spearman_frame"] = _finite(spearmanr(frame_dev[frames],
                                                             frame_err[frames])[0])
            if len(err) >= 2:
                out["uq_spearman_atom"] = _finite(spearmanr(dev, err)[0])
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


UQ_BINS = 10


def ence(err: np.ndarray, dev: np.ndarray, bins: int = UQ_BINS) -> float:
    """Expected normalized calibration error of deviations ``dev`` against errors ``err``: sorted
    by ``dev`` into ``bins`` equal-count bins (fewer when there are fewer values), the mean over
    bins of |RMV - RMSE| / RMV (Levi et al. 2022)."""
    order = np.argsort(dev, kind="stable")
    parts = [p for p in np.array_split(order, min(bins, len(order))) if len(p)]
    terms = []
    for p in parts:
        rmv = np.sqrt((dev[p] ** 2).mean())
        rmse = np.sqrt((err[p] ** 2).mean())
        if rmv > 0:
            terms.append(abs(rmv - rmse) / rmv)
    return float(np.mean(terms)) if terms else float("nan")


def _finite(x) -> float:
    """A correlation, NaN when undefined (constant values) rather than a warning."""
    return float(x)
