"""Distillation benchmarks of ``mlpot distill`` (mlpot/distill.py), two parts.

Every model is trained by ``mlpot train`` or ``mlpot distill`` (``python -m mlpot.cli``, one
process per case, ``OMP_NUM_THREADS`` = --threads); budgets are fixed numbers of optimizer steps
(``training.max_steps``: the learning-rate schedule follows the steps, so a busy machine gives
the same models, only later; ``training.max_time_min`` = --cap-min is only a cap). The default
step counts are this machine's steps/s (measured in a trial, 1 thread, see DEFAULT_STEPS) times
the stated minutes; every result records the steps and the seconds they took, and the
steps 15 minutes would give at the rate it measured (``steps_for_budget``).

energy-only  (rMD17 ethanol and aspirin, --molecules)
    ``_common.rmd17_split``: the 800-frame pool of <shared>/data/rmd17/<mol>_train_01.xyz is the
    training side, written once WITHOUT forces (REF_energy only) and once with them (for the
    upper bound); the 200 test frames keep their forces and are used only for testing.
    Student: dp_se_e2_a with train_bench's hyperparameters (DeePMD-kit's, batch 1), cutoff 5 A:
    the fast model a student should be, many steps per minute on a CPU, and a model that learns
    forces poorly from energies alone, so the three cases are far apart (--student-model
    mace_1layer: train_bench's one-layer MACE-style nequip instead, in all three cases).
      (a) energies alone      mlpot train, loss.forces 0 (energy-only pool), at the energy-only
                              batch of 32 and its steps for the same 15 minutes (batch 32
                              gives the Deep Potential a better energy-only fit than its
                              batch 1: ENERGY_ONLY_BATCH)
      (b) distilled           mlpot distill mode ensemble: a 4-member committee trained on the
                              pool's energies alone (--teacher-model, default egnn at
                              train_bench's settings but batch 32, ENERGY_ONLY_LR and the
                              cutoff ENERGY_ONLY_TEACHER_CUTOFF (aspirin 3 A); --teacher-steps
                              steps, sized to ~36-45 minutes) labels forces; the
                              student learns the reference energies + the teacher's forces,
                              each structure's force weight by the inverse variance of the
                              committee's disagreement (mlpot/distill.py)
      (c) true forces         mlpot train on the pool with its forces (the upper bound)
    The student gets the same budget, 15 minutes at 1 thread, in (a), (b) and (c): the same steps
    in (b) and (c) (--student-steps), in (a) the steps of batch 32 in that time
    (--energy-only-steps); the teacher's
    steps and seconds are reported beside (b). --cases b beside --cases a c shares the cases
    between two processes (then one run with all three reports). Each student and the
    teacher committee (its mean forces) are tested on the 200 test
    frames (energy and force MAE) and run in MD by ``integrators.stability.run_nvt``: 5 replicas
    (--replicas) of Langevin NVT at 500 K (--md-temperature) for --md-ps ps (default 10, the
    stability benchmark's length) at 0.5 fs from the first test frame, with the stability
    benchmark's blow-up rule (forces > 50 eV/A, atoms closer than 0.5 A, a bond of the starting
    structure longer than 2 A). Targets: (b) closes at least half of the force-MAE gap between
    (a) and (c), and (b) survives at least as many replicas as (c).

fast-student  (3BPA)
    Teacher: nequip at train_bench's MACE-like settings (MODELS["nequip"], batch 5, cutoff 5 A)
    trained on <shared>/data/3bpa/train_300K.xyz (5 % validation) for --teacher-steps steps, or
    an existing model given with --teacher (a train_bench run folder, a checkpoint or an
    exported model). Student: dp_se_e2_a at train_bench's settings (batch 1), or with
    --student-model mace_1layer (mace_2layer) train_bench's one-layer (two-layer) MACE-style
    nequip (batch 5), either
      distilled  mlpot distill mode teacher: the teacher labels the 500 training structures, its
                 own Langevin MD samples (--sample-temps, default 300 and 450 K; 8 starts x 2
                 replicas per temperature, --sample-steps steps (default 1000) at 0.5 fs, a
                 frame every 50 steps: 640 samples) and --perturb-copies (default 1) copies of
                 each training structure displaced by 0.05 A (Gaussian);
                 the DFT labels of the training structures are kept beside with weight 1;
      direct     mlpot train on train_300K's DFT labels;
    both for the same --student-steps (at --student-batch structures per step where given) and
    with the training seeds 0..--seeds-1 (the distilled student's further seeds train with
    ``mlpot train`` on the same teacher-labelled ``student_data.xyz``: one teacher, one set of
    labels); --students distilled beside --students direct shares them between two processes,
    and a third, --students distilled --train-seeds 1 ..., trains the distilled student's later
    seeds beside seed 0 once its labels exist (then one run with both and every seed reports).
    --teacher-committee K makes the teacher a committee of K such models (training seeds
    0..K-1, each with its fine-tune; `mlpot export A B ...` writes them as one file, whose mean
    labels and whose deviation gives TEACHER_forces_dev); --teacher-members k ... trains only
    those members and stops (one process per core). --samples-from DIR has the teacher label
    the samples.xyz of an earlier run instead of sampling its own MD (sample.structures), so two
    teachers are compared on the same structures.
    Tested on test_300K.xyz (energy and force MAE, and the teacher's; with several seeds, their
    mean and spread, the targets on the mean). MD throughput: steps/s of integrators' Langevin
    (0.5 fs, 300 K, health checks on) on 64 replicas of test_300K frame 0 batched in one call
    (1,728 atoms), after a warm-up, for the teacher and the distilled student. Targets: the
    distilled student's force MAE is below the direct student's, and it runs at least 3x the
    teacher's steps/s; its force MAE as a ratio to the teacher's is reported (aim: 1.3).

Resumable: each case is a run folder under --work (default benchmarks/runs/distill, git-ignored)
named by its steps; a rerun skips finished trainings (a killed ``mlpot train`` resumes from
last.pt, ``mlpot distill`` resumes itself) and keeps finished evaluations and MD runs
(``bench_*.json`` beside each model, reused while the model file and the settings are the
same). A rerun takes the same --threads and --cap-min: they are part of the configs, and
``mlpot distill`` refuses to resume a run under a changed config (use another --work then).
Results: <results>/distill_energy_only.json (``distill_energy_only_MODEL.json`` with another
--student-model) and <results>/distill_fast_student.json
(``distill_fast_student_TAG.json`` with --tag; --results-dir, default benchmarks/results; a trial
writes elsewhere).

    python benchmarks/distill_bench.py energy-only fast-student --threads 1      # the full run
    python benchmarks/distill_bench.py energy-only --molecules ethanol --student-steps 300 \\
        --energy-only-steps 300 --teacher-steps 100 --md-ps 0.5 \\
        --work benchmarks/runs/distill_trial \\
        --results-dir benchmarks/runs/distill_trial   # a trial: results kept out of results/
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from mlpot.files import sha256
from _common import (add_shared_option, command_line, fail, machine_info, portable, rmd17_split,
                     shared_path, write_json)

HERE = Path(__file__).resolve().parent
PARTS = ("energy-only", "fast-student")
MOLECULES = ("ethanol", "aspirin")
CUTOFF_A = 5.0
BUDGET_MIN = 15.0  # the stated budget of each student and of the 3BPA teacher
ENSEMBLE_TEACHER_MIN = 36.0  # the energy-only committee (4 members in lockstep), ~2.4x a student
# Steps for those minutes at 1 thread on this 2-core machine (--student-steps and
# --teacher-steps override them). Trials of 2026-12-03 (1 thread, load average 7-11 from other
# jobs; steps/s = steps / the trainer's own clock):
#   ethanol   dp (a) 29.3, (b) student 16.7, (c) 22.9; nequip committee of 4 energy-only 1.9
#   aspirin   dp (a) 9.8, (b) student 7.7, (c) 14.1;   nequip committee of 4 energy-only 0.28
#   3BPA      dp direct 5.5, distilled 6.1; nequip teacher 0.63
# The same 3BPA models ran 4.6x (dp: 25 steps/s, train_bench 15 min, 1 thread) and 4.1x
# (nequip: 2.6 steps/s, train_bench 30 min, 1 thread) faster in train_bench's runs; the rMD17
# rates (at the lower load of 7-9) are taken as 3x faster there. So: ethanol students
# ~55 steps/s x 900 s, aspirin ~28; 3BPA from train_bench's rates directly.
DEFAULT_STEPS = {
    ("energy-only", "ethanol"): {"student": 50000, "student_energy_only": 28000,
                                 "teacher": 40000},
    ("energy-only", "aspirin"): {"student": 25000, "student_energy_only": 12000,
                                 "teacher": 30000},
    ("fast-student", "3bpa"): {"student": 22000, "teacher": 2300},
}
# Energy-only training (the committee's members and case (a)) takes batches of
# ENERGY_ONLY_BATCH structures, with these learning rates (start, end). Measured 2026-12-05 on
# the ethanol pool's energies (single models, 1 thread, test force MAE in meV/A): batch 5 leaves
# a small nequip (8 channels) and the EGNN on the mean for the whole run (energy parity slope
# 0.00-0.02: with one number per structure, a small batch's mean offset swamps the signal) and
# gives the MACE-like nequip 447 after 12 minutes; batch 32 gives nequip 257 and EGNN 256 in
# the same 12 minutes, and the Deep Potential 342 in 10 minutes (389 at batch 1 for 50,000
# steps, the 2026-12-04 run). The EGNN is the default energy-only teacher: as good as nequip
# and ~19x more steps per second (69 against 3.6 at batch 32, single models). Ethanol: a
# committee of 4 EGNN at batch 32 ~17-19 steps/s (40,000 steps ~36-40 min); dp at batch 32
# ~32 steps/s (28,000 steps ~15 min). Aspirin's student counts are scaled by the atom counts
# (9/21): measured 2026-12-05, (a) 12,000 steps in 745 s, (b) 25,000 in 859 s, (c) in 688 s; its
# teachers (3 A, ENERGY_ONLY_TEACHER_CUTOFF) ran ~10.7 steps/s (30,000 steps in 2,806 s).
ENERGY_ONLY_BATCH = 32
# mace_1layer (2026-12-07, one member on aspirin's pool energies, 14 minutes, 1 thread): at
# 5e-3 -> 5e-5 its validation energy error is lowest after ~3,000 steps and then rises (it
# over-fits the 760 energies); test force MAE 519-559 meV/A (3-5 A), no better than the EGNN.
ENERGY_ONLY_LR = {"egnn": (2e-3, 2e-5), "nequip": (5e-3, 5e-5), "mace_1layer": (5e-3, 5e-5),
                  "dp_se_e2_a": (1e-3, 3.5e-6)}
# the fast-student teacher continued (--teacher-finetune-steps): a fresh exponential schedule
# from 5x below the first run's start (0.01) down to 5x below its end (1e-4)
FINETUNE_LR = (2e-3, 2e-5)
# The energy-only teachers' cutoff (A) per molecule. Measured 2026-12-05 on aspirin's pool
# energies (single EGNN, batch 32, constant lr 2e-3, 1 thread): at 5 A the network stayed at the
# mean energy for 8,000 steps (parity slope 0.00; as in a committee run of 17,000 steps), at 4 A
# nearly so (0.007 after 6,000), at 3 A it learned (slope 0.18 after 6,000 steps, rising) and ran
# 1.8x faster. With 21 atoms nearly every pair is within 5 A, and the sum over ~20 neighbours
# per atom hides the small bond-length changes that carry the energy; ethanol (9 atoms) learned
# at 5 A. With forces the cutoff does not matter so: every model keeps CUTOFF_A there.
ENERGY_ONLY_TEACHER_CUTOFF = {"ethanol": 5.0, "aspirin": 3.0}
ENSEMBLE = 4
VALIDATION_FRACTION = 0.05


# ------------------------------------------------------------------ small helpers


def write_frames(path: Path, frames) -> None:
    """Write an extxyz file through a temporary one (the process id in its name: two runs of
    the benchmark, e.g. with different --cases, may prepare the same files at once)."""
    import ase.io

    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    ase.io.write(str(tmp), frames, format="extxyz")
    os.replace(tmp, path)


def train_bench():
    """benchmarks/train_bench.py (MODELS, make_config): the models' hyperparameters."""
    import train_bench as tb

    return tb


