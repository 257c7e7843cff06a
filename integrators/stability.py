"""Stability of MD with a learned potential: the one definition of a stable run.

A run *blows up* in a replica at the first check where (``BlowupRule``, thresholds as parameters):

``force``      an atom's force is larger than ``max_force_eV_per_A`` (default 50 eV/A), or a
               force or the energy is not finite;
``distance``   two atoms (periodic images included) are closer than ``min_distance_A``
               (default 0.5 A; a neighbor list with that cutoff);
``bond``       for molecules only: a bond of the starting structure is longer than ``max_bond_A``
               (default 2 A). Bonds are the pairs closer than ``bond_factor`` (default 1.2) x
               the sum of their covalent radii (``ase.data.covalent_radii``) in the starting
               structure; along periodic directions the minimum image is used.

The two measures built on it:

``nve_drift``  the absolute slope of a least-squares line through the conserved energy per atom
               after a warm-up (default 1 ps), in meV/atom/ps;
``run_nvt``    R replicas of one structure with independent starting velocities and noise,
               batched in one ``integrators`` run (Langevin or Bussi at T); each replica
               survives, or blows up at a time with a reason. Force and finiteness are checked
               at every step (they come with the step; a non-finite replica must leave the
               batch at once), distances and bonds every ``check_every`` steps. A replica that
               blows up is taken out of the batch, so the others go on at the cost of their own
               number (so the force provider must treat every replica alike: ``MLPotForces``
               and ``LennardJones`` do; a ``Harmonic`` with per-replica centres does not);
``run_nve``    velocity Verlet from Maxwell-Boltzmann velocities at T, the conserved energy
               (kinetic + potential, ``Integrator.conserved_energy``) sampled every
               ``sample_every`` steps and its drift per replica (None where it blew up).

``benchmarks/stability_bench.py`` runs these on the trained models; other benchmarks import
them from here. Units: A, eV, fs (times in results: ps), K, amu.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import numpy as np
import torch

from .base import ForceProvider, Integrator, MDInputError
from .bussi import Bussi
from .health import minimum_image
from .langevin import Langevin
from .nve import VelocityVerlet
from .state import MDState, initialize_velocities

Tensor = torch.Tensor

DEFAULT_MAX_FORCE_EV_PER_A = 50.0
DEFAULT_MIN_DISTANCE_A = 0.5
DEFAULT_MAX_BOND_A = 2.0
DEFAULT_BOND_FACTOR = 1.2
DEFAULT_WARMUP_PS = 1.0
THERMOSTATS = ("langevin", "bussi")


# ----------------------------------------------------------------------------- the rule
@dataclass
class Blowup:
    """Why a replica blew up: ``kind`` is "force", "distance" or "bond"; ``message`` says where
    (atoms, value, limit)."""

    kind: str
    message: str


def bonds_from_structure(atomic_numbers, positions, cell=None, pbc=None,
                         factor: float = DEFAULT_BOND_FACTOR) -> Tensor:
    """The bonded pairs (i < j) of one structure: closer than ``factor`` x the sum of their
    covalent radii (``ase.data.covalent_radii``), periodic images included  # [B, 2] int64"""
    from ase.data import covalent_radii

    from mlpot.neighbors import neighbor_list, pair_vectors

    if not factor > 0 or math.isinf(factor):
        raise ValueError(f"the bond factor must be a finite number > 0, got {factor}")
    z = np.asarray(atomic_numbers, dtype=np.int64).reshape(-1)
    x = torch.as_tensor(np.asarray(positions, dtype=np.float64))
    if x.shape != (z.size, 3):
        raise ValueError(f"positions {tuple(x.shape)} do not match {z.size} atomic numbers")
    if z.size < 2:
        return torch.zeros(0, 2, dtype=torch.long)
    radii = torch.as_tensor(covalent_radii[z], dtype=torch.float64)
    c = torch.zeros(3, 3, dtype=torch.float64) if cell is None else \
        torch.as_tensor(np.asarray(cell, dtype=np.float64)).reshape(3, 3)
    i, j, s = neighbor_list(x, c, pbc, cutoff=float(2.0 * factor * radii.max()))
    d = pair_vectors(x, c, torch.zeros(z.size, dtype=torch.long), i, j, s).norm(dim=-1)
    bonded = (d < factor * (radii[i] + radii[j])) & (i < j)
    pairs = torch.stack([i[bonded], j[bonded]], dim=1)
    return torch.unique(pairs, dim=0) if pairs.numel() else pairs.reshape(0, 2)


