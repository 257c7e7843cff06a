"""The cheap single-model uncertainty (``model.uncertainty: mve``, mlpot.models.mve): outputs by
the stated formulas, the same in the exported file and every engine, a mean model that trains
exactly as without the variance network, a variance network that learns where the errors are
large, and the config checks."""
import json

import numpy as np
import pytest
import torch
from ase.build import bulk

import integrators as I
import mlpot
from _fitting import write_frames
from mlpot import keys as K
from mlpot.ase import MLPotCalculator
from mlpot.data import AtomicData
from mlpot.export import read_metadata
from mlpot.inputs import structure_inputs
from mlpot.models import build_model
from mlpot.models.mve import MVEPotential, build_mve, gaussian_nll
from mlpot.neighbors import pair_vectors
from mlpot.train import ConfigError, Trainer, config_from_dict

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _model(dtype="float64"):
    torch.manual_seed(0)
    pot = build_model("egnn", ["Cu", "Au"], cutoff=4.0, dtype=dtype, hidden=8, edge_hidden=8,
                      num_layers=1, readout_hidden=8)
    pot.energy_scale.fill_(0.7)
    m = build_mve(pot)
    with torch.no_grad():  # lengths that differ per element, so the test sees the types
        m.energy_length_raw.copy_(torch.tensor([0.3, -1.0], dtype=torch.float64))
    return m


def _atoms(seed=1):
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 1, 1))
    atoms.symbols[[1, 6]] = "Au"
    atoms.rattle(0.1, seed=seed)
    return atoms


def _inputs(atoms, types):
    return structure_inputs(torch.tensor(atoms.positions), torch.as_tensor(types),
                            torch.tensor(atoms.cell.array), torch.tensor([True] * 3))


def test_outputs_follow_the_stated_formulas():
    m = _model()
    atoms = _atoms()
    types = (atoms.numbers == 79).astype(np.int64)
    out = m(_inputs(atoms, types), True, True)
    # the mean is the inner Potential's, untouched
    inner = m.potential(_inputs(atoms, types), True, True)
    for k in (K.ENERGY, K.FORCES, K.STRESS, K.ATOMIC_ENERGIES):
        assert torch.equal(out[k], inner[k]), k
    # forces_dev = softplus(sigma_net) * u + 1e-6, from the variance network called directly
    d = _inputs(atoms, types)
    i, j, shifts = m.neighbor_list(d[K.POSITIONS], d[K.CELL], d[K.PBC],
                                   torch.tensor([0, len(atoms)]))
    vec = pair_vectors(d[K.POSITIONS], d[K.CELL], torch.zeros(len(atoms), dtype=torch.long),
                       i, j, shifts)
    raw = m.sigma_net(torch.as_tensor(types), torch.stack([i, j]), vec).detach().numpy()
    s = np.log1p(np.exp(raw)) * 0.7 + 1e-6
    np.testing.assert_allclose(out[K.FORCES_DEV].detach().numpy(), s, rtol=1e-12)
    assert float(out[K.MAX_FORCE_DEV][0].detach()) == pytest.approx(s.max(), rel=1e-12)
    a = np.log1p(np.exp(np.array([0.3, -1.0])))[types]
    expected_e = np.sqrt(np.sum((a * s) ** 2)) / len(atoms)
    assert float(out[K.ENERGY_DEV][0]) == pytest.approx(expected_e, rel=1e-12)
    assert K.VIRIAL_DEV not in out and K.FORCES_MEMBERS not in out
    m.set_calibration(2.5)
    out = m(_inputs(atoms, types), True, False)
    assert float(out[K.MAX_FORCE_DEV + K.CALIBRATED_SUFFIX][0]) == pytest.approx(2.5 * s.max())
    with pytest.raises(ValueError, match="calibration factor"):
        m.set_calibration(0.0)