def energy_only_settings(section: dict, model: str) -> dict:
    """``section`` (a train config without data) set to energy-only training's batch and
    learning rates (ENERGY_ONLY_BATCH, ENERGY_ONLY_LR)."""
    lr, lr_final = ENERGY_ONLY_LR[model]
    section["optim"].update(lr=lr, lr_final=lr_final)
    section["training"]["batch_size"] = ENERGY_ONLY_BATCH
    return section


def model_section(args, model: str, steps: int, loss: dict, seed: int = 0) -> dict:
    """``model`` at train_bench's settings (MODELS) with ``loss``, cutoff CUTOFF_A and ``steps``
    optimizer steps, as an `mlpot train` config without data."""
    spec = train_bench().MODELS[model]
    return {"model": {**spec["model"], "cutoff": CUTOFF_A}, "loss": loss,
            "optim": dict(spec["optim"]),
            "training": {"batch_size": spec["batch_size"], "max_epochs": 10 ** 6,
                         "max_steps": int(steps), "max_time_min": args.cap_min, "seed": seed,
                         "threads": args.threads, "progress": False}}


def student_section(args, steps: int, forces: bool = True, seed: int = 0,
                    atomic: bool = False) -> dict:
    """The student (--student-model, dp_se_e2_a by default) at train_bench's settings as an
    `mlpot train` config without data (``forces=False``: energies alone, at the energy-only
    batch and learning rates; with forces, at --student-batch structures per step where given;
    ``atomic``: the distilled student, with the teacher's atomic energies at the loss weight
    --atomic-energies and its Hessian rows at --hessian-weight where they are above 0)."""
    student = getattr(args, "student_model", "dp_se_e2_a")
    if forces:
        loss = dict(train_bench().MODELS[student]["loss"])
        if atomic and getattr(args, "atomic_energies", 0.0):
            loss["atomic_energies"] = float(args.atomic_energies)
        if atomic and getattr(args, "hessian_atoms", 0):
            loss["hessian"] = float(args.hessian_weight)
        section = model_section(args, student, steps, loss, seed)
        if getattr(args, "student_batch", None):
            section["training"]["batch_size"] = int(args.student_batch)
        return section
    return energy_only_settings(model_section(args, student, steps,
                                              {"energy": 1.0, "forces": 0.0}), student)


def teacher_section(args, model: str, steps: int, energy_only: bool = False,
                    cutoff: float = None) -> dict:
    """A teacher model at train_bench's settings (nequip: MACE-like) without data
    (``energy_only``: at the energy-only batch and learning rates; ``cutoff``: instead of
    CUTOFF_A)."""
    section = model_section(args, model, steps, dict(train_bench().MODELS[model]["loss"]))
    if cutoff is not None:
        section["model"]["cutoff"] = float(cutoff)
    return energy_only_settings(section, model) if energy_only else section


def run_env(args) -> dict:
    return dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONUNBUFFERED="1")


def mlpot(args, *cli) -> float:
    """Run ``python -m mlpot.cli *cli`` (its output goes to ours); the wall seconds."""
    t0 = time.time()
    res = subprocess.run([sys.executable, "-m", "mlpot.cli", *map(str, cli)], env=run_env(args))
    if res.returncode != 0:
        fail(f"`mlpot {' '.join(map(str, cli[:1]))}` failed (exit code {res.returncode}); its "
             "message is above. Fix the cause and rerun: finished cases are kept")
    return time.time() - t0


def add_wall(folder: Path, seconds: float) -> float:
    """Wall seconds of a case's commands, summed over resumed attempts (bench_wall_s.txt)."""
    f = folder / "bench_wall_s.txt"
    total = (float(f.read_text()) if f.is_file() else 0.0) + seconds
    folder.mkdir(parents=True, exist_ok=True)
    f.write_text(f"{total:.1f}\n")
    return total


