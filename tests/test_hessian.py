"""Hessian rows (mlpot/hessian.py): the labeller's central differences equal the model's own
second derivatives, the file and batch layouts, the training term, and a student that learns a
teacher's Hessian ends closer to it than one trained without."""
import numpy as np
import pytest
import torch
from ase.build import molecule
from ase.io import read as ase_read
from ase.io import write

import mlpot
from _fitting import labelled_cu_cells
from mlpot import keys as K
from mlpot.data import AtomicData, DataError
from mlpot.data.readers import read_ase
from mlpot.export import export
from mlpot.hessian import array_to_matrix, rows_to_array, sampled_row_loss
from mlpot.inputs import structure_inputs
from mlpot.label import LabellerSpec, label_file
from mlpot.models import build_model
from mlpot.train.config import LossConfig
from mlpot.train.loss import Loss

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

SYMBOLS = ["H", "C", "O"]


def _model():
    torch.manual_seed(0)
    return build_model("egnn", SYMBOLS, cutoff=4.0, dtype="float64", hidden=8, edge_hidden=8,
                       num_layers=1, readout_hidden=8)


def _methanols(n):
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        a = molecule("CH3OH")
        a.positions += rng.normal(0, 0.05, a.positions.shape)
        out.append(a)
    return out


def _autograd_hessian(model, atoms):
    types = torch.tensor([SYMBOLS.index(s) for s in atoms.get_chemical_symbols()])

    def energy(p):
        return model(structure_inputs(p, types), compute_forces=False)[K.ENERGY].sum()

    n = len(atoms)
    return torch.autograd.functional.hessian(
        energy, torch.tensor(atoms.positions)).reshape(3 * n, 3 * n).numpy()


def test_model_labeller_rows_equal_the_models_second_derivatives(tmp_path):
    model = _model().eval()
    export(model, str(tmp_path / "m.pt"))
    frames = _methanols(3)
    write(str(tmp_path / "in.xyz"), frames)
    spec = LabellerSpec(kind="model", model=str(tmp_path / "m.pt"), hessian_atoms=2,
                        hessian_delta=0.001, hessian_seed=3)
    label_file(str(tmp_path / "in.xyz"), str(tmp_path / "out.xyz"), spec, log=lambda s: None)
    back = read_ase(str(tmp_path / "out.xyz"), type_map=SYMBOLS, hessian_key="REF_hessian")
    chosen = set()
    for atoms, data in zip(frames, back):
        n = len(atoms)
        want = _autograd_hessian(model, atoms)
        got = data.hessian.numpy().reshape(3 * n, 3 * n)
        labelled = np.isfinite(got).all(axis=1)
        assert labelled.sum() == 6 and np.isnan(got[~labelled]).all()  # 2 atoms x 3 rows
        scale = np.abs(want).max()
        np.testing.assert_allclose(got[labelled], want[labelled], rtol=0, atol=1e-4 * scale)
        chosen.add(tuple(np.nonzero(labelled)[0]))
    assert len(chosen) > 1  # the atoms are drawn per frame


def test_finite_difference_rows_of_emt_are_symmetric_and_predict_force_changes(tmp_path):
    frames = labelled_cu_cells(2, seed=4, stress=False)
    write(str(tmp_path / "in.xyz"), frames)
    spec = LabellerSpec(kind="ase", calculator="ase.calculators.emt:EMT", hessian_atoms=-1)
    label_file(str(tmp_path / "in.xyz"), str(tmp_path / "out.xyz"), spec, log=lambda s: None)
    from ase.calculators.emt import EMT

    for a in ase_read(str(tmp_path / "out.xyz"), ":"):
        n = len(a)
        h = array_to_matrix(a.arrays["REF_hessian"], n)
        assert np.isfinite(h).all()
        np.testing.assert_allclose(h, h.T, rtol=0, atol=1e-3 * np.abs(h).max())
        # H v = -(F(R + eps v) - F(R - eps v)) / (2 eps) for a random direction v
        v = np.random.default_rng(1).normal(size=(n, 3))
        b = a.copy()
        b.calc = EMT()
        eps = 1e-4
        b.positions = a.positions + eps * v
        fp = b.get_forces()
        b.positions = a.positions - eps * v
        fm = b.get_forces()
        np.testing.assert_allclose(h @ v.reshape(-1), -(fp - fm).reshape(-1) / (2 * eps),
                                   rtol=0, atol=2e-3 * np.abs(h).max())


