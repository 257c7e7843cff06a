"""The live active-learning loop with PySCF on rMD17 ethanol at PBE/def2-SVP (rMD17's level).

Three steps, each resumable (the same command after a kill continues where it stopped; the
work folder ``--work`` holds every intermediate file):

1. **Labeller check.** The loop's initial frames (``--initial`` frames drawn with ``--seed``
   from the rMD17 pool of ``_common.rmd17_split``; the 200-frame test part is used only in step
   3) are labelled with ``mlpot.label.label_file`` (the code of ``mlpot label``) at PBE/def2-SVP
   and compared with their rMD17 labels (ORCA, PBE/def2-SVP, very tight SCF and a very dense
   grid): force MAE, RMSE and largest component difference (eV/A), and E_pyscf - E_rmd17 per
   frame: its mean (the raw offset between the two codes' absolute energies) and its spread
   (standard deviation, max - min), which is what a model trained on one and tested on the
   other sees. These PySCF-labelled frames are the loop's initial data, so every label the
   loop trains on comes from PySCF.
2. **The loop.** ``mlpot learn`` (a subprocess; it resumes from its state.json) from those
   frames: a committee of ``--members`` models (``--model``, cutoff 5 A) trained for a fixed
   ``--steps`` optimizer steps per iteration (``training.max_steps``), warm-started from the
   previous iteration; MD exploration (Langevin, ``--timestep`` fs) from ``--starts`` of the
   initial frames at ``--temperatures`` with ``--replicas`` replicas each; trust levels
   ``--lower``/``--upper`` on the raw max_force_dev (eV/A); at most ``--per-iteration`` new
   PySCF labels per iteration, farthest-point thinned, until ``--max-labels`` labels were added
   or ``--max-iterations``. A fixed validation set (``--validation`` pool frames with their rMD17
   labels, disjoint from everything else here) picks each committee's best checkpoint and makes
   learning.csv's column comparable; it is the same for every committee trained here.

   Trust levels 0.2/0.6 eV/A, not DP-GEN's 0.05/0.15: those suit committees near DFT accuracy
   (tens of meV/A). The committees this budget trains are far from it: an egnn committee of 4
   after 800 steps on 54 rMD17 frames has a force MAE of ~240 meV/A and a raw max_force_dev of
   0.19/0.24/0.35 eV/A (10th/50th/90th percentile) on rMD17 pool frames, i.e. on the very
   distribution it should learn. With 0.05/0.15 every explored frame (and every MD replica at
   its first collected frame) is "failed", nothing is selected and the loop only retrains on the
   same data (seen in a trial with 4 initial frames: 8 iterations, 0 labels). 0.2 sits near the
   median deviation on in-distribution frames, 0.6 at about 2.5 times the 90th percentile.
3. **Comparison** on the 200 rMD17 test frames (rMD17's labels) at an equal number of labelled
   frames N (the initial frames plus all the loop's labels):

   - ``loop_final``: the committee the loop's next iteration would train (``Learner.train``
     of iteration n+1: all N frames, warm-started from iteration n; the loop stops after
     labelling, so its last model.pt has not seen the last iteration's labels);
   - ``loop_data_cold``: the same N frames trained from a fresh initialisation with the same
     training settings (``mlpot train``), the like-for-like partner of
   - ``random_rmd17_seed<s>``: N frames drawn at random from the rMD17 pool (rMD17's labels),
     trained the same way, for ``--random-seeds`` draws;
   - ``learning_curve_on_test``: every iteration's model.pt on the test frames;
   - ``longer_training``: ``loop_data_cold`` and the random draws again with ``--extra-steps``
     optimizer steps, to tell whether the data or the short training limits the errors.

   Errors: forces MAE/RMSE (meV/A) of the committee mean; energies MAE (meV per molecule)
   raw and after removing the model's mean signed error on the test frames (the loop's
   committees learn PySCF's absolute energies, which sit a constant away from ORCA's; step 1
   measures that constant, and the aligned error is the fair comparison).

Writes ``benchmarks/results/learn_pyscf_ethanol.json`` (``--out``): settings, labeller check,
loop table with per-iteration phase times (from the phase files' modification times: a resumed
run's pause counts in), comparison, wall times, machine.

    python benchmarks/learn_pyscf_bench.py                 # the whole benchmark, 1 thread
    python benchmarks/learn_pyscf_bench.py --initial 4 --steps 20 --md-steps 100 \\
        --per-iteration 2 --max-labels 4 --random-seeds 1 --work /tmp/t --out /tmp/t.json  # trial
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from _common import (add_shared_option, command_line, machine_info, portable, rmd17_split,
                     shared_path, write_json)

HERE = Path(__file__).resolve().parent
TYPE_MAP = ["C", "H", "O"]
# per model: network, loss and optimizer (train_bench's molecule settings; no search on the test
# frames), cutoff 5 A as on 3BPA
MODELS = {
    "egnn": {"model": {"name": "egnn", "dtype": "float32", "cutoff": 5.0, "hparams": {}},
             "loss": {"energy": 1.0, "forces": 100.0},
             "optim": {"lr": 5e-3, "lr_final": 5e-5, "scheduler": "exponential",
                       "ema_decay": 0.99}},
    "dp_se_e2_a": {"model": {"name": "dp_se_e2_a", "dtype": "float32", "cutoff": 5.0,
                             "hparams": {}},
                   "loss": {"energy": 1.0, "forces": 1.0, "energy_start": 0.02,
                            "forces_start": 1000.0},
                   "optim": {"lr": 1e-3, "lr_final": 3.5e-6, "scheduler": "exponential",
                             "ema_decay": 0.0}},
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- frames
def choose_frames(args):
    """(rMD17 file, initial, validation, the rest of the pool, test) frame numbers; the initial
    and validation frames are drawn from the pool with --seed."""
    import numpy as np

    path, pool, test = rmd17_split(args.shared, "ethanol")
    rng = np.random.default_rng(args.seed)
    order = [pool[k] for k in rng.permutation(len(pool))]
    initial = sorted(order[:args.initial])
    validation = sorted(order[args.initial:args.initial + args.validation])
    rest = sorted(order[args.initial + args.validation:])
    return path, initial, validation, rest, test


def write_frames(all_frames, indices, path: Path) -> Path:
    import ase.io

    frames = []
    for k in indices:
        a = all_frames[k].copy()
        a.info["rmd17_frame"] = int(k)  # the frame number in the rMD17 file
        frames.append(a)
    if not path.exists():
        tmp = path.with_name(path.name + ".tmp.xyz")
        ase.io.write(tmp, frames, format="extxyz")
        os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------- step 1
def pyscf_settings() -> dict:
    """What PySCF's labeller runs with (mlpot.label.PySCFLabeller: RKS, no density fitting,
    PySCF's default grid)."""
    import pyscf
    from pyscf import dft, gto

    from mlpot.label import LabellerSpec

    spec = LabellerSpec(kind="pyscf")
    mf = dft.RKS(gto.M(atom="H 0 0 0; H 0 0 0.74", basis="def2-svp", verbose=0))
    return {"pyscf": pyscf.__version__, "method": spec.method, "basis": spec.basis,
            "scf": "restricted Kohn-Sham (RKS)", "density_fitting": False,
            "grid_level": int(mf.grids.level), "grid_prune": getattr(mf.grids.prune, "__name__",
                                                                       str(mf.grids.prune)),
            "conv_tol_Ha": spec.conv_tol, "max_cycle": spec.max_cycle,
            "gradient": "analytic (mf.nuc_grad_method())",
            "rmd17": "ORCA PBE/def2-SVP, very tight SCF, very dense grid (rMD17 README)"}