def run_train(args, cfg: dict, out: Path) -> dict:
    """`mlpot train` of ``cfg`` into ``out`` (skipped when finished, resumed when killed);
    the run's metrics.json with the bench's wall seconds added."""
    import yaml

    metrics = out / "metrics.json"
    if not metrics.is_file():
        cfg = json.loads(json.dumps(cfg))
        cfg["training"]["out_dir"] = str(out)
        cfg_path = out.with_name(out.name + ".yaml")
        cfg_path.parent.mkdir(parents=True, exist_ok=True)
        cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        resume = ["--resume"] if (out / "last.pt").is_file() else []
        print(f"== mlpot train {portable(cfg_path)} {' '.join(resume)}", flush=True)
        add_wall(out, mlpot(args, "train", cfg_path, *resume))
    return train_record(out)


def train_record(out: Path) -> dict:
    m = json.loads((out / "metrics.json").read_text())
    wall = out / "bench_wall_s.txt"
    steps, t = m.get("steps"), m.get("train_time_s")
    rec = {"steps": steps, "epochs": m.get("epochs"),
           "train_time_s": None if t is None else round(t, 1),
           "steps_per_s": None if not (steps and t) else round(steps / t, 2),
           "command_wall_s": float(wall.read_text()) if wall.is_file() else None,
           "validation": m.get("validation")}
    if rec["steps_per_s"]:
        rec["steps_for_budget"] = int(rec["steps_per_s"] * 60 * BUDGET_MIN)
    return rec


def run_distill(args, cfg: dict, out: Path) -> dict:
    """`mlpot distill` of ``cfg`` (out_dir ``out``; it skips finished stages and resumes)."""
    import yaml

    state_file = out / "state.json"
    done = json.loads(state_file.read_text()).get("done", []) if state_file.is_file() else []
    if "student" not in done:
        cfg_path = out.with_name(out.name + ".yaml")
        cfg_path.parent.mkdir(parents=True, exist_ok=True)
        cfg_path.write_text(yaml.safe_dump({**cfg, "out_dir": str(out)}, sort_keys=False))
        print(f"== mlpot distill {portable(cfg_path)}", flush=True)
        add_wall(out, mlpot(args, "distill", cfg_path))
    return json.loads(state_file.read_text())


def exported(checkpoint: Path, out: Path) -> Path:
    """An exported model: ``checkpoint`` itself when it is one, else exported once to ``out``
    (again when the checkpoint changed)."""
    from mlpot.checkpoint import file_kind
    from mlpot.export import export

    kind = file_kind(str(checkpoint))
    if kind == "torchscript":
        return checkpoint
    if kind != "checkpoint":
        fail(f"{checkpoint}: neither an exported mlpot model nor a training checkpoint")
    stamp = out.with_name(out.name + ".sha256")
    digest = sha256(checkpoint)
    if not out.is_file() or not stamp.is_file() or stamp.read_text().strip() != digest:
        export(str(checkpoint), str(out))
        stamp.write_text(digest + "\n")
    return out


def cached(path: Path, key: dict, compute):
    """``compute()`` once per ``key`` (kept in ``path``: a rerun reuses it)."""
    if path.is_file():
        old = json.loads(path.read_text())
        if old.get("key") == key:
            return old["value"]
    value = compute()
    write_json(path, {"key": key, "value": value})
    return value


def test_errors(args, model: Path, test: Path, cache: Path) -> dict:
    """Energy and force MAE/RMSE of ``model`` on the frames of ``test``."""
    import torch

    from mlpot.train.evaluate import evaluate_file

    def compute():
        torch.set_num_threads(args.threads)
        m = evaluate_file(str(model), str(test))
        return {k: round(float(v), 3) for k, v in m.items()
                if k.startswith(("energy_", "forces_", "uq_")) or k == "frames"}

    return cached(cache, {"model_sha256": sha256(model), "test": test.name}, compute)


def stability(args, model_file: Path, atoms, cache: Path) -> dict:
    """run_nvt of the stability benchmark at --md-temperature (replicas, length as stated)."""
    settings = {"temperature_K": args.md_temperature, "ps": args.md_ps, "timestep_fs": 0.5,
                "replicas": args.replicas, "thermostat": "langevin", "friction_per_fs": 0.01,
                "check_every": 10, "seed": 0, "threads": args.threads}

    def compute():
        import torch

        import integrators as I
        from mlpot.export import load

        torch.set_num_threads(args.threads)
        model = load(str(model_file))
        forces = I.MLPotForces(model, model.atom_types(atoms.numbers), pbc=tuple(atoms.pbc),
                               atomic_numbers=atoms.numbers)
        state = I.state_from_ase(atoms, dtype=model.dtype)
        rule = I.BlowupRule.for_structure(atoms, molecular=True)
        marks = {"next": 0.1, "t0": time.perf_counter()}

        def progress(step, total, alive):
            if step / total + 1e-12 >= marks["next"] or step == total:
                marks["next"] = step / total + 0.1
                el = time.perf_counter() - marks["t0"]
                print(f"  NVT {args.md_temperature:g} K: step {step}/{total} "
                      f"({step / el:.1f} steps/s, {alive} running)", flush=True)

        r = I.run_nvt(forces, state, args.md_temperature, args.md_ps, 0.5, rule,
                      replicas=args.replicas, friction_per_fs=0.01, check_every=10, seed=0,
                      progress=progress)
        blown = [{"replica": o.replica, "time_ps": o.time_ps, "kind": o.kind,
                  "reason": o.reason} for o in r.outcomes if not o.survived]
        return {**settings, "survived": r.survived, "replicas_run": len(r.outcomes),
                "survived_fraction": round(r.survived_fraction, 4), "blowups": blown,
                "steps": r.steps, "wall_s": round(r.wall_s, 1),
                "steps_per_s": round(r.steps_per_s, 2),
                "rule": {"max_force_eV_per_A": I.stability.DEFAULT_MAX_FORCE_EV_PER_A,
                         "min_distance_A": I.stability.DEFAULT_MIN_DISTANCE_A,
                         "max_bond_A": I.stability.DEFAULT_MAX_BOND_A,
                         "bond_factor": I.stability.DEFAULT_BOND_FACTOR}}

    return cached(cache, {"model_sha256": sha256(model_file), **settings}, compute)


def throughput(args, model_file: Path, atoms, cache: Path) -> dict:
    """Steps/s of Langevin MD with ``args.md_replicas`` replicas of ``atoms`` batched."""
    settings = {"replicas": args.md_replicas, "atoms_per_replica": len(atoms),
                "timed_steps": args.throughput_steps, "warmup_steps": 3, "timestep_fs": 0.5,
                "temperature_K": 300.0, "integrator": "Langevin (friction 0.01/fs)",
                "threads": args.threads}

    def compute():
        import warnings

        import torch

        import integrators as I
        from mlpot.export import load

        torch.set_num_threads(args.threads)
        model = load(str(model_file))
        provider = I.MLPotForces(model, model.atom_types(atoms.numbers), pbc=tuple(atoms.pbc),
                                 atomic_numbers=atoms.numbers)
        st = I.state_from_ase(atoms, replicas=args.md_replicas, seed=0, dtype=model.dtype)
        st = I.initialize_velocities(st, 300.0, remove_com=True)
        integ = I.Langevin(0.5, 300.0, 0.01)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", I.MDWarning)
            st = I.simulate(st, integ, provider, 3, last_good_path=None)
            t0 = time.perf_counter()
            I.simulate(st, integ, provider, args.throughput_steps, last_good_path=None)
            wall = time.perf_counter() - t0
        sps = args.throughput_steps / wall
        return {**settings, "wall_s": round(wall, 2), "steps_per_s": round(sps, 3),
                "atom_steps_per_s": round(sps * args.md_replicas * len(atoms), 1),
                "load_average": round(os.getloadavg()[0], 2)}

    return cached(cache, {"model_sha256": sha256(model_file), **settings}, compute)


def steps_of(args, part: str, system: str, who: str) -> int:
    given = {"teacher": args.teacher_steps,
             "student_energy_only": getattr(args, "energy_only_steps", None)}.get(
        who, args.student_steps)
    return int(given) if given else DEFAULT_STEPS[(part, system)][who]