@dataclass
class BlowupRule:
    """The blow-up rule with its thresholds; ``bonds`` [B, 2] (None or empty: no bond check,
    as for a crystal).

    ``check`` looks at R replicas at once and returns, per replica, None or a ``Blowup``.
    ``BlowupRule.for_structure`` takes the bonds from a starting structure.
    """

    max_force_eV_per_A: float = DEFAULT_MAX_FORCE_EV_PER_A
    min_distance_A: float = DEFAULT_MIN_DISTANCE_A
    max_bond_A: float = DEFAULT_MAX_BOND_A
    bonds: Optional[Tensor] = None

    def __post_init__(self) -> None:
        for name in ("max_force_eV_per_A", "min_distance_A", "max_bond_A"):
            value = getattr(self, name)
            if not value > 0 or math.isinf(value):
                raise ValueError(f"{name} must be a finite number > 0, got {value}")
        if self.bonds is not None:
            self.bonds = torch.as_tensor(self.bonds, dtype=torch.long).reshape(-1, 2)

    @classmethod
    def for_structure(cls, atoms, molecular: bool = True,
                      bond_factor: float = DEFAULT_BOND_FACTOR, **thresholds) -> "BlowupRule":
        """The rule for runs started from ``atoms`` (an ``ase.Atoms``): bonds taken from it
        when ``molecular`` (molecules, molecular liquids), none otherwise."""
        bonds = None
        if molecular:
            bonds = bonds_from_structure(atoms.numbers, atoms.positions, atoms.cell.array,
                                         atoms.pbc, bond_factor)
        return cls(bonds=bonds, **thresholds)

    def check(self, positions: Tensor, forces: Optional[Tensor], cell: Tensor, pbc: Tensor,
              energy: Optional[Tensor] = None, geometry: bool = True) -> List[Optional[Blowup]]:
        """Per replica, None or why it blew up.

        Args:
            positions: [R, N, 3] A; forces: [R, N, 3] eV/A (None: not checked); cell:
                [R, 3, 3] A (rows; zeros for a molecule); pbc: [3] bool; energy: [R] eV.
            geometry: also check distances and bonds (False: forces and finiteness only).
        """
        r, n = positions.shape[:2]
        out: List[Optional[Blowup]] = [None] * r
        x = positions.detach()
        bad = ~torch.isfinite(x).reshape(r, -1).all(dim=-1)
        fnorm = atom = None
        if forces is not None:
            fnorm = forces.detach().norm(dim=-1)  # [R, N]
            worst, atom = fnorm.nan_to_num(nan=math.inf).max(dim=-1)
            bad = bad | ~(worst <= self.max_force_eV_per_A)
        if energy is not None:
            bad = bad | ~torch.isfinite(energy.detach().reshape(-1))
        if bool(bad.any()):  # the usual case is one reduction and one sync
            for k in bad.nonzero().reshape(-1).tolist():
                out[k] = self._force_blowup(k, x[k], None if fnorm is None else fnorm[k],
                                            energy, None if atom is None else int(atom[k]))
        if not geometry:
            return out
        ok = [k for k in range(r) if out[k] is None]
        if not ok:
            return out
        for k, why in zip(ok, self._close_pairs(x[ok], cell.detach()[ok], pbc)):
            out[k] = why
        if self.bonds is not None and self.bonds.numel():
            ok = [k for k in range(r) if out[k] is None]
            if ok:
                for k, why in zip(ok, self._long_bonds(x[ok], cell.detach()[ok], pbc)):
                    out[k] = why
        return out

    def _force_blowup(self, k: int, x: Tensor, fnorm: Optional[Tensor], energy,
                      atom: Optional[int]) -> Blowup:
        if not bool(torch.isfinite(x).all()):
            i = int((~torch.isfinite(x).all(dim=-1)).nonzero()[0])
            return Blowup("force", f"replica {k}: atom {i} has a non-finite position")
        if fnorm is not None and not bool(torch.isfinite(fnorm).all()):
            i = int((~torch.isfinite(fnorm)).nonzero()[0])
            return Blowup("force", f"replica {k}: the force on atom {i} is not finite")
        if fnorm is not None and fnorm[atom] > self.max_force_eV_per_A:
            return Blowup("force", f"replica {k}: force {fnorm[atom].item():.4g} eV/A on atom "
                                   f"{atom} (limit {self.max_force_eV_per_A:g} eV/A)")
        return Blowup("force", f"replica {k}: the energy is not finite "
                               f"({energy.reshape(-1)[k].item()})")

    def _close_pairs(self, x: Tensor, cell: Tensor, pbc: Tensor) -> List[Optional[Blowup]]:
        from mlpot.neighbors import neighbor_list_batch, pair_vectors

        r, n = x.shape[:2]
        out: List[Optional[Blowup]] = [None] * r
        flat = x.reshape(r * n, 3)
        ptr = torch.arange(r + 1, device=x.device) * n
        pbc_b = torch.as_tensor(pbc, dtype=torch.bool, device=x.device).reshape(1, 3).expand(r, 3)
        i, j, s = neighbor_list_batch(flat, cell, pbc_b, ptr, self.min_distance_A)
        if i.numel() == 0:
            return out
        batch = torch.arange(r, device=x.device).repeat_interleave(n)
        d = pair_vectors(flat, cell, batch, i, j, s).norm(dim=-1)
        rep = batch[i]
        for k in torch.unique(rep).tolist():
            mine = (rep == k).nonzero().reshape(-1)
            m = mine[int(torch.argmin(d[mine]))]
            out[k] = Blowup("distance", f"replica {k}: atoms {int(i[m]) - k * n} and "
                                        f"{int(j[m]) - k * n} are {d[m].item():.3g} A apart "
                                        f"(limit {self.min_distance_A:g} A)")
        return out

    def _long_bonds(self, x: Tensor, cell: Tensor, pbc: Tensor) -> List[Optional[Blowup]]:
        b = self.bonds.to(x.device)
        d = x[:, b[:, 1]] - x[:, b[:, 0]]  # [R, B, 3]
        d = minimum_image(d, cell, torch.as_tensor(pbc, dtype=torch.bool, device=x.device))
        length = d.norm(dim=-1)
        worst, which = length.max(dim=-1)
        out: List[Optional[Blowup]] = [None] * x.shape[0]
        for k in (~(worst <= self.max_bond_A)).nonzero().reshape(-1).tolist():
            i, j = (int(v) for v in b[int(which[k])])
            out[k] = Blowup("bond", f"replica {k}: the bond {i}-{j} is {worst[k].item():.3g} A "
                                    f"long (limit {self.max_bond_A:g} A)")
        return out


