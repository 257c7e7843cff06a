"""``mlpot distill CONFIG.yaml``: train a student potential on a teacher's labels.

Two modes, one code path (stages in this order, each skipped when already done):

``mode: ensemble`` (energy-only data, after Matin et al., arXiv 2503.14293)
    1. **teacher**: a committee (``teacher.training.ensemble``, default 4) trained on the
       reference energies alone (the teacher's force and stress loss weights are 0), in
       ``OUT/teacher/``, exported to ``OUT/teacher.pt``;
    2. **label**: every training structure labelled by the committee (``mlpot label`` with the
       model labeller and the key prefix ``TEACHER_``): ``TEACHER_energy``, ``TEACHER_forces``
       (the members' mean) and ``TEACHER_forces_dev`` (per atom, DeePMD's definition);
    3. **student**: trained on the reference energies plus the teacher's forces, each
       structure's force weight lowered where the teachers disagree
       (``weights.force_weighting``):

           inverse_variance:  w_s = clip( (median_s d_s / d_s)^2, min_force_weight, 1 ),
                              d_s = sqrt( mean_i TEACHER_forces_dev_i^2 ) over s's atoms

       so a structure whose teachers disagree more than the typical one counts in proportion
       to the inverse of its disagreement's variance, and none counts more than 1
       (``none``: every weight 1).

``mode: teacher`` (a fast student from a slow teacher)
    1. **teacher**: ``teacher.model``, an exported mlpot file (a committee gives
       ``TEACHER_forces_dev`` too);
    2. **sample**: extra structures from the teacher's own MD (``integrators``, Langevin at
       ``sample.temperatures``, ``sample.replicas`` replicas from each of ``sample.starts``
       training structures evenly spaced through the data, a frame every ``collect_every``
       steps) and ``sample.perturb_copies`` copies of each training structure with Gaussian
       displacements of ``sample.perturb_sigma`` A, and the structures of the files
       ``sample.structures`` (any format ASE reads; their own labels are ignored: the
       user's MD snapshots, or another run's ``samples.xyz``); a sample with atoms closer than
       ``data.min_distance`` (default 0.5 A, which the student's reader refuses: MD gone
       wrong) is dropped and counted (``samples_dropped`` in ``state.json``);
    3. **label**: the training structures and the samples labelled by the teacher (``TEACHER_``);
    4. **student**: trained on the teacher's energies and forces of every structure plus, where
       the data has them, the reference labels of the training structures with the weight
       ``weights.reference`` against 1 for a teacher label (0 leaves them out). The teacher's
       frames also carry its atomic energies (``DISTILL_atomic_energies``, N labels per
       structure where the energy is one); the student learns them with the weight
       ``student.loss.atomic_energies`` (0, the default, ignores them). A structure's
       teacher and reference frames (and its perturbed copies) carry one
       ``distill_structure`` value, the student's ``data.copy_key``, so they land in the same
       part of the validation (and test) split: no validation frame has a twin in training.

Every stage's output is an ordinary file: ``OUT/teacher_labels.xyz`` (extxyz, the ``TEACHER_``
labels beside the reference ``REF_`` ones; train on it with ``mlpot train``), the student's
data ``OUT/student_data.xyz`` (keys ``DISTILL_energy``, ``DISTILL_forces`` and the per-frame
loss weights ``DISTILL_energy_weight``, ``DISTILL_forces_weight``), and the student's run
``OUT/student/`` (``best.pt`` for ``mlpot export``). ``OUT/state.json`` records the finished
stages and the config; the same command after a kill resumes: a finished stage is not redone,
teacher and student training continue from their ``last.pt``, labelling from its progress file.
A changed config is refused (one line) rather than mixed with the old run.

Checks before any work (one line, exit code 2): the mode's required sections, a teacher whose
elements do not cover the data, energy-only data in ``mode: teacher`` without a teacher file
(there is nothing to take forces from), the student's and teacher's training configs. A student
cutoff below the teacher's is a warning (the student cannot see all that the teacher uses).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List

import numpy as np

from .files import atomic_write, resolve_path
from .train.config import ConfigError, _spec, dataclass_from_dict
from .train.trainer import ENERGY_ONLY_BATCH

STAGES = ("teacher", "sample", "label", "student_data", "student")
# mode teacher: a training structure is in the student's data twice (teacher and reference
# labels); this info key names the structure so that both land in the same part of the split
STRUCTURE_KEY = "distill_structure"


class DistillConfigError(ConfigError):
    """Bad input to ``mlpot distill`` (exit code 2), found before any work starts."""


@dataclass
class SampleConfig:
    temperatures: List[float] = field(default_factory=lambda: [300.0])  # K
    steps: int = _spec(0, ge=0)                  # MD steps per run (0: no MD samples)
    starts: int = _spec(4, ge=1)                 # training structures the runs start from
    replicas: int = _spec(2, ge=1)               # per start and temperature
    timestep: float = _spec(0.5, gt=0.0)         # fs
    friction: float = _spec(0.01, gt=0.0)        # 1/fs
    collect_every: int = _spec(20, ge=1)         # steps between samples
    perturb_copies: int = _spec(0, ge=0)         # displaced copies per training structure
    perturb_sigma: float = _spec(0.05, gt=0.0)   # A
    structures: List[str] = field(default_factory=list)  # files of more structures to label
    seed: int = _spec(0, ge=0)
    device: str = "cpu"


@dataclass
class WeightsConfig:
    reference: float = _spec(1.0, ge=0.0)        # teacher mode: reference labels vs teacher's
    force_weighting: str = _spec("inverse_variance", choices=["inverse_variance", "none"])
    min_force_weight: float = _spec(0.05, gt=0.0)  # <= 1


@dataclass
class HessianConfig:
    # Hessian distillation (mlpot.hessian): the teacher also labels the Hessian rows of this
    # many atoms of every frame it labels (0: none, -1: all) by central differences of its
    # forces (6 calls per atom); the student learns them with student.loss.hessian
    atoms: int = _spec(0, ge=-1)
    delta: float = _spec(0.01, gt=0.0)          # A
    seed: int = _spec(0, ge=0)                   # which atoms: drawn per frame from this seed


@dataclass
class DistillConfig:
    mode: str = _spec("ensemble", choices=["ensemble", "teacher"])
    out_dir: str = "mlpot-distill"
    data: Dict[str, Any] = field(default_factory=dict)      # `mlpot train`'s data section
    teacher: Dict[str, Any] = field(default_factory=dict)   # ensemble: a train config; teacher: model
    student: Dict[str, Any] = field(default_factory=dict)   # a train config without data
    sample: SampleConfig = field(default_factory=SampleConfig)
    weights: WeightsConfig = field(default_factory=WeightsConfig)
    hessian: HessianConfig = field(default_factory=HessianConfig)


_SECTIONS = {"sample": SampleConfig, "weights": WeightsConfig, "hessian": HessianConfig}


def _fill(cls, raw: Any, where: str):
    return dataclass_from_dict(cls, raw, where, DistillConfigError, _SECTIONS if cls is DistillConfig else None)


def distill_config_from_dict(raw: Dict[str, Any], where: str = "config",
                             base_dir: str = ".") -> DistillConfig:
    """A checked DistillConfig; relative paths are relative to ``base_dir``."""
    if not isinstance(raw, dict):
        raise DistillConfigError(f"{where}: expected a mapping with keys mode, out_dir, data, "
                                 "teacher, student, sample, weights")
    sample = raw.get("sample")
    if isinstance(sample, dict) and isinstance(sample.get("structures"), str):
        raw = {**raw, "sample": {**sample, "structures": [sample["structures"]]}}
    cfg = _fill(DistillConfig, raw, where)

    def rel(p):
        return resolve_path(p, base_dir)

    cfg.out_dir = rel(cfg.out_dir)
    data = dict(cfg.data)
    if not data.get("train"):
        raise DistillConfigError(f"{where}: data.train is required: the training structures "
                                 "with their reference labels")
    for key in ("train", "validation", "test"):
        if data.get(key):
            data[key] = [rel(p) for p in data[key]] if isinstance(data[key], list) \
                else rel(data[key])
    cfg.data = data
    if cfg.weights.min_force_weight > 1:
        raise DistillConfigError(f"{where}: weights.min_force_weight = "
                                 f"{cfg.weights.min_force_weight:g}: must be in (0, 1]")
    if cfg.mode == "teacher":
        model = cfg.teacher.get("model")
        if set(cfg.teacher) - {"model"}:
            raise DistillConfigError(f"{where}: mode teacher: teacher takes only 'model' (an "
                                     "exported mlpot file), not "
                                     f"{sorted(set(cfg.teacher) - {'model'})}")
        if not model:
            raise DistillConfigError(
                f"{where}: mode teacher needs teacher.model, a file written by `mlpot export`; "
                "for energy-only data without a teacher use mode: ensemble")
        cfg.teacher = {"model": rel(model)}
        cfg.sample.structures = [rel(p) for p in cfg.sample.structures]
        for p in cfg.sample.structures:
            if not os.path.isfile(p):
                raise DistillConfigError(f"{where}: sample.structures: {p}: no such file; give "
                                         "files of structures (any format ASE reads) to label")
    else:
        if "model" in cfg.teacher and isinstance(cfg.teacher["model"], str):
            raise DistillConfigError(f"{where}: mode ensemble trains its own teacher: give "
                                     "teacher as an `mlpot train` config (model, loss, optim, "
                                     "training), or use mode: teacher with teacher.model")
        if cfg.sample.steps or cfg.sample.perturb_copies or cfg.sample.structures:
            raise DistillConfigError(f"{where}: sample applies to mode teacher; remove it")
    for name in ("teacher", "student"):
        section = getattr(cfg, name)
        if "data" in section:
            raise DistillConfigError(f"{where}: {name}.data: the data are given once, in data:")
    teacher_config(cfg, where)  # checked now: every value before any work
    scfg = student_config(cfg, os.path.join(cfg.out_dir, "student_data.xyz"), where)
    from .train.loss import Loss

    learns_hessian = Loss(scfg.loss).needs_hessian
    if learns_hessian and cfg.hessian.atoms == 0:
        raise DistillConfigError(f"{where}: student.loss.hessian asks for the teacher's Hessian "
                                 "rows: set hessian.atoms (atoms per frame, -1 for all)")
    if cfg.hessian.atoms and not learns_hessian:
        warnings.warn(f"{where}: hessian.atoms labels Hessian rows that the student ignores "
                      "(student.loss.hessian is 0)", stacklevel=2)
    return cfg


def load_distill_config(path: str) -> DistillConfig:
    from .train.config import read_yaml

    return distill_config_from_dict(read_yaml(path, DistillConfigError), where=path,
                                    base_dir=os.path.dirname(os.path.abspath(path)))


def _train_config(section: Dict[str, Any], data: Dict[str, Any], out_dir: str, where: str):
    from .train import config_from_dict

    raw = copy.deepcopy(section)
    raw["data"] = data
    training = dict(raw.get("training") or {})
    training["out_dir"] = out_dir
    training.setdefault("progress", False)
    raw["training"] = training
    try:
        return config_from_dict(raw, where=where)
    except ConfigError as err:
        raise DistillConfigError(str(err)) from None


def teacher_config(cfg: DistillConfig, where: str = "config"):
    """Mode ensemble: the committee's `mlpot train` Config (energies only: force and stress
    weights 0; ``training.ensemble`` 4 unless given, and at least 2; ``training.batch_size``
    32 unless given). None in mode teacher."""
    if cfg.mode != "ensemble":
        return None
    raw = copy.deepcopy(cfg.teacher)
    loss = dict(raw.get("loss") or {})
    for key in ("forces", "stress", "forces_start", "stress_start"):
        if loss.get(key):
            raise DistillConfigError(f"{where}: teacher.loss.{key} = {loss[key]}: the ensemble "
                                     "teacher learns from energies alone; remove it")
    loss.update(forces=0.0, stress=0.0)
    raw["loss"] = loss
    training = dict(raw.get("training") or {})
    training.setdefault("ensemble", 4)
    # energies alone learn in larger batches (mlpot.train.trainer.ENERGY_ONLY_BATCH)
    training.setdefault("batch_size", ENERGY_ONLY_BATCH)
    raw["training"] = training
    data = dict(cfg.data)
    for key in ("forces_key", "stress_key", "virial_key"):
        data.pop(key, None)
    tcfg = _train_config(raw, data, os.path.join(cfg.out_dir, "teacher"), f"{where}: teacher")
    if tcfg.training.ensemble < 2:
        raise DistillConfigError(f"{where}: teacher.training.ensemble = "
                                 f"{tcfg.training.ensemble}: the ensemble teacher needs 2 or "
                                 "more members (4 is common)")
    return tcfg


def student_data_section(data: Dict[str, Any], data_file: str, mode: str) -> Dict[str, Any]:
    """The ``data`` section of the student's `mlpot train` config: the distill config's
    ``data`` section (``data``) read from the distilled data file ``data_file`` with its
    ``DISTILL_`` labels and weights (what ``mlpot train`` needs to train another student, with
    another seed say, on ``OUT/student_data.xyz``)."""
    out = {k: v for k, v in data.items()
           if k not in ("train", "format", "energy_key", "forces_key", "stress_key",
                        "virial_key", "energy_unit", "length_unit", "max_frames",
                        "energy_weight_key", "forces_weight_key", "atomic_energies_key",
                        "hessian_key")}
    out.update(train=data_file, energy_key="DISTILL_energy", forces_key="DISTILL_forces",
               energy_weight_key="DISTILL_energy_weight",
               forces_weight_key="DISTILL_forces_weight",
               atomic_energies_key="DISTILL_atomic_energies", hessian_key="DISTILL_hessian")
    if mode == "teacher":  # a structure's teacher and reference frames stay together
        out["copy_key"] = STRUCTURE_KEY
    return out


def student_config(cfg: DistillConfig, data_file: str, where: str = "config"):
    """The student's `mlpot train` Config on the distilled data file."""
    data = student_data_section(cfg.data, data_file, cfg.mode)
    raw = copy.deepcopy(cfg.student)
    return _train_config(raw, data, os.path.join(cfg.out_dir, "student"), f"{where}: student")


