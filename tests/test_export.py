"""Checkpoints and exported files: round trips, metadata, loading without mlpot, clear errors."""
import json
import os
import subprocess
import sys
import zipfile

import pytest
import torch

import mlpot
from mlpot import keys as K
from mlpot import testing as T
from mlpot.checkpoint import CheckpointError, hash_data, model_from_checkpoint, save_checkpoint
from mlpot.cli import main as cli
from mlpot.files import sha256
from mlpot.export import (FORMAT_VERSION, METADATA_NAME, ExportError, add_export_parser,
                          export, load, read_metadata)
from mlpot.models import build_model


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def small(dtype="float64", seed=0):
    torch.manual_seed(seed)
    model = build_model("egnn", ["H", "C", "O"], cutoff=4.0, dtype=dtype, hidden=16,
                        edge_hidden=16, num_layers=2, readout_hidden=16)
    model.set_reference_energies(torch.tensor([-13.6, -1029.5, -2041.2]))
    return model.eval()


def evaluate(model, atoms, stress=False):
    out = model(T.to_data(atoms, model).as_dict(), True, stress)
    return {k: v.detach() for k, v in out.items()}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = small()
    path = str(tmp_path_factory.mktemp("export") / "model.pt")
    export(model, path, training_data_hash="sha256:abc", metadata={"note": "test"})
    return model, path


def test_round_trip_and_metadata(exported):
    model, path = exported
    loaded = load(path)
    for atoms in (T.small_molecule("CH3CH2OH"), T.random_periodic(("C", "H", "O"), 20, seed=3)):
        stress = bool(atoms.pbc.all())
        a, b = evaluate(model, atoms, stress), evaluate(loaded, atoms, stress)
        for key in (K.ENERGY, K.FORCES, K.ATOMIC_ENERGIES) + ((K.STRESS,) if stress else ()):
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-10)
    info = loaded.metadata
    assert info == read_metadata(path)
    assert info["format_version"] == FORMAT_VERSION
    assert info["mlpot_version"] == mlpot.__version__
    assert info["type_map"] == ["H", "C", "O"] == loaded.type_map
    assert info["cutoff"] == 4.0 == loaded.cutoff
    assert info["units"] == {"length": "A", "energy": "eV"}
    assert info["dtype"] == "float64" and loaded.dtype == torch.float64
    assert info["config"] == model.config and info["config"]["hparams"]["hidden"] == 16
    assert info["training_data_hash"] == "sha256:abc"
    assert info["user"] == {"note": "test"}
    assert "egnn" in repr(loaded)


def test_float32_export_of_a_float64_model(exported, tmp_path):
    model, _ = exported
    path = str(tmp_path / "f32.pt")
    export(model, path, dtype="float32")
    loaded = load(path)
    assert loaded.metadata["dtype"] == "float32" and loaded.metadata["config"]["dtype"] == "float32"
    assert model.model_dtype == torch.float64  # the model itself is untouched
    atoms = T.random_periodic(("C", "H", "O"), 20, seed=4)
    a = evaluate(model, atoms)
    data = T.to_data(atoms, model, dtype=torch.float32).as_dict()
    b = {k: v.detach() for k, v in loaded(data).items()}
    assert b[K.ENERGY].dtype == torch.float64  # totals are float64 sums
    assert b[K.FORCES].dtype == torch.float32
    assert abs(float(b[K.ENERGY] - a[K.ENERGY])) < 1e-4 * len(atoms)
    torch.testing.assert_close(b[K.FORCES].double(), a[K.FORCES], rtol=0, atol=1e-4)


