"""``mlpot md MODEL STRUCTURE``: molecular dynamics from the command line.

MODEL is a model file written by ``mlpot export`` or the name of a built-in analytic potential
(``lj``: Lennard-Jones, parameters --lj-epsilon/--lj-sigma/--lj-cutoff). STRUCTURE is any file
``ase.io.read`` reads (extxyz, POSCAR, CIF, PDB...). Units: fs, K, bar, eV, Angstrom.

    mlpot md model.pt water.xyz --ensemble npt --temperature 300 --pressure 1 \\
        --timestep 0.5 --steps 20000 --thermo thermo.csv --traj traj.dcd

``add_md_parser(subparsers)`` adds the command to an argparse parser; ``run_md(args)`` runs it.

Exit codes (``mlpot.errors``): 0 done, 2 bad input (one line says what to fix), 3 stopped by the
health check or by exploding forces (the last good frame is saved; its path is in the message),
or by ``--stop-uncertainty`` once every replica passed it (committee models: each replica that
passes it is written to ``THERMO_uncertain.xyz`` and held while the others go on).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import warnings
from collections import deque
from typing import Optional

import torch

from mlpot.dtypes import dtype_of
from mlpot.errors import RunStopped, UserError

from . import health as H
from .base import Integrator, MDInputError
from .bussi import Bussi
from .checkpoint import load_md_checkpoint
from .forces import LennardJones, MLPotForces
from .langevin import Langevin
from .nose_hoover import NoseHooverChain
from .npt import StochasticCellRescaling
from .nve import VelocityVerlet
from .reporters import ModelDeviFile, ProgressBar, ThermoCSV, TrajectoryReporter
from .runner import DEFAULT_MAX_FORCE, MDWarning, overlap_message, simulate
from .state import MDState, initialize_velocities, state_from_ase

ENSEMBLES = ("nve", "langevin", "nose-hoover", "bussi", "npt")
BUILTIN = ("lj",)


def add_md_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``md`` to the subparsers of the ``mlpot`` command."""
    p = subparsers.add_parser(
        "md", help="run molecular dynamics with an mlpot model (NVE, NVT, NPT)",
        description=__doc__.split("\n\n")[0] + " Units: fs, K, bar, eV, Angstrom.")
    p.add_argument("model", help="model file from `mlpot export`, or a built-in potential: lj")
    p.add_argument("structure", help="starting structure (any file ase.io.read reads)")
    p.add_argument("--frame", type=int, default=-1, help="frame of STRUCTURE to start from "
                   "(default: the last)")
    _ensemble_args(p.add_argument_group("ensemble"))
    _output_args(p.add_argument_group("output"))
    r = p.add_argument_group("run")
    r.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 (default cpu)")
    r.add_argument("--dtype", choices=("float32", "float64"), default=None,
                   help="working precision (default: the model's; float64 for lj)")
    r.add_argument("--max-force", type=float, default=DEFAULT_MAX_FORCE,
                   help="eV/A; larger forces stop the run (default %(default)g)")
    _health_args(p.add_argument_group(
        "health check", "stop the run (exit code 3, last good frame saved) when it goes wrong; "
        "see integrators/health.py"))
    b = p.add_argument_group("built-in lj potential")
    b.add_argument("--lj-epsilon", type=float, default=0.0104, help="eV (default argon)")
    b.add_argument("--lj-sigma", type=float, default=3.4, help="Angstrom (default argon)")
    b.add_argument("--lj-cutoff", type=float, default=8.5, help="Angstrom")
    p.set_defaults(func=run_md)
    return p


def _ensemble_args(e) -> None:
    e.add_argument("--ensemble", choices=ENSEMBLES, default="langevin",
                   help="nve (velocity Verlet), langevin (BAOAB), nose-hoover (chains), bussi "
                        "(stochastic velocity rescaling), npt (stochastic cell rescaling + bussi)")
    e.add_argument("--temperature", type=float, default=300.0, help="K (default 300)")
    e.add_argument("--pressure", type=float, default=1.0, help="bar, for npt (default 1)")
    e.add_argument("--timestep", type=float, default=1.0, help="fs (default 1)")
    e.add_argument("--steps", type=int, default=1000, help="total number of steps (default 1000)")
    e.add_argument("--friction", type=float, default=0.01, help="Langevin friction, 1/fs")
    e.add_argument("--tau-t", type=float, default=100.0, help="thermostat time, fs (default 100)")
    e.add_argument("--tau-p", type=float, default=1000.0, help="barostat time, fs (default 1000)")
    e.add_argument("--compressibility", type=float, default=4.5e-5,
                   help="barostat compressibility estimate, 1/bar (default 4.5e-5, water)")
    e.add_argument("--coupling", choices=("iso", "aniso", "tri"), default="iso",
                   help="npt cell coupling (default iso)")
    e.add_argument("--npt-thermostat", choices=("bussi", "langevin"), default="bussi",
                   help="thermostat of npt (default bussi; langevin uses --friction)")
    e.add_argument("--replicas", type=int, default=1, help="independent replicas run together")
    e.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    e.add_argument("--init-temperature", type=float, default=None,
                   help="K, draw starting velocities at this temperature (default --temperature; "
                        "velocities in STRUCTURE are kept when present and this is not given)")