# --------------------------------------------------------------------------- helpers
def force_weights(forces_dev: List[np.ndarray], rule: str, minimum: float) -> np.ndarray:
    """Per-structure force weights from the teacher's per-atom force deviations (module
    docstring): ``inverse_variance`` or ``none``."""
    n = len(forces_dev)
    if rule == "none" or n == 0:
        return np.ones(n)
    d = np.array([np.sqrt(np.mean(np.square(f))) for f in forces_dev])
    ref = float(np.median(d))
    with np.errstate(divide="ignore"):
        w = np.where(d > 0, (ref / np.where(d > 0, d, 1.0)) ** 2, 1.0)
    return np.clip(w, minimum, 1.0)


def tag_structures(frames, samples) -> list:
    """``frames`` then ``samples``, each with ``info["distill_structure"]``, the structure it
    stands for in the student's split (``data.copy_key``): a training structure's own index,
    shared by its perturbed copies (near-duplicates of it); every MD sample its own."""
    out = []
    for k, a in enumerate(frames):
        a = a.copy()
        a.info[STRUCTURE_KEY] = f"s{k}"
        out.append(a)
    for j, b in enumerate(samples):
        b = b.copy()
        source = b.info.get("distill_source")
        b.info[STRUCTURE_KEY] = f"s{b.info['parent']}" if source == "perturbed" \
            else f"x{j}" if source == "file" else f"md{j}"
        out.append(b)
    return out