_LOADER = r"""
import json, sys
import torch
lib = sys.argv[2]
if lib:
    torch.ops.load_library(lib)
files = {"mlpot.json": ""}
model = torch.jit.load(sys.argv[1], _extra_files=files)
info = json.loads(files["mlpot.json"])
pos = torch.tensor(json.loads(sys.argv[3]), dtype=torch.float64)
data = {"positions": pos, "atom_types": torch.tensor([2, 0, 0]),
        "cell": torch.zeros(1, 3, 3, dtype=torch.float64),
        "pbc": torch.zeros(1, 3, dtype=torch.bool)}
out = model(data, True, False)
assert not any(m == "mlpot" or m.startswith("mlpot.") for m in sys.modules), "mlpot was imported"
print(json.dumps({"energy": float(out["energy"][0]), "type_map": info["type_map"]}))
"""


def test_loads_with_torch_alone(exported, tmp_path):
    """A process with torch (and mlpot's op library, when the model calls it) and nothing else of
    mlpot reads the file."""
    from mlpot.export import register_neighbor_op

    model, path = exported
    script = tmp_path / "loader.py"
    script.write_text(_LOADER)
    atoms = T.small_molecule("H2O")
    pos = json.dumps(atoms.positions.tolist())
    lib = register_neighbor_op() or ""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-I", str(script), path, lib, pos], env=env,
                         capture_output=True, text=True, timeout=120, cwd=str(tmp_path))
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["type_map"] == ["H", "C", "O"]
    assert got["energy"] == pytest.approx(float(evaluate(model, atoms)[K.ENERGY][0]), abs=1e-10)


def test_a_model_that_needs_the_op_in_a_process_without_it(exported):
    _, path = exported
    if read_metadata(path)["neighbor_list"] != "NeighborListOp":
        pytest.skip("the model was exported with the pure-PyTorch neighbor list")
    code = ("import mlpot.export as e\ntry:\n    e.load(%r)\nexcept e.ExportError as err:\n"
            "    print(err)" % path)
    env = dict(os.environ, MLPOT_NO_EXTENSION="1")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert "calls mlpot's compiled neighbor-list op" in res.stdout, res.stderr[-2000:]
    assert "unset MLPOT_NO_EXTENSION" in res.stdout


