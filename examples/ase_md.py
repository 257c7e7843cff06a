"""Relax and run MD on a periodic water box through ASE with an exported mlpot model.

    python examples/ase_md.py [--model model.pt] [--steps 200] [--device cpu]

Without --model, a small untrained EGNN is built and exported first (its physics is meaningless;
it only shows the workflow). Steps: cell + positions relaxation (BFGS on a FrechetCellFilter),
then Langevin MD at 300 K with a trajectory file, then a few NVE steps printing the total energy.
Both MD runs carry the MD health check (``integrators.HealthCheck.for_ase``): a run that blows up
stops with a one-line message and its last good structure in --out.
"""
import argparse
import os
import tempfile
import time

import numpy as np
from ase import units
from ase.filters import FrechetCellFilter
from ase.io import Trajectory
from ase.md.langevin import Langevin
from ase.md import velocitydistribution as vd
from ase.md.verlet import VelocityVerlet
from ase.optimize import BFGS

import mlpot.export
from mlpot.ase import MLPotCalculator
from mlpot.check import water_box
from integrators import HealthCheck, HealthCheckFailed

from demo_model import demo_model  # examples/demo_model.py, beside this script


def _thermalize(vd):
    """Maxwell-Boltzmann momenta (ASE 3.29 renamed MaxwellBoltzmannDistribution)."""
    return getattr(vd, "thermalize_momenta", None) or vd.MaxwellBoltzmannDistribution


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="exported model (default: a small untrained demo model)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=tempfile.mkdtemp(prefix="mlpot-ase-md-"))
    args = p.parse_args()
    path = args.model or demo_model(args.out)

    atoms = water_box(3)  # 27 molecules, 81 atoms, periodic
    atoms.calc = MLPotCalculator(path, device=args.device)
    print(f"model {mlpot.export.read_metadata(path)['config']['model']}, {len(atoms)} atoms")

    t0 = time.perf_counter()
    opt = BFGS(FrechetCellFilter(atoms), logfile=None)
    opt.run(fmax=0.05, steps=20)
    print(f"relaxation: {opt.nsteps} steps, E = {atoms.get_potential_energy():.4f} eV, "
          f"V = {atoms.get_volume():.1f} A^3 ({time.perf_counter() - t0:.1f} s)")

    _thermalize(vd)(atoms, temperature_K=300, rng=np.random.default_rng(0))
    dyn = Langevin(atoms, 0.5 * units.fs, temperature_K=300, friction=0.01, fixcm=False,
                   rng=np.random.default_rng(1))
    traj = Trajectory(os.path.join(args.out, "md.traj"), "w", atoms)
    dyn.attach(traj.write, interval=20)
    # stop when T runs away from the thermostat's 300 K (3x), or an atom jumps > 1 A in a step
    dyn.attach(HealthCheck.for_ase(atoms, dyn, last_good_path=os.path.join(
        args.out, "langevin_last_good.xyz")), interval=1)
    dyn.attach(lambda: print(f"  step {dyn.nsteps:5d}  T = {atoms.get_temperature():7.1f} K  "
                             f"E_pot = {atoms.get_potential_energy():.4f} eV"), interval=50)
    t0 = time.perf_counter()
    try:
        dyn.run(args.steps)
    except HealthCheckFailed as err:  # one line: which rule, where the last good structure is
        raise SystemExit(f"ase_md.py: {err}")
    elapsed = time.perf_counter() - t0
    print(f"Langevin: {args.steps} steps in {elapsed:.1f} s "
          f"({1e3 * elapsed / args.steps:.1f} ms/step); trajectory in {args.out}/md.traj")

    nve = VelocityVerlet(atoms, 0.5 * units.fs)
    energies = []
    nve.attach(lambda: energies.append(atoms.get_total_energy()), interval=10)
    # NVE: also the total energy must stay within 0.1 eV/atom of its start
    nve.attach(HealthCheck.for_ase(atoms, nve, last_good_path=os.path.join(
        args.out, "nve_last_good.xyz")), interval=1)
    try:
        nve.run(100)
    except HealthCheckFailed as err:
        raise SystemExit(f"ase_md.py: {err}")
    print(f"NVE: total energy {energies[0]:.5f} -> {energies[-1]:.5f} eV over 100 steps")
    print("stress (GPa):", np.round(atoms.get_stress() / units.GPa, 3))


if __name__ == "__main__":
    main()