def _health_args(h) -> None:
    h.add_argument("--max-temperature-ratio", type=float, default=H.DEFAULT_MAX_TEMPERATURE_RATIO,
                   help="stop when T exceeds this times the thermostat target (NVE: the starting "
                        "temperature or the running mean), default %(default)g")
    h.add_argument("--max-drift", type=float, default=H.DEFAULT_MAX_DRIFT_EV_PER_ATOM,
                   help="eV/atom; stop when the conserved energy drifts further from its start "
                        "(default %(default)g)")
    h.add_argument("--max-step-displacement", type=float,
                   default=H.DEFAULT_MAX_STEP_DISPLACEMENT_A,
                   help="Angstrom; stop when an atom moves further in one step "
                        "(default %(default)g)")
    h.add_argument("--no-health-check", action="store_true",
                   help="run without the health check (the force limit --max-force stays)")
    h.add_argument("--stop-uncertainty", type=float, default=None, metavar="EV_PER_A",
                   help="committee models: stop a replica when its max_force_dev (raw, "
                        "DeePMD-kit's max_devi_f) passes this; the structure is saved to "
                        "THERMO_uncertain.xyz, the other replicas go on, the run ends with exit "
                        "code 3 when all have stopped")


def _output_args(o) -> None:
    o.add_argument("--thermo", default="md_thermo.csv", help="thermo CSV (default md_thermo.csv)")
    o.add_argument("--thermo-every", type=int, default=100, help="steps between thermo rows")
    o.add_argument("--traj", default=None,
                   help="trajectory: .dcd, .xtc, .h5 (mdtraj) or .traj (ASE)")
    o.add_argument("--traj-every", type=int, default=100, help="steps between frames")
    o.add_argument("--checkpoint", default=None, help="checkpoint file, written every "
                   "--checkpoint-every steps and at the end")
    o.add_argument("--checkpoint-every", type=int, default=1000)
    o.add_argument("--resume", action="store_true",
                   help="continue from --checkpoint up to --steps (integrator from the checkpoint)")
    o.add_argument("--model-devi", default=None, metavar="FILE",
                   help="committee models: write DP-GEN's model_devi.out (DeePMD-kit's columns) "
                        "every --thermo-every steps (several replicas: FILE.rK)")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")


def _load_model(path: str, device: str):
    """An exported mlpot model (imported only when needed)."""
    from mlpot.export import load

    return load(path, device=device)


def _forces(args, atoms, device: str):
    """(force provider, default dtype) for MODEL."""
    if args.model.lower() in BUILTIN:
        try:
            lj = LennardJones(args.lj_epsilon, args.lj_sigma, args.lj_cutoff,
                              pbc=tuple(atoms.pbc))
        except ValueError as err:
            raise MDInputError(f"built-in lj potential: {err}") from err
        return lj, torch.float64
    if not os.path.isfile(args.model):
        raise MDInputError(f"no model file {args.model!r} (and not a built-in potential: "
                           f"{', '.join(BUILTIN)}); give a file written by `mlpot export`")
    model = _load_model(args.model, device)
    types = model.atom_types(atoms.numbers, where=args.structure)
    provider = MLPotForces(model, types, pbc=tuple(atoms.pbc), atomic_numbers=atoms.numbers)
    return provider, getattr(model, "dtype", torch.float32)


def _integrator(args, periodic: bool) -> Integrator:
    dt, t = args.timestep, args.temperature
    stress = periodic  # the pressure column
    if args.ensemble == "nve":
        return VelocityVerlet(dt, compute_stress=stress)
    if args.ensemble == "langevin":
        return Langevin(dt, t, args.friction, compute_stress=stress)
    if args.ensemble == "nose-hoover":
        return NoseHooverChain(dt, t, args.tau_t, compute_stress=stress)
    if args.ensemble == "bussi":
        return Bussi(dt, t, args.tau_t, compute_stress=stress)
    return StochasticCellRescaling(dt, t, args.pressure, args.tau_t, args.tau_p,
                                   args.compressibility, args.coupling, args.npt_thermostat,
                                   args.friction)