def blowup_reason(positions, forces=None, cell=None, pbc=None, bonds=None, energy=None,
                  max_force_eV_per_A: float = DEFAULT_MAX_FORCE_EV_PER_A,
                  min_distance_A: float = DEFAULT_MIN_DISTANCE_A,
                  max_bond_A: float = DEFAULT_MAX_BOND_A) -> Optional[Blowup]:
    """The blow-up rule on one structure: None, or why it has blown up.

    positions [N, 3] A; forces [N, 3] eV/A or None; cell [3, 3] (None: a molecule); pbc three
    bools (None: periodic where the cell vector is non-zero); bonds [B, 2] pairs
    (``bonds_from_structure`` of the starting structure) or None; energy in eV or None.
    """
    x = torch.as_tensor(np.asarray(positions, dtype=np.float64)).reshape(1, -1, 3)
    c = torch.zeros(3, 3, dtype=torch.float64) if cell is None else \
        torch.as_tensor(np.asarray(cell, dtype=np.float64)).reshape(3, 3)
    if pbc is None:
        pbc = (c.abs().sum(dim=1) > 0).tolist()
    p = torch.as_tensor(np.broadcast_to(np.asarray(pbc, dtype=bool), (3,)).copy())
    f = None if forces is None else \
        torch.as_tensor(np.asarray(forces, dtype=np.float64)).reshape(1, -1, 3)
    e = None if energy is None else torch.tensor([float(energy)], dtype=torch.float64)
    rule = BlowupRule(max_force_eV_per_A, min_distance_A, max_bond_A, bonds)
    why = rule.check(x, f, c[None], p, e)[0]
    if why is not None:
        why.message = why.message.replace("replica 0: ", "", 1)
    return why


