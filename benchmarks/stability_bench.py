"""Stability of trained mlpot models in MD, by the one definition of ``integrators.stability``.

For each case (a trained model on a starting structure), two measures:

  NVE drift      velocity Verlet for --ps (default 10) ps at --timestep (default 0.5) fs from
                 Maxwell-Boltzmann velocities at 300 K; the absolute slope of a least-squares
                 line through the conserved energy (kinetic + potential) per atom after a 1 ps
                 warm-up, meV/atom/ps (``integrators.nve_drift``). Target: below 0.1.
  NVT survival   --replicas (default 5) independent Langevin runs (BAOAB, friction 0.01/fs;
                 different velocity seeds and noise) of --ps ps (or --nvt-ps), batched in one
                 ``integrators`` run, at each temperature of the case; the fraction that finish
                 without a blow-up: an atom's force above 50 eV/A (or non-finite), two atoms
                 closer than 0.5 A, or, in molecules and water, a bond of the starting
                 structure (pairs within 1.2 x the sum of covalent radii) longer than 2 A
                 (``integrators.BlowupRule``). Target: no blow-up at 300 K.

Cases (label: model run folder under --models; starting structure; temperatures):

  3bpa_dp       3bpa_dp_se_e2_a   3BPA, <shared>/data/3bpa/test_300K.xyz frame 0     300, 600 K
  3bpa_nequip   3bpa_nequip       the same                                          300, 600 K
  water_dp      water_dp_se_e2_a  64 H2O, <shared>/data/deepmd_water/water_train.xyz
                                  frame 0 (train_bench's water data)                300, 600 K
  si            mlearn_si         Si, the first 300 K AIMD frame (64 atoms) of
                                  <shared>/data/zuo2020_mlearn/Si_train.xyz        300 K and
                                  --si-hot (default 843 K)

The mlearn Si AIMD-NVT frames were run at 300, 843, 1518, 2530 and 3374 K (18 frames of 64
atoms each; the ``description`` of each frame names its temperature); --si-hot must be one of
them. ``nequip`` on water is left out (192 atoms: too slow for many picoseconds here).

Models: ``train_bench.py`` writes its run folders under benchmarks/runs (``--models``), e.g.
benchmarks/runs/3bpa_dp_se_e2_a/best.pt; a checkpoint is exported once (``mlpot.export``) into
--work. ``--model CASE=PATH`` gives a case its model (an exported model, a checkpoint or a run
folder), e.g. for Si, for which no benchmark trains a model yet. A case without a model is
skipped with a line saying how to get one.

Variants (e.g. the same models with the ZBL repulsion prior): ``--tag zbl`` runs every case
as ``<case>_zbl`` (model run folders ``<run>_zbl`` under --models unless --model names them),
so that ``3bpa_dp`` and ``3bpa_dp_zbl`` stand side by side in the results.

``--add-repulsion zbl`` (with ``--tag zbl``) instead adds the prior to each case's own trained
model (``mlpot.models.with_repulsion``), after checking that the prior is zero on every frame of
that model's training data: training with the prior would then have given the very same weights
and reference energies (tests/test_zbl.py checks this), so no second training run is needed.

Resumable: each part of a case (the NVE run, each NVT temperature) is written to
``<work>/<label>.json`` when it ends; a rerun with the same settings and model keeps the parts
done and skips finished cases. Each NVT entry records its length (``ps``): a rerun with a
longer ``--nvt-ps`` (or none: ``--ps``) redoes the NVT runs only, and ``--cold-only`` runs the
NVT at 300 K only, so that the hot runs of a slow model can follow in a later run, or in a
second process at the same time with ``--hot-only`` (the hot NVT alone, no NVE; give it its own
``--work``). Results: benchmarks/results/stability.json (``--out``), one entry per label, with
the date, machine and command of the run that wrote it (``run``); a label's parts from an earlier
run of the same model and settings are kept beside the new ones (and that run's record under
``run.earlier_parts``).

    python benchmarks/stability_bench.py                          # every case with a model
    python benchmarks/stability_bench.py --cases 3bpa_dp --ps 0.2 --replicas 2 --out /tmp/s.json
    python benchmarks/stability_bench.py --cases si --model si=runs/si/best.pt
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Optional

from mlpot.files import sha256
from _common import (add_shared_option, command_line, fail, machine_info, portable, shared_path,
                     write_json)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SI_AIMD_DEFAULT_K = 843.0
NVE_TEMPERATURE_K = 300.0
TARGET_DRIFT = 0.1  # meV/atom/ps

# label: (run folder of train_bench, system, temperatures (the second of Si is --si-hot),
#         how to get the model)
CASES = {
    "3bpa_dp": ("3bpa_dp_se_e2_a", "3bpa", (300.0, 600.0),
                "run `python benchmarks/train_bench.py 3bpa dp_se_e2_a` first"),
    "3bpa_nequip": ("3bpa_nequip", "3bpa", (300.0, 600.0),
                    "run `python benchmarks/train_bench.py 3bpa nequip` first"),
    "water_dp": ("water_dp_se_e2_a", "water", (300.0, 600.0),
                 "run `python benchmarks/train_bench.py water dp_se_e2_a` first"),
    "si": ("mlearn_si", "si", (300.0, None),
           "train one on <shared>/data/zuo2020_mlearn/Si_train.xyz (`mlpot train`) and pass "
           "--model si=PATH"),
}


# ------------------------------------------------------------------ starting structures
def aimd_temperatures(frames) -> list:
    """The temperatures (K) of the AIMD-NVT frames of an mlearn file, from their description
    ("... AIMD NVT simulation for normal structure at 843 K")."""
    import re

    temps = set()
    for a in frames:
        if a.info.get("config_type") == "AIMD-NVT":
            m = re.search(r"at\s+([0-9.]+)\s*K", str(a.info.get("description", "")))
            if m:
                temps.add(float(m.group(1)))
    return sorted(temps)


def structure(system: str, shared: Path, si_hot: float):
    """(ase.Atoms, description, molecular) of a case's starting structure."""
    from ase.io import read

    if system == "3bpa":
        path = shared_path(shared, "data", "3bpa", "test_300K.xyz", what="the 3BPA test file")
        return read(path, index=0), "3BPA, test_300K.xyz frame 0", True
    if system == "water":
        path = shared_path(shared, "data", "deepmd_water", "water_train.xyz",
                           what="the DeePMD water file")
        return read(path, index=0), "64 H2O, deepmd_water/water_train.xyz frame 0", True
    path = shared_path(shared, "data", "zuo2020_mlearn", "Si_train.xyz",
                       what="the mlearn Si file")
    frames = read(path, index=":")
    temps = aimd_temperatures(frames)
    if si_hot not in temps:
        fail(f"--si-hot {si_hot:g} K is not a temperature of the Si AIMD frames "
             f"({', '.join(f'{t:g}' for t in temps)} K); pick one of those")
    for k, a in enumerate(frames):
        if a.info.get("config_type") == "AIMD-NVT" and \
                aimd_temperatures([a]) == [NVE_TEMPERATURE_K]:
            return a, f"Si, Si_train.xyz frame {k} (AIMD at 300 K)", False
    fail(f"{path} has no AIMD-NVT frame at 300 K to start from")


