"""mlpot's molecular dynamics: integrators that run a model directly on torch tensors.

R replicas of a system are advanced together (CPU or CUDA, float32 or float64). Units: fs, eV,
Angstrom, amu, K, bar (converted in ``mlpot.units``).

    from integrators import Langevin, LennardJones, ThermoCSV, simulate, state_from_ase
    state = initialize_velocities(state_from_ase(atoms, replicas=4), temperature_K=300)
    state = simulate(state, Langevin(timestep_fs=2.0, temperature_K=300), LennardJones(), 1000,
                     reporters=[ThermoCSV("thermo.csv", 10)])

Each integrator has ``init(state, forces)`` and ``step(state, forces)``; the equations are in
the docstring of its module, with references. ``simulate`` runs the health check of
``integrators.health`` after every step (``HealthCheck.for_ase`` and ``HealthCheck.for_openmm``
run it in ASE and OpenMM). ``integrators.stability`` holds the one definition of a stable run
(``BlowupRule``, ``run_nvt``, ``run_nve``, ``nve_drift``) used by the benchmarks.
"""
from .base import REGISTRY, ForceProvider, Integrator, MDError, MDInputError, MDStopped
from .bussi import Bussi
from .checkpoint import load_md_checkpoint, save_md_checkpoint
from .forces import Harmonic, IdealGas, LennardJones, MLPotForces
from .health import HealthCheck, HealthCheckFailed, UncertaintyStop, UncertaintyStopped
from .langevin import Langevin
from .nose_hoover import NoseHooverChain
from .npt import StochasticCellRescaling
from .nve import VelocityVerlet
from .reporters import (ModelDeviFile, ProgressBar, Reporter, ThermoCSV, TrajectoryReporter,
                        thermo)
from .runner import MDWarning, check_forces, simulate
from .stability import (Blowup, BlowupRule, ReplicaOutcome, StabilityRun, blowup_reason,
                        bonds_from_structure, nve_drift, run_nve, run_nvt)
from .state import (MDState, initialize_velocities, kinetic_energy, make_state, pressure_bar,
                    replica_to_ase, state_from_ase, temperature_K)

__all__ = [
    "Blowup",
    "BlowupRule",
    "Bussi",
    "ForceProvider",
    "Harmonic",
    "HealthCheck",
    "HealthCheckFailed",
    "IdealGas",
    "Integrator",
    "Langevin",
    "LennardJones",
    "MDError",
    "MDInputError",
    "MDStopped",
    "MDWarning",
    "MDState",
    "MLPotForces",
    "ModelDeviFile",
    "NoseHooverChain",
    "ProgressBar",
    "REGISTRY",
    "ReplicaOutcome",
    "Reporter",
    "StabilityRun",
    "StochasticCellRescaling",
    "ThermoCSV",
    "TrajectoryReporter",
    "UncertaintyStop",
    "UncertaintyStopped",
    "VelocityVerlet",
    "blowup_reason",
    "bonds_from_structure",
    "check_forces",
    "initialize_velocities",
    "kinetic_energy",
    "load_md_checkpoint",
    "make_state",
    "nve_drift",
    "pressure_bar",
    "run_nve",
    "run_nvt",
    "save_md_checkpoint",
    "simulate",
    "state_from_ase",
    "replica_to_ase",
    "temperature_K",
    "thermo",
]