# ----------------------------------------------------------------------------- NVE drift
def nve_drift(times_ps, conserved_eV, n_atoms: int, warmup_ps: float = DEFAULT_WARMUP_PS):
    """The absolute slope of a least-squares line through the conserved energy per atom at the
    times after ``warmup_ps``, in meV/atom/ps.

    times_ps: [T]; conserved_eV: [T] (a float is returned) or [T, R] (an array of R).
    """
    t = np.asarray(times_ps, dtype=np.float64).reshape(-1)
    e = np.asarray(conserved_eV, dtype=np.float64)
    one = e.ndim == 1
    if one:
        e = e[:, None]
    if e.ndim != 2 or e.shape[0] != t.size:
        raise ValueError(f"{t.size} times but conserved energies of shape {np.shape(conserved_eV)}")
    if int(n_atoms) < 1:
        raise ValueError(f"n_atoms must be >= 1, got {n_atoms}")
    keep = t >= float(warmup_ps)
    if keep.sum() < 2 or np.ptp(t[keep]) <= 0:
        raise ValueError(f"fewer than two distinct times after the {warmup_ps:g} ps warm-up "
                         f"(the run has {t.size} samples up to {t.max(initial=0):g} ps): run "
                         "longer or shorten the warm-up")
    tk, ek = t[keep], e[keep] / int(n_atoms) * 1000.0  # meV/atom
    tc = tk - tk.mean()
    slope = np.abs((tc[:, None] * (ek - ek.mean(axis=0))).sum(axis=0) / (tc * tc).sum())
    return float(slope[0]) if one else slope


# ----------------------------------------------------------------------------- the runs
@dataclass
class ReplicaOutcome:
    """One replica of a stability run: ``survived``, or blown up at ``time_ps`` (the check
    that found it) for ``kind`` ("force", "distance", "bond") with ``reason``."""

    replica: int
    survived: bool
    time_ps: Optional[float] = None
    kind: Optional[str] = None
    reason: Optional[str] = None


@dataclass
class StabilityRun:
    """What ``run_nvt`` and ``run_nve`` return.

    ``steps``: steps asked for; ``steps_done``: steps taken (fewer when every replica blew up);
    ``steps_per_s``: batched steps per second of wall time (each step advances every replica
    still running); ``times_ps`` and ``conserved_eV`` [T, R] (NaN after a blow-up): the
    samples of the conserved energy (every run records them); ``drift_meV_per_atom_ps``:
    per replica, NVE only (None where it blew up).
    """

    ensemble: str
    temperature_K: float
    timestep_fs: float
    steps: int
    n_atoms: int
    outcomes: List[ReplicaOutcome]
    steps_done: int = 0
    wall_s: float = 0.0
    times_ps: np.ndarray = field(default_factory=lambda: np.zeros(0))
    conserved_eV: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    drift_meV_per_atom_ps: Optional[List[Optional[float]]] = None

    @property
    def survived(self) -> int:
        return sum(o.survived for o in self.outcomes)

    @property
    def survived_fraction(self) -> float:
        return self.survived / max(len(self.outcomes), 1)

    @property
    def steps_per_s(self) -> float:
        return self.steps_done / self.wall_s if self.wall_s > 0 else float("nan")