# ------------------------------------------------------------------ models


def find_model(label: str, case: str, args):
    """(path of an exported model or a checkpoint, None) or (None, why there is none)."""
    run, _, _, how = CASES[case]
    given = args.model.get(case) or args.model.get(label)
    if given is not None:
        path = Path(given)
        if path.is_dir():
            path = path / "best.pt"
        if not path.is_file():
            fail(f"--model {case}={given}: no such model file (give an exported model, a "
                 "checkpoint or a run folder holding best.pt)")
        return path, None
    tagged = args.tag and not args.add_repulsion  # an added prior: the case's own model
    folder = Path(args.models) / (run + (f"_{args.tag}" if tagged else ""))
    for name in ("model.pt", "best.pt"):
        if (folder / name).is_file():
            return folder / name, None
    return None, f"no model: {how} (looked for {portable(folder / 'best.pt')})"


def exported(path: Path, label: str, work: Path) -> Path:
    """An exported model: ``path`` itself, or the checkpoint exported once into ``work``."""
    from mlpot.checkpoint import file_kind

    kind = file_kind(str(path))
    if kind == "torchscript":
        return path
    if kind != "checkpoint":
        fail(f"{path} is neither an exported mlpot model nor a training checkpoint")
    from mlpot.export import export

    def write(out: Path) -> None:
        print(f"{label}: exporting {portable(path)} -> {portable(out)}", flush=True)
        export(str(path), str(out))

    return export_once(label, work, sha256(path), write)


