"""Nose-Hoover chains (NVT).

Martyna, Klein, Tuckerman, J. Chem. Phys. 97, 2635 (1992) for the equations of motion;
Martyna, Tuckerman, Tobias, Klein, Mol. Phys. 87, 1117 (1996) for the integrator. Each replica
has a chain of M thermostats with positions eta_k, velocities v_k (1/fs) and masses Q_k::

    dv/dt     = F/m - v_1 v
    dv_1/dt   = (2K - N_f k_B T) / Q_1 - v_2 v_1
    dv_k/dt   = (Q_{k-1} v_{k-1}^2 - k_B T) / Q_k - v_{k+1} v_k      (1 < k < M)
    dv_M/dt   = (Q_{M-1} v_{M-1}^2 - k_B T) / Q_M
    deta_k/dt = v_k
    Q_1 = N_f k_B T tau^2,  Q_k = k_B T tau^2

with the conserved energy H = K + U + sum_k Q_k v_k^2 / 2 + N_f k_B T eta_1 + k_B T sum_{k>1} eta_k.
A step is NHC(dt/2), velocity Verlet(dt), NHC(dt/2); the chain part is split into
``substeps`` x Suzuki-Yoshida weights w_j (order 1, 3 or 5), each of length h_j = w_j dt/2 /
substeps, in the symmetric order: v_M, v_{M-1} ... v_1 (each v_k update sandwiched by
exp(-v_{k+1} h_j / 4) scalings), particle velocities scaled by exp(-v_1 h_j), eta += h_j v,
then v_1 ... v_M again. The particles are scaled once per half step by the accumulated factor.

Variables: eta = ``state.extras["nhc_eta"]`` [R, M], v_k = ``state.extras["nhc_vel"]`` [R, M]
(1/fs), tau = ``tau_fs``, M = ``chain_length``, N_f = ``state.dof``, T = ``temperature_K``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

import torch

from .base import ForceProvider, Integrator
from .state import MDState, PerReplica, check_temperature, kinetic_energy

Tensor = torch.Tensor


def suzuki_yoshida_weights(order: int) -> List[float]:
    """Weights of the Suzuki-Yoshida factorization (Yoshida, Phys. Lett. A 150, 262 (1990))."""
    if order == 1:
        return [1.0]
    if order == 3:
        w = 1.0 / (2.0 - 2.0 ** (1.0 / 3.0))
        return [w, 1.0 - 2.0 * w, w]
    if order == 5:
        w = 1.0 / (4.0 - 4.0 ** (1.0 / 3.0))
        return [w, w, 1.0 - 4.0 * w, w, w]
    raise ValueError(f"yoshida_order must be 1, 3 or 5, got {order}")


@dataclass
class NoseHooverChain(Integrator):
    """NVT with a Nose-Hoover chain per replica (the module docstring has the equations).

    Attributes:
        temperature_K: target temperature (K), a float or one value per replica.
        tau_fs: period of the thermostat oscillation (fs), about 100 dt or more.
        chain_length: M, the number of thermostats in the chain (>= 1; 3 is usual).
        substeps: n_c, sub-steps of the chain per half step.
        yoshida_order: 1, 3 or 5.
    """

    temperature_K: PerReplica = 300.0
    tau_fs: float = 100.0
    chain_length: int = 3
    substeps: int = 1
    yoshida_order: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        check_temperature(self.temperature_K)
        if not self.tau_fs > 0:
            raise ValueError(f"tau_fs must be > 0, got {self.tau_fs}")
        if self.chain_length < 1 or self.substeps < 1:
            raise ValueError("chain_length and substeps must be >= 1")
        suzuki_yoshida_weights(self.yoshida_order)

    def init(self, state: MDState, forces: ForceProvider) -> MDState:
        state = super().init(state, forces)
        extras = dict(state.extras)
        for key in ("nhc_eta", "nhc_vel"):
            if key not in extras:
                extras[key] = torch.zeros(state.n_replicas, self.chain_length,
                                          dtype=torch.float64, device=state.device)
        return state.replace(extras=extras)

    def step(self, state: MDState, forces: ForceProvider) -> MDState:
        h = 0.5 * float(self.timestep_fs)
        eta, vel = state.extras["nhc_eta"], state.extras["nhc_vel"]
        v, eta, vel = self._chain(state, state.velocities, eta, vel, h)
        x, v, out = self._velocity_verlet(state, forces, v)
        v, eta, vel = self._chain(state, v, eta, vel, h)
        extras = dict(state.extras, nhc_eta=eta, nhc_vel=vel)
        return self._advanced(state, x, v, out, extras=extras)

    def masses(self, state: MDState) -> Tensor:
        """Q_k  # [R, M] float64, eV fs^2"""
        def make() -> Tensor:
            q = (self._kt(state) * self.tau_fs**2)[:, None].repeat(1, self.chain_length)
            q[:, 0] *= state.dof
            return q

        return self._cached("nhc_q", state, make)

    def conserved_energy(self, state: MDState) -> Tensor:
        kt = self._kt(state)
        eta, vel = state.extras["nhc_eta"], state.extras["nhc_vel"]
        chain = 0.5 * (self.masses(state) * vel * vel).sum(-1)
        chain = chain + kt * (state.dof * eta[:, 0] + eta[:, 1:].sum(-1))
        return super().conserved_energy(state) + chain

    def _chain(self, state: MDState, v: Tensor, eta: Tensor, vel: Tensor, h: float):
        """Propagate the chain and scale the particle velocities over a time h."""
        kt = self._kt(state)  # [R]
        q = self.masses(state).unbind(-1)  # M x [R]
        g0 = state.dof * kt
        k2 = 2.0 * kinetic_energy(v, state.masses)  # [R]
        ve = list(vel.unbind(-1))
        et = list(eta.unbind(-1))
        scale = torch.ones_like(k2)
        m = self.chain_length

        def force(k: int) -> Tensor:
            if k == 0:
                return (k2 - g0) / q[0]
            return (q[k - 1] * ve[k - 1] ** 2 - kt) / q[k]

        def update(k: int, hs: float) -> None:
            if k + 1 < m:
                e = torch.exp(-0.25 * hs * ve[k + 1])
                ve[k] = (ve[k] * e + 0.5 * hs * force(k)) * e
            else:
                ve[k] = ve[k] + 0.5 * hs * force(k)

        for _ in range(self.substeps):
            for w in suzuki_yoshida_weights(self.yoshida_order):
                hs = w * h / self.substeps
                for k in reversed(range(m)):
                    update(k, hs)
                f = torch.exp(-hs * ve[0])
                scale, k2 = scale * f, k2 * f * f
                et = [e + hs * x for e, x in zip(et, ve)]
                for k in range(m):
                    update(k, hs)
        return v * scale.to(v.dtype)[:, None, None], torch.stack(et, -1), torch.stack(ve, -1)