def _select(state: MDState, keep: Tensor) -> MDState:
    """The replicas ``keep`` ([K] int64) of a state (per-replica tensors sliced)."""
    r = state.n_replicas

    def sl(v):
        return v[keep] if isinstance(v, Tensor) and v.dim() and v.shape[0] == r else v

    return state.replace(
        positions=state.positions[keep], velocities=state.velocities[keep],
        cell=state.cell[keep], forces=sl(state.forces), energy=sl(state.energy),
        stress=sl(state.stress), bath_energy=sl(state.bath_energy),
        extras={k: sl(v) for k, v in state.extras.items()},
        outputs={k: sl(v) for k, v in state.outputs.items()
                 if isinstance(v, Tensor) and v.dim() and v.shape[0] == r},
        active=None)


def _steps_of(time_ps: float, timestep_fs: float) -> int:
    if not time_ps > 0 or math.isinf(time_ps):
        raise ValueError(f"the run time must be a finite number > 0 ps, got {time_ps}")
    if not timestep_fs > 0 or math.isinf(timestep_fs):
        raise ValueError(f"the timestep must be a finite number > 0 fs, got {timestep_fs}")
    return max(int(round(time_ps * 1000.0 / timestep_fs)), 1)


def _run(state: MDState, integrator: Integrator, forces: ForceProvider, n_steps: int,
         rule: BlowupRule, check_every: int, sample_every: int, ensemble: str, temperature: float,
         progress: Optional[Callable[[int, int, int], None]]) -> StabilityRun:
    """The loop shared by ``run_nvt`` and ``run_nve``."""
    if int(check_every) < 1 or int(sample_every) < 1:
        raise ValueError(f"check_every and sample_every must be >= 1 step, got {check_every} "
                         f"and {sample_every}")
    r0 = state.n_replicas
    outcomes = [ReplicaOutcome(k, True) for k in range(r0)]
    t0 = time.perf_counter()
    state = integrator.init(state, forces)
    first = rule.check(state.positions, state.forces, state.cell, state.pbc, state.energy)
    bad = [w for w in first if w is not None]
    if bad:
        raise MDInputError(f"the starting structure already fails the blow-up rule "
                           f"({bad[0].message.split(': ', 1)[1]}); check it, its units (A) and "
                           "the model")
    alive = torch.arange(r0)  # original replica index of each row still in the batch
    times, samples = [0.0], [integrator.conserved_energy(state).double().cpu().numpy()]
    dt_ps = float(integrator.timestep_fs) / 1000.0
    done = 0
    for step in range(1, int(n_steps) + 1):
        state = integrator.step(state, forces)
        done = step
        geometry = step % int(check_every) == 0 or step == int(n_steps)
        found = rule.check(state.positions, state.forces, state.cell, state.pbc, state.energy,
                           geometry=geometry)
        if any(w is not None for w in found):
            keep = []
            for row, why in enumerate(found):
                k = int(alive[row])
                if why is None:
                    keep.append(row)
                    continue
                msg = why.message.replace(f"replica {row}:", f"replica {k}:", 1)
                outcomes[k] = ReplicaOutcome(k, False, round(step * dt_ps, 6), why.kind,
                                             f"{msg} at {step * dt_ps:g} ps (step {step})")
            if not keep:
                break
            idx = torch.as_tensor(keep, dtype=torch.long, device=state.device)
            state = _select(state, idx)
            alive = alive[torch.as_tensor(keep, dtype=torch.long)]
        if step % int(sample_every) == 0:
            row = np.full(r0, np.nan)
            row[alive.numpy()] = integrator.conserved_energy(state).double().cpu().numpy()
            times.append(step * dt_ps)
            samples.append(row)
        if progress is not None:
            progress(step, int(n_steps), len(alive))
    run = StabilityRun(ensemble, float(temperature), float(integrator.timestep_fs),
                       int(n_steps), state.n_atoms, outcomes, steps_done=done,
                       wall_s=time.perf_counter() - t0, times_ps=np.asarray(times),
                       conserved_eV=np.stack(samples))
    return run


