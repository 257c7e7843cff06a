"""`mlpot distill` (mlpot/distill.py): teacher labels equal the committee's mean forces, the
per-structure force weights follow the stated rule, a student distilled from an energy-only
ensemble beats the same student trained on the energies alone, a kill after each stage resumes
to the same student, the teacher mode's samples and reference weights, and the bad inputs."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from ase.io import read, write

import mlpot
from _fitting import labelled_cu_cells
from mlpot import keys as K
from mlpot.checkpoint import read_checkpoint
from mlpot.distill import (DistillConfigError, distill, distill_config_from_dict,
                           force_weights, student_config, teacher_config)
from mlpot.train.data import load_training_data
from mlpot.inputs import structure_inputs

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

# a Deep Potential: it learns these cells' energies alone (a 1-layer tiny EGNN does not)
TINY = {"name": "dp_se_e2_a", "cutoff": 4.0,
        "hparams": {"embedding": [8, 16], "axis_neuron": 4, "fitting": [16, 16]}}


def _energy_only(frames):
    for a in frames:
        a.arrays.pop("REF_forces", None)
        a.info.pop("REF_stress", None)
    return frames


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """60 energy-only EMT Cu cells (4 atoms) for training and 12 with forces for testing."""
    folder = tmp_path_factory.mktemp("distill_data")
    train = str(folder / "train.xyz")
    write(train, _energy_only(labelled_cu_cells(60, seed=0, stress=False)), format="extxyz")
    test = str(folder / "test.xyz")
    write(test, labelled_cu_cells(12, seed=500, stress=False), format="extxyz")
    return train, test


def _raw(train, out_dir, **over):
    raw = {"mode": "ensemble", "out_dir": str(out_dir),
           "data": {"train": train, "validation_fraction": 0.2},
           "teacher": {"model": dict(TINY), "optim": {"lr": 3e-3},
                       "training": {"ensemble": 3, "max_epochs": 40, "batch_size": 4,
                                    "seed": 1}},
           # the student's budget (8 epochs) is what the energy-only student gets too
           "student": {"model": dict(TINY), "loss": {"energy": 1.0, "forces": 10.0},
                       "optim": {"lr": 3e-3},
                       "training": {"max_epochs": 8, "batch_size": 4, "seed": 7}}}
    for key, value in over.items():
        raw[key] = value
    return raw


@pytest.fixture(scope="module")
def ensemble_run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("distill") / "run"
    state = distill(distill_config_from_dict(_raw(data[0], out)), log=lambda *a: None)
    return out, state


def _forces(model, atoms):
    d = structure_inputs(torch.tensor(atoms.positions), model.atom_types(atoms.numbers),
                         torch.tensor(atoms.cell.array), torch.tensor([True] * 3))
    return model(d, True, False)


def test_teacher_labels_are_the_committee_mean(ensemble_run):
    out, state = ensemble_run
    assert state["done"] == ["teacher", "label", "student_data", "student"]
    teacher = mlpot.load(str(out / "teacher.pt"))
    assert teacher.committee == 3
    labelled = read(str(out / "teacher_labels.xyz"), ":")
    assert len(labelled) == 60
    for a in labelled[:5]:
        o = _forces(teacher, a)
        mean = o[K.FORCES_MEMBERS].detach().mean(0).numpy()
        # float32 networks: the labeller (ASE) and this call round positions differently
        np.testing.assert_allclose(a.arrays["TEACHER_forces"], mean, rtol=1e-4, atol=2e-5)
        np.testing.assert_allclose(a.arrays["TEACHER_forces_dev"],
                                   o[K.FORCES_DEV].detach().numpy(), rtol=1e-4, atol=2e-5)
        assert "REF_energy" in a.info and "REF_forces" not in a.arrays  # reference kept


def test_force_weights_follow_the_stated_rule(ensemble_run):
    rng = np.random.default_rng(0)
    devs = [rng.uniform(0.01, 0.3, 4) for _ in range(9)]
    d = np.array([np.sqrt(np.mean(x ** 2)) for x in devs])
    want = np.clip((np.median(d) / d) ** 2, 0.05, 1.0)
    np.testing.assert_allclose(force_weights(devs, "inverse_variance", 0.05), want)
    assert np.all(force_weights(devs, "none", 0.05) == 1.0)
    assert want.min() < 1.0 and want.max() == 1.0
    # the student's file holds these weights, reference energies and teacher forces
    out, state = ensemble_run
    labelled = read(str(out / "teacher_labels.xyz"), ":")
    student = read(str(out / "student_data.xyz"), ":")
    w = force_weights([a.arrays["TEACHER_forces_dev"] for a in labelled], "inverse_variance",
                      0.05)
    got = np.array([a.info["DISTILL_forces_weight"] for a in student])
    np.testing.assert_allclose(got, w, rtol=1e-12)
    assert got.min() < 1.0  # some structures are down-weighted
    for a, b in zip(labelled, student):
        assert b.info["DISTILL_energy"] == pytest.approx(a.info["REF_energy"], rel=1e-12)
        np.testing.assert_allclose(b.arrays["DISTILL_forces"], a.arrays["TEACHER_forces"])


def _force_mae(checkpoint, test_file):
    model = mlpot.export(str(checkpoint), str(checkpoint) + ".exported.pt")
    model = mlpot.load(model)
    err = []
    for a in read(test_file, ":"):
        f = _forces(model, a)[K.FORCES].detach().numpy()
        err.append(np.abs(f - a.arrays["REF_forces"]).ravel())
    return float(np.mean(np.concatenate(err)))


def test_distilled_student_beats_energy_only_training(ensemble_run, data, tmp_path):
    from mlpot.train import config_from_dict, train

    out, _ = ensemble_run
    raw = _raw(data[0], tmp_path)["student"]
    raw = {**raw, "data": {"train": data[0], "validation_fraction": 0.2},
           "loss": {"energy": 1.0, "forces": 0.0},
           "training": {**raw["training"], "out_dir": str(tmp_path / "energy_only"),
                        "progress": False}}
    train(config_from_dict(raw))
    alone = _force_mae(tmp_path / "energy_only" / "best.pt", data[1])
    distilled = _force_mae(out / "student" / "best.pt", data[1])
    # the same student, the same budget: teacher forces must help clearly
    assert distilled < 0.8 * alone, (distilled, alone)


def _cli(config, env_extra=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "mlpot.cli", "distill", str(config)],
                          capture_output=True, text=True, env=env)


def test_a_kill_after_each_stage_resumes_to_the_same_student(data, tmp_path):
    small = {"teacher": {"model": dict(TINY), "optim": {"lr": 1e-2},
                         "training": {"ensemble": 2, "max_epochs": 3, "batch_size": 8,
                                      "seed": 1}},
             "student": {"model": dict(TINY), "optim": {"lr": 1e-2},
                         "training": {"max_epochs": 3, "batch_size": 8, "seed": 7}}}
    paths = {}
    for name in ("whole", "killed"):
        cfg = tmp_path / f"{name}.yaml"
        cfg.write_text(yaml.safe_dump(_raw(data[0], tmp_path / name, **small)))
        paths[name] = cfg
    assert _cli(paths["whole"]).returncode == 0
    for stage in ("teacher", "label", "student_data"):
        run = _cli(paths["killed"], {"MLPOT_TEST_KILL_AT": f"after-{stage}"})
        assert run.returncode == -9, run.stderr[-2000:]
        done = json.loads((tmp_path / "killed" / "state.json").read_text())["done"]
        assert done[-1] == stage
    run = _cli(paths["killed"])
    assert run.returncode == 0, run.stderr[-2000:]
    a = read_checkpoint(str(tmp_path / "whole" / "student" / "best.pt"))["model"]
    b = read_checkpoint(str(tmp_path / "killed" / "student" / "best.pt"))["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # a changed config is refused, not mixed with the old run
    raw = yaml.safe_load(paths["killed"].read_text())
    raw["weights"] = {"force_weighting": "none"}
    paths["killed"].write_text(yaml.safe_dump(raw))
    run = _cli(paths["killed"])
    assert run.returncode == 2 and "another config" in run.stderr


def _teacher_mode(teacher: str, tmp_path, **over):
    """A mode-teacher config: 6 EMT Cu cells as the training structures (written now),
    ``teacher`` as the teacher, a one-epoch student; ``over`` replaces top-level sections."""
    train = str(tmp_path / "dft.xyz")
    write(train, labelled_cu_cells(6, seed=900, stress=False), format="extxyz")
    raw = {"mode": "teacher", "out_dir": str(tmp_path / "run"),
           "data": {"train": train, "validation_fraction": 0.2},
           "teacher": {"model": teacher},
           "student": {"model": dict(TINY), "training": {"max_epochs": 1, "batch_size": 8}}}
    raw.update(over)
    return raw


def test_teacher_mode_samples_and_weights_reference_labels(ensemble_run, tmp_path):
    out, _ = ensemble_run
    raw = _teacher_mode(str(out / "teacher.pt"), tmp_path,
                        sample={"temperatures": [300, 600], "steps": 20, "collect_every": 10,
                                "starts": 2, "replicas": 1, "perturb_copies": 1},
                        weights={"reference": 0.5})
    state = distill(distill_config_from_dict(raw), log=lambda *a: None)
    # 2 starts x 2 temperatures x 1 replica x 2 collected frames + 6 perturbed copies
    assert state["samples"] == 8 + 6
    student = read(str(tmp_path / "run" / "student_data.xyz"), ":")
    teacher_frames = [a for a in student if a.info["distill_label"] == "teacher"]
    reference = [a for a in student if a.info["distill_label"] == "reference"]
    assert len(teacher_frames) == 6 + 14 and len(reference) == 6
    assert all(a.info["DISTILL_forces_weight"] == 0.5 for a in reference)
    assert all(a.info["DISTILL_energy_weight"] == 1.0 for a in teacher_frames)
    assert {a.info["distill_source"] for a in teacher_frames} == {"reference", "md", "perturbed"}
    # the teacher's atomic energies (summing to its energy) on its frames only
    for a in teacher_frames:
        assert a.arrays["DISTILL_atomic_energies"].sum() == pytest.approx(
            a.info["DISTILL_energy"], abs=1e-5)
    assert not any("DISTILL_atomic_energies" in a.arrays for a in reference)
    # one structure, one part of the student's split: its teacher frame, its reference frame
    # and its perturbed copy share a distill_structure, which is the student's data.copy_key
    structure = {}
    for a in student:
        if a.info["distill_source"] != "md":
            structure.setdefault(a.info["distill_structure"], set()).add(
                (a.info["distill_source"], a.info["distill_label"]))
    assert len(structure) == 6 and all(v == {("reference", "teacher"), ("reference", "reference"),
                                             ("perturbed", "teacher")}
                                       for v in structure.values())
    scfg = student_config(distill_config_from_dict(raw), str(tmp_path / "run" /
                                                              "student_data.xyz"))
    assert scfg.data.copy_key == "distill_structure"
    assert scfg.data.atomic_energies_key == "DISTILL_atomic_energies"
    split = load_training_data(scfg)
    pos = lambda d: d.positions.numpy().round(6).tobytes()  # noqa: E731
    assert not {pos(d) for d in split.train} & {pos(d) for d in split.validation}


def test_samples_with_overlapping_atoms_are_dropped_not_fatal(ensemble_run, tmp_path):
    """The student's reader refuses atoms closer than data.min_distance: such samples (MD gone
    wrong; here displacements of 0.9 A on 2.5 A Cu-Cu bonds) are dropped before labelling, so
    the student trains on the rest instead of the whole run stopping at its last stage."""
    from mlpot.data.validate import closest_pair

    out, _ = ensemble_run
    train = str(tmp_path / "dft.xyz")
    write(train, labelled_cu_cells(6, seed=900, stress=False), format="extxyz")
    raw = {"mode": "teacher", "out_dir": str(tmp_path / "run"),
           "data": {"train": train, "validation_fraction": 0.2},
           "teacher": {"model": str(out / "teacher.pt")},
           "sample": {"perturb_copies": 6, "perturb_sigma": 0.9},
           "student": {"model": dict(TINY), "training": {"max_epochs": 1, "batch_size": 8}}}
    state = distill(distill_config_from_dict(raw), log=lambda *a: None)
    assert state["done"][-1] == "student"
    assert 0 < state["samples_dropped"] < 36
    assert state["samples"] + state["samples_dropped"] == 36
    student = read(str(tmp_path / "run" / "student_data.xyz"), ":")
    assert len(student) == 6 + state["samples"] + 6  # teacher labels + reference copies
    for a in student:
        assert closest_pair(torch.tensor(a.positions), torch.tensor(a.cell.array),
                            torch.tensor(a.pbc), 0.5) is None


def test_bad_inputs_are_one_line_errors_before_any_work(data, ensemble_run, tmp_path):
    out, _ = ensemble_run
    with pytest.raises(DistillConfigError, match="needs teacher.model"):
        distill_config_from_dict(_raw(data[0], tmp_path / "a", mode="teacher", teacher={}))
    with pytest.raises(DistillConfigError, match="energies alone"):
        distill_config_from_dict(_raw(data[0], tmp_path / "b", teacher={
            "model": dict(TINY), "loss": {"forces": 1.0}}))
    with pytest.raises(DistillConfigError, match="2 or more members"):
        distill_config_from_dict(_raw(data[0], tmp_path / "c", teacher={
            "model": dict(TINY), "training": {"ensemble": 1}}))
    # a teacher that does not know the data's elements
    h2o = str(tmp_path / "h2o.xyz")
    from ase.build import molecule

    m = molecule("H2O")
    m.info["REF_energy"] = -1.0
    write(h2o, [m, m], format="extxyz")
    raw = _raw(h2o, tmp_path / "d", mode="teacher", teacher={"model": str(out / "teacher.pt")})
    with pytest.raises(DistillConfigError, match="knows \\['Cu'\\] but the data has H, O"):
        distill(distill_config_from_dict(raw), log=lambda *a: None)
    assert not (tmp_path / "d" / "state.json").exists()
    # a student cutoff below the teacher's: a warning
    raw = _raw(data[0], tmp_path / "e", mode="teacher",
               teacher={"model": str(out / "teacher.pt")},
               student={"model": {**TINY, "cutoff": 3.0}, "training": {"max_epochs": 1}})
    cfg = distill_config_from_dict(raw)
    from mlpot.distill import Distiller

    with pytest.warns(UserWarning, match="below the teacher's"):
        Distiller(cfg, log=lambda *a: None).check(read(data[0], ":"))


def test_example_config_and_the_no_forces_message(tmp_path, capsys):
    from mlpot.distill import load_distill_config

    cfg = load_distill_config(os.path.join(os.path.dirname(__file__), "..", "examples",
                                           "distill_config.yaml"))
    assert cfg.mode == "ensemble" and cfg.weights.force_weighting == "inverse_variance"
    # `mlpot train` asked for forces that the data lacks: one line that names the ways out
    path = str(tmp_path / "e.xyz")
    write(path, _energy_only(labelled_cu_cells(3, stress=False)), format="extxyz")
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"data": {"train": path}, "model": dict(TINY),
                                      "training": {"out_dir": str(tmp_path / "r")}}))
    from mlpot.cli import main as cli

    assert cli(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert "no forces found" in err and "loss.forces: 0" in err and "mlpot distill" in err


def test_ensemble_teacher_batch_defaults_to_32(data, tmp_path):
    """The energy-only committee trains in batches of 32 unless the config says otherwise."""
    raw = _raw(data[0], tmp_path / "run")
    assert teacher_config(distill_config_from_dict(raw)).training.batch_size == 4
    del raw["teacher"]["training"]["batch_size"]
    assert teacher_config(distill_config_from_dict(raw)).training.batch_size == 32


def test_teacher_mode_labels_structures_from_files(ensemble_run, tmp_path):
    """sample.structures: a user's own structures (another run's samples.xyz here) are labelled
    by the teacher beside the training structures, their own labels ignored, each its own
    structure in the split; a file with an element the teacher lacks is refused up front."""
    out, _ = ensemble_run
    # with EMT labels, which the teacher's replace
    write(str(tmp_path / "mine.xyz"), labelled_cu_cells(5, seed=901, stress=False),
          format="extxyz")
    extra = read(str(tmp_path / "mine.xyz"), ":")
    raw = _teacher_mode(str(out / "teacher.pt"), tmp_path, sample={"structures": "mine.xyz"})
    cfg = distill_config_from_dict(raw, base_dir=str(tmp_path))  # relative to the config
    assert cfg.sample.structures == [str(tmp_path / "mine.xyz")]
    state = distill(cfg, log=lambda *a: None)
    assert state["samples"] == 5 and state["labelled"] == 6 + 5
    labels = read(str(tmp_path / "run" / "teacher_labels.xyz"), ":")
    mine = [a for a in labels if a.info["distill_source"] == "file"]
    assert [a.info["file_index"] for a in mine] == list(range(5))
    teacher = mlpot.load(str(out / "teacher.pt"))
    for a, b in zip(mine, extra):
        np.testing.assert_allclose(a.positions, b.positions)
        assert "REF_energy" not in a.info and "REF_forces" not in a.arrays
        np.testing.assert_allclose(a.arrays["TEACHER_forces"],
                                   _forces(teacher, b)[K.FORCES].detach().numpy(), atol=1e-5)
        assert abs(a.info["TEACHER_energy"] - b.info["REF_energy"]) > 1e-6  # not EMT's
    assert len({a.info["distill_structure"] for a in mine}) == 5
    # an element the teacher does not know: before any work
    from ase.build import molecule

    write(str(tmp_path / "h2o.xyz"), [molecule("H2O")], format="extxyz")
    raw.update(out_dir=str(tmp_path / "run2"), sample={"structures": [str(tmp_path / "h2o.xyz")]})
    with pytest.raises(DistillConfigError, match="structure 0 has H, O, which the teacher"):
        distill(distill_config_from_dict(raw), log=lambda *a: None)
    assert not (tmp_path / "run2" / "state.json").exists()
    raw.update(sample={"structures": ["missing.xyz"]})
    with pytest.raises(DistillConfigError, match="missing.xyz: no such file"):
        distill_config_from_dict(raw, base_dir=str(tmp_path))


def test_teacher_hessian_rows_reach_the_student(ensemble_run, tmp_path):
    """hessian.atoms: the teacher labels Hessian rows of its frames (mlpot.hessian), the
    student's data carries them once, as DISTILL_hessian on the teacher's frames, and the
    student learns them (loss.hessian); asking for them without labels, or labels without
    asking, is said before any work."""
    out, _ = ensemble_run
    raw = _teacher_mode(str(out / "teacher.pt"), tmp_path, sample={"perturb_copies": 1},
                        hessian={"atoms": 2},
                        student={"model": dict(TINY), "loss": {"hessian": 0.1},
                                 "training": {"max_epochs": 1, "batch_size": 4}})
    state = distill(distill_config_from_dict(raw), log=lambda *a: None)
    assert state["done"] == ["teacher", "sample", "label", "student_data", "student"]
    labels = read(str(tmp_path / "run" / "teacher_labels.xyz"), ":")
    assert all(np.isfinite(a.arrays["TEACHER_hessian"]).all(axis=1).sum() == 2 for a in labels)
    student = read(str(tmp_path / "run" / "student_data.xyz"), ":")
    assert not any("TEACHER_hessian" in a.arrays for a in student)
    for a in student:
        assert ("DISTILL_hessian" in a.arrays) == (a.info["distill_label"] == "teacher")
    assert student_config(distill_config_from_dict(raw), str(
        tmp_path / "run" / "student_data.xyz")).data.hessian_key == "DISTILL_hessian"
    log = (tmp_path / "run" / "student" / "log.csv").read_text().splitlines()
    assert "mse_hessian" in log[0]
    with pytest.raises(DistillConfigError, match="set hessian.atoms"):
        distill_config_from_dict({**raw, "hessian": {"atoms": 0}})
    with pytest.warns(UserWarning, match="student ignores"):
        distill_config_from_dict({**raw, "student": {**raw["student"], "loss": {}}})
