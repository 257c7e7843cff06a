"""Integrator overhead of mlpot's MD against the bare force call, and beside ase.md, on the
192-atom water box (``water_box(4)``: 64 molecules at liquid density, periodic).

For each force provider the script times, interleaved over several rounds:
  force                 one call of the provider (energy + forces); force+stress for the NPT row
  mlpot <X>             one step of integrators.<X> (the provider call included), X in
                        VelocityVerlet, Langevin, NoseHooverChain, Bussi, StochasticCellRescaling
                        (iso, a tiny compressibility: untrained models have wild stresses)
  mlpot ... x4 replicas one step of 4 replicas at once (VelocityVerlet), per replica
  ase VelocityVerlet    ase.md.VelocityVerlet with an ASE calculator around the same provider
  ase Langevin          ase.md.Langevin, same calculator
  ase ... MLPotCalculator  (mlpot models) ase.md.VelocityVerlet with mlpot.ase.MLPotCalculator
overhead = step / force - 1 (target: at most 5% with a real model), from the best of the rounds
(the timing least disturbed by other processes); medians are printed beside. The bare force calls
cycle through 16 consecutive configurations of a velocity Verlet run, so that they do the work
the MD steps do.

Providers:
  harmonic     atoms on springs: a force call of ~0.1 ms, i.e. the integrator's absolute cost
  lj           Lennard-Jones on every atom (sigma 1 A, cutoff 6 A: a cost proxy with the pairs of a
               6 A model, not water physics), mlpot's neighbor list rebuilt at every call (no
               skin, as the models do, so that the bare call and the MD step do the same work)
  egnn, dp     untrained mlpot models (``mlpot.models.build_model``, float32, TorchScript as
               exported), through ``integrators.MLPotForces``; skipped when unavailable

Usage (from the repository root):  python3 benchmarks/md_bench.py [--providers harmonic,lj,egnn]
                                   [--rounds 3] [--threads 2] [--max-wait 120]
Writes benchmarks/results/md_bench.json and prints a table. The machines are shared and have 2
cores: only ratios from one run mean anything; the script waits for a quiet machine before each
provider (``--max-wait 0``: no wait).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import integrators as I  # noqa: E402
from mlpot import units  # noqa: E402
from mlpot.check import water_box  # noqa: E402

from _common import command_line, machine_info, wait_quiet, write_json  # noqa: E402

DT_FS, T_K = 0.5, 300.0


# ------------------------------------------------------------------------------ providers
def make_provider(name: str, atoms):
    """(provider, dtype) or None when the provider is not available here."""
    if name == "harmonic":
        return I.Harmonic(5.0, center=atoms.positions), torch.float64
    if name == "lj":
        return I.LennardJones(0.01, 1.0, 6.0, skin_A=0.0), torch.float64
    try:
        from mlpot.data import TypeMap
        from mlpot.export import as_exported
        from mlpot.models import build_model
    except ImportError as err:
        print(f"  {name}: mlpot models not available ({err})")
        return None
    family = {"egnn": "egnn", "dp": "dp_se_e2_a", "nequip": "nequip"}[name]
    model = as_exported(build_model(family, ["H", "O"], dtype="float32"))
    types = TypeMap(["H", "O"]).types(atoms.numbers, where="water box")
    return I.MLPotForces(model, types, atomic_numbers=atoms.numbers), torch.float32, model


def provider_calculator(provider, dtype):
    """An ASE calculator around a force provider (one replica), for ase.md."""
    from ase.calculators.calculator import Calculator, all_changes

    class ProviderCalculator(Calculator):
        implemented_properties = ["energy", "forces", "free_energy"]

        def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
            super().calculate(atoms, properties, system_changes)
            x = torch.as_tensor(atoms.positions, dtype=dtype)[None]
            cell = torch.as_tensor(atoms.cell.array, dtype=dtype)[None]
            out = provider(x, cell, False)
            e = float(out["energy"][0])
            f = out["forces"][0].double().numpy()
            self.results = {"energy": e, "free_energy": e, "forces": f}

    return ProviderCalculator()


# ------------------------------------------------------------------------------ timing
def per_call(fn, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def mlpot_step_timer(integrator, provider, state, n):
    st = integrator.init(state.copy(), provider)
    for _ in range(3):  # warm-up (TorchScript profiling runs, neighbor list)
        st = integrator.step(st, provider)

    def run():
        nonlocal st
        st = I.simulate(st, integrator, provider, n, last_good_path=None)

    return lambda: per_call_steps(run, n)


def md_frames(provider, state, n):
    """n consecutive configurations of a velocity Verlet run."""
    integ = I.VelocityVerlet(DT_FS)
    st = integ.init(state.copy(), provider)
    frames = []
    for _ in range(n):
        st = integ.step(st, provider)
        frames.append((st.positions, st.cell))
    return frames


def cycling(provider, frames, stress):
    k = [0]

    def call():
        x, cell = frames[k[0] % len(frames)]
        k[0] += 1
        return provider(x, cell, stress)

    return call


def per_call_steps(run, n):
    t0 = time.perf_counter()
    run()
    return (time.perf_counter() - t0) / n


def ase_step_timer(dyn_factory, atoms, calc, n):
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

    a = atoms.copy()
    a.calc = calc
    MaxwellBoltzmannDistribution(a, temperature_K=T_K, rng=np.random.default_rng(0))
    dyn = dyn_factory(a)
    dyn.run(3)
    return lambda: per_call_steps(lambda: dyn.run(n), n)


def cases(name, made, atoms):
    """name -> timer() returning seconds per call/step."""
    from ase.md.langevin import Langevin as ASELangevin
    from ase.md.verlet import VelocityVerlet as ASEVerlet

    provider, dtype = made[0], made[1]
    state = I.initialize_velocities(I.state_from_ase(atoms, dtype=dtype, seed=1), T_K)
    x, cell = state.positions, state.cell
    for _ in range(3):  # warm-up (TorchScript profiling runs)
        provider(x, cell, True)
        provider(x, cell, False)
    probe = per_call(lambda: provider(x, cell, False), 2)
    n = max(5, min(200, int(1.5 / max(probe, 1e-4))))
    frames = md_frames(provider, state, 16)  # the bare calls see the configurations of a run
    out = {
        "force": lambda: per_call(cycling(provider, frames, False), n),
        "force+stress": lambda: per_call(cycling(provider, frames, True), n),
    }
    for integ in (I.VelocityVerlet(DT_FS), I.Langevin(DT_FS, T_K, 0.01),
                  I.NoseHooverChain(DT_FS, T_K, 100.0), I.Bussi(DT_FS, T_K, 100.0),
                  I.StochasticCellRescaling(DT_FS, T_K, 1.0, 100.0, 1000.0, 1e-6)):
        out[f"mlpot {type(integ).__name__}"] = mlpot_step_timer(integ, provider, state, n)
    rep4 = I.initialize_velocities(I.state_from_ase(atoms, replicas=4, dtype=dtype, seed=2), T_K)
    out["mlpot VelocityVerlet x4 replicas (per replica)"] = (
        lambda t=mlpot_step_timer(I.VelocityVerlet(DT_FS), provider, rep4, max(3, n // 4)): t() / 4)
    calc = provider_calculator(provider, dtype)
    out["ase VelocityVerlet"] = ase_step_timer(
        lambda a: ASEVerlet(a, timestep=DT_FS * units.FS_TO_ASE_TIME), atoms, calc, n)
    out["ase Langevin"] = ase_step_timer(
        lambda a: ASELangevin(a, timestep=DT_FS * units.FS_TO_ASE_TIME, temperature_K=T_K,
                              friction=0.01 / units.FS_TO_ASE_TIME, fixcm=False), atoms, calc, n)
    if len(made) > 2:
        from mlpot.ase import MLPotCalculator

        out["ase VelocityVerlet + MLPotCalculator"] = ase_step_timer(
            lambda a: ASEVerlet(a, timestep=DT_FS * units.FS_TO_ASE_TIME), atoms,
            MLPotCalculator(made[2]), n)
    return out, n


def bench(name: str, atoms, rounds: int, max_wait: float):
    made = make_provider(name, atoms)
    if made is None:
        return None
    timers, n = cases(name, made, atoms)
    waited = wait_quiet(max_wait=max_wait) if max_wait > 0 else 0.0
    samples = {k: [] for k in timers}
    for _ in range(rounds):  # interleaved: every case once per round
        for k, t in timers.items():
            samples[k].append(t())
    best = {k: min(v) for k, v in samples.items()}  # least disturbed by other processes
    rows = []
    for k, v in best.items():
        ref = best["force+stress"] if "StochasticCellRescaling" in k else best["force"]
        rows.append({"case": k, "ms": 1e3 * v, "median_ms": 1e3 * statistics.median(samples[k]),
                     "overhead_vs_force": v / ref - 1, "all_ms": [1e3 * s for s in samples[k]]})
    return {"provider": name, "atoms": len(atoms), "steps_per_timing": n, "rounds": rounds,
            "waited_s": round(waited, 1), "rows": rows}


def print_table(res):
    print(f"\n{res['provider']}: {res['atoms']} atoms, {res['steps_per_timing']} steps per timing, "
          f"best (median) of {res['rounds']} rounds")
    print("| case | ms/step | vs force call |")
    print("|---|---:|---:|")
    for r in res["rows"]:
        rel = "" if r["case"].startswith("force") else f"{100 * r['overhead_vs_force']:+.1f}%"
        print(f"| {r['case']} | {r['ms']:.3f} ({r['median_ms']:.3f}) | {rel} |")


def overhead_summary(results):
    """The integrators' own cost per step, (step - force call) on the near-free harmonic
    provider, and what it is relative to each model's force call. On a shared 2-core machine the
    direct ratios with a 20 ms model scatter by +-15%, far more than the few percent to resolve;
    the absolute cost measured on the cheap provider does not."""
    by = {r["provider"]: {row["case"]: row["ms"] for row in r["rows"]} for r in results}
    if "harmonic" not in by:
        return {}
    base = by["harmonic"]
    out = {}
    for case, ms in base.items():
        if not case.startswith("mlpot") or "replicas" in case:
            continue
        ref = base["force+stress"] if "StochasticCellRescaling" in case else base["force"]
        own = max(0.0, ms - ref)
        row = {"own_ms_per_step": round(own, 4)}
        for name, cases_ms in by.items():
            if name in ("harmonic", "lj"):
                continue
            row[f"percent_of_{name}_force_call"] = round(100 * own / cases_ms["force"], 2)
        out[case.replace("mlpot ", "")] = row
    print("\nintegrator cost per step (harmonic provider, step - force call):")
    for case, row in out.items():
        extra = ", ".join(f"{v}% of {k.split('_')[2]}" for k, v in row.items()
                          if k != "own_ms_per_step")
        print(f"  {case}: {row['own_ms_per_step']:.3f} ms" + (f" ({extra})" if extra else ""))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--providers", default="harmonic,lj,egnn,dp")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-wait", type=float, default=120.0)
    p.add_argument("--out", default=os.path.join(HERE, "results", "md_bench.json"))
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    torch.set_num_threads(args.threads)
    atoms = water_box(4)
    results = []
    for name in args.providers.split(","):
        res = bench(name.strip(), atoms, args.rounds, args.max_wait)
        if res is not None:
            print_table(res)
            results.append(res)
    summary = overhead_summary(results)
    write_json(args.out, {"machine": machine_info(), "date": time.strftime("%Y-%m-%d %H:%M"),
                          "command": command_line(), "timestep_fs": DT_FS,
                          "integrator_overhead": summary, "results": results})
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