def export_once(label: str, work: Path, digest: str, write) -> Path:
    """``<work>/<label>_model.pt``, made by ``write(path)`` unless the file is there with the
    same ``digest`` (of what it was made from) in ``<label>_model.sha256`` beside it."""
    out = work / f"{label}_model.pt"
    stamp = work / f"{label}_model.sha256"
    if not out.is_file() or not stamp.is_file() or stamp.read_text().strip() != digest:
        work.mkdir(parents=True, exist_ok=True)
        write(out)
        stamp.write_text(digest + "\n")
    return out


def with_prior(path: Path, label: str, repulsion: str, work: Path) -> Path:
    """The checkpoint ``path`` with the prior added, exported once into ``work``; fails unless
    the prior is zero on every frame of the model's training data (then training with it would
    have given the same model)."""
    from mlpot.checkpoint import file_kind

    if file_kind(str(path)) != "checkpoint":
        fail(f"--add-repulsion needs the training checkpoint of {label}'s model, not {path}")
    return export_once(label, work, sha256(path) + f" +{repulsion}",
                       lambda out: _export_with_prior(path, label, repulsion, out))


def _export_with_prior(path: Path, label: str, repulsion: str, out: Path) -> None:
    from mlpot.checkpoint import model_from_checkpoint, read_checkpoint
    from mlpot.data import read
    from mlpot.export import export
    from mlpot.models import with_repulsion

    ckpt = read_checkpoint(str(path))
    model = with_repulsion(model_from_checkpoint(ckpt), repulsion)
    data = ckpt.get("train_config", {}).get("data", {})
    train = data.get("train")
    paths = [train] if isinstance(train, str) else list(train or [])
    if not paths or not all(os.path.exists(p) for p in paths):
        fail(f"{path}: its training data ({paths}) is not here, so the prior cannot be checked "
             "to be zero on it; train a model with `model.repulsion` instead")
    largest = 0.0
    for p in paths:
        frames = read(p, format=data.get("format"), type_map=model.type_map)
        largest = max([largest] + [abs(e) for e in model.prior_energies(frames)])
    if largest != 0.0:
        fail(f"{label}: the {repulsion} prior is not zero on the training data (up to "
             f"{largest:.3g} eV in a frame), so adding it changes the model; train one with "
             f"`model.repulsion: {repulsion}` and pass it with --model")
    print(f"{label}: {repulsion} prior added to {portable(path)} (zero on all its training "
          f"frames) -> {portable(out)}", flush=True)
    export(model, str(out), training_data_hash=ckpt.get("data_hash"),
           metadata={"repulsion_added_to": portable(path)})


# ------------------------------------------------------------------ one case
def settings_of(args) -> dict:
    """The settings a case's record must match to be resumed. The NVT length is not among them:
    each temperature's entry records its own ``ps`` (``nvt_entry_ps``), so a case run with
    ``--nvt-ps 2`` can be extended to 10 ps without redoing its NVE run."""
    return {"ps": args.ps, "timestep_fs": args.timestep, "replicas": args.replicas,
            "nve_replicas": args.nve_replicas, "nve_temperature_K": NVE_TEMPERATURE_K,
            "warmup_ps": args.warmup_ps, "thermostat": "langevin",
            "friction_per_fs": args.friction, "check_every": args.check_every,
            "seed": args.seed, "device": args.device, "threads": args.threads}


def nvt_entry_ps(entry: dict, timestep_fs: float) -> float:
    """The length (ps) an NVT entry was run for (older records: from its steps)."""
    return float(entry.get("ps", entry["steps"] * timestep_fs / 1000.0))


def outcome_json(run) -> dict:
    blown = [{"replica": o.replica, "time_ps": o.time_ps, "kind": o.kind, "reason": o.reason}
             for o in run.outcomes if not o.survived]
    kinds = {}
    for b in blown:
        kinds[b["kind"]] = kinds.get(b["kind"], 0) + 1
    return {"replicas": len(run.outcomes), "survived": run.survived,
            "survived_fraction": round(run.survived_fraction, 4), "blowup_kinds": kinds,
            "blowups": blown, "steps": run.steps, "steps_done": run.steps_done,
            "wall_s": round(run.wall_s, 1), "steps_per_s": round(run.steps_per_s, 2),
            "replica_steps_per_s": round(run.steps_per_s * len(run.outcomes), 2),
            # the machine's 1-minute load average at the end: steps/s on a busy machine is lower
            "load_average": round(os.getloadavg()[0], 2)}