def labeller_check(args, work: Path, rmd17, initial) -> dict:
    import ase.io
    import numpy as np

    from mlpot.label import LabellerSpec, label_file

    src = write_frames(rmd17, initial, work / "initial_rmd17.xyz")
    out = work / "initial_pyscf.xyz"
    record = work / "step1_timing.json"
    if not (out.exists() and record.exists()):
        log(f"step 1: labelling {len(initial)} rMD17 ethanol frames with PySCF PBE/def2-SVP "
            f"({args.workers} worker(s), OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')})")
        s = label_file(str(src), str(out), LabellerSpec(kind="pyscf", method="pbe",
                                                        basis="def2-svp"),
                       workers=args.workers, log=log)
        if s["failed"]:
            raise SystemExit(f"step 1: {s['failed']} frame(s) failed to label ({s['failed_file']})")
        done_now = s["labelled"] - s["reused"]
        write_json(record, {"seconds": s["seconds"], "labelled_in_this_run": done_now,
                            "reused": s["reused"], "workers": args.workers,
                            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")})
    timing = json.loads(record.read_text())
    labelled = ase.io.read(out, index=":")
    ref = {int(a.info["rmd17_frame"]): a for a in ase.io.read(src, index=":")}
    df, de = [], []
    for a in labelled:
        r = ref[int(a.info["rmd17_frame"])]
        df.append(a.arrays["REF_forces"] - r.arrays["REF_forces"])
        de.append(a.info["REF_energy"] - r.info["REF_energy"])
    df, de = np.concatenate(df), np.array(de)
    e_ref = np.array([ref[int(a.info["rmd17_frame"])].info["REF_energy"] for a in labelled])
    per_label = (timing["seconds"] / timing["labelled_in_this_run"]
                 if timing["labelled_in_this_run"] else None)
    return {
        "frames": len(labelled), "rmd17_frames": sorted(ref),
        "forces_mae_eV_per_A": float(np.abs(df).mean()),
        "forces_rmse_eV_per_A": float(np.sqrt((df ** 2).mean())),
        "forces_max_abs_diff_eV_per_A": float(np.abs(df).max()),
        "rmd17_forces_rms_eV_per_A": float(np.sqrt(np.mean(np.concatenate(
            [ref[int(a.info["rmd17_frame"])].arrays["REF_forces"] for a in labelled]) ** 2))),
        "energy_offset_mean_meV": float(de.mean() * 1e3),  # E_pyscf - E_rmd17, raw
        "energy_offset_std_meV": float(de.std() * 1e3),
        "energy_offset_spread_meV": float((de.max() - de.min()) * 1e3),
        "energy_offset_per_frame_meV": [round(float(x) * 1e3, 3) for x in de],
        "rmd17_energy_std_meV": float(e_ref.std() * 1e3),
        "seconds": round(timing["seconds"], 1),
        "seconds_per_label": None if per_label is None else round(per_label, 2),
        "workers": timing["workers"], "OMP_NUM_THREADS": timing["OMP_NUM_THREADS"],
        "settings": pyscf_settings(),
    }


# ----------------------------------------------------------------------------- step 2
def training_section(args, validation: Path, steps: int | None = None) -> dict:
    spec = MODELS[args.model]
    return {
        "model": spec["model"], "loss": spec["loss"], "optim": spec["optim"],
        "data": {"type_map": TYPE_MAP, "validation": str(validation)},
        "training": {"ensemble": args.members, "batch_size": args.batch_size,
                     "max_steps": steps or args.steps, "max_epochs": 1000000, "seed": 0,
                     "threads": args.threads},
    }


def learn_config(args, work: Path, validation: Path) -> dict:
    return {
        "learn_dir": str(work / "loop"),
        "data": str(work / "initial_pyscf.xyz"),
        "warm_start": True,
        "training": training_section(args, validation),
        "explore": {"structures": str(work / "starts.xyz"),
                    "temperatures": [float(t) for t in args.temperatures],
                    "steps": args.md_steps, "replicas": args.replicas,
                    "timestep": args.timestep, "friction": args.friction,
                    "collect_every": args.collect_every, "seed": args.seed, "device": "cpu"},
        "selection": {"lower": args.lower, "upper": args.upper,
                      "max_labels": args.per_iteration},
        "labeller": {"kind": "pyscf", "method": "pbe", "basis": "def2-svp",
                     "workers": args.workers},
        "stop": {"accurate_fraction": 0.99, "max_iterations": args.max_iterations,
                 "max_labels": args.max_labels, "max_wall_hours": None},
    }


def run_loop(args, work: Path, cfg: dict) -> float:
    """Run (or resume) `mlpot learn`; the wall seconds of this call."""
    import yaml

    path = work / "learn.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    started = work / "loop_started.json"
    if not started.exists():
        write_json(started, {"time": time.time()})
    launches = work / "loop_launches.txt"
    with open(launches, "a") as f:
        f.write(f"{time.time():.1f}\n")
    log(f"step 2: mlpot learn {path.name} (resumes from {cfg['learn_dir']}/state.json)")
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "mlpot.cli", "learn", str(path)], check=True)
    return time.time() - t0


