"""MDState: the one object every integrator advances, and the quantities computed from it.

R replicas of the same system (same N atoms, masses and species) are advanced together; each
replica has its own positions, velocities, cell, forces, energy and bath variables.

Units (``mlpot.units``): positions and cell in Angstrom, velocities in A/fs, masses in amu,
energies in eV, stress in eV/A^3 (ASE's sign: stress = -virial / volume), time in fs.
Temperatures enter the public API in K and are turned into kT (eV) once, by ``kt_ev``.

Kinetic energy and temperature of replica r (N_f degrees of freedom, 3N or 3N - 3 when the
centre-of-mass momentum is held at zero, ``fixed_com``)::

    K_r = 1/2 sum_i m_i |v_ri|^2            (kinetic_energy; AMU_A2_PER_FS2_TO_EV turns it into eV)
    T_r = 2 K_r / (N_f k_B)                  (temperature_K)
    P_r = (sum_i m_i v_ri v_ri^T / V_r - stress_r) traced / 3   (pressure, instantaneous)
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from typing import Dict, Optional, Sequence, Union

import numpy as np
import torch

from mlpot import units

Tensor = torch.Tensor
PerReplica = Union[float, Sequence[float], Tensor]


@dataclass
class MDState:
    """Positions, velocities and bath variables of R replicas of an N-atom system.

    Attributes:
        positions: [R, N, 3] Angstrom (float32 or float64; the working precision).
        velocities: [R, N, 3] A/fs.
        masses: [N] amu, same dtype as positions.
        cell: [R, 3, 3] Angstrom, rows are lattice vectors (zeros for a molecule).
        pbc: [3] bool.
        atomic_numbers: [N] int64 (for trajectories and the model adapter).
        forces: [R, N, 3] eV/A at ``positions``, or None before ``Integrator.init``.
        energy: [R] float64 eV, potential energy at ``positions``.
        stress: [R, 3, 3] eV/A^3 when the integrator asked for it, else None.
        step: number of steps taken; time_fs: simulated time.
        bath_energy: [R] float64 eV that has left the system to the thermostat/barostat baths,
            so that ``K + U (+ P V) + bath_energy`` is conserved up to integration error.
        fixed_com: the centre-of-mass momentum is zero and stays zero (N_f = 3N - 3).
        extras: integrator variables ([R, ...] tensors, e.g. the Nose-Hoover chain).
        outputs: what the force provider returned beyond energy, forces and stress at
            ``positions``, per replica (a committee's ``max_force_dev`` [R], ``forces_dev``
            [R, N], ``energy_dev`` [R], ``virial_dev`` [R], members...: ``mlpot.keys``);
            recomputed at every force call, not checkpointed.
        active: [R] bool, False for a replica stopped by a per-replica rule (the uncertainty
            stop): ``simulate`` holds it at the structure where it stopped and reporters skip it;
            None: all replicas run.
        rng: the random stream of the stochastic integrators (checkpointed with the state).
    """

    positions: Tensor
    velocities: Tensor
    masses: Tensor
    cell: Tensor
    pbc: Tensor
    atomic_numbers: Tensor
    forces: Optional[Tensor] = None
    energy: Optional[Tensor] = None
    stress: Optional[Tensor] = None
    step: int = 0
    time_fs: float = 0.0
    bath_energy: Optional[Tensor] = None
    fixed_com: bool = False
    extras: Dict[str, Tensor] = field(default_factory=dict)
    rng: Optional[torch.Generator] = None
    outputs: Dict[str, Tensor] = field(default_factory=dict)
    active: Optional[Tensor] = None

    @property
    def n_replicas(self) -> int:
        return self.positions.shape[0]

    @property
    def n_atoms(self) -> int:
        return self.positions.shape[1]

    @property
    def device(self) -> torch.device:
        return self.positions.device

    @property
    def dtype(self) -> torch.dtype:
        return self.positions.dtype

    @property
    def dof(self) -> int:
        """Degrees of freedom N_f per replica: 3N, less 3 with a fixed centre of mass."""
        return 3 * self.n_atoms - (3 if self.fixed_com else 0)

    def volume(self) -> Tensor:
        """Cell volume per replica  # [R] float64, A^3 (0 for a molecule)"""
        return det3(self.cell.double()).abs()

    def replace(self, **changes) -> "MDState":
        """A new state with some fields changed (tensors and the random stream are shared)."""
        return replace(self, **changes)

    def copy(self) -> "MDState":
        """An independent copy: its own random stream, in the same state as this one's.

        Start two runs from ``state.copy()`` to give both the same random numbers: a run
        advances the random stream of the state it starts from.
        """
        rng = None
        if self.rng is not None:
            rng = torch.Generator(device=self.rng.device)
            rng.set_state(self.rng.get_state())
        return replace(self, extras=dict(self.extras), rng=rng)

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "MDState":
        """A copy on another device and/or working precision (energies stay float64).

        Tensors are moved directly; the random stream follows ``moved_generator``.
        """
        dev = self.device if device is None else torch.device(device)
        changes = {}
        for name in TENSOR_FIELDS:
            v = getattr(self, name)
            if v is not None:
                v = v.to(dev)
                if dtype is not None and name in FLOAT_FIELDS:
                    v = v.to(dtype)
            changes[name] = v
        changes["extras"] = {k: v.to(dev) for k, v in self.extras.items()}
        changes["rng"] = None if self.rng is None else moved_generator(
            self.rng.get_state(), self.rng.device.type, dev)
        return replace(self, **changes)