def progress_printer(label: str, what: str):
    state = {"t0": time.perf_counter(), "next": 0.1}

    def report(step: int, total: int, alive: int) -> None:
        if step / total + 1e-12 < state["next"] and step != total:
            return
        state["next"] = step / total + 0.1
        el = time.perf_counter() - state["t0"]
        eta = el / step * (total - step)
        print(f"  {label} {what}: step {step}/{total} ({step / el:.1f} steps/s, {alive} "
              f"replica(s) running, {eta / 60:.1f} min left)", flush=True)

    return report


def run_case(label: str, case: str, args) -> dict:
    import torch

    import integrators as I
    from mlpot.errors import UserError
    from mlpot.export import load

    _, system, temps, _ = CASES[case]
    temps = [t if t is not None else args.si_hot for t in temps]
    model_path, why = find_model(label, case, args)
    if model_path is None:
        print(f"{label}: skipped, {why}", flush=True)
        return {"label": label, "case": case, "done": False, "skipped": why}
    atoms, described, molecular = structure(system, args.shared, args.si_hot)
    work = Path(args.work)
    model_file = with_prior(model_path, label, args.add_repulsion, work) if args.add_repulsion \
        else exported(model_path, label, work)
    digest = sha256(model_file)
    settings = settings_of(args)
    part_file = work / f"{label}.json"
    record = json.loads(part_file.read_text()) if part_file.is_file() else {}
    if record.get("settings") != settings or record.get("model_sha256") != digest:
        if record:
            print(f"{label}: the settings or the model changed since {portable(part_file)}; "
                  "starting the case again", flush=True)
        record = {}
    record.update({
        "label": label, "case": case, "tag": args.tag, "system": described,
        "n_atoms": len(atoms), "temperatures_K": temps,
        "model": portable(model_path, shared=args.shared, models=args.models),
        "model_sha256": digest, "source_sha256": sha256(model_path), "settings": settings,
        "rule": {"max_force_eV_per_A": I.stability.DEFAULT_MAX_FORCE_EV_PER_A,
                 "min_distance_A": I.stability.DEFAULT_MIN_DISTANCE_A,
                 "max_bond_A": I.stability.DEFAULT_MAX_BOND_A if molecular else None,
                 "bond_factor": I.stability.DEFAULT_BOND_FACTOR if molecular else None}})
    record.setdefault("nvt", {})
    nvt_ps = args.ps if args.nvt_ps is None else args.nvt_ps
    wanted = temps[:1] if args.cold_only else temps[1:] if args.hot_only else temps
    with_nve = not args.hot_only

    def have(t: float) -> bool:
        entry = record["nvt"].get(f"{t:g}")
        return entry is not None and math.isclose(nvt_entry_ps(entry, args.timestep), nvt_ps)

    if record.get("done") and ("nve" in record or not with_nve) and all(have(t) for t in wanted):
        print(f"{label}: done before ({portable(part_file)}), kept", flush=True)
        return record
    try:
        model = load(str(model_file), device=args.device)
        types = model.atom_types(atoms.numbers, where=described)
    except UserError as err:
        fail(f"{label}: {err}")
    forces = I.MLPotForces(model, types, pbc=tuple(atoms.pbc), atomic_numbers=atoms.numbers)
    state = I.state_from_ase(atoms, device=args.device, dtype=model.dtype)
    rule = I.BlowupRule.for_structure(atoms, molecular=molecular)
    config = model.metadata.get("config") or {}
    record["model_info"] = {"name": config.get("model"), "dtype": model.metadata.get("dtype"),
                            "cutoff_A": model.cutoff, "committee": model.committee,
                            "repulsion": model.metadata.get("repulsion")}
    record["n_bonds"] = 0 if rule.bonds is None else int(rule.bonds.shape[0])
    print(f"{label}: {described}, {len(atoms)} atoms, model {portable(model_path)}", flush=True)

    def save():
        write_json(part_file, record)

    torch.set_num_threads(args.threads)
    try:
        if with_nve and "nve" not in record:
            r = I.run_nve(forces, state, NVE_TEMPERATURE_K, args.ps, args.timestep, rule,
                          replicas=args.nve_replicas, warmup_ps=args.warmup_ps,
                          check_every=args.check_every, seed=args.seed,
                          progress=progress_printer(label, "NVE"))
            drift = [None if d is None else round(d, 5) for d in r.drift_meV_per_atom_ps]
            ok = [d for d in drift if d is not None]
            record["nve"] = {"temperature_K": NVE_TEMPERATURE_K, **outcome_json(r),
                             "drift_meV_per_atom_ps": drift,
                             "drift_max_meV_per_atom_ps": max(ok) if ok else None,
                             "conserved_span_meV_per_atom": [
                                 None if d is None else round(float(
                                     (r.conserved_eV[:, k].max() - r.conserved_eV[:, k].min())
                                     / r.n_atoms * 1000.0), 4)
                                 for k, d in enumerate(drift)]}
            save()
            print(f"{label}: NVE drift {drift} meV/atom/ps", flush=True)
        for t in wanted:
            key = f"{t:g}"
            if have(t):
                continue
            r = I.run_nvt(forces, state, t, nvt_ps, args.timestep, rule,
                          replicas=args.replicas, friction_per_fs=args.friction,
                          check_every=args.check_every, seed=args.seed,
                          progress=progress_printer(label, f"NVT {key} K"))
            record["nvt"][key] = {"temperature_K": t, "ps": nvt_ps, **outcome_json(r)}
            save()
            print(f"{label}: NVT {key} K: {r.survived}/{len(r.outcomes)} survived "
                  f"{nvt_ps:g} ps", flush=True)
    except UserError as err:
        fail(f"{label}: {err}")
    record["targets"] = targets_of(record)
    record["done"] = True
    save()
    return record


