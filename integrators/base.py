"""What every integrator shares: the force-provider contract, the base class, kicks and drifts.

A force provider is any callable ``fn(positions [R, N, 3], cell [R, 3, 3], compute_stress) ->
dict`` with "energy" [R] (eV), "forces" [R, N, 3] (eV/A) and, when asked, "stress" [R, 3, 3]
(eV/A^3, ASE's sign).

Each integrator is a small dataclass of parameters with two methods (torch-sim's pattern):
``init(state, forces)`` computes what the first step needs, ``step(state, forces)`` returns the
state one timestep later. Steps never modify the tensors of the state they are given, so the
previous state stays valid (the runner keeps it as the last good frame).

The velocity Verlet pieces (Swope, Andersen, Berens, Wilson, J. Chem. Phys. 76, 637 (1982))::

    kick  (B):  v <- v + (h / m) F          h in fs, F/m converted by EV_PER_AMU_TO_A2_PER_FS2
    drift (A):  x <- x + h v
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Callable, ClassVar, Dict, Optional

import torch

from mlpot import units
from mlpot.errors import RunStopped, UserError

from .state import MDState, kinetic_energy, kt_ev

Tensor = torch.Tensor
ForceProvider = Callable[[Tensor, Tensor, bool], Dict[str, Tensor]]


class MDError(RuntimeError):
    """A simulation that cannot go on (non-finite or exploding forces, a collapsed cell...)."""


class MDInputError(MDError, UserError):
    """Bad input to a run (a starting structure with non-finite or exploding forces, an option
    out of range): exit code 2 in ``mlpot md``."""


class MDStopped(MDError, RunStopped):
    """A run stopped by a rule (exploding forces, the health check of ``integrators.health``)
    after the last good frame was saved: exit code 3 in ``mlpot md``."""


#: Every concrete integrator by class name (filled by ``Integrator.__init_subclass__``; MD
#: checkpoints name their integrator and are read back through this map).
REGISTRY: Dict[str, type] = {}


def evaluate(forces: ForceProvider, positions: Tensor, cell: Tensor,
             compute_stress: bool) -> Dict[str, Tensor]:
    """Call the force provider and check the shapes of what it returns.

    Returns energy [R] float64, forces [R, N, 3] (working dtype), stress [R, 3, 3] or None,
    and "outputs": whatever else the provider returned (a committee's deviations, per replica),
    detached, which the integrators keep in ``MDState.outputs``.
    """
    out = forces(positions, cell, compute_stress)
    r, n = positions.shape[:2]
    if "energy" not in out or "forces" not in out:
        raise MDError(f"the force provider returned {sorted(out)}; it must return 'energy' and "
                      "'forces' (and 'stress' when asked)")
    e = out["energy"].detach().reshape(-1).to(torch.float64)
    f = out["forces"].detach().to(positions.dtype)
    if e.shape[0] != r or f.shape != positions.shape:
        raise MDError(f"force provider shapes: energy {tuple(e.shape)}, forces {tuple(f.shape)}; "
                      f"expected energy ({r},), forces ({r}, {n}, 3)")
    s = None
    if compute_stress:
        if out.get("stress") is None:
            raise MDError("the force provider returned no 'stress' although it was asked for one "
                          "(needed by the barostat and the pressure column)")
        s = out["stress"].detach().to(positions.dtype).reshape(r, 3, 3)
    extra = {k: v.detach() for k, v in out.items() if k not in ("energy", "forces", "stress")
             and isinstance(v, torch.Tensor)}
    return {"energy": e, "forces": f, "stress": s, "outputs": extra}


@dataclass
class Integrator:
    """Base class: a timestep and whether stress is computed at every force call.

    Attributes:
        timestep_fs: dt in fs, > 0.
        compute_stress: also compute the stress (for the pressure in reports); NPT always does.
            Keyword only, so that ``Langevin(2.0, 300.0)`` means dt = 2 fs, T = 300 K.
    """

    timestep_fs: float
    compute_stress: bool = field(default=False, kw_only=True)

    stochastic: ClassVar[bool] = False
    needs_stress: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        REGISTRY[cls.__name__] = cls

    def __post_init__(self) -> None:
        dt = float(self.timestep_fs)
        if not dt > 0 or dt != dt or dt == float("inf"):
            raise ValueError(f"timestep_fs must be a finite number > 0, got {self.timestep_fs}")

    @property
    def with_stress(self) -> bool:
        return bool(self.compute_stress or self.needs_stress)

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)
        if not name.startswith("_"):  # a parameter changed (e.g. to anneal): forget constants
            self.__dict__.pop("_cache", None)

    def _cached(self, name: str, state: MDState, make: Callable[[], Tensor], *key) -> Tensor:
        """A per-step constant (k_B T, noise amplitudes...) computed once per parameters, shape,
        device and dtype."""
        cache = self.__dict__.setdefault("_cache", {})
        full = (name, state.n_replicas, state.n_atoms, state.dof, state.device,
                state.dtype) + key
        if full not in cache:
            if len(cache) > 64:
                cache.clear()
            cache[full] = make()
        return cache[full]

    def _kt(self, state: MDState) -> Tensor:
        """k_B T per replica  # [R] float64 eV (needs a ``temperature_K`` attribute)"""
        return self._cached("kt", state, lambda: kt_ev(
            getattr(self, "temperature_K"), state.n_replicas, state.device))

    def params(self) -> dict:
        """The constructor arguments (saved in checkpoints)."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.tolist() if isinstance(v, torch.Tensor) else v
        return out

    # ------------------------------------------------------------------ the two methods
    def init(self, state: MDState, forces: ForceProvider) -> MDState:
        """Compute forces (and stress) if the state has none; set integrator variables."""
        if state.bath_energy is None:
            state = state.replace(bath_energy=torch.zeros(
                state.n_replicas, dtype=torch.float64, device=state.device))
        missing = state.forces is None or state.energy is None
        if missing or (self.with_stress and state.stress is None):
            out = evaluate(forces, state.positions, state.cell, self.with_stress)
            state = state.replace(forces=out["forces"], energy=out["energy"], stress=out["stress"],
                                  outputs=out["outputs"])
        return state

    def step(self, state: MDState, forces: ForceProvider) -> MDState:
        raise NotImplementedError

    def conserved_energy(self, state: MDState) -> Tensor:
        """K + U + bath_energy  # [R] float64 eV (constant up to integration error)"""
        return kinetic_energy(state.velocities, state.masses) + state.energy + state.bath_energy

    # ------------------------------------------------------------------ shared pieces
    def _kick(self, state: MDState, velocities: Tensor, f: Tensor, h: float) -> Tensor:
        """B: v + (h / m) F"""
        inv_m = (units.EV_PER_AMU_TO_A2_PER_FS2 / state.masses)[None, :, None]
        return velocities + (h * inv_m) * f

    def _forces_at(self, forces: ForceProvider, positions: Tensor,
                   cell: Tensor) -> Dict[str, Tensor]:
        return evaluate(forces, positions, cell, self.with_stress)

    def _advanced(self, state: MDState, positions: Tensor, velocities: Tensor,
                  out: Dict[str, Tensor], **changes) -> MDState:
        """The state one step later with new positions, velocities and force results."""
        return state.replace(positions=positions, velocities=velocities, forces=out["forces"],
                             energy=out["energy"], stress=out["stress"],
                             outputs=out.get("outputs", {}), step=state.step + 1,
                             time_fs=state.time_fs + float(self.timestep_fs), **changes)

    def _velocity_verlet(self, state: MDState, forces: ForceProvider,
                         velocities: Optional[Tensor] = None):
        """B(dt/2) A(dt) force B(dt/2), from ``velocities`` (default the state's).

        Returns (positions, velocities, force results).
        """
        dt = float(self.timestep_fs)
        v = state.velocities if velocities is None else velocities
        v = self._kick(state, v, state.forces, 0.5 * dt)
        x = state.positions + dt * v
        out = self._forces_at(forces, x, state.cell)
        v = self._kick(state, v, out["forces"], 0.5 * dt)
        return x, v, out
