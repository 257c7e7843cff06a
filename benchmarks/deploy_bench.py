"""Time per MD step through each deployment path against the bare model call.

For each model (an exported file, or an untrained model of each family at its default
hyperparameters), on the water box of size^3 molecules (default 4: 192 atoms):

* bare:        the exported model (``mlpot.load``) called on a ready-made input dict (energy +
               forces), TorchScript graph optimizations off as in all of mlpot's interfaces
* bare_jit_opt: the same with TorchScript's default (profiling, optimizing) executor, for reference
* ase:         one ase.md.VelocityVerlet step with MLPotCalculator
* torchforce:  one openmm.VerletIntegrator step, TorchForce backend, CPU platform
* pythonforce: the same with the PythonForce backend

Modes are interleaved in rounds (a busy machine slows them alike), taking turns at going first
after an untimed step (the first calls after the wait for a quiet machine run slow), and each
reports the median of its rounds. Ratios are step time / bare call time (target <= 1.1 for ase and torchforce); ns/day
is for the given time step.

Usage: python benchmarks/deploy_bench.py [--models egnn dp_se_e2_a] [--model-file model.pt]
           [--dtype float32] [--size 4] [--steps 10] [--rounds 5] [--threads 2]
           [--timestep-fs 0.5] [--json results.json]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch  # before openmm / openmmtorch

import openmm

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from mlpot import keys as K  # noqa: E402
from mlpot import units  # noqa: E402
from mlpot.ase import MLPotCalculator  # noqa: E402
from mlpot.check import water_box  # noqa: E402
from mlpot.export import export, load  # noqa: E402
from mlpot.models import build_model  # noqa: E402
from mlpot.openmm import backend_status, create_system, topology_from_ase  # noqa: E402

from _common import portable, wait_quiet, write_json  # noqa: E402


def _thermalize(vd):
    """Maxwell-Boltzmann momenta (ASE 3.29 renamed MaxwellBoltzmannDistribution)."""
    return getattr(vd, "thermalize_momenta", None) or vd.MaxwellBoltzmannDistribution


def bare_runner(model, atoms):
    data = {K.POSITIONS: torch.tensor(atoms.positions, dtype=model.dtype),
            K.ATOM_TYPES: torch.tensor([model.type_map.index(s)
                                        for s in atoms.get_chemical_symbols()]),
            K.CELL: torch.tensor(atoms.cell.array, dtype=model.dtype)[None],
            K.PBC: torch.ones(1, 3, dtype=torch.bool)}

    def run(steps):
        for _ in range(steps):
            out = model(data, True, False)
            out[K.FORCES].sum().item()
            del out
    return run


def ase_runner(model, atoms, dt_fs):
    from ase import units as ase_units
    from ase.md import velocitydistribution as vd
    from ase.md.verlet import VelocityVerlet

    atoms = atoms.copy()
    atoms.calc = MLPotCalculator(model)
    _thermalize(vd)(atoms, temperature_K=300, rng=np.random.default_rng(0))
    dyn = VelocityVerlet(atoms, timestep=dt_fs * ase_units.fs)
    return dyn.run


def openmm_runner(path, atoms, backend, dt_fs):
    system = create_system(path, topology_from_ase(atoms), backend=backend)
    integrator = openmm.VerletIntegrator(dt_fs * units.FS_TO_PS)
    context = openmm.Context(system, integrator, openmm.Platform.getPlatformByName("CPU"))
    context.setPositions(atoms.positions * units.ANGSTROM_TO_NM)
    context.setVelocitiesToTemperature(300, 1)
    return lambda steps: (integrator.step(steps), context)  # the closure keeps context alive


def bench_model(label, path, atoms, args):
    model = load(path)
    optimized = load(path)  # its own executor: the optimization choice is made at the first call
    optimized.jit_optimize = True
    runners = {"bare": bare_runner(load(path), atoms), "bare_jit_opt": bare_runner(optimized, atoms),
               "ase": ase_runner(model, atoms, args.timestep_fs)}
    for backend, name in (("torch", "torchforce"), ("python", "pythonforce")):
        ok, why = backend_status(backend)
        if ok:
            runners[name] = openmm_runner(path, atoms, backend, args.timestep_fs)
        else:
            print(f"  {name}: not usable ({why})")
    for run in runners.values():  # warm-up: TorchScript profiling runs, allocations
        run(3)
    times = {k: [] for k in runners}
    names = list(runners)
    for r in range(args.rounds):
        if args.wait_quiet:
            wait_quiet(limit=0.3, max_wait=120)
        # after the wait the CPU is cold (the first ~100 ms after idling run slow on these VMs):
        # one untimed step first, and the modes take turns at going first
        runners[names[r % len(names)]](1)
        for name in names[r % len(names):] + names[:r % len(names)]:
            run = runners[name]
            t0 = time.perf_counter()
            run(args.steps)
            times[name].append((time.perf_counter() - t0) / args.steps)
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    row = {"model": label, "dtype": model.metadata["dtype"], "n_atoms": len(atoms),
           "threads": torch.get_num_threads(), "timestep_fs": args.timestep_fs,
           "ms_per_step": {k: round(1e3 * v, 2) for k, v in med.items()},
           "ratio_to_bare": {k: round(v / med["bare"], 3) for k, v in med.items() if k != "bare"},
           "ratio_of_best": {k: round(v / best["bare"], 3) for k, v in best.items() if k != "bare"},
           "ns_per_day": {k: round(args.timestep_fs * 1e-6 * 86400 / v, 3)
                          for k, v in med.items() if not k.startswith("bare")},
           "spread": {k: round((max(v) - min(v)) / statistics.median(v), 2)
                      for k, v in times.items()}}
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="*", default=["egnn", "dp_se_e2_a", "nequip"])
    p.add_argument("--model-file", help="an exported model to time instead of untrained ones")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--size", type=int, default=4, help="water box of size^3 molecules")
    p.add_argument("--steps", type=int, default=2, help="steps per round and mode")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--timestep-fs", type=float, default=0.5)
    p.add_argument("--json", help="write the results here")
    p.add_argument("--no-wait", dest="wait_quiet", action="store_false",
                   help="do not wait for other processes to go quiet before each round")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    atoms = water_box(args.size)
    print(f"{len(atoms)}-atom water box, {args.dtype}, {args.threads} threads, torch "
          f"{torch.__version__}, OpenMM {openmm.__version__}")
    tmp = tempfile.mkdtemp(prefix="mlpot-bench-")
    jobs = []
    if args.model_file:
        jobs.append((os.path.basename(args.model_file), args.model_file))
    else:
        for name in args.models:
            torch.manual_seed(0)
            path = os.path.join(tmp, f"{name}.pt")
            export(build_model(name, ["H", "O"], dtype=args.dtype), path)
            jobs.append((f"{name} (untrained, defaults)", path))
    rows = []
    for label, path in jobs:
        row = bench_model(label, path, atoms, args)
        rows.append(row)
        ms, ratio, nsd = row["ms_per_step"], row["ratio_to_bare"], row["ns_per_day"]
        print(f"{label}: bare {ms['bare']:.1f} ms/call (spread {row['spread']['bare']:.0%})")
        for k in ratio:
            if k.startswith("bare"):
                print(f"  {k:12s} {ms[k]:8.1f} ms/call {ratio[k]:5.2f}x bare")
                continue
            print(f"  {k:12s} {ms[k]:8.1f} ms/step  {ratio[k]:5.2f}x bare (best runs: "
                  f"{row['ratio_of_best'][k]:.2f}x)  {nsd[k]:.3f} ns/day "
                  f"(spread {row['spread'][k]:.0%})")
    if args.json:
        write_json(args.json, {"rows": rows,
                               "argv": portable(sys.argv[1:] if argv is None else list(argv))})
    return rows


if __name__ == "__main__":
    main()