#: The tensor fields of MDState (saved in checkpoints, moved by ``MDState.to``) and those in
#: the working precision (energies and bath energies stay float64).
TENSOR_FIELDS = ("positions", "velocities", "masses", "cell", "pbc", "atomic_numbers", "forces",
                 "energy", "stress", "bath_energy", "active")
FLOAT_FIELDS = ("positions", "velocities", "masses", "cell", "forces", "stress")


def moved_generator(saved: Optional[Tensor], saved_device_type: str,
                    device: torch.device) -> torch.Generator:
    """A generator on ``device`` continuing a saved random stream (``Generator.get_state()``).

    Generator states are device-type specific: on another device type the stream restarts from
    a seed derived from the saved state (still deterministic, no longer the same numbers).
    """
    rng = torch.Generator(device=device)
    if saved is None:
        return rng
    if saved_device_type == device.type:
        rng.set_state(saved)
    else:
        digest = hashlib.sha256(saved.cpu().numpy().tobytes()).digest()[:8]
        rng.manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
    return rng


# ------------------------------------------------------------------------------ 3x3 algebra
# Closed forms: batched LAPACK calls on 3x3 matrices cost milliseconds on a CPU.
def det3(m: Tensor) -> Tensor:
    """Determinant of [..., 3, 3] matrices  # [...]"""
    a, b, c = m[..., 0, :], m[..., 1, :], m[..., 2, :]
    return (a * torch.linalg.cross(b, c)).sum(-1)


def rows_times(x: Tensor, m: Tensor) -> Tensor:
    """Row vectors times per-replica matrices, x [R, N, 3] @ m [R, 3, 3], as three broadcast
    multiply-adds (batched matmul of many tiny matrices is slow)."""
    m = m.to(x.dtype)
    return (x[..., 0:1] * m[:, None, 0, :] + x[..., 1:2] * m[:, None, 1, :]
            + x[..., 2:3] * m[:, None, 2, :])


def inv3(m: Tensor) -> Tensor:
    """Inverse of [..., 3, 3] matrices (adjugate / determinant)."""
    a, b, c = m[..., 0, :], m[..., 1, :], m[..., 2, :]
    adj_t = torch.stack([torch.linalg.cross(b, c), torch.linalg.cross(c, a),
                         torch.linalg.cross(a, b)], -1)  # columns are the cofactor rows
    return adj_t / det3(m)[..., None, None]


