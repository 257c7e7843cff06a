"""Per-atom energy labels (a teacher's atomic energies, for distillation): read by
``data.atomic_energies_key``, batched with NaN where a structure has none, learned through
``loss.atomic_energies`` as the masked mean squared error, and the reference energies started
from their per-element means."""
import numpy as np
import pytest
import torch
from ase.io import write

from _fitting import emt_cells
from mlpot import keys as K
from mlpot.data import AtomicData, DataError
from mlpot.data.readers import read_ase
from mlpot.models import atomic_reference_energies
from mlpot.train import Trainer, config_from_dict
from mlpot.train.config import LossConfig
from mlpot.train.loss import Loss, entry_counts

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _cells(n, seed=0, key="T_atomic"):
    """Rattled 8-atom Cu/Au cells labelled by EMT: energy, forces and EMT's per-atom energies
    under ``key`` (EMT's atomic energies sum to its energy)."""
    out = []
    for a in emt_cells(n, seed):
        a.info["REF_energy"] = a.get_potential_energy()
        a.arrays["REF_forces"] = a.get_forces()
        a.arrays[key] = a.get_potential_energies()
        a.calc = None
        out.append(a)
    return out


def test_the_reader_batches_atomic_energies_with_nan_where_missing(tmp_path):
    frames = _cells(3)
    del frames[1].arrays["T_atomic"]  # a frame without them (a reference frame, say)
    path = str(tmp_path / "d.xyz")
    write(path, frames, format="extxyz")
    items = read_ase(path, type_map=["Cu", "Au"], atomic_energies_key="T_atomic")
    assert items[1].atomic_energies is None
    for k in (0, 2):
        np.testing.assert_allclose(items[k].atomic_energies.numpy(),
                                   frames[k].arrays["T_atomic"], rtol=0, atol=1e-7)
        assert items[k].atomic_energies.dtype == torch.float64
    batch = AtomicData.collate(items)
    assert batch.atomic_energies.shape == (24,)
    assert torch.isnan(batch.atomic_energies[8:16]).all()
    assert torch.isfinite(batch.atomic_energies[:8]).all()
    # a structure taken back out of the batch, and a float32 copy, keep them (float64)
    np.testing.assert_allclose(batch[2].atomic_energies.numpy(), items[2].atomic_energies.numpy(),
                               atol=1e-10)
    assert batch.to(dtype=torch.float32).atomic_energies.dtype == torch.float64
    assert K.ATOMIC_ENERGIES not in batch.as_dict()  # a label, never a model input
    assert entry_counts(batch).tolist() == [3.0, 72.0, 0.0, 16.0]
    # without the key: no such label
    assert read_ase(path, type_map=["Cu", "Au"])[0].atomic_energies is None


def test_a_non_finite_atomic_energy_is_a_one_line_error(tmp_path):
    frames = _cells(2)
    frames[1].arrays["T_atomic"][3] = np.nan
    path = str(tmp_path / "d.xyz")
    write(path, frames, format="extxyz")
    with pytest.raises(DataError, match=r"frame 1: T_atomic holds a value that is not a finite"):
        read_ase(path, atomic_energies_key="T_atomic")


def test_the_loss_term_is_the_masked_mean_squared_error(tmp_path):
    frames = _cells(3)
    del frames[0].arrays["T_atomic"]
    path = str(tmp_path / "d.xyz")
    write(path, frames, format="extxyz")
    batch = AtomicData.collate(read_ase(path, type_map=["Cu", "Au"],
                                        atomic_energies_key="T_atomic"))
    rng = np.random.default_rng(1)
    pred = {K.ENERGY: batch.energy.clone(), K.FORCES: batch.forces.clone(),
            K.ATOMIC_ENERGIES: batch.atomic_energies.nan_to_num(-3.0)
            + torch.as_tensor(rng.normal(0, 0.1, 24))}
    loss = Loss(LossConfig(energy=1.0, forces=1.0, atomic_energies=2.0))
    total, parts = loss(pred, batch)
    err = (pred[K.ATOMIC_ENERGIES] - batch.atomic_energies).numpy()[8:]  # labelled atoms
    assert parts["atomic_energies"] == pytest.approx(float(np.mean(err ** 2)), rel=1e-12)
    assert float(total) == pytest.approx(2.0 * float(np.mean(err ** 2)), rel=1e-9)
    # off by default, and scheduled like the other weights
    assert "atomic_energies" not in Loss(LossConfig())(pred, batch)[1]
    w = Loss(LossConfig(atomic_energies=1.0, atomic_energies_start=11.0)).weights(0.5)
    assert w["atomic_energies"] == pytest.approx(6.0)


