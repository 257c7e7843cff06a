"""NPT: stochastic cell rescaling (barostat) with stochastic velocity rescaling (thermostat).

Isotropic: Bernetti and Bussi, J. Chem. Phys. 153, 114107 (2020). Anisotropic: Del Tatto,
Raiteri, Bernetti, Bussi, Appl. Sci. 12, 1139 (2022). First-order (overdamped) stochastic
equations for the cell, with positions and momenta scaled along, so that the isothermal-isobaric
distribution exp(-(K + U + P0 V) / k_B T) is sampled and volume fluctuations are right.

Volume (all couplings), in lambda = sqrt(V) where the diffusion D_l is constant::

    f_l     = -2 lambda (P0 - P_int) + k_B T / lambda       (force on lambda; the last term
                                                              comes from dV = 2 lambda dlambda)
    dlambda = D_l / (k_B T) f_l dt + sqrt(2 D_l dt) xi,     D_l = k_B T beta_T / (4 tau_p)

Shape at fixed volume ("aniso": cell axes independently, "tri": all six cell degrees of
freedom), e a symmetric traceless log-strain::

    F_e = V dev(P_int)                                       dev = traceless (diagonal for aniso)
    de  = D_e / (k_B T) F_e dt + sqrt(2 D_e dt) dev(G),      D_e = k_B T beta_T / (3 tau_p V)

with P_int = (sum_i m_i v_i v_i^T) / V - stress the internal pressure tensor (P_int its trace / 3)
and G a matrix of N(0, 1) numbers. The deformation mu = (V'/V)^(1/3) exp(de) acts on row
vectors::

    x <- x mu + dt v (mu + mu^-T) / 2,    v <- v mu^-T,    cell <- cell mu

With the centre of mass held at rest (``state.fixed_com``, N_f = 3N - 3) the momenta integrate
to V^(N_f / 3) instead of V^N: an ideal gas then has p(V) ~ V^(N - 1) exp(-P0 V / k_B T).

One step: thermostat(dt/2) [Bussi's rescaling, or a Langevin O step], B(dt/2), cell move +
drift(dt), forces, B(dt/2), thermostat(dt/2) (the order of Bussi's SimpleMD implementation). The
effective energy of this splitting drifts to first order in dt while the volume relaxes.
The sampled measure is dV de: flat in the three box lengths for "aniso". "tri" turns the cell back
to lower-triangular form (a rigid rotation of the whole system, which changes no energy) after
each step, so that it does not slowly rotate.

Effective energy (the paper's conserved quantity): K + U + P0 V + bath_energy, where the barostat
adds per step, with f' the force after the move,
    1/2 dlambda (f_l + f_l') + D_l dt / (4 k_B T) (f_l'^2 - f_l^2) - k_B T ln(lambda'/lambda)
(and the same form in de, F_e for the shape).

Variables: P0 = ``pressure_bar`` (converted to eV/A^3), beta_T = ``compressibility_per_bar``
(only sets the time scale with tau_p), tau_p = ``tau_p_fs``, tau_T = ``tau_t_fs``,
V = ``state.volume()``, stress = ``state.stress``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Dict

import torch

from mlpot import units

from .base import ForceProvider, Integrator, MDError
from .bussi import rescale_velocities
from .langevin import ornstein_uhlenbeck
from .state import (MDState, PerReplica, check_temperature, det3, inv3, kinetic_tensor,
                    rows_times)

Tensor = torch.Tensor
COUPLINGS = ("iso", "aniso", "tri")


def deviatoric(p: Tensor, coupling: str) -> Tensor:
    """The traceless part of [R, 3, 3] tensors: diagonal only for "aniso", symmetrized for
    "tri"."""
    eye = torch.eye(3, dtype=p.dtype, device=p.device)
    if coupling == "aniso":
        d = p.diagonal(dim1=-2, dim2=-1)
        return torch.diag_embed(d - d.mean(-1, keepdim=True))
    s = 0.5 * (p + p.transpose(-1, -2))
    return s - s.diagonal(dim1=-2, dim2=-1).mean(-1)[:, None, None] * eye


def lower_triangular_frame(x: Tensor, v: Tensor, cell: Tensor):
    """Rotate positions, velocities and cell so that the cell is lower triangular (rows).
    Returns (x, v, cell, Q) with the rotation Q [R, 3, 3] applied as x Q.

    Q = [e1 e2 e3] (columns) from Gram-Schmidt on the cell rows a, b: e1 = a/|a|,
    e2 = (b - (b.e1) e1)/|...|, e3 = e1 x e2; then cell Q has rows (|a|,0,0), (., ., 0), (., ., .).
    """
    a, b = cell[:, 0], cell[:, 1]
    e1 = a / a.norm(dim=-1, keepdim=True)
    b = b - (b * e1).sum(-1, keepdim=True) * e1
    e2 = b / b.norm(dim=-1, keepdim=True)
    q = torch.stack([e1, e2, torch.linalg.cross(e1, e2)], -1)  # [R, 3, 3]
    return rows_times(x, q), rows_times(v, q), torch.tril(cell @ q), q


def expm_small(a: Tensor) -> Tensor:
    """exp(a) for [R, 3, 3] matrices: Taylor series to 8th order after scaling a by 2^-s so that
    its entries are below 0.05, then s squarings (batched LAPACK expm is slow on a CPU)."""
    big = float(a.abs().amax())
    s = max(0, math.ceil(math.log2(big / 0.05))) if big > 0.05 else 0
    b = a / 2**s
    out = term = torch.eye(3, dtype=a.dtype, device=a.device).expand_as(a)
    for k in range(1, 9):
        term = term @ b / k
        out = out + term
    for _ in range(s):
        out = out @ out
    return out


@dataclass
class StochasticCellRescaling(Integrator):
    """NPT with stochastic cell rescaling and a thermostat (equations in the module docstring).

    Attributes:
        temperature_K: target temperature (K), a float or one value per replica.
        pressure_bar: target (hydrostatic) pressure P0 in bar.
        tau_t_fs: thermostat relaxation time (fs).
        tau_p_fs: barostat relaxation time (fs), typically 1000-5000 fs.
        compressibility_per_bar: beta_T, an estimate of the isothermal compressibility (1/bar;
            4.5e-5 for water). Too small only slows the volume relaxation.
        coupling: "iso" (volume only), "aniso" (the three cell axes independently, angles kept
            for orthorhombic cells) or "tri" (all six cell degrees of freedom).
        thermostat: "bussi" (global, keeps the dynamics) or "langevin" (local, O steps of dt/2
            with ``friction_per_fs``). Use "langevin" for anisotropic coupling of nearly ideal
            systems: a global thermostat never redistributes momentum between directions, and
            the kinetic part of the pressure tensor then drives the cell shape.
        friction_per_fs: gamma of the "langevin" thermostat (1/fs).
    """

    temperature_K: PerReplica = 300.0
    pressure_bar: float = 1.0
    tau_t_fs: float = 100.0
    tau_p_fs: float = 1000.0
    compressibility_per_bar: float = 4.5e-5
    coupling: str = "iso"
    thermostat: str = "bussi"
    friction_per_fs: float = 0.01

    stochastic: ClassVar[bool] = True
    needs_stress: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_temperature(self.temperature_K)
        if self.thermostat not in ("bussi", "langevin"):
            raise ValueError(f"thermostat must be 'bussi' or 'langevin', got {self.thermostat!r}")
        if self.coupling not in COUPLINGS:
            raise ValueError(f"coupling must be one of {COUPLINGS}, got {self.coupling!r}")
        for name in ("tau_t_fs", "tau_p_fs", "compressibility_per_bar", "friction_per_fs"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")

    def init(self, state: MDState, forces: ForceProvider) -> MDState:
        if not bool(state.pbc.all()):
            raise ValueError("NPT needs a periodic system (pbc all True) with a cell")
        return super().init(state, forces)

    def conserved_energy(self, state: MDState) -> Tensor:
        p0 = self.pressure_bar * units.BAR_TO_EV_PER_A3
        return super().conserved_energy(state) + p0 * state.volume()

    def step(self, state: MDState, forces: ForceProvider) -> MDState:
        h = 0.5 * float(self.timestep_fs)
        v, q1 = self._thermostat(state, state.velocities, h)
        v = self._kick(state, v, state.forces, h)
        move = self._cell_move(state, v, state.cell, state.stress)
        x, v, cell = self._deform_and_drift(state.positions, v, state.cell, move["mu"])
        if self.coupling == "tri":
            x, v, cell, q = lower_triangular_frame(x, v, cell)
            q = q.double()  # the strain step in the new frame, for the closing work
            move["de"] = q.transpose(-1, -2) @ move["de"] @ q
        out = self._forces_at(forces, x, cell)
        work = move["work"] + self._closing_work(state, v, cell, out["stress"], move)
        v = self._kick(state, v, out["forces"], h)
        v, q2 = self._thermostat(state, v, h)
        return self._advanced(state, x, v, out, cell=cell,
                              bath_energy=state.bath_energy + q1 + q2 + work)

    def _thermostat(self, state: MDState, v: Tensor, h: float):
        if self.thermostat == "langevin":
            return ornstein_uhlenbeck(self, state, v, float(self.friction_per_fs), h)
        return rescale_velocities(state, v, self._kt(state), self.tau_t_fs, h)

    # ------------------------------------------------------------------ barostat pieces
    def _drive(self, state: MDState, v: Tensor, cell: Tensor, stress: Tensor):
        """(V [R], f_lambda [R], F_e [R, 3, 3] or None, k_B T [R]) for the current configuration."""
        kt = self._kt(state)
        vol = det3(cell.double()).abs()
        p_int = kinetic_tensor(v, state.masses) / vol[:, None, None] - stress.double()
        p0 = self.pressure_bar * units.BAR_TO_EV_PER_A3
        lam = vol.sqrt()
        f_lam = -2.0 * lam * (p0 - p_int.diagonal(dim1=-2, dim2=-1).mean(-1)) + kt / lam
        f_e = None
        if self.coupling != "iso":
            f_e = vol[:, None, None] * deviatoric(p_int, self.coupling)
        return vol, f_lam, f_e, kt

    def _diffusion(self, kt: Tensor, vol: Tensor):
        """(D_lambda [R] in A^3/fs, D_e [R] in 1/fs)."""
        beta = self.compressibility_per_bar / units.BAR_TO_EV_PER_A3  # A^3/eV
        return kt * beta / (4.0 * self.tau_p_fs), kt * beta / (3.0 * self.tau_p_fs * vol)

    def _cell_move(self, state: MDState, v: Tensor, cell: Tensor,
                   stress: Tensor) -> Dict[str, Tensor]:
        """Draw the cell move: the deformation mu and the first half of the barostat work."""
        dt = float(self.timestep_fs)
        vol, f_lam, f_e, kt = self._drive(state, v, cell, stress)
        d_lam, d_e = self._diffusion(kt, vol)
        lam = vol.sqrt()
        xi = torch.randn(state.n_replicas, generator=state.rng, device=state.device,
                         dtype=torch.float64)
        dlam = d_lam / kt * f_lam * dt + (2.0 * d_lam * dt).sqrt() * xi
        if not bool((lam + dlam > 0).all()):
            raise MDError(f"step {state.step}: the barostat move would make the volume negative; "
                          "increase tau_p_fs or decrease compressibility_per_bar")
        iso = ((lam + dlam) / lam) ** (2.0 / 3.0)  # (V'/V)^(1/3)
        mu = iso[:, None, None] * torch.eye(3, dtype=torch.float64, device=state.device)
        work = 0.5 * dlam * f_lam - 0.25 * d_lam * dt / kt * f_lam**2 + kt * lam.log()
        move = {"dlam": dlam, "d_lam": d_lam, "lam": lam}
        if f_e is not None:
            g = torch.randn(state.n_replicas, 3, 3, generator=state.rng, device=state.device,
                            dtype=torch.float64)
            de = (d_e / kt)[:, None, None] * f_e * dt + \
                (2.0 * d_e * dt).sqrt()[:, None, None] * deviatoric(g, self.coupling)
            mu = mu @ expm_small(de)
            work = work + 0.5 * (de * f_e).sum((-1, -2)) \
                - 0.25 * d_e * dt / kt * (f_e**2).sum((-1, -2))
            move.update(de=de, d_e=d_e)
        move.update(mu=mu, work=work)
        return move

    def _closing_work(self, state: MDState, v: Tensor, cell: Tensor, stress: Tensor,
                      move: Dict[str, Tensor]) -> Tensor:
        """Second half of the barostat work, with the forces on lambda and e after the move."""
        dt = float(self.timestep_fs)
        vol, f_lam, f_e, kt = self._drive(state, v, cell, stress)
        lam = vol.sqrt()
        work = 0.5 * move["dlam"] * f_lam + 0.25 * move["d_lam"] * dt / kt * f_lam**2 \
            - kt * lam.log()
        if f_e is not None:
            work = work + 0.5 * (move["de"] * f_e).sum((-1, -2)) \
                + 0.25 * move["d_e"] * dt / kt * (f_e**2).sum((-1, -2))
        return work

    def _deform_and_drift(self, x: Tensor, v: Tensor, cell: Tensor, mu: Tensor):
        """x mu + dt v (mu + mu^-T)/2, v mu^-T, cell mu (row vectors)."""
        dt = float(self.timestep_fs)
        mu_inv_t = inv3(mu).transpose(-1, -2)
        mu, mu_inv_t = mu.to(x.dtype), mu_inv_t.to(x.dtype)
        x_new = rows_times(x, mu) + dt * rows_times(v, 0.5 * (mu + mu_inv_t))
        return x_new, rows_times(v, mu_inv_t), cell @ mu