def test_file_and_batch_layouts(tmp_path):
    frames = labelled_cu_cells(3, seed=0, stress=False)
    rows = np.arange(3 * 12, dtype=float).reshape(3, 12) + 0.5
    frames[0].arrays["T_h"] = rows_to_array(4, [2], rows)  # atom 2's three rows
    frames[2].arrays["T_h"] = rows_to_array(4, [0], -rows)
    path = str(tmp_path / "d.xyz")
    write(path, frames, format="extxyz")
    items = read_ase(path, type_map=["Cu"], hessian_key="T_h")
    assert items[1].hessian is None
    m = items[0].hessian.numpy().reshape(12, 12)
    np.testing.assert_array_equal(m[6:9], rows)
    assert np.isnan(np.delete(m, [6, 7, 8], axis=0)).all()
    batch = AtomicData.collate(items)
    assert batch.hessian.shape == (3 * 144,) and torch.isnan(batch.hessian[144:288]).all()
    np.testing.assert_array_equal(batch[2].hessian.numpy(), items[2].hessian.numpy())
    assert batch.to(dtype=torch.float32).hessian.dtype == torch.float64
    assert K.POSITIONS in batch.as_dict() and "hessian" not in batch.as_dict()
    # bad labels: one line each
    frames[0].arrays["T_h"][2, 5] = np.nan  # a row partly NaN
    write(path, frames, format="extxyz")
    with pytest.raises(DataError, match=r"frame 0: T_h has a row that is partly NaN"):
        read_ase(path, hessian_key="T_h")
    frames[0].arrays["T_h"] = np.zeros((4, 7))
    write(path, frames, format="extxyz")
    with pytest.raises(DataError, match=r"frame 0: T_h has 28 numbers; a structure of 4 atoms"):
        read_ase(path, hessian_key="T_h")


def test_the_loss_term_compares_sampled_rows_and_reaches_the_parameters():
    model = _model().train()
    frames = _methanols(2)
    items = []
    for a in frames:
        d = AtomicData.from_ase(a)
        d.atom_types = torch.tensor([SYMBOLS.index(s) for s in a.get_chemical_symbols()])
        d.hessian = torch.as_tensor(_autograd_hessian(model, a).reshape(-1))
        items.append(d)
    batch = AtomicData.collate(items)

    def term(labels, rows=2):
        inputs = batch.as_dict()
        pos = inputs[K.POSITIONS].detach().requires_grad_(True)
        inputs[K.POSITIONS] = pos
        pred = model(inputs, compute_forces=True)
        return sampled_row_loss(pred[K.FORCES], pos, labels, batch.ptr, rows), pred, pos

    (mse, count), _, _ = term(batch.hessian)
    assert count == 2 * 2 * 18 and float(mse.detach()) < 1e-20  # the model's own rows: no error
    (mse, _), _, _ = term(batch.hessian + 0.1)
    assert float(mse.detach()) == pytest.approx(0.01, rel=1e-9)
    model.zero_grad()
    mse.backward()
    assert sum(float(p.grad.abs().sum()) for p in model.parameters() if p.grad is not None) > 0
    # through Loss: a part of its own, left out without the positions (validation)
    loss = Loss(LossConfig(energy=0.0, forces=0.0, hessian=2.0))
    batch.hessian = batch.hessian + 0.1
    _, pred, pos = term(batch.hessian)
    total, parts = loss(pred, batch, positions=pos)
    assert parts["hessian"] == pytest.approx(0.01, rel=1e-9)
    assert float(total) == pytest.approx(0.02, rel=1e-9)
    _, parts = loss(pred, batch)
    assert "hessian" not in parts