def _reference_frames(cfg: DistillConfig):
    """The training structures (ase.Atoms) with their reference labels as ``REF_energy``,
    ``REF_forces`` and ``REF_virial`` (where the data has them), read by mlpot's reader with
    the data section's keys and units, so that every later stage sees one convention."""
    from ase import Atoms

    from .data import DataError, read
    from .train.data import _paths

    d = cfg.data
    kwargs = dict(energy_unit=d.get("energy_unit", "eV"), length_unit=d.get("length_unit", "A"),
                  min_distance=d.get("min_distance", 0.5))
    out = []
    for path in _paths(d["train"]):
        is_deepmd = d.get("format") == "deepmd" or (d.get("format") is None
                                                    and os.path.isdir(path))
        extra = {} if is_deepmd else {k: d.get(k) for k in ("energy_key", "forces_key",
                                                           "stress_key", "virial_key")}
        try:
            frames = read(path, format=d.get("format"), **kwargs, **extra)
        except DataError as err:
            raise DistillConfigError(str(err)) from None
        for s in frames:
            a = Atoms(numbers=s.atomic_numbers.numpy(), positions=s.positions.numpy(),
                      cell=s.cell[0].numpy(), pbc=s.pbc[0].numpy())
            if s.energy is not None and np.isfinite(float(s.energy[0])):
                a.info["REF_energy"] = float(s.energy[0])
            if s.forces is not None and bool(np.isfinite(s.forces.numpy()).all()):
                a.arrays["REF_forces"] = s.forces.numpy().astype(np.float64)
            if s.virial is not None and bool(np.isfinite(s.virial.numpy()).all()):
                a.info["REF_virial"] = s.virial[0].numpy().reshape(9)
            a.info["distill_source"] = "reference"
            out.append(a)
    if d.get("max_frames"):
        out = out[: int(d["max_frames"])]
    return out


