"""Bad input to `mlpot test`, `mlpot export` and `mlpot md`: exit code 2 and one line on stderr
that says what is wrong, never a traceback (mlpot.errors: 0 done, 1 a bug, 2 bad input)."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from ase.build import molecule
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import write

from mlpot.cli import main as cli
from mlpot.export import export
from mlpot.models import build_model


def tiny_model():
    torch.manual_seed(0)
    return build_model("egnn", ["H", "C", "O"], cutoff=4.0, dtype="float64", hidden=8,
                       edge_hidden=8, num_layers=1, readout_hidden=8).eval()


def water_frames(n=2):
    rng = np.random.default_rng(0)
    frames = []
    for _ in range(n):
        atoms = molecule("H2O")
        atoms.positions += rng.normal(0, 0.02, (3, 3))
        atoms.calc = SinglePointCalculator(atoms, energy=float(rng.normal(-14, 0.1)),
                                           forces=rng.normal(0, 1, (3, 3)))
        frames.append(atoms)
    return frames


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A small exported model, labelled data, a structure and a DeePMD system."""
    root = tmp_path_factory.mktemp("cli_errors")
    model = str(root / "model.pt")
    export(tiny_model(), model)
    data = str(root / "data.xyz")
    write(data, water_frames(), format="extxyz")
    structure = str(root / "water.xyz")
    write(structure, molecule("H2O"), format="extxyz")
    deepmd = root / "deepmd"
    (deepmd / "set.000").mkdir(parents=True)
    (deepmd / "type.raw").write_text("0\n1\n1\n")
    (deepmd / "type_map.raw").write_text("O\nH\n")
    frames = water_frames()
    sets = deepmd / "set.000"
    np.save(sets / "coord.npy", np.stack([a.positions for a in frames]).reshape(2, -1))
    np.save(sets / "energy.npy", np.array([a.get_potential_energy() for a in frames]))
    np.save(sets / "force.npy", np.stack([a.get_forces() for a in frames]).reshape(2, -1))
    (deepmd / "nopbc").write_text("")
    return {"root": root, "model": model, "data": data, "structure": structure,
            "deepmd": deepmd}


def one_line_error(capsys, argv, *needles):
    """Run `mlpot ARGV` in this process: exit code 2, one line on stderr holding the needles."""
    code = cli([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err, err
    assert code == 2, f"exit code {code}, stderr:\n{err}"
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_the_good_case_passes(files, capsys):
    """The files the error cases start from are good: `mlpot test` on them succeeds."""
    assert cli(["test", files["model"], "--data", files["data"]]) == 0
    assert cli(["test", files["model"], "--data", str(files["deepmd"])]) == 0


def test_test_on_a_text_file(files, capsys, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a model\n")
    one_line_error(capsys, ["test", notes, "--data", files["data"]], str(notes))


def test_test_on_a_truncated_model(files, capsys, tmp_path):
    cut = tmp_path / "cut.pt"
    blob = open(files["model"], "rb").read()
    cut.write_bytes(blob[: len(blob) // 2])
    one_line_error(capsys, ["test", cut, "--data", files["data"]], str(cut))


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: --device cuda works")
def test_test_on_cuda_without_a_gpu(files, capsys):
    line = one_line_error(capsys, ["test", files["model"], "--data", files["data"], "--device",
                                   "cuda"])
    assert "cuda" in line.lower()


def test_foreign_checkpoint_dict(files, capsys, tmp_path):
    foreign = tmp_path / "x.pt"
    torch.save({"a": 1}, foreign)
    one_line_error(capsys, ["test", foreign, "--data", files["data"]], str(foreign))
    one_line_error(capsys, ["export", foreign, "-o", tmp_path / "out.pt"], str(foreign))
    assert not (tmp_path / "out.pt").exists()


def test_test_on_deepmd_data_with_a_non_integer_type_raw(files, capsys, tmp_path):
    import shutil

    bad = tmp_path / "deepmd"
    shutil.copytree(files["deepmd"], bad)
    (bad / "type.raw").write_text("0\n1.5\n1\n")
    one_line_error(capsys, ["test", files["model"], "--data", bad],
                   f"{bad / 'type.raw'}: '1.5' (entry 2) is not an integer")


def test_test_on_deepmd_data_with_an_object_array(files, capsys, tmp_path):
    import shutil

    bad = tmp_path / "deepmd"
    shutil.copytree(files["deepmd"], bad)
    energy = bad / "set.000" / "energy.npy"
    np.save(energy, np.array([{"e": -14.0}, {"e": -14.1}], dtype=object), allow_pickle=True)
    one_line_error(capsys, ["test", files["model"], "--data", bad],
                   f"{energy}: an object array")


def test_md_with_zero_replicas(files, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    one_line_error(capsys, ["md", files["model"], files["structure"], "--steps", "2",
                            "--replicas", "0", "--no-progress"], "--replicas")


def test_md_on_an_empty_structure_file(files, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    empty = tmp_path / "empty.xyz"
    empty.write_text("")
    one_line_error(capsys, ["md", files["model"], empty, "--steps", "2", "--no-progress"],
                   str(empty))


def test_md_frame_beyond_the_file(files, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = one_line_error(capsys, ["md", files["model"], files["structure"], "--frame", "99",
                                   "--steps", "2", "--no-progress"], files["structure"])
    assert "99" in line


def test_a_real_process_exits_2_with_one_line(files, tmp_path):
    """The same through the installed entry point's module: exit status and stderr as a user
    sees them."""
    notes = tmp_path / "notes.txt"
    notes.write_text("not a model\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "mlpot.cli", "test", str(notes), "--data",
                           files["data"]], capture_output=True, text=True, env=env, timeout=300)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr
    assert str(notes) in lines[0]


def test_test_on_unlabelled_data(files, capsys):
    """`mlpot test` on frames without labels said nothing and exited 0; now it says why."""
    one_line_error(capsys, ["test", files["model"], "--data", files["structure"]],
                   "no energy, force or stress labels")