def test_gaussian_nll_is_the_stated_likelihood():
    rng = np.random.default_rng(0)
    f_pred, f_ref = rng.normal(size=(5, 3)), rng.normal(size=(5, 3))
    f_ref[2] = np.nan  # a missing label is left out
    s = rng.uniform(0.2, 1.0, 5)
    e_pred, e_ref, e_dev = rng.normal(size=2), np.array([0.3, np.nan]), np.array([0.05, 0.1])
    n = np.array([3, 2])
    pred = {K.FORCES: torch.tensor(f_pred, requires_grad=True),
            K.FORCES_DEV: torch.tensor(s, requires_grad=True),
            K.ENERGY: torch.tensor(e_pred), K.ENERGY_DEV: torch.tensor(e_dev)}
    got = gaussian_nll(pred, torch.tensor(f_ref), torch.tensor(e_ref), torch.tensor(n))
    ok = [0, 1, 3, 4]
    err2 = ((f_pred - f_ref) ** 2).sum(1)[ok]
    want = np.mean(3 * np.log(s[ok]) + 1.5 * err2 / s[ok] ** 2)
    sig = e_dev[0] * n[0]
    want += np.log(sig) + 0.5 * (e_pred[0] - e_ref[0]) ** 2 / sig ** 2
    assert float(got) == pytest.approx(want, rel=1e-12)
    got.backward()  # the errors are detached: no gradient reaches the mean model's forces
    assert pred[K.FORCES].grad is None


def test_exported_file_and_every_engine_report_the_same_deviation(tmp_path):
    m = _model()
    m.set_calibration(1.5)
    path = mlpot.export(m, str(tmp_path / "mve.pt"))
    meta = read_metadata(path)
    assert meta["uncertainty"] == "mve" and meta["calibration"] == 1.5 and not meta["committee"]
    model = mlpot.load(path)
    assert model.uncertainty == "mve"
    atoms = _atoms(seed=4)
    types = (atoms.numbers == 79).astype(np.int64)
    want = {k: v.detach().numpy() for k, v in m(_inputs(atoms, types), True, True).items()}
    got = model(_inputs(atoms, types), True, True)
    for k, v in want.items():
        np.testing.assert_allclose(got[k].detach().numpy(), v, rtol=1e-10, atol=1e-12,
                                   err_msg=k)
    calc = MLPotCalculator(model)
    atoms.calc = calc
    atoms.get_forces()
    assert calc.results["max_force_dev"] == pytest.approx(float(want[K.MAX_FORCE_DEV][0]))
    assert calc.results["energy_dev_calibrated"] == pytest.approx(
        1.5 * float(want[K.ENERGY_DEV][0]))
    np.testing.assert_allclose(calc.results["forces_dev"], want[K.FORCES_DEV], rtol=1e-10)
    st = I.state_from_ase(atoms, replicas=2, dtype=torch.float64)
    provider = I.MLPotForces(model, model.atom_types(atoms.numbers))
    assert provider.uncertainty == "mve"
    st = I.VelocityVerlet(1.0).init(st, provider)
    np.testing.assert_allclose(st.outputs[K.MAX_FORCE_DEV].numpy(),
                               np.repeat(want[K.MAX_FORCE_DEV], 2), rtol=1e-10)
    np.testing.assert_allclose(st.outputs[K.FORCES_DEV][1].numpy(), want[K.FORCES_DEV],
                               rtol=1e-10)
    pytest.importorskip("openmm")
    from mlpot.openmm import UncertaintyReporter

    rep = UncertaintyReporter(path, None, str(tmp_path / "u.csv"), interval=5)
    assert rep.model.uncertainty == "mve"


# ---------------------------------------------------------------------------- training
def _noisy_au_frames(n=16, seed=0):
    """EMT Cu cells with two Au atoms whose force labels carry large noise (0.4 eV/A per
    component): the errors are large on Au and small on Cu, which the variance network must
    learn."""
    from ase.calculators.emt import EMT

    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(n):
        atoms = _atoms(seed=int(rng.integers(1 << 30)))
        atoms.calc = EMT()
        e, f = atoms.get_potential_energy(), atoms.get_forces()
        au = atoms.numbers == 79
        f[au] += rng.normal(0.0, 0.4, f[au].shape)
        atoms.calc = None
        atoms.info["REF_energy"] = e
        atoms.arrays["REF_forces"] = f
        frames.append(atoms)
    return frames


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mve_data")
    path = folder / "noisy.xyz"
    from ase.io import write

    write(str(path), _noisy_au_frames(), format="extxyz")
    return str(path)


