"""The MD health check: stop a run that has gone wrong, with one clear message.

A learned potential's outputs stay bounded where it extrapolates, so a blow-up rarely shows as
huge forces; it shows as a temperature that runs away, a conserved quantity that drifts, or an
atom that jumps. ``HealthCheck`` holds a list of rules, each watching one of these, and raises
``HealthCheckFailed`` (an ``integrators.MDStopped``, a ``mlpot.errors.RunStopped``: exit code 3
in ``mlpot md``) when one is broken, after writing the last good structure (extxyz) to
``last_good_path`` and naming it in the message.

The rules and their defaults (all configurable; ``mlpot md`` options in brackets):

``TemperatureRunaway`` (``--max-temperature-ratio``, default 3)
    Stop when T > ratio x T_ref in any replica. With a thermostat,
    T_ref = max(target, T at the start, ``floor_K``); without one (NVE),
    T_ref = max(T at the start, running mean of T over the checks so far, ``floor_K``). NVE
    from a lattice start settles at about half the starting temperature (equipartition with the
    potential energy) and a thermostat brings a hot start down, so normal equilibration stays
    below 1 x T_ref. ``floor_K`` (default 50 K) keeps a cold or zero-velocity start from
    tripping on the first kelvins.
``EnergyDrift`` (``--max-drift``, default 0.1 eV/atom)
    Stop when |E_c(t) - E_c(0)| / N exceeds the tolerance, E_c being the conserved quantity:
    K + U in NVE, K + U + the energy given to the bath (and P V for NPT) with mlpot's
    thermostats (``Integrator.conserved_energy``). 0.1 eV/atom is about 800 K of kinetic energy
    per atom; sane runs drift by meV/atom. Skipped where the conserved quantity is unknown (ASE
    and OpenMM thermostats do not report their bath energy).
``UncertaintyStop`` (``--stop-uncertainty EV_PER_A``, off by default; committees only)
    Stop when a committee's raw ``max_force_dev`` (DeePMD-kit's ``max_devi_f``, eV/A, not the
    calibrated value) passes the threshold. The structure that crossed it is written
    (extxyz, with its step, replica and deviation) to the rule's ``path``. It is a per-replica
    rule: in ``simulate`` with several replicas, a replica that crosses is saved and held
    (frozen at that structure, skipped by the reporters) while the others go on; when every
    replica has stopped, the run ends with ``UncertaintyStopped`` (exit code 3). As an ASE
    observer it reads ``calc.results["max_force_dev"]`` of an ``MLPotCalculator`` running a
    committee (``HealthCheck(default_rules() + [UncertaintyStop(0.15)])``); in OpenMM, whose
    TorchForce returns only the energy, ``mlpot.openmm.UncertaintyReporter`` does the same.
``MaxDisplacement`` (``--max-step-displacement``, default 1 A per step)
    Stop when an atom moved more than the limit times the number of steps since the previous
    check (minimum-image displacement along periodic directions, so wrapping into the cell does
    not count). Thermal speeds are ~0.01-0.1 A/fs: at dt = 1 fs an atom moves ~0.01-0.1 A.

The same check runs three ways:

- in ``integrators.simulate`` (and ``mlpot md``), every step, on by default:
  ``simulate(..., health=HealthCheck.with_thresholds(max_drift=0.05))``;
- as an ASE observer: ``dyn.attach(HealthCheck.for_ase(atoms, dyn), interval=1)``;
- as an OpenMM reporter: ``simulation.reporters.append(HealthCheck.for_openmm(simulation, 10))``.

A new rule (e.g. the model-uncertainty stop) is a subclass of ``Rule`` with ``start`` and
``check``, added to ``HealthCheck(rules=[...])``.

Units: A, eV, K, fs (``mlpot.units``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch

from mlpot import units

from .base import MDInputError, MDStopped

Tensor = torch.Tensor

DEFAULT_MAX_TEMPERATURE_RATIO = 3.0
DEFAULT_TEMPERATURE_FLOOR_K = 50.0
DEFAULT_MAX_DRIFT_EV_PER_ATOM = 0.1
DEFAULT_MAX_STEP_DISPLACEMENT_A = 1.0


class HealthCheckFailed(MDStopped):
    """The health check stopped the run (exit code 3); the message says which rule, where, and
    where the last good structure was written."""


class NoDeviation(MDInputError):
    """An uncertainty rule or output asked of a model that is not a committee (exit code 2)."""


@dataclass
class Snapshot:
    """What the rules look at, for R replicas of N atoms (float64 torch tensors).

    Attributes:
        step: MD step number.
        positions: [R, N, 3] A.
        cell: [R, 3, 3] A (rows; zeros for a molecule).
        pbc: [3] bool.
        temperature_K: [R].
        conserved_eV: [R] the integrator's conserved quantity, or None when unknown.
        target_K: [R] the thermostat's target, or None without a thermostat.
        max_force_dev: [R] a committee's raw max_force_dev (eV/A), or None without one.
    """

    step: int
    positions: Tensor
    cell: Tensor
    pbc: Tensor
    temperature_K: Tensor
    conserved_eV: Optional[Tensor] = None
    target_K: Optional[Tensor] = None
    max_force_dev: Optional[Tensor] = None

    @property
    def n_atoms(self) -> int:
        return self.positions.shape[1]


def _first_bad(bad: Tensor) -> Optional[int]:
    """Index of the first True in a [R] bool tensor, or None (one host-device sync)."""
    if not bool(bad.any()):
        return None
    return int(bad.nonzero()[0])


class Rule:
    """One health rule. ``start(first)`` sees the first snapshot; ``check(prev, cur)`` returns
    None, or what is wrong (a phrase naming the replica, the value and the limit)."""

    option = ""  # the ``mlpot md`` option that sets its threshold
    per_replica = False  # True: ``simulate`` may stop only the replicas in ``crossed``

    def start(self, first: Snapshot) -> None:
        pass

    def check(self, prev: Snapshot, cur: Snapshot) -> Optional[str]:
        raise NotImplementedError


class TemperatureRunaway(Rule):
    """T > ratio x T_ref (see the module docstring for T_ref)."""

    option = "--max-temperature-ratio"

    def __init__(self, ratio: float = DEFAULT_MAX_TEMPERATURE_RATIO,
                 floor_K: float = DEFAULT_TEMPERATURE_FLOOR_K):
        if not ratio > 1 or math.isinf(ratio):
            raise ValueError(f"the temperature ratio must be a finite number > 1, got {ratio}")
        if not floor_K >= 0 or math.isinf(floor_K):
            raise ValueError(f"the temperature floor must be >= 0 K, got {floor_K}")
        self.ratio, self.floor = float(ratio), float(floor_K)

    def start(self, first: Snapshot) -> None:
        t0 = first.temperature_K.clamp_min(self.floor)
        self.base = t0 if first.target_K is None else torch.maximum(t0, first.target_K)
        self.thermostat = first.target_K is not None
        self.sum, self.count = first.temperature_K.clone(), 1

    def check(self, prev: Snapshot, cur: Snapshot) -> Optional[str]:
        ref = self.base
        if not self.thermostat:  # NVE: also the running mean of the checks before this one
            ref = torch.maximum(ref, self.sum / self.count)
        bad = ~(cur.temperature_K <= self.ratio * ref)  # NaN is bad too
        self.sum, self.count = self.sum + cur.temperature_K, self.count + 1
        r = _first_bad(bad)
        if r is None:
            return None
        what = "the thermostat target or the start" if self.thermostat else \
            "the start or the running mean"
        return (f"temperature runaway in replica {r}: T = {cur.temperature_K[r].item():.4g} K, "
                f"above {self.ratio:g} x {ref[r].item():.4g} K ({what})")


def _positive(what: str, value: float, unit: str) -> float:
    """``value`` as a float; ValueError unless it is a finite number > 0."""
    if not value > 0 or math.isinf(value):
        raise ValueError(f"{what} must be a finite number > 0 {unit}, got {value}")
    return float(value)


class EnergyDrift(Rule):
    """|E_c(t) - E_c(0)| / N > tolerance (eV/atom); skipped where E_c is unknown."""

    option = "--max-drift"

    def __init__(self, max_ev_per_atom: float = DEFAULT_MAX_DRIFT_EV_PER_ATOM):
        self.tol = _positive("the energy drift tolerance", max_ev_per_atom, "eV/atom")

    def start(self, first: Snapshot) -> None:
        self.e0 = None if first.conserved_eV is None else first.conserved_eV.clone()

    def check(self, prev: Snapshot, cur: Snapshot) -> Optional[str]:
        if self.e0 is None or cur.conserved_eV is None:
            return None
        drift = (cur.conserved_eV - self.e0).abs() / max(cur.n_atoms, 1)
        r = _first_bad(~(drift <= self.tol))
        if r is None:
            return None
        return (f"the conserved energy of replica {r} drifted by {drift[r].item():.4g} eV/atom "
                f"since the start (tolerance {self.tol:g} eV/atom)")


def minimum_image(d: Tensor, cell: Tensor, pbc: Tensor) -> Tensor:
    """Displacements d [R, N, 3] folded to the nearest periodic image along periodic axes of
    cells [R, 3, 3] (rows); unchanged where no axis is periodic or a cell is singular."""
    from .state import det3, inv3

    if not bool(pbc.any()):
        return d
    c = cell.to(d.dtype)
    if not bool((det3(c).abs() > 1e-9).all()):
        return d
    frac = d @ inv3(c)  # [R, N, 3] in cell units (rows: x = s @ cell)
    frac = frac - torch.where(pbc.to(d.device), torch.round(frac), torch.zeros_like(frac))
    return frac @ c


class MaxDisplacement(Rule):
    """An atom moved more than ``max_A`` x (steps since the previous check)."""

    option = "--max-step-displacement"

    def __init__(self, max_A: float = DEFAULT_MAX_STEP_DISPLACEMENT_A):
        self.max = _positive("the displacement limit", max_A, "A per step")

    def check(self, prev: Snapshot, cur: Snapshot) -> Optional[str]:
        steps = max(cur.step - prev.step, 1)
        limit = self.max * steps
        d = cur.positions - prev.positions
        if bool((d.norm(dim=-1) <= limit).all()):  # the usual case: one reduction, one sync
            return None
        dist = minimum_image(d, cur.cell, cur.pbc).norm(dim=-1)  # [R, N]; wrapping is no jump
        worst, atom = dist.max(dim=-1)
        r = _first_bad(~(worst <= limit))
        if r is None:
            return None
        per = "one step" if steps == 1 else f"{steps} steps"
        return (f"atom {int(atom[r])} of replica {r} moved {worst[r].item():.4g} A in {per} "
                f"(limit {self.max:g} A per step)")


class UncertaintyStopped(HealthCheckFailed):
    """The uncertainty stop ended the run (exit code 3): every replica passed the threshold."""


class UncertaintyStop(Rule):
    """A committee's raw ``max_force_dev`` passed ``max_force_dev`` eV/A in a running replica.

    ``crossed`` ([R] bool) holds the replicas that crossed at the last ``check``; ``stopped``
    those stopped so far (they are not checked again). ``path``: where the structures that
    crossed are written (extxyz, one frame each, appended), or None.
    """

    option = "--stop-uncertainty"
    per_replica = True

    def __init__(self, max_force_dev: float, path: Optional[str] = "md_uncertain.xyz"):
        self.threshold = _positive("the uncertainty threshold (max_force_dev)", max_force_dev,
                                   "eV/A")
        self.path = path
        self.stopped: Optional[Tensor] = None
        self.crossed: Optional[Tensor] = None

    def start(self, first: Snapshot) -> None:
        self.stopped = torch.zeros(first.positions.shape[0], dtype=torch.bool,
                                   device=first.positions.device)

    def check(self, prev: Snapshot, cur: Snapshot) -> Optional[str]:
        if cur.max_force_dev is None:
            raise NoDeviation("--stop-uncertainty needs a committee model (one returning "
                              "max_force_dev); this model returns none: export a committee "
                              "(training.ensemble) or drop --stop-uncertainty")
        dev = cur.max_force_dev.to(self.stopped.device)
        crossed = ~(dev <= self.threshold) & ~self.stopped  # NaN crosses too
        r = _first_bad(crossed)
        if r is None:
            self.crossed = None
            return None
        self.crossed = crossed
        which = crossed.nonzero().reshape(-1).tolist()
        names = f"replica {r}" if len(which) == 1 else \
            "replicas " + ", ".join(str(k) for k in which)
        return (f"the committee's max_force_dev passed --stop-uncertainty {self.threshold:g} "
                f"eV/A in {names} (replica {r}: {dev[r].item():.4g} eV/A)")


def default_rules(max_temperature_ratio: Optional[float] = DEFAULT_MAX_TEMPERATURE_RATIO,
                  max_drift: Optional[float] = DEFAULT_MAX_DRIFT_EV_PER_ATOM,
                  max_step_displacement: Optional[float] = DEFAULT_MAX_STEP_DISPLACEMENT_A,
                  temperature_floor_K: float = DEFAULT_TEMPERATURE_FLOOR_K) -> List[Rule]:
    """The three rules with these thresholds (None leaves a rule out)."""
    rules: List[Rule] = []
    if max_temperature_ratio is not None:
        rules.append(TemperatureRunaway(max_temperature_ratio, temperature_floor_K))
    if max_drift is not None:
        rules.append(EnergyDrift(max_drift))
    if max_step_displacement is not None:
        rules.append(MaxDisplacement(max_step_displacement))
    return rules


class HealthCheck:
    """A list of rules applied to successive snapshots of a run.

    Args:
        rules: the rules (default ``default_rules()``: temperature runaway, energy drift,
            displacement per step, with the documented defaults).
        last_good_path: where the structure before the failing check is written (extxyz), or
            None. The ASE and OpenMM adapters write it; ``simulate`` writes its own last good
            frame (all replicas, with velocities) to its ``last_good_path``.

    ``start(snapshot)`` once, then ``check(snapshot)`` returns None or raises
    ``HealthCheckFailed``. ``failure(snapshot)`` returns the message instead of raising.
    """

    def __init__(self, rules: Optional[Sequence[Rule]] = None,
                 last_good_path: Optional[str] = "md_last_good.xyz"):
        self.rules = list(default_rules() if rules is None else rules)
        self.last_good_path = last_good_path
        self._prev: Optional[Snapshot] = None
        self.broken: Optional[Rule] = None  # the rule behind the last failure

    @classmethod
    def with_thresholds(cls, max_temperature_ratio=DEFAULT_MAX_TEMPERATURE_RATIO,
                        max_drift=DEFAULT_MAX_DRIFT_EV_PER_ATOM,
                        max_step_displacement=DEFAULT_MAX_STEP_DISPLACEMENT_A,
                        temperature_floor_K=DEFAULT_TEMPERATURE_FLOOR_K,
                        last_good_path: Optional[str] = "md_last_good.xyz") -> "HealthCheck":
        return cls(default_rules(max_temperature_ratio, max_drift, max_step_displacement,
                                 temperature_floor_K), last_good_path)

    @property
    def started(self) -> bool:
        return self._prev is not None

    def start(self, snapshot: Snapshot) -> None:
        for rule in self.rules:
            rule.start(snapshot)
        self._prev = snapshot

    def failure(self, snapshot: Snapshot) -> Optional[str]:
        """What the first broken rule says about ``snapshot``, or None (and ``snapshot``
        becomes the previous one)."""
        if self._prev is None:
            self.start(snapshot)
            return None
        # per-replica rules last: the whole-run rules see every step
        for rule in sorted(self.rules, key=lambda r: r.per_replica):
            problem = rule.check(self._prev, snapshot)
            if problem:
                self.broken = rule
                return problem
        self._prev = snapshot
        return None

    def accept(self, snapshot: Snapshot) -> None:
        """Take ``snapshot`` as the previous one (after ``simulate`` held stopped replicas)."""
        self._prev = snapshot

    def message(self, step: int, problem: str, saved: str) -> str:
        """The one-line message of a stop."""
        if isinstance(self.broken, UncertaintyStop):
            return (f"MD stopped by the uncertainty check at step {step}: {problem}{saved}. The "
                    "model is extrapolating: label the saved structure(s) and add them to the "
                    "training data, or raise the threshold (--stop-uncertainty)")
        return (f"MD stopped by the health check at step {step}: {problem}{saved}. Try a smaller "
                "timestep, check the starting structure, or the model for these configurations "
                "(thresholds: --max-temperature-ratio, --max-drift, --max-step-displacement; "
                "--no-health-check turns the check off)")

    # ------------------------------------------------------------------ ASE and OpenMM
    @classmethod
    def for_ase(cls, atoms, dyn=None, temperature_K=None, health: Optional["HealthCheck"] = None,
                last_good_path: Optional[str] = "md_last_good.xyz", **thresholds):
        """An observer for ``dyn.attach(observer, interval=k)`` of an ASE dynamics.

        ``temperature_K``: the thermostat's target; None for NVE (``VelocityVerlet``), where the
        total energy is the conserved quantity. Given ``dyn``, its step count is used, and a
        thermostat's target is read from it (``dyn.temp``, k_B T in eV) when ``temperature_K``
        is not given. ``thresholds``: keywords of ``with_thresholds``.
        """
        check = health or cls.with_thresholds(last_good_path=last_good_path, **thresholds)
        return ASEObserver(check, atoms, dyn, temperature_K)

    @classmethod
    def for_openmm(cls, simulation, interval: int = 10,
                   health: Optional["HealthCheck"] = None,
                   last_good_path: Optional[str] = "md_last_good.xyz", **thresholds):
        """An OpenMM reporter (``simulation.reporters.append(...)``) checking every
        ``interval`` steps. The thermostat's target is the integrator's ``getTemperature()``
        where it has one; otherwise the run is taken as NVE and the total energy must be
        conserved."""
        check = health or cls.with_thresholds(last_good_path=last_good_path, **thresholds)
        return OpenMMReporter(check, simulation, interval)


def write_xyz(path: str, numbers, positions: np.ndarray, cell: np.ndarray, pbc, step: int,
              velocities: Optional[np.ndarray] = None) -> None:
    """One structure as extxyz (positions A; velocities in ASE units when given)."""
    from ase import Atoms
    from ase.io import write

    atoms = Atoms(numbers=np.asarray(numbers), positions=positions, cell=cell, pbc=pbc)
    if velocities is not None:
        atoms.set_velocities(velocities)
    atoms.info["step"] = int(step)
    write(path, atoms, format="extxyz")


def _saved(save: Callable[[str], None], path: Optional[str], step: int) -> str:
    if not path:
        return ""
    try:
        save(path)
        return f"; the last good structure (step {step}) was written to {path}"
    except Exception as err:  # noqa: BLE001 - the stop matters more than this error
        return f"; writing the last good structure to {path} failed: {err}"


def _t(x) -> Tensor:
    return torch.as_tensor(np.asarray(x, dtype=np.float64))


class ASEObserver:
    """``HealthCheck`` as an ASE observer; see ``HealthCheck.for_ase``."""

    def __init__(self, health: HealthCheck, atoms, dyn=None, temperature_K=None):
        self.health, self.atoms, self.dyn = health, atoms, dyn
        if temperature_K is None and dyn is not None:
            temperature_K = _ase_target_K(dyn)
        self.target = temperature_K
        self.calls = 0
        self._last = None

    def _snapshot(self) -> Snapshot:
        a = self.atoms
        step = int(self.dyn.nsteps) if self.dyn is not None else self.calls
        ekin = a.get_kinetic_energy()
        temp = a.get_temperature()  # ASE's count of degrees of freedom (constraints removed)
        conserved = None
        if self.target is None:
            conserved = _t([ekin + a.get_potential_energy()])
        dev = getattr(a.calc, "results", {}).get("max_force_dev")  # MLPotCalculator, committee
        return Snapshot(step=step, positions=_t(a.positions)[None], cell=_t(a.cell.array)[None],
                        pbc=torch.as_tensor(np.asarray(a.pbc, dtype=bool)),
                        temperature_K=_t([temp]), conserved_eV=conserved,
                        target_K=None if self.target is None else _t([self.target]),
                        max_force_dev=None if dev is None else _t([dev]))

    def __call__(self) -> None:
        snap = self._snapshot()
        self.calls += 1
        problem = self.health.failure(snap)
        if problem is None:
            good = self.atoms.copy()
            good.calc = None
            good.info["step"] = snap.step
            self._last = (snap.step, good)
            return
        rule = self.health.broken
        if isinstance(rule, UncertaintyStop):  # the structure that crossed, for labelling
            bad = self.atoms.copy()
            bad.calc = None
            bad.info.update(step=snap.step, max_force_dev=float(snap.max_force_dev[0]))
            saved = _saved(lambda p: bad.write(p, format="extxyz"), rule.path, snap.step)
            saved = saved.replace("the last good structure", "the structure that crossed it")
            raise UncertaintyStopped(self.health.message(snap.step, problem, saved))
        step, good = self._last
        saved = _saved(lambda p: good.write(p, format="extxyz"), self.health.last_good_path, step)
        raise HealthCheckFailed(self.health.message(snap.step, problem, saved))


def _ase_target_K(dyn) -> Optional[float]:
    """The thermostat target of an ASE dynamics in K; None for plain velocity Verlet (NVE)."""
    kt = getattr(dyn, "temp", None)  # Langevin, Bussi, Andersen: k_B T in eV
    if kt is not None:
        return float(kt) / units.BOLTZMANN_EV_PER_K
    t = getattr(dyn, "temperature", None)  # NVTBerendsen: K
    if isinstance(t, (int, float)):
        return float(t)
    from ase.md.verlet import VelocityVerlet

    if type(dyn) is VelocityVerlet:
        return None
    raise ValueError(f"give temperature_K: the thermostat target of {type(dyn).__name__} is not "
                     "known to the health check")


class OpenMMReporter:
    """``HealthCheck`` as an OpenMM reporter; see ``HealthCheck.for_openmm``."""

    def __init__(self, health: HealthCheck, simulation, interval: int = 10):
        if int(interval) < 1:
            raise ValueError(f"the health check interval must be >= 1 step, got {interval}")
        self.health, self.interval = health, int(interval)
        system = simulation.system
        import openmm

        n = system.getNumParticles()
        com = any(isinstance(system.getForce(i), openmm.CMMotionRemover)
                  for i in range(system.getNumForces()))
        self.dof = max(3 * n - system.getNumConstraints() - (3 if com else 0), 1)
        get_t = getattr(simulation.integrator, "getTemperature", None)
        self.target = None
        if get_t is not None:
            self.target = get_t().value_in_unit(openmm.unit.kelvin)
        self.numbers = [a.element.atomic_number if a.element is not None else 0
                        for a in simulation.topology.atoms()]
        self._last = None

    def describeNextReport(self, simulation):
        if not self.health.started:  # the start of the first ``step`` call: the reference
            self.report(simulation, simulation.context.getState(
                getPositions=True, getVelocities=True, getEnergy=True))
        steps = self.interval - simulation.currentStep % self.interval
        return {"steps": steps, "periodic": False, "include": ["positions", "velocities",
                                                               "energy"]}

    def report(self, simulation, state) -> None:
        from openmm import unit

        nm = 1.0 / units.ANGSTROM_TO_NM
        x = state.getPositions(asNumpy=True).value_in_unit(unit.nanometer) * nm
        v = state.getVelocities(asNumpy=True).value_in_unit(unit.nanometer / unit.picosecond)
        box = state.getPeriodicBoxVectors(asNumpy=True).value_in_unit(unit.nanometer) * nm
        periodic = simulation.system.usesPeriodicBoundaryConditions()
        kin = state.getKineticEnergy().value_in_unit(unit.kilojoule_per_mole) \
            * units.KJ_PER_MOL_TO_EV
        pot = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole) \
            * units.KJ_PER_MOL_TO_EV
        temp = 2.0 * kin / (self.dof * units.BOLTZMANN_EV_PER_K)
        cell = np.asarray(box, dtype=np.float64) if periodic else np.zeros((3, 3))
        snap = Snapshot(step=int(simulation.currentStep), positions=_t(x)[None],
                        cell=_t(cell)[None], pbc=torch.tensor([periodic] * 3),
                        temperature_K=_t([temp]),
                        conserved_eV=_t([kin + pot]) if self.target is None else None,
                        target_K=None if self.target is None else _t([self.target]))
        problem = self.health.failure(snap)
        if problem is None:
            # nm/ps -> A/fs -> ASE velocity units
            v_ase = np.asarray(v) * (nm * units.FS_TO_PS) * units.A_PER_FS_TO_ASE_VELOCITY
            self._last = (snap.step, np.asarray(x, dtype=np.float64), cell, periodic, v_ase)
            return
        step, xg, cg, pg, vg = self._last
        saved = _saved(lambda p: write_xyz(p, self.numbers, xg, cg, [pg] * 3, step, vg),
                       self.health.last_good_path, step)
        raise HealthCheckFailed(self.health.message(snap.step, problem, saved))


def snapshot_of(state, integrator) -> Snapshot:
    """The snapshot of an ``MDState`` advanced by ``integrator`` (integrators' own runs)."""
    from .state import temperature_K

    target = getattr(integrator, "temperature_K", None)
    if target is not None:
        target = torch.as_tensor(target, dtype=torch.float64, device=state.device).reshape(-1)
        target = target.expand(state.n_replicas)
    return Snapshot(step=int(state.step), positions=state.positions.detach().double(),
                    cell=state.cell.detach().double(), pbc=state.pbc,
                    temperature_K=temperature_K(state),
                    conserved_eV=integrator.conserved_energy(state).detach().double(),
                    target_K=target, max_force_dev=state.outputs.get("max_force_dev"))


__all__ = ["ASEObserver", "EnergyDrift", "HealthCheck", "HealthCheckFailed", "MaxDisplacement",
           "NoDeviation", "OpenMMReporter", "Rule", "Snapshot", "TemperatureRunaway",
           "UncertaintyStop", "UncertaintyStopped", "default_rules",
           "minimum_image", "snapshot_of", "write_xyz"]
