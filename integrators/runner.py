"""``simulate``: the MD loop with reporters, checkpoints and the safety checks.

Safety: after every force call the forces must be finite and no larger than ``max_force``
(eV/A), and the health check (``integrators.health``: temperature runaway, conserved-energy
drift, an atom jumping) must pass; otherwise the run stops with ``MDStopped`` (exit code 3 in
``mlpot md``) naming the step, replica and atom, after writing the last good frame (the state
before the failing step, all replicas) to an extxyz file. A starting structure with bad forces
raises ``MDInputError`` (exit code 2), and atoms closer than ``overlap_warning_A`` at the start
give a warning.

Uncertainty (``--stop-uncertainty``, ``integrators.health.UncertaintyStop``): with a committee
model, a replica whose ``max_force_dev`` passes the threshold is written (the structure that
crossed it, appended to the rule's ``path``) and, while other replicas run, held at that
structure (``MDState.active`` False: it is still part of the batch, but each step puts it back,
and the reporters skip it) with an ``MDWarning``; when no replica is left, or with one replica,
the run ends with ``UncertaintyStopped`` (exit code 3). Checkpoints keep ``active``, so a
resumed run keeps the stopped replicas stopped.
"""
from __future__ import annotations

import math
import os
import warnings
from typing import Optional, Sequence, Union

import torch

from mlpot import units
from mlpot.files import remove_stale_temporaries
from mlpot.threads import poll_threads

from .base import ForceProvider, Integrator, MDInputError, MDStopped
from .checkpoint import save_md_checkpoint
from .health import HealthCheck, HealthCheckFailed, UncertaintyStopped, snapshot_of
from .reporters import Reporter
from .state import MDState

DEFAULT_MAX_FORCE = 1.0e3  # eV/A: far beyond any physical force, well before an overflow


class MDWarning(UserWarning):
    """Something suspicious at the start of a run (overlapping atoms) that does not stop it."""


def check_forces(state: MDState, max_force: float = DEFAULT_MAX_FORCE) -> Optional[str]:
    """None when all forces and energies are finite and |F| <= max_force, else what is wrong."""
    f = state.forces
    fmax = f.detach().abs().amax()
    ok = torch.isfinite(f).all() & torch.isfinite(state.energy).all() & (fmax <= max_force)
    if bool(ok):  # the one host-device synchronization per step
        return None
    per_atom = f.detach().norm(dim=-1)  # [R, N]
    bad = ~torch.isfinite(per_atom) | (per_atom > max_force)
    if bad.any():
        r, i = (int(k) for k in bad.nonzero()[0])
        return (f"replica {r}, atom {i}: force {per_atom[r, i].item():.4g} eV/A "
                f"(limit {max_force:g} eV/A)")
    r = int((~torch.isfinite(state.energy)).nonzero()[0])
    return f"replica {r}: energy {state.energy[r].item()}"


def write_frame(path: str, state: MDState, replicas: Optional[Sequence[int]] = None,
                append: bool = False) -> None:
    """Replicas of a state (default all) as extxyz frames (positions, velocities in ASE units,
    cell; a committee's max_force_dev in the info when the state has it)."""
    from ase import Atoms
    from ase.io import write

    frames = []
    dev = state.outputs.get("max_force_dev")
    for r in (range(state.n_replicas) if replicas is None else replicas):
        atoms = Atoms(numbers=state.atomic_numbers.cpu().numpy(),
                      positions=state.positions[r].detach().double().cpu().numpy(),
                      cell=state.cell[r].detach().double().cpu().numpy(),
                      pbc=state.pbc.cpu().numpy(), masses=state.masses.double().cpu().numpy())
        atoms.set_velocities(state.velocities[r].detach().double().cpu().numpy()
                             * units.A_PER_FS_TO_ASE_VELOCITY)
        atoms.info.update(step=int(state.step), time_fs=float(state.time_fs), replica=r)
        if dev is not None:
            atoms.info["max_force_dev"] = float(dev[r])
        frames.append(atoms)
    write(path, frames, format="extxyz", append=append)