def mae(rec: dict, key: str):
    return rec.get("test", {}).get(key)


def common_settings(args) -> dict:
    return {"threads": args.threads, "cap_min": args.cap_min, "budget_min_stated": BUDGET_MIN,
            "energy_only_teacher_budget_min_stated": ENSEMBLE_TEACHER_MIN,
            "energy_only_batch": ENERGY_ONLY_BATCH,
            "energy_only_lr": {k: list(v) for k, v in ENERGY_ONLY_LR.items()},
            "cutoff_A": CUTOFF_A, "validation_fraction": VALIDATION_FRACTION, "seed": 0,
            "student": {"name": getattr(args, "student_model", "dp_se_e2_a"),
                        **{k: v for k, v in student_section(
                args, 0).items() if k in ("model", "loss", "optim")},
                "batch_size": student_section(args, 0)["training"]["batch_size"]}}


def keep_other_molecules(path: Path, new: dict) -> dict:
    """``new`` with the molecules of an earlier result in ``path`` that this run did not
    redo (runs of one molecule at a time, e.g. on different days: each molecule keeps its own
    date and command), when both used the same settings; otherwise ``new`` alone."""
    if not path.is_file():
        return new
    old = json.loads(path.read_text())
    same = all(old.get(k) == new.get(k) for k in ("settings", "teacher_model", "md"))
    if not same:
        print(f"{portable(path)}: earlier results with other settings are replaced", flush=True)
        return new
    molecules = {m: {**r, "date": r.get("date", old.get("date")),
                     "command": r.get("command", old.get("command"))}
                 for m, r in old.get("molecules", {}).items() if m not in new["molecules"]}
    for m in new["molecules"]:
        new["molecules"][m]["command"] = new["command"]
    return {**new, "molecules": {**molecules, **new["molecules"]}}


# ------------------------------------------------------------------ energy-only
def prepare_rmd17(args, molecule: str, folder: Path) -> dict:
    """pool_energy.xyz (800, REF_energy only), pool_forces.xyz (the same with REF_forces) and
    test.xyz (200, with forces), from rmd17_split; written once."""
    import ase.io

    path, pool_idx, test_idx = rmd17_split(args.shared, molecule)
    files = {"pool_energy": folder / "pool_energy.xyz", "pool_forces": folder / "pool_forces.xyz",
             "test": folder / "test.xyz"}
    if not all(p.is_file() for p in files.values()):
        folder.mkdir(parents=True, exist_ok=True)
        frames = ase.io.read(str(path), index=":")
        for a in frames:
            a.info = {"REF_energy": a.info["REF_energy"]}
        write_frames(files["test"], [frames[i] for i in test_idx])
        write_frames(files["pool_forces"], [frames[i] for i in pool_idx])
        energy_only = []
        for i in pool_idx:
            a = frames[i].copy()
            a.arrays.pop("REF_forces", None)
            a.info = {"REF_energy": frames[i].info["REF_energy"]}
            energy_only.append(a)
        write_frames(files["pool_energy"], energy_only)
    return {"source": path, "pool_frames": len(pool_idx), "test_frames": len(test_idx), **files}


def energy_only(args) -> dict:
    import ase.io

    results = {}
    for mol in args.molecules:
        s_steps = steps_of(args, "energy-only", mol, "student")
        a_steps = steps_of(args, "energy-only", mol, "student_energy_only")
        t_steps = steps_of(args, "energy-only", mol, "teacher")
        t_cutoff = args.teacher_cutoff or ENERGY_ONLY_TEACHER_CUTOFF[mol]
        folder = Path(args.work) / "energy_only" / mol
        files = prepare_rmd17(args, mol, folder)
        # the students' runs named by their model where it is not the default
        model = "" if args.student_model == "dp_se_e2_a" else f"_{args.student_model}"
        start = ase.io.read(str(files["test"]), index=0)
        data = {"validation_fraction": VALIDATION_FRACTION}
        print(f"=== energy-only {mol}: student {s_steps} steps ((a): {a_steps} at batch "
              f"{ENERGY_ONLY_BATCH}), teacher {ENSEMBLE} x {args.teacher_model} {t_steps} "
              f"steps at batch {ENERGY_ONLY_BATCH}, cutoff {t_cutoff:g} A", flush=True)
        cases = {}

        # (a) energies alone
        if "a" in args.cases:
            out = folder / f"a_energy_only_b{ENERGY_ONLY_BATCH}_s{a_steps}{model}"
            cfg = {"data": {**data, "train": str(files["pool_energy"])},
                   **student_section(args, a_steps, forces=False)}
            cases["a_energy_only"] = {"how": "mlpot train on the pool's energies (loss.forces 0), "
                                             f"batch {ENERGY_ONLY_BATCH}",
                                      "training": run_train(args, cfg, out), "run": out}
        # (b) distilled from the energy-only committee
        if "b" in args.cases:
            b_name = f"b_distilled_s{s_steps}_t{t_steps}_{args.teacher_model}_b{ENERGY_ONLY_BATCH}"
            if t_cutoff != CUTOFF_A:
                b_name += f"_rc{t_cutoff:g}"
            b_name += model
            out = folder / b_name
            teacher = teacher_section(args, args.teacher_model, t_steps, energy_only=True,
                                      cutoff=t_cutoff)
            teacher["training"]["ensemble"] = ENSEMBLE
            teacher["loss"] = {"energy": 1.0}  # mlpot distill sets forces and stress to 0
            dcfg = {"mode": "ensemble", "data": {**data, "train": str(files["pool_energy"])},
                    "teacher": teacher, "student": student_section(args, s_steps),
                    "weights": {"force_weighting": "inverse_variance", "min_force_weight": 0.05}}
            state = run_distill(args, dcfg, out)
            cases["b_distilled"] = {
                "how": f"mlpot distill mode ensemble ({ENSEMBLE} x {args.teacher_model} on the "
                       f"pool's energies, batch {ENERGY_ONLY_BATCH}; student on reference energies "
                       "+ teacher forces, "
                       "inverse-variance force weights)",
                "training": train_record(out / "student"), "run": out / "student",
                # the whole `mlpot distill` command: teacher, labelling, student data, student
                "distill_command_wall_s": float((out / "bench_wall_s.txt").read_text())
                if (out / "bench_wall_s.txt").is_file() else None,
                "teacher": {"model": args.teacher_model, "members": ENSEMBLE,
                            "cutoff_A": t_cutoff,
                            "training": train_record(out / "teacher")},
                "force_weights": state.get("force_weights")}
        # (c) true forces
        if "c" in args.cases:
            out = folder / f"c_true_forces_s{s_steps}{model}"
            cfg = {"data": {**data, "train": str(files["pool_forces"])},
                   **student_section(args, s_steps)}
            cases["c_true_forces"] = {
                "how": "mlpot train on the pool with its forces (upper bound)",
                "training": run_train(args, cfg, out), "run": out}

        if set(args.cases) != set("abc"):  # a part of the cases (run the others elsewhere):
            continue                       # trained only; the run with all of them reports
        teacher_file = folder / b_name / "teacher.pt"
        cases["b_distilled"]["teacher"]["test"] = test_errors(
            args, teacher_file, files["test"], teacher_file.with_name("teacher_test.json"))
        # the committee's own MD (its mean forces) in the same runs: a student learns the
        # teachers' forces, so it can hardly be more stable than they are
        cases["b_distilled"]["teacher"]["md"] = stability(
            args, teacher_file, start, teacher_file.with_name("teacher_stability.json"))
        print(f"{mol} teacher committee: NVT {args.md_temperature:g} K "
              f"{cases['b_distilled']['teacher']['md']['survived']}/{args.replicas} survived "
              f"{args.md_ps:g} ps", flush=True)
        for name, case in cases.items():
            run = case.pop("run")
            model = exported(run / "best.pt", run / "model.pt")
            case["test"] = test_errors(args, model, files["test"], run / "bench_test.json")
            print(f"{mol} {name}: test {case['test']}", flush=True)
            case["md"] = stability(args, model, start, run / "bench_stability.json")
            print(f"{mol} {name}: NVT {args.md_temperature:g} K {case['md']['survived']}/"
                  f"{case['md']['replicas_run']} survived {args.md_ps:g} ps", flush=True)
            case["run"] = portable(run, work=args.work)

        fa = mae(cases["a_energy_only"], "forces_mae_meV_per_A")
        fb = mae(cases["b_distilled"], "forces_mae_meV_per_A")
        fc = mae(cases["c_true_forces"], "forces_mae_meV_per_A")
        closed = (fa - fb) / (fa - fc) if fa != fc else None
        sb = cases["b_distilled"]["md"]["survived"]
        sc = cases["c_true_forces"]["md"]["survived"]
        results[mol] = {
            "data": {"file": portable(files["source"], shared=args.shared),
                     "split": "benchmarks/_common.rmd17_split (seed 0)",
                     "pool_frames": files["pool_frames"], "test_frames": files["test_frames"],
                     "train": "the pool without forces (REF_energy only); (c): with forces",
                     "validation_fraction": VALIDATION_FRACTION},
            "student_steps": s_steps, "teacher_steps": t_steps,
            "md_start": "the first frame of the test part",
            "cases": cases,
            "force_gap_closed": None if closed is None else round(closed, 3),
            "targets": {"b_closes_half_the_force_gap": closed is not None and closed >= 0.5,
                        "b_at_least_as_stable_as_c": sb >= sc}}
    return results