def _too_close(atoms, min_distance: float) -> bool:
    """Whether two atoms of ``atoms`` (periodic images included) are closer than
    ``min_distance`` A (the training reader's check, ``mlpot.data.validate.closest_pair``)."""
    import torch

    from .data.validate import closest_pair

    return closest_pair(torch.as_tensor(atoms.positions, dtype=torch.float64),
                        torch.as_tensor(atoms.cell.array, dtype=torch.float64),
                        torch.as_tensor(atoms.pbc), min_distance) is not None


def _write_xyz(path: str, frames) -> None:
    import ase.io

    atomic_write(path, lambda tmp: ase.io.write(tmp, frames, format="extxyz"))


def _file_structures(path: str, known) -> list:
    """The structures of ``path`` (``sample.structures``; any format ASE reads) without
    whatever labels the file has (the teacher labels them); an element outside ``known`` (the
    teacher's type map) or an unreadable file is one line."""
    import ase
    import ase.io

    try:
        read = ase.io.read(path, index=":")
    except Exception as err:  # noqa: BLE001 - ASE raises many kinds for a bad file
        raise DistillConfigError(f"sample.structures: {path}: not readable as structures "
                                 f"({type(err).__name__}: {str(err).splitlines()[0][:120]}); "
                                 "give a file in a format ASE reads") from None
    out = []
    for i, a in enumerate(read):
        missing = sorted(set(a.get_chemical_symbols()) - set(known))
        if missing:
            raise DistillConfigError(f"sample.structures: {path} structure {i} has "
                                     f"{', '.join(missing)}, which the teacher does not know "
                                     f"({list(known)}); leave such structures out")
        out.append(ase.Atoms(numbers=a.numbers, positions=a.positions, cell=a.cell, pbc=a.pbc,
                             info={"distill_source": "file", "file_index": i}))
    return out