def _save_last_good(last_good: MDState, path: Optional[str]) -> str:
    if not path:
        return ""
    try:
        write_frame(path, last_good)
        return f"; the last good frame (step {last_good.step}) was written to {path}"
    except Exception as err:  # noqa: BLE001 - the MD error matters more than this one
        return f"; writing the last good frame to {path} failed: {err}"


def _fail(state: MDState, last_good: MDState, what: str, path: Optional[str]) -> MDStopped:
    saved = _save_last_good(last_good, path)
    return MDStopped(f"MD stopped at step {state.step} (t = {state.time_fs:g} fs): non-finite or "
                     f"exploding forces, {what}{saved}. Try a smaller timestep, check the starting "
                     "structure for overlapping atoms, or the model for this configuration.")


def _hold(new: MDState, held: MDState, stopped: torch.Tensor) -> MDState:
    """``new`` with the replicas in ``stopped`` ([R] bool) put back to their values in
    ``held`` (positions, velocities, cell, forces, energies, bath and integrator variables,
    model outputs)."""
    def pick(a, b):
        if a is None or b is None or a.shape != b.shape or a.shape[:1] != stopped.shape:
            return b
        return torch.where(stopped.reshape((-1,) + (1,) * (a.dim() - 1)), a, b)

    changes = {name: pick(getattr(held, name), getattr(new, name)) for name in
               ("positions", "velocities", "cell", "forces", "energy", "stress", "bath_energy")}
    changes["extras"] = {k: pick(held.extras.get(k), v) for k, v in new.extras.items()}
    changes["outputs"] = {k: pick(held.outputs.get(k), v) for k, v in new.outputs.items()}
    return new.replace(**changes)


def _save_crossed(state: MDState, crossed: torch.Tensor, path: Optional[str],
                  append: bool) -> str:
    if not path:
        return ""
    which = crossed.nonzero().reshape(-1).tolist()
    try:
        write_frame(path, state, which, append=append and os.path.exists(path))
        return f"; the structure that crossed it (step {state.step}) was written to {path}"
    except Exception as err:  # noqa: BLE001 - the stop matters more than this error
        return f"; writing the structure that crossed it to {path} failed: {err}"


def overlap_message(state: MDState, within_A: float) -> Optional[str]:
    """A one-line warning when two atoms are closer than ``within_A``, else None."""
    from mlpot.data.validate import closest_pair

    for rep in range(state.n_replicas):
        found = closest_pair(state.positions[rep], state.cell[rep], state.pbc, within_A)
        if found is not None:
            break
    else:
        return None
    i, j, d = found
    return (f"atoms {i} and {j} of replica {rep} are {d:.3g} A apart (closer than "
            f"{within_A:g} A): overlapping atoms usually mean a wrong structure or units")


def _stop_replicas(new: MDState, health: HealthCheck, snap, problem: str):
    """A per-replica rule broke: save the replicas that crossed, hold them, and go on with the
    others; raise ``UncertaintyStopped`` when none is left. Returns (state, held)."""
    rule = health.broken
    crossed = rule.crossed
    saved = _save_crossed(new, crossed, getattr(rule, "path", None),
                          append=bool(getattr(rule, "written", False)))
    rule.written = True
    active = torch.ones_like(crossed) if new.active is None else new.active.to(crossed.device)
    active = active & ~crossed
    rule.stopped = rule.stopped | crossed
    if not bool(active.any()):
        raise UncertaintyStopped(health.message(new.step, problem, saved))
    new = new.replace(active=active)
    health.accept(snap)
    warnings.warn(f"step {new.step}: {problem}{saved}; the replica(s) that crossed are held "
                  f"there and the {int(active.sum())} other replica(s) go on", MDWarning,
                  stacklevel=3)
    return new, new