def targets_of(record: dict) -> dict:
    """The targets a record meets, from the parts it holds (None: that part was not run)."""
    nve = record.get("nve")
    cold = record["nvt"].get(f"{record['temperatures_K'][0]:g}")
    return {
        "no_blowup_at_300K": None if cold is None
        else cold.get("survived") == cold.get("replicas"),
        f"nve_drift_below_{TARGET_DRIFT:g}": None if nve is None
        else nve["drift_max_meV_per_atom_ps"] is not None
        and nve["survived"] == nve["replicas"]
        and nve["drift_max_meV_per_atom_ps"] < TARGET_DRIFT}


def merge_record(old: Optional[dict], new: dict) -> dict:
    """A case's record in the results file after a run: parts (NVE, each NVT temperature) of
    an earlier record of the same model and settings are kept beside the new ones, so that a
    ``--cold-only`` and a ``--hot-only`` run of a case in two processes add up. The same model
    is the same source file (checkpoint or exported model), which each process exports itself
    (exports of one checkpoint are identical since mlpot wrote them reproducibly; results written
    before then hold exports of differing bytes)."""
    def source(record):
        return record.get("source_sha256") or record.get("model_sha256")

    if not old or source(old) != source(new) or old.get("settings") != new.get("settings"):
        return new
    merged = {**old, **new, "nvt": {**old.get("nvt", {}), **new["nvt"]}}
    if old.get("run") and new.get("run") and old["run"] != new["run"]:
        # the run that wrote the parts kept from before (with its own earlier parts, if any)
        merged["run"] = {**new["run"], "earlier_parts": old["run"]}
    if "nve" not in new and "nve" in old:
        merged["nve"] = old["nve"]
    merged["targets"] = targets_of(merged)
    return merged