def _start(args, atoms, dtype) -> MDState:
    state = state_from_ase(atoms, replicas=args.replicas, seed=args.seed, device=args.device,
                           dtype=dtype)
    has_v = bool(state.velocities.abs().sum() > 0)
    if args.init_temperature is not None or not has_v:
        t0 = args.temperature if args.init_temperature is None else args.init_temperature
        state = initialize_velocities(state, t0, remove_com=True)
    return state


# (option, attribute, test, what it must be); checked before anything is read
_CHECKS = (
    ("--replicas", "replicas", lambda v: v >= 1, "a whole number >= 1"),
    ("--steps", "steps", lambda v: v >= 0, "a whole number >= 0 (the total, counted from step 0)"),
    ("--timestep", "timestep", lambda v: 0 < v < math.inf, "a number of fs > 0"),
    ("--temperature", "temperature", lambda v: 0 <= v < math.inf, "a number of K >= 0"),
    ("--init-temperature", "init_temperature", lambda v: v is None or 0 <= v < math.inf,
     "a number of K >= 0"),
    ("--pressure", "pressure", math.isfinite, "a finite number of bar"),
    ("--friction", "friction", lambda v: 0 <= v < math.inf, "a number of 1/fs >= 0"),
    ("--tau-t", "tau_t", lambda v: 0 < v < math.inf, "a number of fs > 0"),
    ("--tau-p", "tau_p", lambda v: 0 < v < math.inf, "a number of fs > 0"),
    ("--compressibility", "compressibility", lambda v: 0 < v < math.inf, "a number of 1/bar > 0"),
    ("--thermo-every", "thermo_every", lambda v: v >= 1, "a whole number of steps >= 1"),
    ("--traj-every", "traj_every", lambda v: v >= 1, "a whole number of steps >= 1"),
    ("--checkpoint-every", "checkpoint_every", lambda v: v >= 1, "a whole number of steps >= 1"),
    ("--max-force", "max_force", lambda v: 0 < v, "a number of eV/A > 0"),
    ("--max-temperature-ratio", "max_temperature_ratio", lambda v: 1 < v < math.inf,
     "a number > 1"),
    ("--max-drift", "max_drift", lambda v: 0 < v < math.inf, "a number of eV/atom > 0"),
    ("--max-step-displacement", "max_step_displacement", lambda v: 0 < v < math.inf,
     "a number of Angstrom > 0"),
    ("--stop-uncertainty", "stop_uncertainty", lambda v: 0 < v < math.inf,
     "a number of eV/A > 0 (a max_force_dev; DP-GEN's trust levels are 0.05-0.15 eV/A)"),
)


def check_args(args) -> None:
    """Raise ``MDInputError`` naming the first option with an unusable value."""
    for option, name, ok, what in _CHECKS:
        value = getattr(args, name, None)
        if option != "--init-temperature" and value is None:
            continue
        if not ok(value):  # NaN fails every test
            raise MDInputError(f"{option} {value}: must be {what}")
    try:
        device = torch.device(args.device)
    except (RuntimeError, ValueError) as err:
        raise MDInputError(f"--device {args.device}: not a device (use cpu, cuda or cuda:N)") \
            from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MDInputError(f"--device {args.device}: no CUDA GPU is available here; use --device "
                           "cpu")
    if device.type == "cuda" and device.index is not None \
            and device.index >= torch.cuda.device_count():
        raise MDInputError(f"--device {args.device}: only {torch.cuda.device_count()} CUDA "
                           "device(s) here")


def read_structure(path: str, frame: int):
    """Frame ``frame`` (negative: from the end) of a structure file, read frame by frame."""
    from ase.io import iread

    if not os.path.isfile(path):
        raise MDInputError(f"no structure file {path!r}")
    if os.path.getsize(path) == 0:
        raise MDInputError(f"{path} is empty: give a structure file (extxyz, POSCAR, CIF, PDB...)")
    try:
        if frame >= 0:
            count = 0
            for count, atoms in enumerate(iread(path, index=":"), 1):
                if count - 1 == frame:
                    return atoms
        else:
            last = deque(iread(path, index=":"), maxlen=-frame)
            count = len(last)  # all frames when fewer than -frame
            if count == -frame:
                return last[0]
    except Exception as err:  # noqa: BLE001 - any reader error is a bad file
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise MDInputError(f"cannot read {path}: {msg}") from err
    if count == 0:
        raise MDInputError(f"{path} holds no structure (empty file?)")
    raise MDInputError(f"--frame {frame}: {path} has {count} frame(s); use 0..{count - 1} or "
                       f"-{count}..-1")


def _health(args) -> Optional[H.HealthCheck]:
    stop = getattr(args, "stop_uncertainty", None)
    rules = [] if args.no_health_check else H.default_rules(
        args.max_temperature_ratio, args.max_drift, args.max_step_displacement)
    if stop is not None:
        rules.append(H.UncertaintyStop(stop, uncertain_path(args)))
    return H.HealthCheck(rules, last_good_path=None) if rules else None