def _hessian_error(checkpoint, frames):
    model = mlpot.load(mlpot.export(str(checkpoint), str(checkpoint) + ".pt"))
    err = []
    for a in frames:
        want = array_to_matrix(a.arrays["REF_hessian"], len(a))
        d = structure_inputs(torch.tensor(a.positions, dtype=torch.float32).requires_grad_(True),
                             model.atom_types(a.numbers), torch.tensor(a.cell.array),
                             torch.tensor([True] * 3))
        n = len(a)
        rows = []
        for r in range(3 * n):
            pos = torch.tensor(a.positions, dtype=torch.float32, requires_grad=True)
            d[K.POSITIONS] = pos
            e = model(d, False, False)[K.ENERGY].sum()
            (g,) = torch.autograd.grad(e, pos, create_graph=True)
            (h,) = torch.autograd.grad(g.reshape(-1)[r], pos)
            rows.append(h.reshape(-1).numpy())
        err.append(np.abs(np.array(rows) - want).ravel())
    return float(np.mean(np.concatenate(err)))


def test_a_student_trained_on_hessian_rows_learns_them(tmp_path):
    """Two Deep Potentials with the same seed and steps on EMT Cu cells, one also learning
    EMT's Hessian rows: it ends closer to EMT's Hessian on cells it never saw."""
    from mlpot.train import config_from_dict, train

    spec = LabellerSpec(kind="ase", calculator="ase.calculators.emt:EMT", hessian_atoms=-1)
    write(str(tmp_path / "cells.xyz"), labelled_cu_cells(24, seed=0, stress=False))
    label_file(str(tmp_path / "cells.xyz"), str(tmp_path / "train.xyz"), spec,
               log=lambda s: None)
    write(str(tmp_path / "held.xyz"), labelled_cu_cells(3, seed=300, stress=False))
    label_file(str(tmp_path / "held.xyz"), str(tmp_path / "test.xyz"), spec, log=lambda s: None)
    held = ase_read(str(tmp_path / "test.xyz"), ":")
    errors = {}
    for w in (0.0, 1.0):
        cfg = config_from_dict({
            "data": {"train": str(tmp_path / "train.xyz"), "validation_fraction": 0.2,
                     "hessian_key": "REF_hessian"},
            "model": {"name": "dp_se_e2_a", "cutoff": 4.0,
                      "hparams": {"embedding": [8, 16], "axis_neuron": 4, "fitting": [16, 16]}},
            "loss": {"energy": 1.0, "forces": 10.0, "hessian": w},
            "optim": {"lr": 1e-2},
            "training": {"max_epochs": 15, "batch_size": 4, "seed": 5, "progress": False,
                         "out_dir": str(tmp_path / f"w{w}")}})
        train(cfg)
        errors[w] = _hessian_error(tmp_path / f"w{w}" / "best.pt", held)
    print(f"held-out Hessian MAE (eV/A^2): {errors}")
    assert errors[1.0] < 0.9 * errors[0.0]  # seen: 1.01 against 1.27


def test_label_cli_hessian_options_and_bad_values(tmp_path, capsys):
    from mlpot.cli import main as cli

    frames = labelled_cu_cells(2, seed=7, stress=False)
    write(str(tmp_path / "in.xyz"), frames)
    out = tmp_path / "out.xyz"
    assert cli(["label", str(tmp_path / "in.xyz"), "-o", str(out), "--ase-calculator",
                "ase.calculators.emt:EMT", "--hessian-atoms", "1"]) == 0
    for a in ase_read(str(out), ":"):
        assert np.isfinite(a.arrays["REF_hessian"]).all(axis=1).sum() == 1
    capsys.readouterr()
    for flag, value, message in (("--hessian-atoms", "-2", "give a number of atoms >= 0"),
                                 ("--hessian-delta", "0", "give a displacement > 0")):
        assert cli(["label", str(tmp_path / "in.xyz"), "-o", str(tmp_path / "x.xyz"),
                    "--ase-calculator", "ase.calculators.emt:EMT", flag, value]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "x.xyz").exists()