def test_reference_energies_start_from_the_labels_element_means():
    items = [AtomicData.from_arrays(np.zeros((3, 3)), [29, 29, 79]) for _ in range(2)]
    for s, values in zip(items, ([-3.0, -4.0, -1.0], [-5.0, -4.0, -2.0])):
        s.atom_types = torch.tensor([0, 0, 1])
        s.atomic_energies = torch.tensor(values, dtype=torch.float64)
    items.append(AtomicData.from_arrays(np.zeros((1, 3)), [47]))  # no labels: the fallback
    items[-1].atom_types = torch.tensor([2])
    e0 = atomic_reference_energies(items, 3, torch.tensor([0.0, 0.0, 7.0]))
    np.testing.assert_allclose(e0.numpy(), [-4.0, -1.5, 7.0])


def _student(path, out_dir, weight, key="T_atomic"):
    return config_from_dict({
        "data": {"train": path, "validation_fraction": 0.25, "atomic_energies_key": key},
        "model": {"name": "dp_se_e2_a", "cutoff": 4.0,
                  "hparams": {"embedding": [8, 16], "axis_neuron": 4, "fitting": [16, 16]}},
        "loss": {"energy": 1.0, "forces": 1.0, "atomic_energies": weight},
        "optim": {"lr": 3e-3, "ema_decay": 0.0},
        "training": {"max_epochs": 12, "batch_size": 4, "seed": 3, "out_dir": str(out_dir)}})


def test_a_student_learns_the_teachers_atomic_energies(tmp_path):
    """With loss.atomic_energies the trained model's atomic energies follow the labels (EMT's
    here) far more closely than the same training without them, which fixes only their sums."""
    path = str(tmp_path / "d.xyz")
    write(path, _cells(24, seed=5), format="extxyz")
    errors = {}
    for weight in (0.0, 10.0):
        trainer = Trainer(_student(path, tmp_path / f"w{weight:g}", weight))
        if weight:  # E0 from the labels' element means
            labelled = [s.atomic_energies[s.atom_types == 1] for s in trainer.train_set.items]
            assert float(trainer.model.reference_energies[1]) == pytest.approx(
                float(torch.cat(labelled).mean()), abs=1e-9)
        trainer.fit()
        model = trainer.eval_model().eval()
        batch = AtomicData.collate(trainer.val_set.items).with_neighbors(4.0)
        with torch.no_grad():
            out = model(batch.to(dtype=torch.float32).as_dict(), compute_forces=False)
        errors[weight] = float((out[K.ATOMIC_ENERGIES] - batch.atomic_energies).abs().mean())
    print(errors)
    assert errors[10.0] < 0.5 * errors[0.0]


@pytest.mark.parametrize("key", [None, "NO_SUCH_KEY"])
def test_the_loss_term_without_labels_is_a_one_line_error_before_training(tmp_path, key):
    path = str(tmp_path / "d.xyz")
    write(path, _cells(6), format="extxyz")
    with pytest.raises(DataError, match=r"loss.atomic_energies asks for per-atom energy labels, "
                                        r"but no training frame has them") as err:
        Trainer(_student(path, tmp_path / "run", 1.0, key=key))
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run" / "last.pt").exists()