# ---------------------------------------------------------------------------------- creation
def make_state(
    positions,
    masses,
    cell=None,
    pbc=None,
    atomic_numbers=None,
    velocities=None,
    replicas: int = 1,
    seed: int = 0,
    device=None,
    dtype: torch.dtype = torch.float64,
) -> MDState:
    """An MDState from arrays.

    Args:
        positions: [N, 3] (copied to every replica) or [R, N, 3], Angstrom.
        masses: [N] amu, all finite and > 0 (there is no default: a missing mass is an error).
        cell: [3, 3] or [R, 3, 3] Angstrom, rows; None for a molecule.
        pbc: three bools (default: periodic where the cell vector is non-zero).
        atomic_numbers: [N] (default zeros).
        velocities: like positions, A/fs (default zeros; see ``initialize_velocities``).
        replicas: R when positions are [N, 3].
        seed: seed of the state's random stream.
    """
    dev = torch.device(device) if device is not None else torch.device("cpu")
    pos = _as(positions, dtype, dev)
    if pos.dim() == 2:
        pos = pos.unsqueeze(0).repeat(replicas, 1, 1)
    if pos.dim() != 3 or pos.shape[-1] != 3:
        raise ValueError(f"positions must be [N, 3] or [R, N, 3], got {tuple(pos.shape)}")
    r, n = pos.shape[:2]
    m = _check_masses(masses, n, dtype, dev)
    c = torch.zeros(3, 3, dtype=dtype, device=dev) if cell is None else _as(cell, dtype, dev)
    c = c.expand(r, 3, 3).clone() if c.dim() == 2 else c.clone()
    if pbc is None:
        pbc = (c[0].abs().sum(dim=1) > 0).tolist()
    p = torch.as_tensor(np.broadcast_to(np.asarray(pbc, dtype=bool), (3,)).copy(), device=dev)
    z = torch.zeros(n, dtype=torch.long, device=dev) if atomic_numbers is None else \
        torch.as_tensor(np.asarray(atomic_numbers, dtype=np.int64), device=dev)
    v = torch.zeros_like(pos)
    if velocities is not None:
        v = _as(velocities, dtype, dev).expand_as(pos).clone()
    rng = torch.Generator(device=dev)
    rng.manual_seed(int(seed))
    return MDState(positions=pos, velocities=v, masses=m, cell=c, pbc=p, atomic_numbers=z,
                   bath_energy=torch.zeros(r, dtype=torch.float64, device=dev), rng=rng)


def state_from_ase(atoms, replicas: int = 1, seed: int = 0, device=None,
                   dtype: torch.dtype = torch.float64) -> MDState:
    """An MDState from an ``ase.Atoms`` (or a list of R of them with the same species).

    Velocities come from the atoms' momenta when set (ASE units converted to A/fs).
    """
    frames = list(atoms) if isinstance(atoms, (list, tuple)) else [atoms] * replicas
    first = frames[0]
    if any(len(a) != len(first) or (a.numbers != first.numbers).any() for a in frames):
        raise ValueError("all replicas must have the same atoms in the same order")
    pos = np.stack([a.positions for a in frames])
    vel = np.stack([a.get_velocities() for a in frames]) / units.A_PER_FS_TO_ASE_VELOCITY
    cell = np.stack([a.cell.array for a in frames])
    return make_state(pos, first.get_masses(), cell, first.pbc, first.numbers, vel,
                      seed=seed, device=device, dtype=dtype)


def replica_to_ase(state: MDState, r: int):
    """Replica ``r`` of a state as an ``ase.Atoms`` (positions, cell, pbc; no velocities): what
    the collectors of ``mlpot learn`` and ``mlpot distill`` keep of the MD."""
    from ase import Atoms

    return Atoms(numbers=state.atomic_numbers.cpu().numpy(),
                 positions=state.positions[r].detach().double().cpu().numpy(),
                 cell=state.cell[r].detach().double().cpu().numpy(),
                 pbc=state.pbc.cpu().numpy())


def _as(x, dtype, device) -> Tensor:
    if isinstance(x, Tensor):
        return x.detach().to(device=device, dtype=dtype)
    return torch.as_tensor(np.asarray(x, dtype=np.float64), dtype=dtype, device=device)


def _check_masses(masses, n: int, dtype, device) -> Tensor:
    if masses is None:
        raise ValueError("masses are missing: give one mass per atom in amu "
                         "(e.g. ase.data.atomic_masses[atomic_numbers])")
    m = _as(masses, dtype, device).reshape(-1)
    if m.numel() == 1:
        m = m.expand(n).clone()
    if m.numel() != n:
        raise ValueError(f"got {m.numel()} masses for {n} atoms")
    bad = ~torch.isfinite(m) | (m <= 0)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise ValueError(f"mass of atom {i} is {float(m[i])}: masses must be finite and > 0 amu")
    return m