# ------------------------------------------------------------------ fast student
def train_teacher(args, data: dict, folder: Path, t_steps: int, ft_steps, seed: int):
    """The fast-student teacher of training seed ``seed``: nequip at train_bench's settings for
    ``t_steps`` steps, then (``ft_steps``) continued from its best.pt on FINETUNE_LR; seed 0 in
    teacher_nequip_t<T>[_ft<F>], seed k in the same names with _seed<k>. Trains only where
    --teacher-members includes the seed (all seeds without it). (record, final run folder)."""
    tb = train_bench()
    suffix = f"_seed{seed}" if seed else ""
    train_it = args.teacher_members is None or seed in args.teacher_members
    out = folder / f"teacher_nequip_t{t_steps}{suffix}"
    cfg = tb.make_config("3bpa", "nequip", data, args.cap_min, args.threads, out)
    cfg["data"] = data
    cfg["training"].update(max_steps=t_steps, max_epochs=10 ** 6, seed=seed)
    rec = {"training": run_train(args, cfg, out) if train_it else None,
           "run": portable(out, work=args.work), "seed": seed}
    if ft_steps:  # continued from its best.pt on a fresh, lower schedule
        first = out
        out = folder / f"teacher_nequip_t{t_steps}_ft{ft_steps}{suffix}"
        cfg = json.loads(json.dumps(cfg))
        cfg["optim"].update(lr=FINETUNE_LR[0], lr_final=FINETUNE_LR[1])
        cfg["training"].update(max_steps=ft_steps, init_from=str(first / "best.pt"))
        rec["finetune"] = {"training": run_train(args, cfg, out) if train_it else None,
                           "run": portable(out, work=args.work), "lr": list(FINETUNE_LR),
                           "init_from": portable(first / "best.pt", work=args.work)}
    return rec, out


def committee_file(checkpoints, out: Path) -> Path:
    """The teachers ``checkpoints`` as one committee file (``mlpot export A B ...``), written
    again when any of them changed."""
    from mlpot.export import export

    stamp = out.with_name(out.name + ".sha256")
    digest = " ".join(sha256(c) for c in checkpoints)
    if not out.is_file() or not stamp.is_file() or stamp.read_text().strip() != digest:
        export([str(c) for c in checkpoints], str(out))
        stamp.write_text(digest + "\n")
    return out


def labels_done(folder: Path) -> bool:
    """Whether ``folder`` holds a `mlpot distill` run whose teacher labels are finished."""
    state_file = folder / "state.json"
    try:
        return "student_data" in json.loads(state_file.read_text()).get("done", [])
    except (OSError, ValueError):
        return False


def with_atomic_energies(folder: Path) -> Path:
    """The student data of the finished `mlpot distill` run ``folder`` with the teacher's
    atomic energies on its teacher-labelled frames: ``student_data.xyz`` itself where it has
    them (runs of today's `mlpot distill`), else ``student_data_atomic.xyz``, written once from
    the run's teacher model (runs labelled before the teacher's atomic energies were kept)."""
    import ase.io

    from mlpot.label import LabellerSpec, make_labeller

    src = folder / "student_data.xyz"
    frames = ase.io.read(str(src), index=":", format="extxyz")
    teacher = [a for a in frames if a.info.get("distill_label") == "teacher"]
    if all("DISTILL_atomic_energies" in a.arrays for a in teacher):
        return src
    dst = folder / "student_data_atomic.xyz"
    if dst.is_file():
        return dst
    model = json.loads((folder / "state.json").read_text())["config"]["teacher"]["model"]
    labeller = make_labeller(LabellerSpec(kind="model", model=model))  # as `mlpot distill`'s
    print(f"the teacher's atomic energies for {len(teacher)} frames of {portable(src)}",
          flush=True)
    for a in teacher:
        atomic = labeller.label(a.copy()).atomic_energies
        if abs(atomic.sum() - a.info["DISTILL_energy"]) > 1e-3:
            fail(f"{src}: the teacher {model} does not give this run's teacher energies "
                 f"({atomic.sum():.4f} against {a.info['DISTILL_energy']:.4f} eV)")
        a.arrays["DISTILL_atomic_energies"] = atomic
    write_frames(dst, frames)
    return dst


def without_teacher_on_reference(src: Path) -> Path:
    """``src`` (a finished run's student data) without the teacher's labels of the structures
    that have reference (DFT) labels: each structure is then learned from its best label, the
    teacher's only on its own MD and displaced samples. Written once beside ``src``."""
    import ase.io

    dst = src.with_name(src.stem + "_no_teacher_on_reference.xyz")
    if not dst.is_file():
        frames = ase.io.read(str(src), index=":", format="extxyz")
        keep = [a for a in frames if not (a.info.get("distill_source") == "reference"
                                          and a.info.get("distill_label") == "teacher")]
        print(f"{portable(src)}: {len(frames) - len(keep)} teacher frames of reference "
              f"structures left out, {len(keep)} kept", flush=True)
        write_frames(dst, keep)
    return dst


def seeds_summary(records: dict) -> dict:
    """Mean and population standard deviation over seeds of the test errors in ``records``
    (seed -> record with ``test``)."""
    import numpy as np

    out = {"seeds": sorted(records)}
    for key in ("energy_mae_meV_per_atom", "forces_mae_meV_per_A", "forces_rmse_meV_per_A"):
        values = [r["test"][key] for r in records.values() if r["test"].get(key) is not None]
        if values:
            out[key] = round(float(np.mean(values)), 2)
            out[key.replace("_meV", "_std_meV")] = round(float(np.std(values)), 2)
    return out