def loop_table(work: Path, n_validation: int) -> tuple[list, dict]:
    """The loop's rows (state.json) with each iteration's phase times from the modification
    times of the files each phase writes last, and train_frames: the loop's labels column less
    the fixed validation frames, which it counts too."""
    import ase.io

    state = json.loads((work / "loop" / "state.json").read_text())
    t_prev = json.loads((work / "loop_started.json").read_text())["time"]
    rows = []
    for r in state["rows"]:
        d = work / "loop" / f"iter_{r['iteration']:03d}"
        marks = [d / "model.pt", d / "explored.xyz", d / "selected.xyz", d / "labelled.xyz"]
        times = {}
        if all(m.exists() for m in marks):
            t = [m.stat().st_mtime for m in marks]
            times = {"train_s": t[0] - t_prev, "explore_s": t[1] - t[0],
                     "select_s": t[2] - t[1], "label_s": t[3] - t[2], "iteration_s": t[3] - t_prev}
            times = {k: round(v, 1) for k, v in times.items()}
            t_prev = t[3]
        if r.get("labels_added"):
            times["label_s_per_label"] = round(times.get("label_s", 0.0) / r["labels_added"], 2)
        train_frames = {"train_frames": r["labels"] - n_validation} if "labels" in r else {}
        by_t = {}
        if (d / "selected.xyz").exists() and (d / "selected.xyz").stat().st_size > 0:
            for a in ase.io.read(d / "selected.xyz", index=":"):
                t = f"{a.info['temperature_K']:g}"
                by_t[t] = by_t.get(t, 0) + 1
        rows.append({**r, **train_frames, **times, "selected_by_temperature_K": by_t})
    return rows, state