# ------------------------------------------------------------------------- derived quantities
def check_temperature(temperature_K: PerReplica, name: str = "temperature_K") -> Tensor:
    """The temperature(s) as a float64 tensor; raises on a negative or non-finite value."""
    t = torch.as_tensor(temperature_K, dtype=torch.float64).reshape(-1)
    if t.numel() == 0 or not torch.isfinite(t).all() or (t < 0).any():
        raise ValueError(f"{name} must be >= 0 K (one value or one per replica), got {t.tolist()}")
    return t


def kt_ev(temperature_K: PerReplica, n_replicas: int, device) -> Tensor:
    """k_B T per replica in eV  # [R] float64. Raises on a negative or non-finite temperature."""
    t = check_temperature(temperature_K).to(device)
    if t.numel() not in (1, n_replicas):
        raise ValueError(f"temperature_K has {t.numel()} values for {n_replicas} replicas")
    return (t * units.BOLTZMANN_EV_PER_K).expand(n_replicas).clone()


def kinetic_energy(velocities: Tensor, masses: Tensor) -> Tensor:
    """K = 1/2 sum_i m_i |v_i|^2  # [R] float64 eV"""
    mv2 = (velocities.double() ** 2).sum(-1) * masses.double()  # [R, N]
    return 0.5 * units.AMU_A2_PER_FS2_TO_EV * mv2.sum(-1)


def kinetic_tensor(velocities: Tensor, masses: Tensor) -> Tensor:
    """sum_i m_i v_i v_i^T  # [R, 3, 3] float64 eV (twice the kinetic energy tensor)"""
    v = velocities.double()
    mv = v * masses.double()[None, :, None]  # [R, N, 3]
    out = (mv[..., :, None] * v[..., None, :]).sum(1)  # [R, 3, 3] (bmm is slow for tall N x 3)
    return units.AMU_A2_PER_FS2_TO_EV * out


def temperature_K(state: MDState) -> Tensor:
    """T = 2K / (N_f k_B)  # [R] float64 K"""
    k = kinetic_energy(state.velocities, state.masses)
    return 2.0 * k / (max(state.dof, 1) * units.BOLTZMANN_EV_PER_K)


def pressure_tensor(state: MDState) -> Tensor:
    """Instantaneous pressure tensor P = sum m v v^T / V - stress  # [R, 3, 3] float64 eV/A^3

    NaN where the stress is unknown or the system is not periodic.
    """
    vol = state.volume()
    if state.stress is None or not bool(state.pbc.all()):
        return torch.full((state.n_replicas, 3, 3), float("nan"), dtype=torch.float64,
                          device=state.device)
    kin = kinetic_tensor(state.velocities, state.masses)
    return kin / vol[:, None, None] - state.stress.double()


def pressure_bar(state: MDState) -> Tensor:
    """Instantaneous pressure (trace / 3 of ``pressure_tensor``)  # [R] float64 bar"""
    p = pressure_tensor(state)
    return p.diagonal(dim1=-2, dim2=-1).mean(-1) * units.EV_PER_A3_TO_BAR


# ------------------------------------------------------------------------------ velocities
def remove_com_velocity(velocities: Tensor, masses: Tensor) -> Tensor:
    """v_i - sum_j m_j v_j / sum_j m_j, per replica  # [R, N, 3]"""
    w = (masses / masses.sum())[None, :, None]
    return velocities - (velocities * w).sum(1, keepdim=True)


def initialize_velocities(state: MDState, temperature_K: PerReplica,
                          remove_com: bool = True) -> MDState:
    """Velocities drawn from the Maxwell-Boltzmann distribution, v ~ N(0, k_B T / m) per component.

    With ``remove_com`` the centre-of-mass velocity is subtracted and ``fixed_com`` set (N_f =
    3N - 3); use it for systems whose forces sum to zero (anything periodic or isolated), not
    for atoms tied to external springs. The state's random stream is used.
    """
    kt = kt_ev(temperature_K, state.n_replicas, state.device)  # [R]
    var = kt[:, None] / state.masses.double()[None, :] * units.EV_PER_AMU_TO_A2_PER_FS2  # [R, N]
    noise = torch.randn(state.positions.shape, generator=state.rng, device=state.device,
                        dtype=state.dtype)
    v = noise * var.sqrt().to(state.dtype)[..., None]
    if remove_com:
        v = remove_com_velocity(v, state.masses)
    return state.replace(velocities=v, fixed_com=remove_com)
