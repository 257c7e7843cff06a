"""NPT molecular dynamics with mlpot's integrators (stochastic cell rescaling, Bernetti and Bussi
2020), driving an exported mlpot model on several replicas at once.

    python examples/npt_integrators.py [--model model.pt] [--steps 200] [--replicas 2]

Without --model, a Lennard-Jones argon crystal stands in for an ML model (mlpot's integrators
take any force provider); with --model (from `mlpot export`, e.g. mlpot-demo/model.pt) a
64-atom silicon cell is simulated.
"""
import argparse
import tempfile

import torch
from ase.build import bulk

import integrators as md


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="exported mlpot model (default: Lennard-Jones argon)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--out", default=tempfile.mkdtemp(prefix="mlpot-npt-"))
    args = p.parse_args()
    if args.model:
        from mlpot import load
        from mlpot.data import TypeMap

        atoms = bulk("Si", "diamond", a=5.43, cubic=True).repeat((2, 2, 2))
        model = load(args.model)
        forces = md.MLPotForces(model, TypeMap(model.type_map).types(atoms.numbers),
                                atomic_numbers=atoms.numbers)
        temperature, dt = 600.0, 1.0
    else:
        atoms = bulk("Ar", "fcc", a=5.26, cubic=True).repeat((3, 3, 3))
        forces = md.LennardJones(epsilon_eV=0.0104, sigma_A=3.40, cutoff_A=8.5)
        temperature, dt = 40.0, 5.0
    state = md.state_from_ase(atoms, replicas=args.replicas, seed=1, dtype=torch.float64)
    state = md.initialize_velocities(state, temperature)
    npt = md.StochasticCellRescaling(timestep_fs=dt, temperature_K=temperature, pressure_bar=1.0,
                                     tau_t_fs=100 * dt, tau_p_fs=500 * dt)
    thermo = f"{args.out}/npt.csv"
    final = md.simulate(state, npt, forces, args.steps,
                        [md.ThermoCSV(thermo, 10), md.TrajectoryReporter(f"{args.out}/npt.dcd", 10)],
                        last_good_path=f"{args.out}/last_good.xyz")
    volume = torch.linalg.det(final.cell).abs()
    print(f"{args.steps} NPT steps of {args.replicas} replicas: T = "
          f"{md.temperature_K(final).tolist()} K, V = {volume.tolist()} A^3; log {thermo}")


if __name__ == "__main__":
    main()