def _start(state: MDState, temperature_K: float, replicas: Optional[int], seed: int) -> MDState:
    """R replicas of the state's first replica with Maxwell-Boltzmann velocities at T drawn
    from a stream seeded by ``seed`` (different in every replica)."""
    if replicas is not None:
        if int(replicas) < 1:
            raise ValueError(f"the number of replicas must be >= 1, got {replicas}")
        idx = torch.zeros(int(replicas), dtype=torch.long, device=state.device)
        state = _select(state.replace(forces=None, energy=None, stress=None), idx)
    rng = torch.Generator(device=state.device)
    rng.manual_seed(int(seed))
    state = state.replace(rng=rng, step=0, time_fs=0.0, forces=None, energy=None, stress=None,
                          bath_energy=None, extras={}, outputs={}, active=None)
    return initialize_velocities(state, temperature_K)


def run_nvt(forces: ForceProvider, state: MDState, temperature_K: float, time_ps: float,
            timestep_fs: float = 0.5, rule: Optional[BlowupRule] = None,
            replicas: Optional[int] = 5, thermostat: str = "langevin",
            friction_per_fs: float = 0.01, tau_fs: float = 100.0, check_every: int = 10,
            sample_every: int = 100, seed: int = 0,
            progress: Optional[Callable[[int, int, int], None]] = None) -> StabilityRun:
    """R independent NVT runs of ``time_ps`` at ``temperature_K``, batched; per replica
    survived, or the time and reason of its blow-up.

    ``state``: the starting structure (its first replica is copied ``replicas`` times; None
    keeps the state's replicas); velocities are drawn at T from a stream seeded by ``seed``.
    ``thermostat``: "langevin" (BAOAB, ``friction_per_fs``) or "bussi" (``tau_fs``).
    ``rule``: the blow-up rule (default ``BlowupRule()``, without bonds: give
    ``BlowupRule.for_structure(atoms)`` for molecules).
    """
    if thermostat not in THERMOSTATS:
        raise ValueError(f"thermostat must be one of {', '.join(THERMOSTATS)}, got {thermostat!r}")
    n = _steps_of(time_ps, timestep_fs)
    integ = Langevin(timestep_fs, float(temperature_K), friction_per_fs) \
        if thermostat == "langevin" else Bussi(timestep_fs, float(temperature_K), tau_fs)
    state = _start(state, temperature_K, replicas, seed)
    return _run(state, integ, forces, n, rule or BlowupRule(), check_every, sample_every,
                f"nvt-{thermostat}", temperature_K, progress)


def run_nve(forces: ForceProvider, state: MDState, temperature_K: float, time_ps: float,
            timestep_fs: float = 0.5, rule: Optional[BlowupRule] = None,
            replicas: Optional[int] = 1, warmup_ps: float = DEFAULT_WARMUP_PS,
            check_every: int = 10, sample_every: int = 10, seed: int = 0,
            progress: Optional[Callable[[int, int, int], None]] = None) -> StabilityRun:
    """NVE (velocity Verlet) for ``time_ps`` from Maxwell-Boltzmann velocities at
    ``temperature_K``; the run's ``drift_meV_per_atom_ps`` holds ``nve_drift`` of each replica
    (conserved energy K + U sampled every ``sample_every`` steps, fitted after ``warmup_ps``;
    None for a replica that blew up). The blow-up rule is checked as in ``run_nvt``."""
    n = _steps_of(time_ps, timestep_fs)
    integ = VelocityVerlet(timestep_fs)
    state = _start(state, temperature_K, replicas, seed)
    run = _run(state, integ, forces, n, rule or BlowupRule(), check_every, sample_every, "nve",
               temperature_K, progress)
    drift: List[Optional[float]] = []
    for k, outcome in enumerate(run.outcomes):
        drift.append(float(nve_drift(run.times_ps, run.conserved_eV[:, k], run.n_atoms,
                                     warmup_ps)) if outcome.survived else None)
    run.drift_meV_per_atom_ps = drift
    return run


__all__ = ["Blowup", "BlowupRule", "ReplicaOutcome", "StabilityRun", "blowup_reason",
           "bonds_from_structure", "nve_drift", "run_nve", "run_nvt",
           "DEFAULT_MAX_FORCE_EV_PER_A", "DEFAULT_MIN_DISTANCE_A", "DEFAULT_MAX_BOND_A",
           "DEFAULT_BOND_FACTOR", "DEFAULT_WARMUP_PS"]