# ----------------------------------------------------------------------------- step 3
def final_committee(args, work: Path, state) -> tuple[Path, int, float]:
    """Iteration n+1's training of the loop (all labels, warm start): (model.pt, frames in its
    training and validation sets as the loop counts them, seconds)."""
    from mlpot.learn import Learner, load_learn_config

    n = state["iteration"] + 1
    idir = work / "loop" / f"iter_{n:03d}"
    done = idir / "final_committee.json"
    if done.exists():
        rec = json.loads(done.read_text())
        return idir / "model.pt", rec["labels"], rec["seconds"]
    log(f"step 3: the final committee (iteration {n}'s training: all labels, warm start)")
    t0 = time.time()
    learner = Learner(load_learn_config(str(work / "learn.yaml")), log=log)
    scratch = {"rows": []}
    learner.train(n, scratch)
    row = scratch["rows"][n]
    seconds = time.time() - t0
    write_json(done, {"labels": row["labels"], "seconds": seconds})
    return idir / "model.pt", row["labels"], seconds


def train_cold(args, work: Path, name: str, files: list, validation: Path,
               steps: int | None = None) -> tuple[Path, float]:
    """`mlpot train` of the loop's training settings (with `steps` optimizer steps if given) on
    `files` from a fresh start."""
    import yaml

    out = work / name
    done = out / "done.json"
    if done.exists():
        return out / "best.pt", json.loads(done.read_text())["seconds"]
    cfg = training_section(args, validation, steps)
    cfg["data"]["train"] = [str(f) for f in files]
    cfg["training"]["out_dir"] = str(out)
    cfg["training"]["progress"] = False
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    cmd = [sys.executable, "-m", "mlpot.cli", "train", str(path)]
    if (out / "last.pt").exists():
        cmd.append("--resume")
    log(f"step 3: training {name} from scratch on {len(files)} file(s)")
    t0 = time.time()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    seconds = time.time() - t0
    write_json(done, {"seconds": seconds})
    return out / "best.pt", seconds


