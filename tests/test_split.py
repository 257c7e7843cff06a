"""Train/validation/test splits: stratified by an info key (data.split_key), a held-out test
fraction (data.test_fraction) that neither training nor checkpoint selection sees, and the
original random validation split unchanged when neither is set."""
import json
import os
from collections import Counter

import pytest
import torch
from ase.io import write

from _fitting import labelled_cu_cells
from mlpot.data import DataError
from mlpot.train import ConfigError, Trainer, config_from_dict
from mlpot.train.data import load_training_data, split_indices
from mlpot.train.trainer import finalize

TINY = {"name": "egnn", "cutoff": 3.6, "hparams": {"hidden": 8, "num_layers": 1}}
GROUPS = ["bulk"] * 20 + ["surface"] * 6 + ["vacancy"] * 4


def test_stratified_split_puts_every_group_in_every_part():
    train, val, test = split_indices(len(GROUPS), 0.1, 0.1, seed=0, groups=GROUPS)
    assert sorted(train + val + test) == list(range(len(GROUPS)))  # disjoint, complete
    for part in (train, val, test):
        assert set(GROUPS[k] for k in part) == {"bulk", "surface", "vacancy"}
    assert Counter(GROUPS[k] for k in test) == {"bulk": 2, "surface": 1, "vacancy": 1}
    assert split_indices(len(GROUPS), 0.1, 0.1, 0, GROUPS) == (train, val, test)
    assert split_indices(len(GROUPS), 0.1, 0.1, 1, GROUPS) != (train, val, test)
    # without groups: one random split in the same proportions
    train, val, test = split_indices(30, 0.2, 0.1, seed=0)
    assert (len(train), len(val), len(test)) == (21, 6, 3)


def _frames_with_types(n=15):
    frames = labelled_cu_cells(n, seed=0)
    for k, a in enumerate(frames):
        a.info["config_type"] = ("A", "B", "C")[k % 3]
    return frames


def _cfg(path, out, **data):
    return config_from_dict({
        "data": {"train": path, **data}, "model": dict(TINY),
        "loss": {"energy": 1.0, "forces": 10.0},
        "training": {"batch_size": 4, "max_epochs": 1, "out_dir": str(out), "progress": False}})


def test_test_fraction_is_held_out_and_reported(tmp_path):
    frames = _frames_with_types()
    path = str(tmp_path / "typed.xyz")
    write(path, frames, format="extxyz")
    cfg = _cfg(path, tmp_path / "run", validation_fraction=0.2, test_fraction=0.2,
               split_key="config_type")
    data = load_training_data(cfg, ("energy", "forces"))
    key = lambda d: float(d.energy[0])  # noqa: E731 - distinct energies name the frames
    parts = [set(map(key, p)) for p in (data.train, data.validation, data.test)]
    assert sum(map(len, parts)) == len(frames) and not (parts[0] & parts[2] or parts[1] & parts[2])
    assert (len(data.train), len(data.validation), len(data.test)) == (9, 3, 3)
    energies = {f.info["REF_energy"]: f.info["config_type"] for f in frames}
    assert sorted(energies[e] for e in parts[2]) == ["A", "B", "C"]
    trainer = Trainer(cfg, data=data)
    trainer.fit()
    results = finalize(trainer)
    assert results["test"]["frames"] == 3
    with open(os.path.join(str(tmp_path / "run"), "metrics.json")) as f:
        assert json.load(f)["test"]["frames"] == 3


def test_default_split_is_unchanged(tmp_path):
    frames = labelled_cu_cells(12, seed=0)
    path = str(tmp_path / "cu.xyz")
    write(path, frames, format="extxyz")
    cfg = _cfg(path, tmp_path / "run", validation_fraction=0.25)
    data = load_training_data(cfg, ("energy",))
    order = torch.randperm(12, generator=torch.Generator().manual_seed(0)).tolist()
    expected = sorted(order[:3])
    got = sorted(k for k, f in enumerate(frames)
                 if any(abs(float(d.energy[0]) - f.info["REF_energy"]) < 1e-9
                        for d in data.validation))
    assert got == expected and data.test == []


def test_split_errors_are_one_line(tmp_path):
    frames = labelled_cu_cells(6, seed=0)
    path = str(tmp_path / "cu.xyz")
    write(path, frames, format="extxyz")
    with pytest.raises(ConfigError, match="data.test and data.test_fraction are both set"):
        _cfg(path, tmp_path, test=path, test_fraction=0.1)
    with pytest.raises(ConfigError, match="must be < 1"):
        _cfg(path, tmp_path, validation_fraction=0.6, test_fraction=0.5)
    with pytest.raises(DataError, match="no info key 'config_type' to split by"):
        load_training_data(_cfg(path, tmp_path, split_key="config_type"), ("energy",))


def test_rotated_copies_stay_in_one_part(tmp_path):
    # mlearn holds strained cells once per axis: the same energy and force magnitudes in a
    # rotated frame. A test frame whose copy is in training would measure memory, not skill.
    frames = labelled_cu_cells(12, seed=0)
    copies = []
    for a in frames[:4]:
        b = a.copy()
        b.rotate(90, "z", rotate_cell=True)
        b.info["REF_energy"] = a.info["REF_energy"]
        b.arrays["REF_forces"] = a.arrays["REF_forces"][:, [1, 0, 2]] * [-1, 1, 1]
        copies.append(b)
    path = str(tmp_path / "copies.xyz")
    write(path, frames + copies, format="extxyz")
    for seed in range(5):
        cfg = _cfg(path, tmp_path / "run", validation_fraction=0.25, test_fraction=0.25)
        cfg.training.seed = seed
        data = load_training_data(cfg, ("energy", "forces"))
        parts = [{round(float(d.energy[0]), 6) for d in p}
                 for p in (data.train, data.validation, data.test)]
        assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
        assert len(data.train) + len(data.validation) + len(data.test) == 16


def test_copy_key_keeps_one_structure_with_two_labels_in_one_part(tmp_path):
    # `mlpot distill` (mode teacher) writes each training structure twice, with the teacher's
    # and the reference labels: equivalence_key cannot see they are one structure (different
    # energies), data.copy_key names it
    frames = labelled_cu_cells(20, seed=0)
    twins = []
    for k, a in enumerate(frames):
        a.info["structure"] = f"s{k}"
        b = a.copy()
        b.info["REF_energy"] = a.info["REF_energy"] + 0.01
        twins.append(b)
    path = str(tmp_path / "twins.xyz")
    write(path, frames + twins, format="extxyz")

    def shared_positions(**data):
        cfg = _cfg(path, tmp_path / "run", validation_fraction=0.3, **data)
        d = load_training_data(cfg, ("energy", "forces"))
        pos = lambda f: f.positions.numpy().round(6).tobytes()  # noqa: E731
        parts = [{pos(f) for f in p} for p in (d.train, d.validation, d.test)]
        assert len(d.train) + len(d.validation) + len(d.test) == 40
        return parts[0] & parts[1] | parts[0] & parts[2] | parts[1] & parts[2]

    assert shared_positions()  # without the key some structures straddle the split ...
    assert not shared_positions(copy_key="structure")  # ... with it none
    assert not shared_positions(copy_key="structure", test_fraction=0.2)
    with pytest.raises(DataError, match="no info key 'nope'.*data.copy_key"):
        load_training_data(_cfg(path, tmp_path, copy_key="nope"), ("energy",))