def fast_student(args) -> dict:
    import ase.io

    from mlpot.distill import student_data_section

    tb = train_bench()
    s_steps = steps_of(args, "fast-student", "3bpa", "student")
    t_steps = steps_of(args, "fast-student", "3bpa", "teacher")
    folder = Path(args.work) / "fast_student"
    d3 = shared_path(args.shared, "data", "3bpa", what="the 3BPA data")
    train, test = d3 / "train_300K.xyz", d3 / "test_300K.xyz"
    for f in (train, test):
        if not f.is_file():
            fail(f"{f} is missing from the 3BPA data; pass --shared DIR")
    data = {"train": str(train), "type_map": ["C", "H", "N", "O"],
            "validation_fraction": VALIDATION_FRACTION}
    start = ase.io.read(str(test), index=0)
    seeds = list(range(args.seeds))
    train_seeds = seeds if args.train_seeds is None else sorted(set(args.train_seeds))
    want = set(args.students)
    batch = f"_b{args.student_batch}" if args.student_batch else ""
    if args.student_model != "dp_se_e2_a":  # both students' runs named by another model
        batch = f"_{args.student_model}" + batch
    # the distilled student's runs: also named by its atomic-energy weight (the direct one's not)
    dbatch = batch + (f"_ae{args.atomic_energies:g}" if args.atomic_energies else "") \
        + (f"_h{args.hessian_atoms}w{args.hessian_weight:g}" if args.hessian_atoms else "") \
        + ("_noteacherref" if args.no_teacher_on_reference else "")
    print(f"=== fast-student 3BPA: students ({', '.join(sorted(want))}) {s_steps} steps"
          f"{f' at batch {args.student_batch}' if args.student_batch else ''}, seeds "
          f"{seeds}, teacher {'given' if args.teacher else f'nequip {t_steps} steps'}",
          flush=True)
    folder.mkdir(parents=True, exist_ok=True)
    ft_steps = args.teacher_finetune_steps
    tag = "given" if args.teacher else f"t{t_steps}" + (f"ft{ft_steps}" if ft_steps else "") \
        + (f"c{args.teacher_committee}" if args.teacher_committee > 1 else "")

    temps = [float(t) for t in args.sample_temps]
    # other samples than the defaults: named by them (the defaults keep older names)
    temps_tag = "" if temps == [300.0, 450.0] else "_T" + "-".join(f"{t:g}" for t in temps)
    copies_tag = "" if args.perturb_copies == 1 else f"_p{args.perturb_copies}"
    samples_tag = f"_md{args.sample_steps}{temps_tag}{copies_tag}"
    if args.samples_from:  # another run's samples, named by their file's digest
        samples_tag = f"_samples{sha256(Path(args.samples_from) / 'samples.xyz')[:8]}"
    distill_out = folder / f"student_distilled_s{s_steps}_{tag}{samples_tag}{dbatch}"
    later_seeds_only = "distilled" in want and 0 not in train_seeds and not args.labels_run
    if later_seeds_only and not labels_done(distill_out):
        fail(f"--train-seeds {' '.join(map(str, train_seeds))} without 0 trains on the teacher's "
             f"labels in {portable(distill_out, work=args.work)}, not finished yet: start it "
             "once the seed-0 process has labelled (its state.json lists student_data)")

    teacher_rec, distilled, distilled_runs = None, None, {}
    if "distilled" in want:
        # the teacher
        if args.teacher:
            given = Path(args.teacher)
            ckpt = given / "best.pt" if given.is_dir() else given
            if not ckpt.is_file():
                fail(f"--teacher {given}: no model there (give a train_bench run folder holding "
                     "best.pt, a checkpoint or an exported model)")
            metrics = ckpt.parent / "metrics.json"
            teacher_rec = {"given": portable(given, shared=args.shared, work=args.work),
                           "training": train_record(ckpt.parent) if metrics.is_file() else None}
            teacher_file = exported(ckpt, folder / "teacher_given.pt")
        else:
            members = [train_teacher(args, data, folder, t_steps, ft_steps, k)
                       for k in range(args.teacher_committee)]
            if args.teacher_members is not None:
                return None  # only these members trained: the run with all of them goes on
            if len(members) == 1:
                teacher_rec, out = members[0]
                teacher_file = exported(out / "best.pt", out / "model.pt")
            else:
                teacher_file = committee_file([out / "best.pt" for _, out in members],
                                              folder / f"teacher_{tag}.pt")
                teacher_rec = {"committee": len(members), "file": portable(teacher_file,
                                                                           work=args.work),
                               "members": {str(k): rec for k, (rec, _) in enumerate(members)}}
                for k, (rec, out) in enumerate(members):  # each member alone, for scale
                    rec["test"] = test_errors(args, exported(out / "best.pt", out / "model.pt"),
                                              test, out / "bench_test.json")
        teacher_rec["model"] = "given with --teacher" if args.teacher else \
            "nequip (train_bench MODELS['nequip'], MACE-like)" + (
                f", a committee of {args.teacher_committee} (training seeds 0..."
                f"{args.teacher_committee - 1}; mlpot export of the members)"
                if args.teacher_committee > 1 else "")

        # the distilled student: seed 0 by `mlpot distill`, other seeds by `mlpot train` on
        # the same teacher-labelled data (OUT/student_data.xyz, the same weights and split key)
        sample = {"steps": args.sample_steps, "temperatures": temps, "starts": 8,
                  "replicas": 2, "timestep": 0.5, "friction": 0.01, "collect_every": 50,
                  "perturb_copies": args.perturb_copies, "perturb_sigma": 0.05, "seed": 0}
        if args.samples_from:  # the teacher labels these instead of sampling its own MD
            sample.update(steps=0, perturb_copies=0, structures=[
                str(Path(args.samples_from).resolve() / "samples.xyz")])
        if args.labels_run:  # the teacher's labels of an earlier `mlpot distill` run
            out = Path(args.labels_run).resolve()
            state = json.loads((out / "state.json").read_text())  # checked in main()
            # what that run sampled (its config), not this command's sampling options
            sample = {k: v for k, v in (state.get("config", {}).get("sample") or sample).items()
                      if k != "device"}
            first = 0
            how = (f"mlpot train on the student_data.xyz of an earlier mlpot distill run "
                   f"({portable(out, work=args.work)}), every seed")
        else:
            out = distill_out
            dcfg = {"mode": "teacher", "data": data, "teacher": {"model": str(teacher_file)},
                    "student": student_section(args, s_steps, atomic=True), "sample": sample,
                    "weights": {"reference": 1.0}}
            if args.hessian_atoms:  # Hessian distillation (mlpot.hessian)
                dcfg["hessian"] = {"atoms": args.hessian_atoms}
            if later_seeds_only:  # seed 0's `mlpot distill` may still train: leave it be
                state = json.loads((out / "state.json").read_text())
            else:
                state = run_distill(args, dcfg, out)
            distilled_runs[0] = out / "student"
            first = 1
            how = ("mlpot distill mode teacher (seed 0); further seeds: mlpot train on its "
                   "student_data.xyz with student.training.seed changed")
        distilled = {"how": how, "sample": sample, "samples": state.get("samples"),
                     "student_frames": state.get("student_frames"),
                     "distill_command_wall_s": float((out / "bench_wall_s.txt").read_text())
                     if (out / "bench_wall_s.txt").is_file() else None}
        labels = with_atomic_energies(out) if args.atomic_energies and args.labels_run \
            else out / "student_data.xyz"
        if args.no_teacher_on_reference:
            labels = without_teacher_on_reference(labels)
        distilled["teacher_labels_on_reference_structures"] = not args.no_teacher_on_reference
        student_data = student_data_section(data, str(labels), "teacher")
        distilled["atomic_energies_weight"] = args.atomic_energies
        distilled["hessian"] = {"atoms_per_frame": args.hessian_atoms,
                                "loss_weight": args.hessian_weight} if args.hessian_atoms \
            else None
        for k in seeds[first:]:
            run = out / (f"student_s{s_steps}{dbatch}_seed{k}" if args.labels_run
                         else f"student_seed{k}")
            if k in train_seeds:
                run_train(args, {"data": student_data,
                                 **student_section(args, s_steps, seed=k, atomic=True)}, run)
            distilled_runs[k] = run

    # the same student trained directly on the DFT data
    direct_runs = {}
    if "direct" in want:
        for k in seeds:
            run = folder / (f"student_direct_s{s_steps}{batch}" + (f"_seed{k}" if k else ""))
            if k in train_seeds:
                run_train(args, {"data": data, **student_section(args, s_steps, seed=k)}, run)
            direct_runs[k] = run
    if want != {"distilled", "direct"} or set(train_seeds) != set(seeds):
        return None  # trained only: the run with both students and every seed reports

    def per_seed(runs: dict) -> dict:
        recs = {}
        for k, run in runs.items():
            model = exported(run / "best.pt", run / "model.pt")
            recs[k] = {"training": train_record(run), "run": portable(run, work=args.work),
                       "test": test_errors(args, model, test, run / "bench_test.json")}
        return recs

    direct = {"how": "mlpot train on train_300K's DFT labels"}
    distilled_seeds, direct_seeds = per_seed(distilled_runs), per_seed(direct_runs)
    for rec, seeded in ((distilled, distilled_seeds), (direct, direct_seeds)):
        rec.update(seeded[0])  # seed 0 at the top, as in single-seed results
        if len(seeds) > 1:
            rec["seeds"] = {str(k): v for k, v in seeded.items()}
            rec["over_seeds"] = seeds_summary(seeded)
    teacher_rec["test"] = test_errors(args, teacher_file, test,
                                      folder / f"teacher_{tag}_test.json")
    for name, rec in (("teacher", teacher_rec), ("distilled", distilled), ("direct", direct)):
        print(f"3BPA {name}: test_300K {rec['test']}"
              + (f"; over seeds {rec['over_seeds']}" if "over_seeds" in rec else ""), flush=True)
    teacher_rec["md_throughput"] = throughput(args, teacher_file, start,
                                              folder / f"teacher_{tag}_throughput.json")
    distilled_file = distilled_runs[0] / "model.pt"
    distilled["md_throughput"] = throughput(args, distilled_file, start,
                                            distilled_file.with_name("bench_throughput.json"))
    speedup = distilled["md_throughput"]["steps_per_s"] / teacher_rec["md_throughput"][
        "steps_per_s"]

    def force_mae(rec):  # over seeds where there are several
        return rec["over_seeds"]["forces_mae_meV_per_A"] if "over_seeds" in rec \
            else mae(rec, "forces_mae_meV_per_A")

    ratio = force_mae(distilled) / mae(teacher_rec, "forces_mae_meV_per_A")
    wins = sum(distilled_seeds[k]["test"]["forces_mae_meV_per_A"]
               < direct_seeds[k]["test"]["forces_mae_meV_per_A"] for k in seeds)
    print(f"3BPA: MD speed-up of the student {speedup:.2f}x; its force MAE / the teacher's "
          f"{ratio:.2f}; lower force MAE than the direct student on {wins} of {len(seeds)} "
          "seeds", flush=True)
    return {"data": {"train": portable(train, shared=args.shared),
                     "test": portable(test, shared=args.shared),
                     "validation_fraction": VALIDATION_FRACTION},
            "student_steps": s_steps, "student_batch": args.student_batch or
            tb.MODELS[args.student_model]["batch_size"], "seeds": seeds,
            "teacher_steps": None if args.teacher else t_steps,
            "teacher_finetune_steps": None if args.teacher else ft_steps,
            "teacher_committee": None if args.teacher else args.teacher_committee,
            "samples_from": portable(Path(args.samples_from), work=args.work)
            if args.samples_from else None,
            "md_structure": "test_300K.xyz frame 0 (27 atoms), replicas batched",
            "teacher": teacher_rec, "student_distilled": distilled, "student_direct": direct,
            "md_speedup_student_over_teacher": round(speedup, 2),
            "force_mae_ratio_student_to_teacher": round(ratio, 3),
            "distilled_lower_force_mae_on_seeds": wins,
            "targets": {"distilled_beats_direct_forces": force_mae(distilled) <
                        force_mae(direct),
                        "student_at_least_3x_faster": speedup >= 3.0,
                        "force_ratio_at_most_1.3 (aim)": ratio <= 1.3}}