def test_the_same_checkpoint_exports_to_the_same_bytes(tmp_path):
    """Two processes with different string hash seeds export one checkpoint to identical files
    (and two checkpoints of one state are identical): a file's hash identifies its model. Before,
    the archive's inner folder was named after the random temporary file, and scripting wrote
    ``torch.nn.Linear``'s two constants in the hash seed's set order (seeds 1 and 4 differ)."""
    ckpt, again = str(tmp_path / "best.pt"), str(tmp_path / "copy" / "best.pt")
    model = small()
    save_checkpoint(model, ckpt, data_hash="sha256:d")
    save_checkpoint(model, again, data_hash="sha256:d")
    assert open(ckpt, "rb").read() == open(again, "rb").read()
    digests = []
    for seed in ("1", "4"):
        out = str(tmp_path / f"model_{seed}.pt")
        env = dict(os.environ, PYTHONHASHSEED=seed)
        res = subprocess.run([sys.executable, "-m", "mlpot", "export", ckpt, "-o", out],
                             env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
        digests.append(sha256(out))
    assert digests[0] == digests[1]


# ---------------------------------------------------------------------------- errors
def test_a_file_that_is_not_a_model(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model at all")
    with pytest.raises(ExportError, match="not an mlpot model"):
        load(str(junk))
    with pytest.raises(FileNotFoundError, match="no such model file"):
        load(str(tmp_path / "missing.pt"))

    class Plain(torch.nn.Module):
        def forward(self, x):
            return x

    plain = tmp_path / "plain.pt"
    torch.jit.save(torch.jit.script(Plain()), str(plain))
    with pytest.raises(ExportError, match="TorchScript file but not an mlpot model"):
        load(str(plain))

    ckpt = tmp_path / "ckpt.pt"
    save_checkpoint(small(), str(ckpt))
    with pytest.raises(ExportError, match="not an mlpot model"):
        load(str(ckpt))


def _rewrite_metadata(src: str, dst: str, change) -> None:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename.endswith("/extra/" + METADATA_NAME):
                data = change(data.decode()).encode()
            zout.writestr(item, data)


def test_a_newer_format_is_refused_with_advice(exported, tmp_path):
    _, path = exported
    newer = str(tmp_path / "newer.pt")

    def bump(text):
        info = json.loads(text)
        info.update(format_version=FORMAT_VERSION + 1, mlpot_version="9.0.0")
        return json.dumps(info)

    _rewrite_metadata(path, newer, bump)
    with pytest.raises(ExportError, match=r"exported by mlpot 9\.0\.0 .*Upgrade mlpot"):
        load(newer)
    broken = str(tmp_path / "broken.pt")
    _rewrite_metadata(path, broken, lambda text: "{not json")
    with pytest.raises(ExportError, match="unreadable mlpot metadata"):
        read_metadata(broken)


# ---------------------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip_prefers_ema(tmp_path):
    model, ema = small(seed=0), small(seed=1)
    path = str(tmp_path / "sub" / "best.pt")
    save_checkpoint(model, path, ema=ema.state_dict(), data_hash="sha256:d", epoch=7)
    assert os.listdir(tmp_path / "sub") == ["best.pt"]  # the temporary file is gone
    raw = torch.load(path, weights_only=True)  # plain data only
    assert raw["epoch"] == 7 and raw["config"] == model.config and raw["data_hash"] == "sha256:d"
    atoms = T.small_molecule("CH3CH2OH")
    e_ema = float(evaluate(ema, atoms)[K.ENERGY][0])
    e_raw = float(evaluate(model, atoms)[K.ENERGY][0])
    assert e_ema != pytest.approx(e_raw)
    assert float(evaluate(model_from_checkpoint(path), atoms)[K.ENERGY][0]) == pytest.approx(e_ema)
    assert float(evaluate(model_from_checkpoint(path, use_ema=False), atoms)[K.ENERGY][0]) == \
        pytest.approx(e_raw)

    out = str(tmp_path / "model.pt")
    mlpot.export(path, out)  # the module is callable
    assert read_metadata(out)["training_data_hash"] == "sha256:d"
    assert float(evaluate(load(out), atoms)[K.ENERGY][0]) == pytest.approx(e_ema, abs=1e-10)

    with pytest.raises(CheckpointError, match="exported .*not a training checkpoint"):
        model_from_checkpoint(out)
    bad = tmp_path / "bad.pt"
    torch.save({"weights": 1}, str(bad))
    with pytest.raises(CheckpointError, match="not an mlpot checkpoint"):
        model_from_checkpoint(str(bad))


def test_cli(tmp_path, capsys):
    import argparse

    ckpt = str(tmp_path / "best.pt")
    save_checkpoint(small(), ckpt)
    parser = argparse.ArgumentParser(prog="mlpot")
    add_export_parser(parser.add_subparsers(dest="command"))
    out = str(tmp_path / "m32.pt")
    args = parser.parse_args(["export", ckpt, "-o", out, "--dtype", "float32",
                              "--data-hash", "sha256:x"])
    assert args.func(args) == 0
    assert "float32" in capsys.readouterr().out
    info = read_metadata(out)
    assert info["dtype"] == "float32" and info["training_data_hash"] == "sha256:x"
    assert cli(["export", str(tmp_path / "nope.pt"), "-o", out]) == 2  # bad input
    assert "nope.pt" in capsys.readouterr().err


def test_hash_data(tmp_path):
    a, b = tmp_path / "a.xyz", tmp_path / "b.xyz"
    a.write_text("1\n\nH 0 0 0\n")
    b.write_text("1\n\nO 0 0 0\n")
    h = hash_data([str(a), str(b)])
    assert h.startswith("sha256:") and h == hash_data([str(b), str(a)])
    b.write_text("1\n\nO 0 0 1\n")
    assert hash_data([str(a), str(b)]) != h