def _read_xyz(path: str):
    import ase.io

    return ase.io.read(path, index=":", format="extxyz")


# --------------------------------------------------------------------------- the run
class Distiller:
    def __init__(self, cfg: DistillConfig, log=print):
        self.cfg = cfg
        self.log = log
        self.out = cfg.out_dir
        self.state_path = os.path.join(self.out, "state.json")

    def path(self, name: str) -> str:
        return os.path.join(self.out, name)

    def signature(self) -> Dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self.cfg)))

    def read_state(self) -> Dict[str, Any]:
        if not os.path.exists(self.state_path):
            return {"config": self.signature(), "done": []}
        with open(self.state_path, encoding="utf-8") as f:
            state = json.load(f)
        if state.get("config") != self.signature():
            raise DistillConfigError(
                f"{self.state_path}: this folder holds a distillation with another config; use "
                "the same config to resume it, or another out_dir for a new run")
        return state

    def write_state(self, state: Dict[str, Any]) -> None:
        atomic_write(self.state_path, lambda tmp: open(tmp, "w").write(
            json.dumps(state, indent=1)))

    def run(self) -> Dict[str, Any]:
        os.makedirs(self.out, exist_ok=True)
        state = self.read_state()
        frames = _reference_frames(self.cfg)
        self.check(frames)
        for stage in STAGES:
            if stage in state["done"]:
                continue
            if stage == "sample" and self.cfg.mode != "teacher":
                continue
            getattr(self, "stage_" + stage)(frames, state)
            state["done"].append(stage)
            self.write_state(state)
            _kill_point("after-" + stage)
        self.log(f"student: {self.path('student/best.pt')} (export it with `mlpot export`); "
                 f"teacher labels: {self.path('teacher_labels.xyz')}")
        return state

    # ------------------------------------------------------------------ checks
    def check(self, frames) -> None:
        """Checks that need the data (one line each, before any work)."""
        cfg = self.cfg
        elements = sorted({s for a in frames for s in a.get_chemical_symbols()})
        has_forces = sum("REF_forces" in a.arrays for a in frames)
        if cfg.mode == "teacher":
            from .export import read_metadata

            path = cfg.teacher["model"]
            if not os.path.isfile(path):
                raise DistillConfigError(f"teacher.model {path}: no such file; give a model "
                                         "written by `mlpot export`")
            meta = read_metadata(path)
            missing = sorted(set(elements) - set(meta["type_map"]))
            if missing:
                raise DistillConfigError(
                    f"teacher.model {path} knows {meta['type_map']} but the data has "
                    f"{', '.join(missing)}; use a teacher trained on these elements")
            for extra in cfg.sample.structures:  # read again by the sample stage
                _file_structures(extra, meta["type_map"])
            teacher_cutoff = float(meta["cutoff"])
        else:
            if not all("REF_energy" in a.info for a in frames):
                raise DistillConfigError(
                    f"data.train: {sum('REF_energy' not in a.info for a in frames)} of "
                    f"{len(frames)} structures have no energy; the ensemble teacher learns "
                    "from energies (name the key with data.energy_key)")
            teacher_cutoff = teacher_config(cfg).model.cutoff
            if has_forces:
                self.log(f"note: {has_forces} training structures have forces; mode ensemble "
                         "trains the teacher on energies alone and gives the student the "
                         "teacher's forces")
        student = student_config(cfg, self.path("student_data.xyz"))
        s_cut = student.model.cutoff
        if s_cut is None:
            from .models import network_class

            s_cut = network_class(student.model.name).DEFAULT_CUTOFF
        if teacher_cutoff is not None and s_cut < teacher_cutoff:
            warnings.warn(f"the student's cutoff {s_cut:g} A is below the teacher's "
                          f"{teacher_cutoff:g} A: the student cannot see all that the teacher "
                          "uses, and its errors on the teacher's labels will stay larger",
                          stacklevel=2)

    # ------------------------------------------------------------------ stages
    def teacher_file(self) -> str:
        return self.cfg.teacher["model"] if self.cfg.mode == "teacher" \
            else self.path("teacher.pt")

    def stage_teacher(self, frames, state) -> None:
        if self.cfg.mode == "teacher":
            return
        from .export import export
        from .train import train

        tcfg = teacher_config(self.cfg)
        resume = os.path.exists(os.path.join(tcfg.training.out_dir, "last.pt"))
        self.log(f"teacher: {'resuming' if resume else 'training'} a committee of "
                 f"{tcfg.training.ensemble} on {len(frames)} structures' energies in "
                 f"{tcfg.training.out_dir}")
        results = train(tcfg, resume=resume)
        state["teacher_metrics"] = {k: results.get(k) for k in ("validation", "test")
                                    if k in results}
        export(os.path.join(tcfg.training.out_dir, "best.pt"), self.teacher_file())

    def stage_sample(self, frames, state) -> None:
        s = self.cfg.sample
        samples = []
        if s.steps:
            samples += self._md_samples(frames)
        if s.perturb_copies:
            rng = np.random.default_rng(s.seed)
            for k, a in enumerate(frames):
                for c in range(s.perturb_copies):
                    b = a.copy()
                    for key in [x for x in b.info if x.startswith("REF_")]:
                        del b.info[key]
                    b.arrays.pop("REF_forces", None)
                    b.positions = b.positions + rng.normal(0.0, s.perturb_sigma, b.positions.shape)
                    b.info.update(distill_source="perturbed", parent=k)
                    samples.append(b)
        if s.structures:
            from .export import read_metadata

            known = read_metadata(self.teacher_file())["type_map"]
            for path in s.structures:
                extra = _file_structures(path, known)
                self.log(f"  {path}: {len(extra)} structures")
                samples += extra
        # the student's reader refuses atoms closer than data.min_distance: a sample from MD
        # that went wrong (or a large displacement) would stop the student stage after all
        # the labelling, and again on every resume; such samples are dropped here
        min_d = self.cfg.data.get("min_distance", 0.5)
        dropped = 0
        if min_d is not None:
            kept = [b for b in samples if not _too_close(b, float(min_d))]
            dropped, samples = len(samples) - len(kept), kept
        _write_xyz(self.path("samples.xyz"), samples)
        state["samples"] = len(samples)
        state["samples_dropped"] = dropped
        self.log(f"sample: {len(samples)} structures ({self.path('samples.xyz')})" +
                 (f"; {dropped} dropped: atoms closer than data.min_distance = {min_d:g} A"
                  if dropped else ""))

    def _md_samples(self, frames):
        """Frames from the teacher's Langevin MD (module docstring)."""
        import torch

        import integrators as I

        from .export import load

        s = self.cfg.sample
        model = load(self.teacher_file(), s.device)
        starts = np.unique(np.linspace(0, len(frames) - 1, min(s.starts, len(frames)))
                           .round().astype(int))
        temps = [float(t) for t in s.temperatures]
        out = []
        for run, k in enumerate(starts):
            atoms = frames[int(k)]
            types = model.atom_types(atoms.numbers, where=f"data.train structure {k}")
            provider = I.MLPotForces(model, types, pbc=tuple(bool(p) for p in atoms.pbc),
                                     atomic_numbers=atoms.numbers)
            r = len(temps) * s.replicas
            t_rep = torch.tensor([t for t in temps for _ in range(s.replicas)],
                                 dtype=torch.float64)
            st = I.state_from_ase(atoms, replicas=r, seed=s.seed + run, device=s.device,
                                  dtype=model.dtype)
            st = I.initialize_velocities(st, t_rep, remove_com=True)
            collector = _Frames(s.collect_every, t_rep.tolist(), int(k))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", I.MDWarning)
                try:
                    I.simulate(st, I.Langevin(s.timestep, t_rep, s.friction), provider, s.steps,
                               [collector], last_good_path=None)
                except I.MDStopped as err:  # keep what was collected before the stop
                    self.log(f"  MD from structure {k} stopped early: "
                             f"{' '.join(str(err).split())[:200]}")
            out += collector.frames
            self.log(f"  MD from structure {k}: {len(collector.frames)} samples")
        return out

    def stage_label(self, frames, state) -> None:
        from .label import LabellerSpec, label_file

        to_label = self.path("to_label.xyz")
        if not os.path.exists(to_label):  # written once: the labelling's progress refers to it
            extra = _read_xyz(self.path("samples.xyz")) if self.cfg.mode == "teacher" \
                and os.path.exists(self.path("samples.xyz")) else []
            _write_xyz(to_label, tag_structures(frames, extra))
        h = self.cfg.hessian
        spec = LabellerSpec(kind="model", model=self.teacher_file(),
                            device=self.cfg.sample.device, hessian_atoms=h.atoms,
                            hessian_delta=h.delta, hessian_seed=h.seed)
        self.log(f"label: the teacher labels {to_label}")
        summary = label_file(to_label, self.path("teacher_labels.xyz"), spec, log=self.log,
                             prefix="TEACHER_")
        state["labelled"] = summary["labelled"]
        state["label_failed"] = summary["failed"]

    def stage_student_data(self, frames, state) -> None:
        labelled = _read_xyz(self.path("teacher_labels.xyz"))
        w = self.cfg.weights
        out = []
        if self.cfg.mode == "ensemble":
            devs = [a.arrays.get("TEACHER_forces_dev", np.zeros(len(a))) for a in labelled]
            fw = force_weights(devs, w.force_weighting, w.min_force_weight)
            for a, weight in zip(labelled, fw):
                b = _distill_frame(a, a.info["REF_energy"], a.arrays["TEACHER_forces"], 1.0,
                                   float(weight), hessian=a.arrays.get("TEACHER_hessian"))
                b.info["distill_label"] = "reference energy + teacher forces"
                out.append(b)
            state["force_weights"] = {"min": float(fw.min()), "median": float(np.median(fw)),
                                      "max": float(fw.max())}
        else:
            for a in labelled:
                b = _distill_frame(a, a.info["TEACHER_energy"], a.arrays["TEACHER_forces"],
                                   1.0, 1.0, a.arrays.get("TEACHER_atomic_energies"),
                                   a.arrays.get("TEACHER_hessian"))
                b.info["distill_label"] = "teacher"
                out.append(b)
            if w.reference > 0:
                for a in labelled:
                    if a.info.get("distill_source") != "reference" or "REF_energy" not in a.info:
                        continue
                    f = a.arrays.get("REF_forces")
                    b = _distill_frame(a, a.info["REF_energy"], f, w.reference,
                                       w.reference if f is not None else 0.0)
                    b.info["distill_label"] = "reference"
                    out.append(b)
        for i, b in enumerate(out):  # a run labelled before the key existed: no grouping
            b.info.setdefault(STRUCTURE_KEY, f"frame{i}")
        _write_xyz(self.path("student_data.xyz"), out)
        state["student_frames"] = len(out)
        self.log(f"student data: {len(out)} frames ({self.path('student_data.xyz')})")

    def stage_student(self, frames, state) -> None:
        from .train import train

        scfg = student_config(self.cfg, self.path("student_data.xyz"))
        if scfg.data.copy_key:
            import ase.io

            first = ase.io.read(self.path("student_data.xyz"), index=0, format="extxyz")
            if scfg.data.copy_key not in first.info:  # data written by an earlier version
                scfg.data.copy_key = None
        resume = os.path.exists(os.path.join(scfg.training.out_dir, "last.pt"))
        self.log(f"student: {'resuming' if resume else 'training'} {scfg.model.name} in "
                 f"{scfg.training.out_dir}")
        results = train(scfg, resume=resume)
        state["student_metrics"] = {k: results.get(k) for k in ("validation", "test")
                                    if k in results}


