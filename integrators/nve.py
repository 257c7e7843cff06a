"""Velocity Verlet: the microcanonical (NVE) integrator.

Swope, Andersen, Berens, Wilson, J. Chem. Phys. 76, 637 (1982). One step of length dt::

    v(t + dt/2) = v(t) + dt/2 * F(x(t)) / m          (B, ``_kick``)
    x(t + dt)   = x(t) + dt * v(t + dt/2)              (A)
    v(t + dt)   = v(t + dt/2) + dt/2 * F(x(t + dt)) / m (B)

Symplectic and time reversible: the energy error stays bounded and scales as dt^2.
Variables: x = ``state.positions`` [R, N, 3] A, v = ``state.velocities`` A/fs,
F = ``state.forces`` eV/A, m = ``state.masses`` amu, dt = ``timestep_fs``.
"""
from __future__ import annotations

from dataclasses import dataclass

from .base import ForceProvider, Integrator
from .state import MDState


@dataclass
class VelocityVerlet(Integrator):
    """NVE molecular dynamics with velocity Verlet (see the module docstring for the equations)."""

    def step(self, state: MDState, forces: ForceProvider) -> MDState:
        x, v, out = self._velocity_verlet(state, forces)
        return self._advanced(state, x, v, out)
