"""``mlpot demo``: the whole workflow on the embedded silicon DFT data, in about five minutes.

Train a NequIP-style equivariant potential on the embedded mlearn Si frames (Zuo et al. 2020;
see mlpot/demo_data/README.md), split 80/10/10 by configuration type into training, validation
(it picks the checkpoint) and a test part used for nothing else, test it there beside the
published GAP and MTP errors, export it, and run short molecular dynamics of a 64-atom
diamond-silicon cell at 1200 K in ASE, in OpenMM (TorchForce, or PythonForce where openmm-torch
cannot load) and with mlpot's integrators. Everything lands in ``--out``: model.pt, metrics.json,
parity and learning-curve plots, trajectories and an RDF plot.

The training is a fixed number of optimizer steps (``DEMO_STEPS``, about 4 minutes on 2 cores
of 2026; the learning-rate and loss-weight schedule follows the steps), so a slow day gives the
same model later rather than a worse one; ``--minutes`` only caps the wall time.
"""
from __future__ import annotations

import json
import os
import time
from importlib import resources
from typing import Dict

import numpy as np

DEMO_MODEL = {"name": "nequip", "cutoff": 5.0, "dtype": "float32",
              "hparams": {"num_features": 32, "l_max": 2, "num_layers": 3}}
DEMO_STEPS = 1800
DEMO_STRESS_WEIGHT = 1.0e4  # (eV/A^3)^-2
# Published test-set MAEs on mlearn Si (Zuo et al., J. Phys. Chem. A 124, 731 (2020), as tabulated
# in ACEpotentials.jl examples/zuobench/error_table.jl): energy meV/atom, forces meV/A. The demo's
# test part is a held-out tenth of the training file, not the official test set.
PUBLISHED_SI = {"GAP": (2.91, 70.0), "MTP": (2.21, 60.0)}


def demo_data_path() -> str:
    return str(resources.files("mlpot.demo_data").joinpath("si_mlearn.xyz"))


def _config(out: str, steps: int, minutes: float, max_frames, seed: int):
    from .train import config_from_dict

    return config_from_dict({
        "data": {"train": demo_data_path(), "validation_fraction": 0.1, "test_fraction": 0.1,
                 "split_key": "config_type", "type_map": ["Si"], "max_frames": max_frames},
        "model": DEMO_MODEL,
        # forces first, then energies: the energies of these frames span 0.8 eV/atom (crystal,
        # surfaces, vacancies, melt), which the forces alone do not pin down; the virials, with a
        # weight that makes them count (a 5 meV/A^3 stress error adds 0.25), tie the energies of
        # the strained cells together (validation energy MAE 6.2 -> 4.1 meV/atom, see README)
        "loss": {"energy_start": 1.0, "energy": 1000.0, "forces_start": 100.0, "forces": 10.0,
                 "stress": DEMO_STRESS_WEIGHT},
        # a cosine schedule keeps the learning rate (and the force-heavy loss weights that follow
        # it) high for longer than an exponential one: on three splits, validation energy MAE
        # 4.0 / 5.1 / 4.5 -> 2.9 / 4.4 / 3.7 meV/atom at the same 1,800 steps (see README)
        "optim": {"lr": 1e-2, "lr_final": 1e-4, "scheduler": "cosine", "ema_decay": 0.99},
        "training": {"batch_size": 2, "max_epochs": 100000, "max_steps": steps,
                     "max_time_min": minutes, "seed": seed, "out_dir": os.path.join(out, "training")},
    })


def _diamond_si(repeat: int = 2):
    from ase.build import bulk

    atoms = bulk("Si", "diamond", a=5.43, cubic=True).repeat((repeat,) * 3)
    atoms.rattle(0.02, seed=1)
    return atoms


def _md_ase(model_path: str, out: str, steps: int) -> Dict[str, float]:
    from ase import units
    from ase.io import Trajectory
    from ase.md.langevin import Langevin

    from integrators import HealthCheck

    from .ase import MLPotCalculator

    atoms = _diamond_si()
    atoms.calc = MLPotCalculator(model_path)
    dyn = Langevin(atoms, 1.0 * units.fs, temperature_K=1200, friction=0.02, fixcm=False)
    traj = Trajectory(os.path.join(out, "md_ase.traj"), "w", atoms)
    dyn.attach(traj.write, interval=10)
    # the MD health check (integrators.health): stops a run that blows up, saving the last good
    # structure; the target temperature is read from the thermostat
    dyn.attach(HealthCheck.for_ase(atoms, dyn, last_good_path=os.path.join(
        out, "md_ase_last_good.xyz")), interval=1)
    t0 = time.perf_counter()
    dyn.run(steps)
    traj.close()
    return {"steps": steps, "ms_per_step": 1e3 * (time.perf_counter() - t0) / max(steps, 1),
            "final_temperature_K": float(atoms.get_temperature())}