def _distill_frame(a, energy: float, forces, energy_weight: float, forces_weight: float,
                   atomic_energies=None, hessian=None):
    """A copy of frame ``a`` whose training labels are ``DISTILL_*`` (forces None: zeros with
    weight 0, so that every frame of the file has the same keys; atomic energies and Hessian
    rows, a teacher's, only where given: a frame without them has no such label)."""
    b = a.copy()
    # the teacher's Hessian rows are large (9N numbers per atom): kept once, as DISTILL_hessian
    for key in [k for k in b.arrays if k.startswith("DISTILL_") or k == "TEACHER_hessian"]:
        del b.arrays[key]
    if atomic_energies is not None:
        b.arrays["DISTILL_atomic_energies"] = np.asarray(atomic_energies, dtype=np.float64)
    if hessian is not None:
        b.arrays["DISTILL_hessian"] = np.asarray(hessian, dtype=np.float64)
    b.info["DISTILL_energy"] = float(energy)
    b.arrays["DISTILL_forces"] = np.zeros((len(a), 3)) if forces is None \
        else np.asarray(forces, dtype=np.float64)
    b.info["DISTILL_energy_weight"] = float(energy_weight)
    b.info["DISTILL_forces_weight"] = float(forces_weight)
    return b


class _Frames:
    """Collects the replicas' frames every ``interval`` steps (a reporter of
    ``integrators.simulate``)."""

    def __init__(self, interval: int, temps, start: int):
        self.interval, self.temps, self.start = int(interval), temps, start
        self.frames: List[Any] = []

    def open(self, state, integrator) -> None:
        pass

    def close(self) -> None:
        pass

    def report(self, state, integrator) -> None:
        from integrators import replica_to_ase

        if state.step == 0:
            return
        for r in range(state.n_replicas):
            a = replica_to_ase(state, r)
            a.info.update(distill_source="md", parent=self.start, step=int(state.step),
                          temperature_K=float(self.temps[r]))
            self.frames.append(a)


def _kill_point(name: str) -> None:
    """Tests: ``MLPOT_TEST_KILL_AT=<name>`` kills the process here (SIGKILL, as kill -9)."""
    if os.environ.get("MLPOT_TEST_KILL_AT") == name:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def distill(cfg: DistillConfig, log=print) -> Dict[str, Any]:
    """Run (or resume) the distillation of ``cfg``; returns its state (module docstring)."""
    return Distiller(cfg, log).run()


def run_distill(args) -> int:
    cfg = load_distill_config(args.config)
    distill(cfg)
    return 0


def add_distill_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "distill", help="train a student on a teacher's labels (energy-only data or a fast "
                        "student from a slow teacher)",
        description="mode ensemble: a committee trained on energies labels forces for a "
                    "student; mode teacher: a trained model labels the data and its own MD "
                    "samples for a faster student. The same command after a kill resumes.")
    p.add_argument("config", help="YAML file (see examples/distill_config.yaml)")
    p.set_defaults(func=run_distill)