def uncertain_path(args) -> str:
    """Where ``--stop-uncertainty`` writes the structures that crossed it."""
    return os.path.splitext(args.thermo)[0] + "_uncertain.xyz"


def _check_committee(args, forces) -> None:
    """--stop-uncertainty and --model-devi need a model with an uncertainty (a committee or a
    variance network): one line, exit 2, before any step."""
    wants = [o for o, v in (("--stop-uncertainty", getattr(args, "stop_uncertainty", None)),
                            ("--model-devi", getattr(args, "model_devi", None))) if v is not None]
    if wants and not getattr(forces, "uncertainty", None):
        raise H.NoDeviation(f"{' and '.join(wants)} need(s) a model with an uncertainty (one that "
                            f"gives a max_force_dev); {args.model} is a single model without "
                            "one: train a committee (training.ensemble: K) or a model with a "
                            "variance network (model.uncertainty: mve) and export it, or drop "
                            "the option")


def _prepare(args):
    """(state, integrator, forces, steps to run) from the arguments."""
    check_args(args)
    atoms = read_structure(args.structure, args.frame)
    forces, model_dtype = _forces(args, atoms, args.device)
    _check_committee(args, forces)
    dtype = dtype_of(args.dtype) if args.dtype else model_dtype
    if args.resume:
        if not args.checkpoint or not os.path.exists(args.checkpoint):
            raise MDInputError(
                f"--resume needs an existing --checkpoint, got {args.checkpoint!r}")
        state, integrator = load_md_checkpoint(args.checkpoint, device=args.device)
        if args.dtype is not None:
            state = state.to(args.device, dtype)
        if state.n_atoms != len(atoms):
            raise MDInputError(f"{args.checkpoint} holds {state.n_atoms} atoms, {args.structure} "
                               f"{len(atoms)}: resume with the structure of that run")
        print(f"resuming from step {state.step} of {args.checkpoint} "
              f"({type(integrator).__name__})", file=sys.stderr)
    else:
        state = _start(args, atoms, dtype)
        try:
            integrator = _integrator(args, bool(atoms.pbc.all()))
        except ValueError as err:
            raise MDInputError(str(err)) from err
    return state, integrator, forces, max(0, args.steps - state.step)


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    if issubclass(category, MDWarning):
        print(f"\nmlpot md: warning: {' '.join(str(message).split())}", file=sys.stderr)
    else:
        _SHOW_WARNING(message, category, filename, lineno, file, line)


_SHOW_WARNING = warnings.showwarning


def run_md(args: argparse.Namespace) -> int:
    """Run ``mlpot md``; returns the exit status: 0 done, 2 bad input, 3 stopped by the health
    check or exploding forces (one line on stderr says why). Other errors are bugs: raised."""
    try:
        state, integrator, forces, n = _prepare(args)
        overlap = overlap_message(state, 0.5)
        if overlap:
            print(f"mlpot md: warning: {overlap}", file=sys.stderr)
        reporters = [ThermoCSV(args.thermo, args.thermo_every)]
        if getattr(args, "model_devi", None):
            reporters.append(ModelDeviFile(args.model_devi, args.thermo_every))
        if args.traj:
            reporters.append(TrajectoryReporter(args.traj, args.traj_every, replica=None
                                                if args.replicas > 1 else 0))
        if not args.no_progress:
            reporters.append(ProgressBar(n, max(1, min(100, n // 100 or 1))))
        last_good = os.path.splitext(args.thermo)[0] + "_last_good.xyz"
        with warnings.catch_warnings():  # a replica held by --stop-uncertainty: one line
            warnings.showwarning = _one_line_warning
            state = simulate(state, integrator, forces, n, reporters,
                             checkpoint_path=args.checkpoint,
                             checkpoint_interval=args.checkpoint_every, max_force=args.max_force,
                             last_good_path=last_good, health=_health(args),
                             overlap_warning_A=None)
    except (UserError, RunStopped) as err:
        kind = "stopped" if isinstance(err, RunStopped) else "error"
        print(f"mlpot md: {kind}: {' '.join(str(err).split())}", file=sys.stderr)
        return err.exit_code
    print(f"mlpot md: {state.step} steps ({state.time_fs / 1000:g} ps) done; thermo in "
          f"{args.thermo}" + (f", trajectory in {args.traj}" if args.traj else ""), file=sys.stderr)
    return 0


def main(argv: Optional[list] = None) -> int:
    """``python -m integrators.cli md ...``: the same command as ``mlpot md`` without the rest of
    the ``mlpot`` command line."""
    parser = argparse.ArgumentParser(prog="mlpot")
    sub = parser.add_subparsers(dest="command", required=True)
    add_md_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