def _md_openmm(model_path: str, out: str, steps: int) -> Dict[str, float]:
    import torch  # noqa: F401  (first: openmm-torch needs the CUDA libraries torch loads)
    import openmm
    from openmm import app, unit

    from integrators import HealthCheck

    from . import units
    from .openmm import create_system, select_backend, topology_from_ase

    atoms = _diamond_si()
    topology = topology_from_ase(atoms)
    backend = select_backend("auto")
    system = create_system(model_path, topology, backend=backend)
    integrator = openmm.LangevinMiddleIntegrator(1200 * unit.kelvin, 1 / unit.picosecond,
                                                 1.0 * unit.femtosecond)
    sim = app.Simulation(topology, system, integrator, openmm.Platform.getPlatformByName("CPU"))
    sim.context.setPositions(atoms.positions * units.ANGSTROM_TO_NM)
    sim.context.setVelocitiesToTemperature(1200 * unit.kelvin, 1)
    sim.reporters.append(app.DCDReporter(os.path.join(out, "md_openmm.dcd"), 10))
    sim.reporters.append(HealthCheck.for_openmm(sim, 10, last_good_path=os.path.join(
        out, "md_openmm_last_good.xyz")))  # the target temperature is the integrator's
    t0 = time.perf_counter()
    sim.step(steps)
    elapsed = time.perf_counter() - t0
    energy = sim.context.getState(getEnergy=True).getPotentialEnergy()
    return {"steps": steps, "backend": backend, "ms_per_step": 1e3 * elapsed / max(steps, 1),
            "final_potential_eV": energy.value_in_unit(unit.kilojoule_per_mole)
            * units.KJ_PER_MOL_TO_EV}


def _md_integrators(model_path: str, out: str, steps: int) -> Dict[str, float]:
    import integrators as md

    from .export import load

    atoms = _diamond_si()
    model = load(model_path)
    types = model.atom_types(atoms.numbers, where="demo")
    forces = md.MLPotForces(model, types, pbc=(True, True, True), atomic_numbers=atoms.numbers)
    state = md.state_from_ase(atoms, dtype=model.dtype)
    state = md.initialize_velocities(state, 1200.0)
    thermo = os.path.join(out, "md_integrators.csv")
    traj = os.path.join(out, "md_integrators.dcd")
    reporters = [md.ThermoCSV(thermo, 10), md.TrajectoryReporter(traj, 10)]
    t0 = time.perf_counter()
    final = md.simulate(state, md.Langevin(timestep_fs=1.0, temperature_K=1200.0,
                                           friction_per_fs=0.02),
                        forces, steps, reporters, last_good_path=os.path.join(out, "last_good.xyz"),
                        health=md.HealthCheck())  # the default thresholds, every step
    return {"steps": steps, "ms_per_step": 1e3 * (time.perf_counter() - t0) / max(steps, 1),
            "final_temperature_K": float(md.temperature_K(final)[0]), "trajectory": traj}


