"""Committees: mean of the members, DeePMD-style deviations from the members' own outputs, the
physics checks of any model, one file on export, rebuilt from config and checkpoint."""
import numpy as np
import pytest
import torch

from mlpot import keys as K
from mlpot import testing as T
from mlpot.checkpoint import model_from_checkpoint, save_checkpoint
from mlpot.export import export, load, read_metadata
from mlpot.models import build_model, from_config
from mlpot.models.committee import Committee
from mlpot.uncertainty import model_deviation

pytestmark = pytest.mark.usefixtures("one_thread")

HP = {"hidden": 8, "edge_hidden": 8, "num_layers": 1, "readout_hidden": 8}


def member(seed, dtype="float64"):
    torch.manual_seed(seed)
    m = build_model("egnn", ["H", "O"], cutoff=3.5, dtype=dtype, **HP)
    m.set_reference_energies(torch.tensor([-13.6, -2041.0], dtype=torch.float64))
    return m.eval()


@pytest.fixture(scope="module")
def committee():
    return Committee([member(s) for s in (0, 1, 2)]).eval()


def test_outputs_are_the_members_mean_and_deviation(committee):
    atoms = T.random_periodic(("O", "H"), 10, seed=1)
    data = T.to_data(atoms, committee).as_dict()
    out = committee(dict(data), True, True)
    members = [m(dict(data), True, True) for m in committee.members]
    e = torch.stack([o[K.ENERGY] for o in members])
    f = torch.stack([o[K.FORCES] for o in members])
    v = torch.stack([o[K.VIRIAL] for o in members])
    torch.testing.assert_close(out[K.ENERGY], e.mean(0), rtol=0, atol=1e-12)
    torch.testing.assert_close(out[K.FORCES], f.mean(0), rtol=0, atol=1e-12)
    torch.testing.assert_close(out[K.STRESS],
                               torch.stack([o[K.STRESS] for o in members]).mean(0))
    torch.testing.assert_close(out[K.ENERGY_MEMBERS], e)
    dev = model_deviation(e, f, torch.zeros(10, dtype=torch.long), torch.tensor([10]), v)
    for key, value in dev.items():
        torch.testing.assert_close(out[key], value, rtol=0, atol=1e-12)
    fa = f.detach().numpy()
    expected = np.sqrt(((fa - fa.mean(0)) ** 2).sum(-1).mean(0)).max()  # DeePMD's max_devi_f
    assert float(out[K.MAX_FORCE_DEV][0]) == pytest.approx(expected, rel=1e-12)
    assert float(out[K.MAX_FORCE_DEV][0]) > 0
    torch.testing.assert_close(out[K.MAX_FORCE_DEV + K.CALIBRATED_SUFFIX], out[K.MAX_FORCE_DEV])
    committee.set_calibration(2.5)
    again = committee(dict(data), True, False)
    torch.testing.assert_close(again[K.MAX_FORCE_DEV + K.CALIBRATED_SUFFIX],
                               2.5 * again[K.MAX_FORCE_DEV])
    committee.set_calibration(1.0)


def test_equal_members_give_zero_deviation():
    same = Committee([member(0), member(0)]).eval()
    out = same(T.to_data(T.small_molecule("H2O"), same).as_dict(), True, False)
    assert float(out[K.MAX_FORCE_DEV].detach().max()) < 1e-12
    assert float(out[K.ENERGY_DEV].detach().max()) < 1e-12


def test_a_committee_passes_the_model_contract(committee):
    T.assert_model_contract(committee)


def test_export_config_and_checkpoint_round_trips(committee, tmp_path):
    atoms = T.random_periodic(("O", "H"), 8, seed=2)
    data = T.to_data(atoms, committee).as_dict()
    ref = committee(dict(data), True, True)
    path = export(committee, str(tmp_path / "committee.pt"))
    info = read_metadata(path)
    assert info["committee"] == 3 and info["calibration"] == 1.0
    loaded = load(path)
    assert loaded.committee == 3
    got = loaded(dict(data), True, True)
    for key in (K.ENERGY, K.FORCES, K.STRESS, K.MAX_FORCE_DEV, K.FORCES_DEV, K.ENERGY_DEV,
                K.VIRIAL_DEV, K.FORCES_MEMBERS):
        torch.testing.assert_close(got[key], ref[key], rtol=0, atol=1e-10)
    rebuilt = from_config(committee.config)
    rebuilt.load_state_dict(committee.state_dict())
    torch.testing.assert_close(rebuilt(dict(data))[K.ENERGY], ref[K.ENERGY])
    save_checkpoint(committee, str(tmp_path / "best.pt"))
    back = model_from_checkpoint(str(tmp_path / "best.pt"))
    torch.testing.assert_close(back(dict(data))[K.MAX_FORCE_DEV], ref[K.MAX_FORCE_DEV])


def test_members_must_match():
    with pytest.raises(ValueError, match="at least 2 members"):
        Committee([member(0)])
    other = build_model("egnn", ["H", "C"], cutoff=3.5, dtype="float64", **HP)
    with pytest.raises(ValueError, match="member 1 differs"):
        Committee([member(0), other])
