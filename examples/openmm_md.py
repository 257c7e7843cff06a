"""All-ML molecular dynamics in OpenMM with an exported mlpot model.

    python examples/openmm_md.py [--model model.pt] [--backend auto|torch|python]
                                 [--platform CPU] [--steps 200]

Without --model, a small untrained EGNN is built and exported first (its physics is meaningless;
it only shows the workflow). The water box gets an all-ML System (``mlpot.openmm.create_system``),
runs in ``openmm.app.Simulation`` with a Langevin integrator, and reports to the terminal, a DCD
trajectory and a checkpoint file. The MD health check (``integrators.HealthCheck.for_openmm``, a
reporter) stops a run that blows up with a one-line message and its last good structure in --out.
"""
import argparse
import os
import sys
import tempfile
import time

import torch  # noqa: F401 - first: openmm-torch needs the CUDA libraries torch loads

import openmm
from openmm import app, unit

from integrators import HealthCheck, HealthCheckFailed
from mlpot import units
from mlpot.check import water_box
from mlpot.openmm import create_system, select_backend, topology_from_ase

from demo_model import demo_model  # examples/demo_model.py, beside this script


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="exported model (default: a small untrained demo model)")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "python"])
    p.add_argument("--platform", default="CPU", help="Reference, CPU, CUDA, ...")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--out", default=tempfile.mkdtemp(prefix="mlpot-openmm-md-"))
    args = p.parse_args()
    path = args.model or demo_model(args.out)

    atoms = water_box(3)  # 81 atoms, periodic
    topology = topology_from_ase(atoms)
    backend = select_backend(args.backend)  # 'auto': TorchForce where openmm-torch works
    system = create_system(path, topology, backend=backend)
    print(f"{topology.getNumAtoms()} atoms, {backend} backend, platform {args.platform}")

    integrator = openmm.LangevinMiddleIntegrator(300 * unit.kelvin, 1 / unit.picosecond,
                                                 0.5 * unit.femtosecond)
    simulation = app.Simulation(topology, system, integrator,
                                openmm.Platform.getPlatformByName(args.platform))
    simulation.context.setPositions(atoms.positions * units.ANGSTROM_TO_NM)
    simulation.minimizeEnergy(maxIterations=50)
    simulation.context.setVelocitiesToTemperature(300 * unit.kelvin, 1)
    simulation.reporters += [
        app.StateDataReporter(sys.stdout, 50, step=True, potentialEnergy=True, temperature=True,
                              speed=True),
        app.DCDReporter(os.path.join(args.out, "md.dcd"), 20),
        app.CheckpointReporter(os.path.join(args.out, "md.chk"), 100),
        # every 10 steps: T within 3x the integrator's 300 K, no atom jumping > 1 A per step
        HealthCheck.for_openmm(simulation, 10, last_good_path=os.path.join(
            args.out, "last_good.xyz")),
    ]
    t0 = time.perf_counter()
    try:
        simulation.step(args.steps)
    except HealthCheckFailed as err:
        raise SystemExit(f"openmm_md.py: {err}")
    elapsed = time.perf_counter() - t0
    print(f"{args.steps} steps in {elapsed:.1f} s ({1e3 * elapsed / args.steps:.1f} ms/step, "
          f"{0.5e-6 * 86400 * args.steps / elapsed:.3f} ns/day at 0.5 fs); files in {args.out}")


if __name__ == "__main__":
    main()