def simulate(
    state: MDState,
    integrator: Integrator,
    forces: ForceProvider,
    n_steps: int,
    reporters: Sequence[Reporter] = (),
    checkpoint_path: Optional[str] = None,
    checkpoint_interval: int = 0,
    max_force: float = DEFAULT_MAX_FORCE,
    last_good_path: Optional[str] = "md_last_good.xyz",
    health: Union[HealthCheck, bool, None] = True,
    overlap_warning_A: Optional[float] = 0.5,
) -> MDState:
    """Run ``n_steps`` steps from ``state`` and return the final state.

    The tensors of ``state`` are not modified, but its random stream advances (use
    ``state.copy()`` to start two runs with the same random numbers).

    Reporters report at every multiple of their interval (and at step 0 of a fresh run). A
    checkpoint is written every ``checkpoint_interval`` steps and at the end when
    ``checkpoint_path`` is given (temporary files of killed checkpoint writes are removed at the
    start); ``load_md_checkpoint`` then resumes exactly.

    ``health``: the health check run after every step (``True``: ``HealthCheck()`` with the
    default thresholds of ``integrators.health``; None or False: none). A broken rule raises
    ``HealthCheckFailed`` after the last good frame is written to ``last_good_path``.
    ``overlap_warning_A``: warn (``MDWarning``) when two atoms start closer than this (None: no
    check).
    """
    if int(n_steps) != n_steps or n_steps < 0:
        raise MDInputError(f"the number of steps must be a whole number >= 0, got {n_steps}")
    if not max_force > 0 or math.isnan(max_force):
        raise MDInputError(f"max_force must be > 0 eV/A, got {max_force}")
    if health is True:
        health = HealthCheck()
    if overlap_warning_A:
        msg = overlap_message(state, overlap_warning_A)
        if msg:
            warnings.warn(msg, MDWarning, stacklevel=2)
    state = integrator.init(state, forces)
    problem = check_forces(state, max_force)
    if problem:
        raise MDInputError(f"the starting structure already has non-finite or exploding forces: "
                           f"{problem}; check it for overlapping atoms and its units (Angstrom)")
    if checkpoint_path:
        remove_stale_temporaries(checkpoint_path)  # left by a kill -9 during a write
    per_replica = [rule for rule in health.rules if rule.per_replica] if health else []
    if health:
        health.start(snapshot_of(state, integrator))
        if state.active is not None:  # resumed: replicas stopped before stay stopped
            for rule in per_replica:
                rule.stopped = ~state.active.to(state.device)
    held = state  # the values of the stopped replicas
    fresh = state.step == 0
    opened = []
    try:
        for rep in reporters:
            rep.open(state, integrator)
            opened.append(rep)
            if fresh:
                rep.report(state, integrator)
        for _ in range(int(n_steps)):
            poll_threads()  # fewer threads while another process takes a core (mlpot.threads)
            new = integrator.step(state, forces)
            if state.active is not None:
                new = _hold(new, held, ~state.active)
            problem = check_forces(new, max_force)
            if problem:
                raise _fail(new, state, problem, last_good_path)
            if health:
                snap = snapshot_of(new, integrator)
                problem = health.failure(snap)
                if problem and health.broken in per_replica:
                    new, held = _stop_replicas(new, health, snap, problem)
                elif problem:
                    raise HealthCheckFailed(health.message(
                        new.step, problem, _save_last_good(state, last_good_path)))
            state = new
            for rep in reporters:
                if state.step % rep.interval == 0:
                    rep.report(state, integrator)
            if checkpoint_path and checkpoint_interval and state.step % checkpoint_interval == 0:
                save_md_checkpoint(checkpoint_path, state, integrator)
        if checkpoint_path:
            save_md_checkpoint(checkpoint_path, state, integrator)
    finally:
        for rep in opened:
            rep.close()
    return state