def evaluate(model_path: Path, test_file: Path) -> dict:
    """The committee mean on the test frames: forces and energies against rMD17's labels."""
    import numpy as np
    import torch

    from mlpot.data import AtomicDataset, read
    from mlpot.train.evaluate import load_model_for_eval
    from mlpot.train.metrics import MetricAccumulator

    model, type_map, cutoff = load_model_for_eval(str(model_path))
    frames = read(str(test_file), type_map=type_map)
    dataset = AtomicDataset(frames, type_map, cutoff, name=test_file.name)
    acc = MetricAccumulator()
    for batch in dataset.loader(20):
        acc.add(model(batch.as_dict(), compute_forces=True), batch)
    m = acc.result()
    de = (torch.cat(acc.e_pred) - torch.cat(acc.e_ref)).numpy() * 1e3  # meV per molecule
    frame_dev = torch.cat(acc.frame_dev).numpy() if acc.frame_dev else np.array([np.nan])
    return {
        "forces_mae_meV_per_A": round(m["forces_mae_meV_per_A"], 2),
        "forces_rmse_meV_per_A": round(m["forces_rmse_meV_per_A"], 2),
        "energy_mae_meV": round(float(np.abs(de).mean()), 2),
        "energy_mean_signed_error_meV": round(float(de.mean()), 2),
        "energy_mae_aligned_meV": round(float(np.abs(de - de.mean()).mean()), 2),
        "energy_rmse_aligned_meV": round(float(np.sqrt(((de - de.mean()) ** 2).mean())), 2),
        "mean_max_force_dev_eV_per_A": round(float(frame_dev.mean()), 4),
    }


def summary(values: list) -> dict:
    import numpy as np

    keys = values[0].keys()
    return {k: {"mean": round(float(np.mean([v[k] for v in values])), 2),
                "std": round(float(np.std([v[k] for v in values])), 2)} for k in keys}


