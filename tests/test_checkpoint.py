"""The checkpoint module: data never code, old files still load, one kind check, consistent
best/last pairs after a kill, stale temporary files cleaned."""
import json
import math
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from ase.io import read

from mlpot import checkpoint as C
from mlpot.ase import MLPotCalculator
from mlpot.cli import main as cli

LEGACY = Path(__file__).parent / "data" / "checkpoints_v1"


# ---------------------------------------------------------------------------- no code from files
class _Evil:
    """Unpickling this runs ``open(target, 'w')``: a stand-in for any code in a crafted file."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def _crafted_checkpoint(path, target):
    torch.save({"config": {"model": "egnn"}, "model": {}, "payload": _Evil(str(target))},
               str(path))


def test_a_crafted_checkpoint_runs_no_code(tmp_path, capsys):
    bad = tmp_path / "model.pt"
    target = tmp_path / "pwned"
    _crafted_checkpoint(bad, target)
    # the file is a real attack: its pickle calls open() (io.open; listed without unpickling)
    calls = torch.serialization.get_unsafe_globals_in_checkpoint(str(bad))
    assert any(name.split(".")[-1] == "open" for name in calls), calls

    with pytest.raises(C.CheckpointError, match="refused: it asks to run code"):
        C.read_checkpoint(str(bad))
    assert not target.exists()
    # and through every command that reads checkpoints: one line, exit code 2, no code run
    data = str(LEGACY / "cu.xyz")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data: {{train: {data}}}\nmodel: {{name: egnn, cutoff: 3.6}}\n"
                   f"training: {{out_dir: {tmp_path / 'run'}, progress: false}}\n")
    os.makedirs(tmp_path / "run")
    shutil.copy(bad, tmp_path / "run" / "last.pt")
    for argv in (["test", str(bad), "--data", data], ["export", str(bad), "-o",
                                                      str(tmp_path / "m.pt")],
                 ["train", str(cfg), "--resume"]):
        capsys.readouterr()
        assert cli(argv) == 2, argv
        err = capsys.readouterr().err
        assert "asks to run code" in err and "Traceback" not in err, argv
        assert len(err.strip().splitlines()) == 1, err
        assert not target.exists(), argv


def test_file_kind_from_zip_members_only(tmp_path):
    model = C.model_from_checkpoint(str(LEGACY / "save_checkpoint.pt"))
    from mlpot.export import export

    exported = export(model, str(tmp_path / "m.pt"))
    assert C.file_kind(exported) == "torchscript"
    assert C.file_kind(str(LEGACY / "trainer_last.pt")) == "checkpoint"
    assert C.file_kind(str(tmp_path / "none.pt")) == "missing"
    (tmp_path / "text.pt").write_text("hello")
    assert C.file_kind(str(tmp_path / "text.pt")) == "unknown"
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as z:
        z.writestr("a/b.txt", "x")
    assert C.file_kind(str(tmp_path / "other.zip")) == "unknown"
    truncated = tmp_path / "cut.pt"
    truncated.write_bytes((LEGACY / "trainer_last.pt").read_bytes()[:20000])
    assert C.file_kind(str(truncated)) == "unknown"
    with pytest.raises(C.CheckpointError, match="truncated"):
        C.read_checkpoint(str(truncated))


# ---------------------------------------------------------------------------- old files
@pytest.mark.parametrize("name", ["trainer_last.pt", "trainer_best.pt", "save_checkpoint.pt"])
def test_checkpoints_of_the_previous_format_load_as_data(name):
    """Files written by mlpot before this module (commit 2c79cbf) load with weights_only=True
    (numpy's RNG state allowed through exactly three numpy globals) and give the same numbers."""
    path = str(LEGACY / name)
    if name.startswith("trainer"):  # numpy's RNG state: they do need the allow-list
        with pytest.raises(pickle.UnpicklingError):
            torch.load(path, weights_only=True)
    state = C.read_checkpoint(path)
    assert state["config"]["model"] == "egnn"
    expected = json.loads((LEGACY / "expected.json").read_text())[name]
    atoms = read(str(LEGACY / "cu.xyz"), 0)
    atoms.calc = MLPotCalculator(C.model_from_checkpoint(path))
    # a float32 model: another CPU's kernels (AVX2 against AVX-512) sum in another order, so the
    # last bits may differ from the stored numbers (seen: 6e-9 eV/A on forces of 1e-3 eV/A);
    # wrong or non-EMA weights would differ by orders of magnitude more
    assert atoms.get_potential_energy() == pytest.approx(expected["energy"], abs=1e-6)
    np.testing.assert_allclose(atoms.get_forces(), expected["forces"], rtol=0, atol=1e-7)


def test_an_old_training_run_resumes(tmp_path):
    """`mlpot train --resume` continues a run whose last.pt was written before the change."""
    from mlpot.train import Trainer, config_from_dict

    state = C.read_checkpoint(str(LEGACY / "trainer_last.pt"))
    cfg = state["train_config"]
    cfg["data"]["train"] = str(LEGACY / "cu.xyz")
    cfg["training"]["out_dir"] = str(tmp_path / "run")
    cfg["training"]["max_epochs"] = 3
    os.makedirs(tmp_path / "run")
    for name in ("last", "best"):
        shutil.copy(LEGACY / f"trainer_{name}.pt", tmp_path / "run" / f"{name}.pt")
    trainer = Trainer(config_from_dict(cfg))
    trainer.fit(resume=True)
    assert trainer.epoch == 3 and len(trainer.history) == 3
    again = C.read_checkpoint(str(tmp_path / "run" / "last.pt"))
    assert again["version"] == C.VERSION and again["epoch"] == 3
    assert isinstance(again["rng"]["numpy"][1], torch.Tensor)  # no numpy object any more
    torch.load(str(tmp_path / "run" / "last.pt"), weights_only=True)  # no allow-list needed


# ---------------------------------------------------------------------------- kills
def _config(tmp_path, epochs):
    return {"data": {"train": str(LEGACY / "cu.xyz"), "validation_fraction": 0.25},
            "model": {"name": "egnn", "cutoff": 3.6,
                      "hparams": {"hidden": 8, "edge_hidden": 8, "num_layers": 1}},
            "loss": {"energy": 1.0, "forces": 10.0},
            "optim": {"lr": 5e-3, "ema_decay": 0.99},
            "training": {"batch_size": 3, "max_epochs": epochs, "out_dir": str(tmp_path / "run"),
                         "progress": False, "seed": 3}}


def _train_in_subprocess(cfg, resume=False, kill_at=None):
    code = ("import json, sys; from mlpot.train import config_from_dict, train; "
            "train(config_from_dict(json.loads(sys.argv[1])), resume=sys.argv[2] == '1')")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if kill_at:
        env["MLPOT_TEST_KILL_AT"] = kill_at
    return subprocess.run([sys.executable, "-c", code, json.dumps(cfg), "1" if resume else "0"],
                          env=env, capture_output=True, text=True, timeout=300)


def test_a_kill_between_best_and_last_leaves_a_consistent_pair(tmp_path):
    """Killed (as by kill -9) right after best.pt of the first validation is written: last.pt
    does not exist yet, and the resumed run finishes with best.pt equal to an uninterrupted
    run's. (The old order, last.pt first, left a run that could never finish: "best.pt: no such
    checkpoint".)"""
    cfg = _config(tmp_path, epochs=2)
    killed = _train_in_subprocess(cfg, kill_at="between-best-and-last")
    assert killed.returncode == 137, killed.stderr
    run = tmp_path / "run"
    assert (run / "best.pt").exists() and not (run / "last.pt").exists()
    # a fresh start is then the only way (no last.pt): it must not be refused or lose best.pt
    done = _train_in_subprocess(cfg)
    assert done.returncode == 0, done.stderr

    full_cfg = _config(tmp_path / "full", epochs=2)
    assert _train_in_subprocess(full_cfg).returncode == 0
    a = C.read_checkpoint(str(run / "best.pt"))
    b = C.read_checkpoint(str(tmp_path / "full" / "run" / "best.pt"))
    assert a["step"] == b["step"] and a["best_val"] == b["best_val"]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


@pytest.mark.parametrize("broken", ["stale", "missing"])
def test_resume_repairs_a_best_pt_broken_by_an_older_mlpot(tmp_path, broken):
    """A pair left by the old write order (last.pt records a best that best.pt lacks, or
    best.pt missing): the resumed run warns and tracks the best afresh, so it finishes and
    best.pt holds a validation of this run instead of silently staying an older epoch."""
    from mlpot.train import Trainer, config_from_dict

    cfg = _config(tmp_path, epochs=3)
    Trainer(config_from_dict(cfg)).fit()
    run = tmp_path / "run"
    last = C.read_checkpoint(str(run / "last.pt"))
    if broken == "stale":  # an older best.pt
        C.write_checkpoint(dict(last, best_val=last["best_val"] + 1.0, step=1),
                           str(run / "best.pt"))
    else:  # killed after last.pt of the first validation: "best.pt: no such checkpoint"
        os.remove(run / "best.pt")
    cfg["training"]["max_epochs"] = 4
    trainer = Trainer(config_from_dict(cfg))
    with pytest.warns(UserWarning, match="best weights are lost"):
        trainer.fit(resume=True)
    best = C.read_checkpoint(str(run / "best.pt"))
    assert best["step"] == trainer.step and math.isfinite(best["best_val"])


def test_stale_temporary_files_are_removed_at_start(tmp_path):
    from mlpot.train import Trainer, config_from_dict

    run = tmp_path / "run"
    os.makedirs(run)
    leftovers = [run / ".last.pt.abc123.tmp", run / ".best.pt.x9.tmp", run / "log.csv.tmp"]
    for f in leftovers:
        f.write_bytes(b"half a checkpoint")
    keep = run / "notes.tmp"
    keep.write_text("mine")
    Trainer(config_from_dict(_config(tmp_path, epochs=1))).fit()
    assert not any(f.exists() for f in leftovers)
    assert keep.read_text() == "mine"