# ------------------------------------------------------------------ main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("parts", nargs="+", choices=PARTS, metavar="PART",
                   help=f"one or more of: {', '.join(PARTS)}")
    p.add_argument("--molecules", nargs="+", default=list(MOLECULES), choices=MOLECULES,
                   help="energy-only: rMD17 molecules (default: ethanol aspirin)")
    p.add_argument("--student-steps", type=int, help="optimizer steps of every student "
                   "(default: DEFAULT_STEPS, the stated 15 minutes at 1 thread here)")
    p.add_argument("--teacher-steps", type=int, help="optimizer steps of the teacher (the "
                   "committee's members train in lockstep; default: DEFAULT_STEPS)")
    p.add_argument("--teacher-finetune-steps", type=int, metavar="N",
                   help="fast-student: continue the nequip teacher for N more steps from its "
                        "best.pt (training.init_from) at lr %g -> %g" % FINETUNE_LR)
    p.add_argument("--energy-only-steps", type=int, help="energy-only: optimizer steps of case "
                   "(a), energies alone at batch %d (default: DEFAULT_STEPS)" % ENERGY_ONLY_BATCH)
    p.add_argument("--teacher-model", default="egnn",
                   choices=["egnn", "nequip", "mace_1layer", "dp_se_e2_a"],
                   help="energy-only: the committee members' model (default egnn)")
    p.add_argument("--teacher-cutoff", type=float,
                   help="energy-only: the teachers' cutoff in A (default per molecule, "
                        "ENERGY_ONLY_TEACHER_CUTOFF: ethanol 5, aspirin 3)")
    p.add_argument("--teacher-committee", type=int, default=1, metavar="K",
                   help="fast-student: the teacher is a committee of K such nequip models "
                        "(training seeds 0..K-1, each with its fine-tune), written as one file "
                        "by `mlpot export A B ...` (default 1: one model)")
    p.add_argument("--teacher-members", type=int, nargs="+", metavar="K",
                   help="fast-student: train only these committee members and stop (one "
                        "process per core, side by side; then run without it)")
    p.add_argument("--samples-from", metavar="DIR",
                   help="fast-student: the teacher labels the samples.xyz of this earlier "
                        "`mlpot distill` run (a student_distilled_* folder) instead of its own "
                        "MD (sample.structures): two teachers compared on the same structures")
    p.add_argument("--cases", nargs="+", default=["a", "b", "c"], choices=["a", "b", "c"],
                   help="energy-only: train only these cases (two processes can share the "
                        "work, e.g. --cases b beside --cases a c); results are written only by "
                        "a run with all three (it reuses the finished trainings)")
    p.add_argument("--teacher", metavar="PATH", help="fast-student: use this teacher (a "
                   "train_bench run folder, a checkpoint or an exported model) instead of "
                   "training one")
    p.add_argument("--seeds", type=int, default=1,
                   help="fast-student: train each student with seeds 0..N-1 and report the "
                        "mean and spread (default 1)")
    p.add_argument("--student-batch", type=int,
                   help="fast-student: structures per step of both students (default: "
                        "train_bench's Deep Potential batch, 1)")
    p.add_argument("--student-model", default="dp_se_e2_a",
                   choices=["dp_se_e2_a", "mace_1layer", "mace_2layer"],
                   help="the model of every student, at train_bench's settings (MODELS; "
                        "mace_1layer: a one-layer MACE-style nequip, mace_2layer: the same on "
                        "two layers (fast-student only); runs and results of another model "
                        "than the default are named by it)")
    p.add_argument("--students", nargs="+", default=["distilled", "direct"],
                   choices=["distilled", "direct"],
                   help="fast-student: train only these students (two processes can share the "
                        "work); results are written only by a run with both")
    p.add_argument("--train-seeds", type=int, nargs="+", metavar="K",
                   help="fast-student: train only these of the seeds (the distilled student's "
                        "seed 0 comes with `mlpot distill`; a process without 0 trains on its "
                        "labels once they exist, beside it), to share them between processes; "
                        "results are written only by a run with every seed")
    p.add_argument("--labels-run", metavar="DIR",
                   help="fast-student: train every distilled seed with `mlpot train` on the "
                        "teacher-labelled student_data.xyz of this finished `mlpot distill` run "
                        "(a student_distilled_* folder under --work), instead of labelling again "
                        "(students of other steps or batches from the same labels)")
    p.add_argument("--atomic-energies", type=float, default=0.0, metavar="W",
                   help="fast-student: the distilled student also learns the teacher's atomic "
                        "energies, with this loss weight (student.loss.atomic_energies; default "
                        "0: not); with --labels-run, an older run's labels get them from its "
                        "teacher first")
    p.add_argument("--hessian-atoms", type=int, default=0, metavar="K",
                   help="fast-student: Hessian distillation: the teacher also labels the "
                        "Hessian rows of K atoms of every frame it labels (hessian.atoms; -1: "
                        "all; 6 teacher calls per atom) and the distilled student learns them "
                        "with --hessian-weight (default 0: not); with --labels-run, the K of "
                        "that run's rows (students of other weights on the same labels)")
    p.add_argument("--hessian-weight", type=float, default=1.0, metavar="W",
                   help="fast-student, with --hessian-atoms: student.loss.hessian, (eV/A^2)^-2 "
                        "(default 1)")
    p.add_argument("--no-teacher-on-reference", action="store_true",
                   help="fast-student, with --labels-run: leave out the teacher's labels of "
                        "the training structures (which keep their DFT labels); the teacher "
                        "labels only its MD and displaced samples")
    p.add_argument("--tag", default="",
                   help="fast-student: write distill_fast_student_TAG.json instead (keeps the "
                        "other results)")
    p.add_argument("--sample-steps", type=int, default=1000,
                   help="fast-student: steps of each teacher MD run (0.5 fs; default 1000)")
    p.add_argument("--sample-temps", nargs="+", type=float, default=[300.0, 450.0],
                   help="fast-student: temperatures of the teacher's MD samples, K")
    p.add_argument("--perturb-copies", type=int, default=1,
                   help="fast-student: displaced copies of each training structure that the "
                        "teacher labels (default 1; 0: none)")
    p.add_argument("--md-ps", type=float, default=10.0,
                   help="energy-only: length of each NVT stability run, ps (default 10)")
    p.add_argument("--md-temperature", type=float, default=500.0, help="K (default 500)")
    p.add_argument("--replicas", type=int, default=5, help="NVT stability replicas (5)")
    p.add_argument("--md-replicas", type=int, default=64,
                   help="fast-student: replicas batched in the throughput runs (64)")
    p.add_argument("--throughput-steps", type=int, default=20,
                   help="fast-student: timed MD steps per model (20)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cap-min", type=float, default=180.0,
                   help="wall-clock cap of each training (training.max_time_min; default 180, "
                        "far above the budgets on a busy machine: the steps decide)")
    p.add_argument("--work", default=str(HERE / "runs" / "distill"),
                   help="folder for the runs (default benchmarks/runs/distill, git-ignored)")
    p.add_argument("--results-dir", default=str(HERE / "results"),
                   help="where distill_energy_only.json and distill_fast_student.json go")
    add_shared_option(p)
    args = p.parse_args()
    for name in ("student_steps", "energy_only_steps", "teacher_steps", "teacher_finetune_steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be at least 1")
    if args.teacher_finetune_steps and args.teacher:
        fail("--teacher-finetune-steps continues the teacher this benchmark trains; with "
             "--teacher give the continued run itself (or leave --teacher out)")
    if args.perturb_copies < 0:
        fail("--perturb-copies must be 0 or more (0: no displaced copies)")
    if args.teacher_cutoff is not None and args.teacher_cutoff <= 0:
        fail("--teacher-cutoff must be > 0 (Angstrom), e.g. 3")
    if args.no_teacher_on_reference and not args.labels_run:
        fail("--no-teacher-on-reference takes the labels of a finished run: give --labels-run")
    if args.atomic_energies < 0:
        fail("--atomic-energies must be >= 0 (a loss weight, e.g. 1)")
    if args.hessian_atoms < -1 or (args.hessian_atoms and not args.hessian_weight > 0):
        fail("--hessian-atoms K takes K >= 1 (or -1: all) with --hessian-weight above 0")
    if args.student_model not in ENERGY_ONLY_LR and "energy-only" in args.parts:
        fail(f"energy-only with --student-model {args.student_model}: its energy-only learning "
             f"rates were never measured (ENERGY_ONLY_LR has {', '.join(ENERGY_ONLY_LR)})")
    if (args.student_model != "dp_se_e2_a" and "energy-only" in args.parts
            and not (args.student_steps and args.energy_only_steps)):
        fail("energy-only with --student-model: give --student-steps (cases b, c) and "
             "--energy-only-steps (case a, batch %d): the default steps are the Deep "
             "Potential's 15 minutes" % ENERGY_ONLY_BATCH)
    if args.seeds < 1 or (args.student_batch is not None and args.student_batch < 1):
        fail("--seeds and --student-batch must be at least 1")
    if args.train_seeds and not set(args.train_seeds) <= set(range(args.seeds)):
        fail(f"--train-seeds must be among 0..{args.seeds - 1} (--seeds {args.seeds})")
    if args.teacher_committee < 1:
        fail("--teacher-committee must be at least 1 (1: a single teacher)")
    if args.teacher_members is not None and not (
            set(args.teacher_members) <= set(range(args.teacher_committee))):
        fail(f"--teacher-members must be among 0..{args.teacher_committee - 1} "
             f"(--teacher-committee {args.teacher_committee})")
    if args.teacher_members is not None and "distilled" not in args.students:
        fail("--teacher-members trains the distilled student's teachers: give --students "
             "distilled (or leave --students out) with it")
    if (args.teacher_committee > 1 or args.teacher_members is not None) and args.teacher:
        fail("--teacher-committee and --teacher-members train the teachers; with --teacher "
             "give an exported committee file instead")
    if args.samples_from and not (Path(args.samples_from) / "samples.xyz").is_file():
        fail(f"--samples-from {args.samples_from}: no samples.xyz there; give a "
             "student_distilled_* folder whose sample stage finished")
    if args.samples_from and args.labels_run:
        fail("--samples-from makes new teacher labels, --labels-run reuses old ones: give one")
    if args.labels_run and not labels_done(Path(args.labels_run)):
        fail(f"--labels-run {args.labels_run}: no finished `mlpot distill` labels there "
             "(state.json without the student_data stage); give a student_distilled_* folder")
    if args.labels_run and args.hessian_atoms:  # students of other weights on the same rows
        labelled = (json.loads((Path(args.labels_run) / "state.json").read_text())
                    .get("config", {}).get("hessian") or {}).get("atoms", 0)
        if not labelled:
            fail(f"--labels-run {args.labels_run} holds no Hessian rows: leave out "
                 "--hessian-atoms, or label them in a run without --labels-run")
        if labelled != args.hessian_atoms:
            fail(f"--labels-run {args.labels_run} holds Hessian rows of {labelled} atoms per "
                 f"frame: give --hessian-atoms {labelled} (any --hessian-weight)")
    if args.md_ps <= 0 or args.replicas < 1 or args.md_replicas < 1 or args.threads < 1:
        fail("--md-ps must be > 0 and --replicas, --md-replicas, --threads at least 1")
    args.work = str(Path(args.work).resolve())
    import torch

    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    roots = {"shared": args.shared, "work": args.work}
    head = {"date": time.strftime("%Y-%m-%d"), "command": command_line(**roots),
            "machine": machine_info(), "settings": common_settings(args)}
    if "energy-only" in args.parts:
        t0 = time.time()
        res = energy_only(args)
        if set(args.cases) != {"a", "b", "c"}:
            print("energy-only: cases " + " ".join(args.cases) + " trained; run again with all "
                  "three for the results")
            res = None
        for mol in res or {}:
            res[mol].update(date=head["date"], wall_s=round(time.time() - t0, 1))
        out = {**head, "part": "energy-only", "teacher_model": args.teacher_model,
               "teacher_members": ENSEMBLE, "md": {"temperature_K": args.md_temperature,
                                                   "ps": args.md_ps, "replicas": args.replicas},
               "molecules": res}
        path = Path(args.results_dir) / (
            "distill_energy_only" + ("" if args.student_model == "dp_se_e2_a"
                                     else f"_{args.student_model}") + ".json")
        if res is not None:
            out = keep_other_molecules(path, portable(out, **roots))
            write_json(path, out)
            print(f"wrote {portable(path)}")
    if "fast-student" in args.parts:
        t0 = time.time()
        res = fast_student(args)
        if res is None and args.teacher_members is not None:
            print("fast-student: teachers " + " ".join(map(str, args.teacher_members)) +
                  " trained; run again without --teacher-members for the students")
        elif res is None:
            print("fast-student: students " + " ".join(args.students) + " trained; run again "
                  "with both and every seed for the results")
        else:
            out = {**head, "part": "fast-student", **res, "wall_s": round(time.time() - t0, 1)}
            name = "distill_fast_student" + (f"_{args.tag}" if args.tag else "") + ".json"
            write_json(Path(args.results_dir) / name, portable(out, **roots))
            print(f"wrote {portable(Path(args.results_dir) / name)}")


if __name__ == "__main__":
    main()
