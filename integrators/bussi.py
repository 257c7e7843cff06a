"""Stochastic velocity rescaling (Bussi, Donadio, Parrinello), NVT.

Bussi, Donadio, Parrinello, J. Chem. Phys. 126, 014101 (2007), eq. (A7). The kinetic energy K of
each replica follows dK = (K_bar - K) dt/tau + 2 sqrt(K K_bar / N_f) dW/sqrt(tau), whose exact
solution over a time h is drawn as::

    c      = exp(-h / tau)
    K'     = c K + (1 - c) K_bar (R1^2 + S) / N_f + 2 R1 sqrt(c (1 - c) K K_bar / N_f)
    v     <- v * sqrt(K' / K)

with K_bar = N_f k_B T / 2, R1 ~ N(0, 1) and S the sum of N_f - 1 squared N(0, 1) numbers
(a chi-squared variable). All velocities of a replica are scaled by the same factor, so the
dynamics stays close to Newtonian (for tau >> dt) while the canonical distribution is sampled.

The step is symmetric: rescale(dt/2), velocity Verlet(dt), rescale(dt/2). The kinetic energy each
rescaling removes goes to ``state.bath_energy`` ("effective energy" of the paper).

Variables: tau = ``tau_fs``, T = ``temperature_K``, N_f = ``state.dof``, K = ``kinetic_energy``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import ForceProvider, Integrator
from .state import MDState, PerReplica, check_temperature, kinetic_energy

Tensor = torch.Tensor


def rescale_velocities(state: MDState, velocities: Tensor, kt: Tensor, tau_fs: float, h_fs: float):
    """Bussi's rescaling over a time h (k_B T = kt [R], eV).

    Returns (new velocities, energy given to the bath [R]).
    """
    nf = state.dof
    k = kinetic_energy(velocities, state.masses)  # [R]
    k_bar = 0.5 * nf * kt  # [R]
    c = math.exp(-h_fs / tau_fs) if tau_fs > 0 else 0.0
    r1 = torch.randn(state.n_replicas, generator=state.rng, device=state.device,
                     dtype=torch.float64)
    s = chi_squared(state, nf - 1)
    k_new = (c * k + (1.0 - c) * k_bar * (r1 * r1 + s) / nf
             + 2.0 * r1 * torch.sqrt(c * (1.0 - c) * k * k_bar / nf))
    alpha = torch.where(k > 0, torch.sqrt(k_new / k.clamp_min(1e-300)), torch.ones_like(k))
    heat = k - torch.where(k > 0, k_new, k)
    return velocities * alpha.to(velocities.dtype)[:, None, None], heat


def chi_squared(state: MDState, dof: int) -> Tensor:
    """A chi-squared variable with ``dof`` degrees of freedom per replica  # [R] float64

    Drawn as a sum of squared normal numbers from the state's stream (exact, reproducible; the
    cost is that of one Langevin noise draw).
    """
    if dof <= 0:
        return torch.zeros(state.n_replicas, dtype=torch.float64, device=state.device)
    xi = torch.randn(state.n_replicas, dof, generator=state.rng, device=state.device,
                     dtype=torch.float64)
    return (xi * xi).sum(-1)


@dataclass
class Bussi(Integrator):
    """NVT with stochastic velocity rescaling (the module docstring has the equations).

    Attributes:
        temperature_K: target temperature (K), a float or one value per replica.
        tau_fs: relaxation time of the kinetic energy (fs); 0 resamples it at every half step.
    """

    temperature_K: PerReplica = 300.0
    tau_fs: float = 100.0

    stochastic: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_temperature(self.temperature_K)
        if not self.tau_fs >= 0:
            raise ValueError(f"tau_fs must be >= 0, got {self.tau_fs}")

    def step(self, state: MDState, forces: ForceProvider) -> MDState:
        h = 0.5 * float(self.timestep_fs)
        kt = self._kt(state)
        v, q1 = rescale_velocities(state, state.velocities, kt, self.tau_fs, h)
        x, v, out = self._velocity_verlet(state, forces, v)
        v, q2 = rescale_velocities(state, v, kt, self.tau_fs, h)
        return self._advanced(state, x, v, out, bath_energy=state.bath_energy + q1 + q2)