def _cfg(data_file, out, epochs, **model):
    return config_from_dict({
        "data": {"train": data_file, "validation_fraction": 0.25, "type_map": ["Cu", "Au"]},
        "model": {"name": "egnn", "cutoff": 4.0,
                  "hparams": {"hidden": 8, "edge_hidden": 8, "num_layers": 1,
                              "readout_hidden": 8}, **model},
        "loss": {"energy": 1.0, "forces": 10.0},
        "optim": {"lr": 1e-2, "grad_clip": 1.0},
        "training": {"batch_size": 2, "max_epochs": epochs, "out_dir": str(out),
                     "progress": False, "seed": 2}})


def test_the_mean_model_trains_exactly_as_without_the_variance_network(data_file, tmp_path):
    plain = Trainer(_cfg(data_file, tmp_path / "plain", 2))
    plain.fit()
    mve = Trainer(_cfg(data_file, tmp_path / "mve", 2, uncertainty="mve"))
    assert isinstance(mve.model, MVEPotential)
    mve.fit()
    a, b = plain.model.state_dict(), mve.model.potential.state_dict()
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert mve.history[-1]["train_nll"] == mve.history[-1]["train_nll"]  # logged, finite


def test_the_variance_network_learns_where_the_errors_are(data_file, tmp_path):
    from mlpot.train import train

    out = tmp_path / "run"
    results = train(_cfg(data_file, out, 25, uncertainty="mve"))
    assert results["uncertainty"] == "mve" and results["calibration_factor"] > 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert "uq_spearman_atom" in metrics["validation"]
    path = mlpot.export(str(out / "best.pt"), str(tmp_path / "m.pt"))
    meta = read_metadata(path)
    assert meta["uncertainty"] == "mve"
    assert meta["calibration"] == pytest.approx(results["calibration_factor"])
    model = mlpot.load(path)
    frames = _noisy_au_frames(6, seed=9)
    au, cu = [], []
    for atoms in frames:
        types = (atoms.numbers == 79).astype(np.int64)
        dev = model(_inputs(atoms, types), True, False)[K.FORCES_DEV].detach().numpy()
        au.extend(dev[types == 1])
        cu.extend(dev[types == 0])
    # Au labels carry 0.4 eV/A noise per component (norm ~0.69 eV/A), Cu none
    assert np.mean(au) > 2.0 * np.mean(cu), (np.mean(au), np.mean(cu))
    import csv

    nll = [float(r["train_nll"]) for r in csv.DictReader(open(out / "log.csv"))]
    assert nll[-1] < nll[0]  # the likelihood improves


def test_bad_uncertainty_configs_are_one_line_errors(data_file, tmp_path):
    with pytest.raises(ConfigError, match="is not one of"):
        _cfg(data_file, tmp_path / "a", 1, uncertainty="shallow")
    with pytest.raises(ConfigError, match="choose one"):
        c = _cfg(data_file, tmp_path / "b", 1, uncertainty="mve").to_dict()
        c["training"]["ensemble"] = 3
        config_from_dict(c)
    with pytest.raises(ConfigError, match="model.uncertainty is not"):
        _cfg(data_file, tmp_path / "c", 1, uncertainty_net={"name": "egnn"})
    with pytest.raises(ConfigError, match="uncertainty_net.*unknown model"):
        _cfg(data_file, tmp_path / "d", 1, uncertainty="mve", uncertainty_net={"name": "dp"})
    with pytest.raises(ConfigError, match="uncertainty_net.*widht"):
        _cfg(data_file, tmp_path / "e", 1, uncertainty="mve",
             uncertainty_net={"name": "egnn", "hparams": {"widht": 3}})
