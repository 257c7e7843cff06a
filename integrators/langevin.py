"""Langevin dynamics in the BAOAB splitting (NVT).

Leimkuhler and Matthews, Appl. Math. Res. Express 2013, 34 (2013); J. Chem. Phys. 138, 174102
(2013). The Langevin equation dv = F/m dt - gamma v dt + sqrt(2 gamma k_B T / m) dW is split into
B (kick), A (drift) and O (the exact Ornstein-Uhlenbeck solution); one step of length dt is::

    B:  v <- v + dt/2 * F(x) / m
    A:  x <- x + dt/2 * v
    O:  v <- c1 v + sqrt((1 - c1^2) k_B T / m) * xi,     c1 = exp(-gamma dt), xi ~ N(0, 1)
    A:  x <- x + dt/2 * v
    (forces at the new x)
    B:  v <- v + dt/2 * F(x) / m

BAOAB samples configurations with an error of order dt^2 that is very small in practice.
With ``state.fixed_com`` the centre-of-mass part of the O step is removed, so the total momentum
stays zero and N_f = 3N - 3. The kinetic energy the O step takes out is added to
``state.bath_energy`` so that K + U + bath_energy is conserved up to the splitting error.

Variables: gamma = ``friction_per_fs`` (1/fs), T = ``temperature_K`` (K; one value or one per
replica), k_B T = ``kt`` (eV), dt = ``timestep_fs``, xi drawn from ``state.rng``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from mlpot import units

from .base import ForceProvider, Integrator
from .state import MDState, PerReplica, check_temperature, kinetic_energy, remove_com_velocity


@dataclass
class Langevin(Integrator):
    """NVT Langevin dynamics, BAOAB splitting.

    Attributes:
        temperature_K: target temperature (K), a float or one value per replica.
        friction_per_fs: gamma in 1/fs (0.01/fs: weak coupling that keeps dynamics; 0.1/fs: strong).
    """

    temperature_K: PerReplica = 300.0
    friction_per_fs: float = 0.01

    stochastic: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_temperature(self.temperature_K)
        if not self.friction_per_fs >= 0:
            raise ValueError(f"friction_per_fs must be >= 0, got {self.friction_per_fs}")

    def step(self, state: MDState, forces: ForceProvider) -> MDState:
        h = 0.5 * float(self.timestep_fs)
        v = self._kick(state, state.velocities, state.forces, h)
        x = state.positions + h * v
        v, heat = ornstein_uhlenbeck(self, state, v, float(self.friction_per_fs), 2.0 * h)
        x = x + h * v
        out = self._forces_at(forces, x, state.cell)
        v = self._kick(state, v, out["forces"], h)
        return self._advanced(state, x, v, out, bath_energy=state.bath_energy + heat)



def ornstein_uhlenbeck(integrator: Integrator, state: MDState, v: torch.Tensor, friction: float,
                       h: float):
    """O step over a time h: v <- c1 v + sqrt((1 - c1^2) k_B T / m) xi, c1 = exp(-gamma h).

    k_B T is the integrator's (``temperature_K``). Returns (new velocities, kinetic energy given
    to the bath [R]).
    """
    c1 = math.exp(-friction * h)

    def amplitude() -> torch.Tensor:  # [R, N, 1] A/fs
        s2 = (1.0 - c1 * c1) * integrator._kt(state)[:, None] / state.masses.double()[None, :]
        return (s2 * units.EV_PER_AMU_TO_A2_PER_FS2).sqrt().to(v.dtype)[..., None]

    sigma = integrator._cached("ou_sigma", state, amplitude, h)
    xi = torch.randn(v.shape, generator=state.rng, device=v.device, dtype=v.dtype)
    new = c1 * v + sigma * xi
    if state.fixed_com:
        new = remove_com_velocity(new, state.masses)
    heat = kinetic_energy(v, state.masses) - kinetic_energy(new, state.masses)
    return new, heat