def rdf_plot(traj_path: str, topology_atoms, path: str, r_max: float = 5.0) -> Dict[str, float]:
    """g(r) of the trajectory (mdtraj reads it), plotted to ``path``; returns the first peak."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import mdtraj

    from integrators.reporters import mdtraj_topology

    traj = mdtraj.load(traj_path, top=mdtraj_topology(topology_atoms.numbers))
    pairs = traj.topology.select_pairs("all", "all")
    r, g = mdtraj.compute_rdf(traj, pairs, r_range=(0.15, r_max / 10), n_bins=120)
    r = r * 10  # nm -> A
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(r, g)
    ax.set_xlabel("r (A)")
    ax.set_ylabel("g(r)")
    ax.set_title(f"Si at 1200 K, mlpot integrators ({traj.n_frames} frames)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return {"frames": int(traj.n_frames), "first_peak_A": float(r[int(np.argmax(g))])}


def run_demo(out: str = "mlpot-demo", steps: int = DEMO_STEPS, minutes: float = 15.0,
             md_steps: int = 200, max_frames=None, seed: int = 0) -> Dict:
    import torch

    from .export import export
    from .threads import threads_used
    from .train import Trainer
    from .train.trainer import finalize

    os.makedirs(out, exist_ok=True)
    print(f"[1/5] training a NequIP-style potential on the embedded Si data, {steps} steps "
          f"(about 4 minutes on 2 cores; at most {minutes:g} min; data: {demo_data_path()})")
    trainer = Trainer(_config(out, steps, minutes, max_frames, seed))
    trainer.fit(resume=os.path.exists(os.path.join(out, "training", "last.pt")))
    results = finalize(trainer)
    print("[2/5] exporting model.pt")
    model_path = export(os.path.join(out, "training", "best.pt"), os.path.join(out, "model.pt"),
                        training_data_hash=trainer.data.data_hash)
    print(f"[3/5] {md_steps} steps of MD in ASE (Langevin, 1200 K)")
    md = {"ase": _md_ase(model_path, out, md_steps)}
    print(f"[4/5] {md_steps} steps of MD in OpenMM")
    md["openmm"] = _md_openmm(model_path, out, md_steps)
    print(f"[5/5] {md_steps} steps of MD with mlpot's integrators, and the RDF")
    md["integrators"] = _md_integrators(model_path, out, md_steps)
    md["rdf"] = rdf_plot(md["integrators"]["trajectory"], _diamond_si(),
                         os.path.join(out, "rdf.png"))
    summary = {"data": demo_data_path(), "model": DEMO_MODEL, "test": results.get("test", {}),
               "validation": results["validation"], "published_test_mae_Si": {
                   k: {"energy_meV_per_atom": e, "forces_meV_per_A": f}
                   for k, (e, f) in PUBLISHED_SI.items()},
               "train_time_s": results["train_time_s"], "epochs": results["epochs"],
               "steps": results["steps"], "steps_requested": steps, "minutes_cap": minutes,
               "threads": torch.get_num_threads(),
               "threads_used": threads_used() or [torch.get_num_threads()], "md": md}
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(summary, f, indent=1)
    for name in ("parity.png", "learning_curve.png"):
        src = os.path.join(out, "training", name)
        if os.path.exists(src):
            os.replace(src, os.path.join(out, name))
    _print_summary(out, summary)
    return summary


def _print_summary(out: str, s: Dict) -> None:
    t = s["test"] or s["validation"]
    nan = float("nan")
    print("\nmlpot demo: done")
    used = s.get("threads_used") or [s["threads"]]
    print(f"  trained {s['steps']} steps ({s['epochs']} epochs) in {s['train_time_s'] / 60:.1f} min"
          f" on {'-'.join(map(str, used))} thread{'s' if max(used) > 1 else ''}")
    if len(used) > 1:
        print("  the thread count followed the load of other processes; sums taken in another "
              "order give a slightly different model from a run at one count (test errors "
              "differ by a few tenths of a meV/atom)")
    if s["steps"] < s["steps_requested"]:
        print(f"  the {s['minutes_cap']:g}-minute cap stopped the training at {s['steps']} of "
              f"{s['steps_requested']} steps (a busy machine), so this model is worse than the "
              f"demo's: `mlpot demo --out {out} --minutes {2 * s['minutes_cap']:g}` continues it "
              "to the full steps")
    print(f"  test frames (held out of training and checkpoint selection): {t.get('frames', 0):.0f}")
    print(f"  {'':<22}{'energy MAE':>12}{'RMSE':>8}  meV/atom{'force MAE':>12}{'RMSE':>8}  meV/A")
    print(f"  {'mlpot (this run)':<22}{t.get('energy_mae_meV_per_atom', nan):>12.2f}"
          f"{t.get('energy_rmse_meV_per_atom', nan):>8.2f}{'':10}"
          f"{t.get('forces_mae_meV_per_A', nan):>12.1f}{t.get('forces_rmse_meV_per_A', nan):>8.1f}")
    for name, (e, f) in PUBLISHED_SI.items():
        print(f"  {name + ' (published)':<22}{e:>12.2f}{'':>8}{'':10}{f:>12.1f}")
    print(f"  energy parity slope {t.get('energy_slope', nan):.3f} (1: no scale error); published "
          "figures: Zuo et al. 2020, on the official test set")
    for k in ("ase", "openmm", "integrators"):
        print(f"  MD {k:<12} {s['md'][k]['ms_per_step']:.1f} ms/step")
    print(f"  RDF first peak at {s['md']['rdf']['first_peak_A']:.2f} A (diamond Si: 2.35 A)")
    print(f"  files in {out}/: model.pt, metrics.json, parity.png, learning_curve.png, rdf.png, "
          "md_ase.traj, md_openmm.dcd, md_integrators.dcd, md_integrators.csv, training/")


def add_demo_parser(subparsers) -> None:
    p = subparsers.add_parser("demo", help="train, test, export and run MD on the embedded Si "
                              "DFT data (about 5 minutes)")
    p.add_argument("--out", default="mlpot-demo", help="report folder (default mlpot-demo)")
    p.add_argument("--steps", type=int, default=DEMO_STEPS,
                   help=f"training steps (default {DEMO_STEPS}: about 4 minutes on 2 cores)")
    p.add_argument("--minutes", type=float, default=15.0,
                   help="cap on the training time (default 15; the steps decide the model)")
    p.add_argument("--md-steps", type=int, default=200, help="steps of each MD run")
    p.add_argument("--max-frames", type=int, default=None, help="use only the first frames")
    p.set_defaults(func=lambda a: (run_demo(a.out, a.steps, a.minutes, a.md_steps,
                                            a.max_frames), 0)[1])