# ----------------------------------------------------------------------------- main
def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--work", type=Path, default=HERE / "runs" / "learn_pyscf_ethanol",
                   help="folder for every intermediate file (default benchmarks/runs/"
                        "learn_pyscf_ethanol, which git ignores)")
    p.add_argument("--out", type=Path, default=HERE / "results" / "learn_pyscf_ethanol.json")
    p.add_argument("--threads", type=int, default=1,
                   help="OMP_NUM_THREADS and torch threads of everything (default 1)")
    p.add_argument("--workers", type=int, default=1, help="PySCF labelling processes (default 1)")
    p.add_argument("--seed", type=int, default=0, help="draws of the frames and the MD seed")
    p.add_argument("--initial", type=int, default=10, help="initial frames (default 10)")
    p.add_argument("--validation", type=int, default=20,
                   help="fixed validation frames from the pool, rMD17 labels (default 20)")
    p.add_argument("--model", choices=sorted(MODELS), default="egnn")
    p.add_argument("--members", type=int, default=4, help="committee size (default 4)")
    p.add_argument("--steps", type=int, default=800,
                   help="optimizer steps per training (training.max_steps; default 800)")
    p.add_argument("--batch-size", type=int, default=5)
    p.add_argument("--starts", type=int, default=3,
                   help="MD starting structures: the first of the initial frames (default 3)")
    p.add_argument("--temperatures", type=float, nargs="+", default=[300.0, 450.0, 600.0])
    p.add_argument("--replicas", type=int, default=2, help="per temperature and start")
    p.add_argument("--md-steps", type=int, default=1000, help="MD steps per run (default 1000)")
    p.add_argument("--timestep", type=float, default=0.5, help="fs (default 0.5)")
    p.add_argument("--friction", type=float, default=0.01, help="1/fs (default 0.01)")
    p.add_argument("--collect-every", type=int, default=10)
    p.add_argument("--lower", type=float, default=0.2,
                   help="eV/A (default 0.2; DP-GEN's 0.05 stalls here: module docstring)")
    p.add_argument("--upper", type=float, default=0.6,
                   help="eV/A (default 0.6; DP-GEN's 0.15 stalls here)")
    p.add_argument("--per-iteration", type=int, default=10, help="new labels per iteration")
    p.add_argument("--max-labels", type=int, default=40, help="labels the loop may add")
    p.add_argument("--max-iterations", type=int, default=8)
    p.add_argument("--extra-steps", type=int, default=3000,
                   help="also train the loop's data and the random draws from scratch with this "
                        "many steps (0: not)")
    p.add_argument("--random-seeds", type=int, default=2,
                   help="random draws of N rMD17 pool frames for the baseline (default 2)")
    add_shared_option(p)
    args = p.parse_args()
    for name in ("initial", "members", "steps", "starts", "replicas", "md_steps",
                 "per_iteration", "max_labels", "max_iterations", "random_seeds", "threads",
                 "workers"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be 1 or more")
    if args.starts > args.initial:
        p.error(f"--starts {args.starts} must not exceed --initial {args.initial}")
    shared_path(args.shared, "data", "rmd17", what="the rMD17 data")
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # PySCF, torch, the subprocesses
    import ase.io
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    try:
        from pyscf import lib
        lib.num_threads(args.threads)
    except ImportError:
        p.exit(2, f"{p.prog}: PySCF is missing: pip install 'mlpot[dft]'\n")
    t_all = time.time()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    rmd17_path, initial, validation, rest, test = choose_frames(args)
    rmd17 = ase.io.read(rmd17_path, index=":")
    val_file = write_frames(rmd17, validation, work / "validation_rmd17.xyz")
    test_file = write_frames(rmd17, test, work / "test_rmd17.xyz")

    # 1. the labeller
    check = labeller_check(args, work, rmd17, initial)
    log(f"step 1: PySCF vs rMD17 on {check['frames']} frames: forces MAE "
        f"{check['forces_mae_eV_per_A'] * 1e3:.2f} meV/A, max |dF| "
        f"{check['forces_max_abs_diff_eV_per_A'] * 1e3:.2f} meV/A; E_pyscf - E_rmd17 = "
        f"{check['energy_offset_mean_meV']:.2f} meV (std {check['energy_offset_std_meV']:.3f})"
        f"; {check['seconds_per_label']} s per label")
    starts = work / "starts.xyz"
    if not starts.exists():
        ase.io.write(starts, ase.io.read(work / "initial_pyscf.xyz", index=f":{args.starts}"),
                     format="extxyz")

    # 2. the loop
    cfg = learn_config(args, work, val_file)
    loop_wall = run_loop(args, work, cfg)
    rows, state = loop_table(work, len(validation))
    loop_files = [work / "initial_pyscf.xyz"] + [
        work / "loop" / f"iter_{r['iteration']:03d}" / "labelled.xyz" for r in rows
        if r.get("labels_added")]

    # 3. the comparison at equal N
    final_model, n_counted, final_s = final_committee(args, work, state)
    n_final = sum(len(ase.io.read(f, index=":")) for f in loop_files)
    if n_counted != n_final + len(validation):  # the loop counts the validation file too
        raise SystemExit(f"the final committee saw {n_counted} frames with validation, the "
                         f"loop's files hold {n_final} and the validation file {len(validation)}")
    cold_model, cold_s = train_cold(args, work, "loop_data_cold", loop_files, val_file)
    committees = {"loop_final": (final_model, final_s), "loop_data_cold": (cold_model, cold_s)}
    random_files = []
    for s in range(args.random_seeds):
        pick = sorted(int(k) for k in np.random.default_rng(1000 + s).choice(rest, n_final,
                                                                            replace=False))
        random_files.append(write_frames(rmd17, pick,
                                         work / f"random_rmd17_n{n_final}_seed{s}.xyz"))
        committees[f"random_rmd17_seed{s}"] = train_cold(args, work, f"random_rmd17_seed{s}",
                                                         [random_files[-1]], val_file)
    longer = {}  # the same data sets, trained longer: is the data or the training the limit?
    if args.extra_steps:
        e = args.extra_steps
        longer["loop_data_cold"] = train_cold(args, work, f"loop_data_cold_steps{e}", loop_files,
                                              val_file, e)
        for s, f in enumerate(random_files):
            longer[f"random_rmd17_seed{s}"] = train_cold(
                args, work, f"random_rmd17_seed{s}_steps{e}", [f], val_file, e)
    log("step 3: evaluating on the 200 rMD17 test frames")
    comparison = {name: {**evaluate(m, test_file), "train_wall_s": round(sec, 1)}
                  for name, (m, sec) in committees.items()}
    randoms = [v for k, v in comparison.items() if k.startswith("random")]
    keys = ("forces_mae_meV_per_A", "forces_rmse_meV_per_A", "energy_mae_aligned_meV")
    comparison["random_mean_std"] = summary([{k: v[k] for k in keys} for v in randoms])
    comparison_longer = {name: {**evaluate(m, test_file), "train_wall_s": round(sec, 1)}
                         for name, (m, sec) in longer.items()}
    if longer:
        comparison_longer["random_mean_std"] = summary(
            [{k: v[k] for k in keys} for name, v in comparison_longer.items()
             if name.startswith("random")])
    curve = []
    for r in rows:
        m = work / "loop" / f"iter_{r['iteration']:03d}" / "model.pt"
        if m.exists():
            curve.append({"iteration": r["iteration"], "train_frames": r.get("train_frames"),
                          **evaluate(m, test_file)})
    curve.append({"iteration": state["iteration"] + 1, "train_frames": n_final, "final": True,
                  **comparison["loop_final"]})

    result = {
        "what": "mlpot learn with the PySCF labeller on rMD17 ethanol (PBE/def2-SVP), against "
                "the same committee trained on as many random rMD17 pool frames",
        "data": {"rmd17_file": portable(rmd17_path, shared=args.shared),
                 "split": "benchmarks/_common.rmd17_split(shared, 'ethanol'): 800 pool, 200 test",
                 "initial_frames": initial, "validation_frames": validation,
                 "test_frames": len(test)},
        "labeller_check": check,
        "loop": {"config": portable(cfg, shared=args.shared, work=work),
                 "table": rows, "stopped": state.get("stopped"),
                 "labels_added": n_final - args.initial, "final_frames": n_final,
                 "loop_elapsed_s": round(state["elapsed_s"], 1),
                 "launches": len((work / "loop_launches.txt").read_text().split()),
                 "this_call_wall_s": round(loop_wall, 1)},
        "comparison": {"frames_each": n_final, "test": "200 rMD17 test frames, rMD17 (ORCA) labels",
                       "committees": comparison, "learning_curve_on_test": curve,
                       "longer_training": {"steps": args.extra_steps,
                                           "committees": comparison_longer} if longer else None,
                       "note": "loop committees learn PySCF labels (initial frames included), "
                               "random ones rMD17's; energy_mae_aligned removes each "
                               "committee's mean signed error on the test frames"},
        "settings": {k: (portable(str(v), shared=args.shared, work=work)
                         if isinstance(v, Path) else v) for k, v in vars(args).items()},
        # step 1's labelling + the loop (summed over its runs) + the step 3 trainings
        "wall_s_total": round(check["seconds"] + state["elapsed_s"]
                              + sum(sec for _, sec in committees.values())
                              + sum(sec for _, sec in longer.values()), 1),
        "wall_s_this_call": round(time.time() - t_all, 1),
        "command": command_line(shared=args.shared, work=work),
        "machine": machine_info(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    write_json(args.out, result)
    shown = list(comparison.items()) + [(f"{k} ({args.extra_steps} steps)", v)
                                        for k, v in comparison_longer.items()]
    for name, v in shown:
        if not name.startswith("random_mean_std"):
            log(f"{name:22s} F MAE {v['forces_mae_meV_per_A']:7.1f} RMSE "
                f"{v['forces_rmse_meV_per_A']:7.1f} meV/A  E MAE aligned "
                f"{v['energy_mae_aligned_meV']:6.1f} meV (raw {v['energy_mae_meV']:.1f})")
    log(f"wrote {portable(args.out)}")


if __name__ == "__main__":
    main()