# ------------------------------------------------------------------ main
def parse_models(values) -> dict:
    out = {}
    for v in values or []:
        case, sep, path = v.partition("=")
        if not sep or not path:
            fail(f"--model {v}: give CASE=PATH (cases: {', '.join(CASES)})")
        if case not in CASES:
            fail(f"--model {v}: unknown case {case!r} (cases: {', '.join(CASES)})")
        out[case] = path
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cases", default=",".join(CASES),
                   help=f"comma-separated cases (default all: {','.join(CASES)})")
    p.add_argument("--models", default=str(HERE / "runs"),
                   help="folder of train_bench's run folders (default benchmarks/runs)")
    p.add_argument("--model", action="append", metavar="CASE=PATH",
                   help="the model of a case: an exported model, a checkpoint or a run folder "
                        "(repeatable)")
    p.add_argument("--tag", default="",
                   help="a variant's name: results under <case>_<tag>, model folders <run>_<tag>")
    p.add_argument("--add-repulsion", choices=["zbl"], default=None,
                   help="add this prior to each case's own trained model (with --tag; checked "
                        "to be zero on its training data)")
    p.add_argument("--ps", type=float, default=10.0, help="length of each run, ps (default 10)")
    p.add_argument("--nvt-ps", type=float, default=None,
                   help="length of the NVT runs when shorter than --ps (default: --ps), for "
                        "models too slow for 5 replicas x 10 ps here")
    p.add_argument("--hot-only", action="store_true",
                   help="NVT at the case's hot temperature only, no NVE: beside a --cold-only run "
                        "of the same case in another process (--work elsewhere); both merge "
                        "into --out")
    p.add_argument("--cold-only", action="store_true",
                   help="NVT at the case's first temperature only (300 K, the target's); a later "
                        "run without it adds the hot one")
    p.add_argument("--timestep", type=float, default=0.5, help="fs (default 0.5)")
    p.add_argument("--replicas", type=int, default=5, help="NVT replicas (default 5)")
    p.add_argument("--nve-replicas", type=int, default=1, help="NVE replicas (default 1)")
    p.add_argument("--warmup-ps", type=float, default=1.0,
                   help="NVE time left out of the drift fit (default 1 ps)")
    p.add_argument("--friction", type=float, default=0.01, help="Langevin friction, 1/fs")
    p.add_argument("--check-every", type=int, default=10,
                   help="steps between distance and bond checks (forces: every step)")
    p.add_argument("--si-hot", type=float, default=SI_AIMD_DEFAULT_K,
                   help="Si's second temperature, one of its AIMD temperatures (default 843 K)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--work", default=str(HERE / "runs" / "stability"),
                   help="per-case records and exported models (default benchmarks/runs/"
                        "stability, which git ignores)")
    p.add_argument("--out", default=str(HERE / "results" / "stability.json"),
                   help="results file (default benchmarks/results/stability.json)")
    add_shared_option(p)
    args = p.parse_args()
    args.model = parse_models(args.model)
    if args.tag and not args.tag.replace("_", "").isalnum():
        fail(f"--tag {args.tag!r}: use letters, digits and underscores")
    if args.add_repulsion and not args.tag:
        fail("--add-repulsion needs a --tag (e.g. --tag zbl) so its results stand beside the "
             "model's own")
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown or not cases:
        fail(f"--cases: unknown case(s) {', '.join(unknown) or '(none given)'}; the cases are "
             f"{', '.join(CASES)}")
    if args.nvt_ps is not None and not args.nvt_ps > 0:
        fail("--nvt-ps must be > 0")
    if not args.ps > 0 or not args.timestep > 0 or args.replicas < 1 or args.nve_replicas < 1:
        fail("--ps and --timestep must be > 0, --replicas and --nve-replicas >= 1")
    if not 0 <= args.warmup_ps < args.ps:
        fail(f"--warmup-ps {args.warmup_ps:g} must be >= 0 and shorter than --ps {args.ps:g}")
    shared_path(args.shared, "data", what="the shared data folder")
    if args.cold_only and args.hot_only:
        fail("--cold-only and --hot-only together run nothing; give one of them")
    out = Path(args.out)
    for case in cases:
        label = case + (f"_{args.tag}" if args.tag else "")
        record = run_case(label, case, args)
        # read again: a run of another part of this case may have written it meanwhile
        results = json.loads(out.read_text()) if out.is_file() else {}
        results.setdefault("cases", {})
        run = {"date": time.strftime("%Y-%m-%d", time.gmtime()), "machine": machine_info(),
               "command": command_line(shared=args.shared)}
        if record.get("done"):
            results["cases"][label] = merge_record(results["cases"].get(label),
                                                   {**record, "run": run})
        results.update({
            "definition": "integrators.stability (see benchmarks/stability_bench.py): NVE drift "
                          "= |slope| of the conserved energy per atom after the warm-up, "
                          "meV/atom/ps; NVT survival = fraction of replicas with no force > 50 "
                          "eV/A, no atoms closer than 0.5 A, no starting bond longer than 2 A "
                          "(molecules and water)",
            "command": run["command"], "machine": run["machine"], "date": run["date"]})
        write_json(out, results)
    print(f"results: {portable(out)}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
