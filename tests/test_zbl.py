"""The ZBL short-range repulsion prior (mlpot.nn.zbl, ``model.repulsion: zbl``): the published
formula, the switch (continuous energy, force and force constant at both radii), the physics
checks of mlpot.testing with close contacts for every family, chunked == unchunked, export and the
ASE calculator, checkpoints, committees, the trainer's reference energies, config errors, and a
model without the prior unchanged."""
import copy

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.data import atomic_numbers, covalent_radii

from mlpot import keys as K
from mlpot import testing as T
from mlpot.checkpoint import model_from_checkpoint, save_checkpoint
from mlpot.export import export, load, read_metadata
from mlpot.models import build_model, fit_reference_energies, from_config, network_class
from mlpot.models.committee import Committee
from mlpot.nn.zbl import RepulsionError, ZBLRepulsion
from mlpot.train import ConfigError, config_from_dict

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

PAIRS = [("H", "H"), ("C", "H"), ("O", "H"), ("C", "C"), ("Si", "Si")]
TYPES = ["H", "C", "O", "Si"]


# ---------------------------------------------------------------------------- reference
def zbl_reference(r, z1, z2):
    """ZBL (Ziegler, Biersack, Littmark 1985), written out independently of mlpot (eV)."""
    a = 0.46850 / (z1 ** 0.23 + z2 ** 0.23)
    x = np.asarray(r) / a
    phi = (0.18175 * np.exp(-3.19980 * x) + 0.50986 * np.exp(-0.94229 * x)
           + 0.28022 * np.exp(-0.40290 * x) + 0.02817 * np.exp(-0.20162 * x))
    return 14.399645 * z1 * z2 / np.asarray(r) * phi


def radii_reference(s1, s2, inner=0.4, outer=0.6):
    rsum = covalent_radii[atomic_numbers[s1]] + covalent_radii[atomic_numbers[s2]]
    return inner * rsum, outer * rsum


def smoothstep_reference(r, ri, ro):
    t = np.clip((np.asarray(r) - ri) / (ro - ri), 0.0, 1.0)
    return 1.0 - 10 * t ** 3 + 15 * t ** 4 - 6 * t ** 5


def pair_energy(prior, s1, s2, r, grad_order=0):
    """Per-atom energies of the pair at distance r (tensor), through the full neighbor list."""
    types = torch.tensor([TYPES.index(s1), TYPES.index(s2)])
    edge_index = torch.tensor([[0, 1], [1, 0]])
    vec = torch.stack([torch.stack([r, torch.zeros_like(r), torch.zeros_like(r)])])
    vectors = torch.cat([vec, -vec])  # x_j - x_i from each end
    return prior(types, edge_index, vectors)


@pytest.fixture(scope="module")
def prior():
    return ZBLRepulsion(TYPES, cutoff=5.0)


@pytest.mark.parametrize("s1,s2", PAIRS)
def test_energy_is_the_published_formula_times_the_switch(prior, s1, s2):
    z1, z2 = atomic_numbers[s1], atomic_numbers[s2]
    ri, ro = radii_reference(s1, s2)
    distances = [0.3 * ri, 0.7 * ri, 0.999 * ri,               # the bare wall
                 ri + 0.2 * (ro - ri), ri + 0.5 * (ro - ri), ri + 0.9 * (ro - ri),  # switch
                 1.001 * ro, 1.5 * ro, 4.9]                    # nothing
    for r in distances:
        e = pair_energy(prior, s1, s2, torch.tensor(r, dtype=torch.float64))
        expected = zbl_reference(r, z1, z2) * smoothstep_reference(r, ri, ro)
        assert float(e.sum()) == pytest.approx(expected, rel=1e-12, abs=0.0), (s1, s2, r)
        assert float(e[0]) == float(e[1]) == pytest.approx(expected / 2, rel=1e-12)  # halves
        if r >= ro:
            assert float(e.sum()) == 0.0
    # the wall is a wall: tens of eV below r_inner for every pair
    assert float(pair_energy(prior, s1, s2, torch.tensor(0.9 * ri, dtype=torch.float64)).sum()) \
        > 10.0


def radial_derivatives(prior, s1, s2, r):
    """E(r), F(r) = -dE/dr and K(r) = dF/dr of a pair, by autograd (float64)."""
    rt = torch.tensor(r, dtype=torch.float64, requires_grad=True)
    e = pair_energy(prior, s1, s2, rt).sum()
    (de,) = torch.autograd.grad(e, rt, create_graph=True)
    (d2e,) = torch.autograd.grad(de, rt)
    return float(e.detach()), -float(de.detach()), -float(d2e)


@pytest.mark.parametrize("s1,s2", PAIRS)
def test_energy_force_and_force_constant_are_continuous_at_both_radii(prior, s1, s2):
    """Jumps across r_inner and r_outer shrink in proportion to the step h (a jump of E, F or
    dF/dr would stay); beyond r_outer everything is exactly zero."""
    ri, ro = radii_reference(s1, s2)
    for r0 in (ri, ro):
        jumps = []
        for h in (1e-3, 1e-4, 1e-5):
            left = radial_derivatives(prior, s1, s2, r0 - h)
            right = radial_derivatives(prior, s1, s2, r0 + h)
            jumps.append([abs(a - b) for a, b in zip(left, right)])
        scale = [abs(v) + 1.0 for v in radial_derivatives(prior, s1, s2, r0 - 1e-3)]
        for k, what in enumerate(("energy", "force", "force constant")):
            if k < 2:
                assert jumps[2][k] <= 1e-3 * scale[k], f"{s1}-{s2} {what} jumps at {r0:.3f}"
            assert jumps[2][k] <= 0.2 * jumps[1][k] + 1e-9, \
                f"{s1}-{s2}: the {what} jump at {r0:.3f} does not shrink with the step: {jumps}"
    assert radial_derivatives(prior, s1, s2, ro + 1e-6) == (0.0, 0.0, 0.0)
    # forces against central differences of the energy, in the wall and in the switch
    for r in (0.8 * ri, 0.5 * (ri + ro)):
        d = 1e-6
        fd = -(radial_derivatives(prior, s1, s2, r + d)[0]
               - radial_derivatives(prior, s1, s2, r - d)[0]) / (2 * d)
        assert radial_derivatives(prior, s1, s2, r)[1] == pytest.approx(fd, rel=1e-6)


# ---------------------------------------------------------------------------- in Potential
def small_model(name, repulsion="zbl", seed=0, dtype="float64", type_map=("O", "H"), **kw):
    torch.manual_seed(seed)
    hp = dict(getattr(network_class(name), "TEST_HPARAMS", {}))
    return build_model(name, list(type_map), 3.5, dtype, repulsion=repulsion, **hp, **kw).eval()


def close_contacts(seed=0, n_far=0):
    """A periodic cell (O, H) with an O-H pair in the switch (0.50 A), one in the bare wall
    (0.35 A) and an H-H pair in the switch (0.32 A), plus ``n_far`` atoms away from them."""
    rng = np.random.default_rng(seed)

    def unit():
        v = rng.normal(size=3)
        return v / np.linalg.norm(v)

    cell = np.diag([5.0, 5.2, 4.8]) + rng.uniform(-0.3, 0.3, (3, 3))
    o0, o2, h4 = np.array([0.5, 0.5, 0.5]), np.array([2.9, 0.7, 2.4]), np.array([1.2, 3.3, 2.9])
    pos = [o0, o0 + 0.50 * unit(), o2, o2 + 0.35 * unit(), h4, h4 + 0.32 * unit()]
    symbols = ["O", "H", "O", "H", "H", "H"]
    far = [np.array(p) for p in ([3.3, 3.6, 0.6], [0.6, 2.4, 3.9], [3.8, 2.2, 4.3],
                                 [2.0, 4.6, 1.5])]
    for k in range(n_far):
        pos.append(far[k])
        symbols.append("OH"[k % 2])
    return Atoms(symbols, positions=pos, cell=cell, pbc=True)


def prior_only(model, atoms):
    """The prior's share of the model's energy, from the module directly (eV)."""
    d = T.to_data(atoms, model).with_neighbors(model.cutoff)
    return float(model.repulsion(d.atom_types, d.edge_index, d.edge_vectors()).sum())


@pytest.mark.parametrize("name", ["dp_se_e2_a", "egnn", "nequip"])
def test_physics_checks_with_close_contacts(name):
    model = small_model(name)
    atoms = close_contacts()
    assert prior_only(model, atoms) > 30.0  # the prior is really there
    data = T.to_data(atoms, model)
    T.assert_forces_are_gradients(model, data, delta=3e-5, n_checks=10)
    T.assert_stress_is_strain_derivative(model, data)
    T.assert_invariance(model, data)
    T.assert_batch_equals_single(model, [data, T.to_data(close_contacts(seed=1, n_far=2), model)])
    T.assert_script_equals_eager(model, data)
    T.assert_smooth_at_cutoff(model)


def test_prior_is_rebuilt_from_the_config_and_survives_copies():
    model = small_model("egnn", repulsion_radii=[0.45, 0.65])
    cfg = model.config
    assert cfg["repulsion"] == "zbl" and cfg["repulsion_radii"] == [0.45, 0.65]
    rebuilt = from_config(cfg)
    rebuilt.load_state_dict(model.state_dict())
    twin = copy.deepcopy(model)
    data = T.to_data(close_contacts(), model)
    ref = model(data.as_dict())
    for other in (rebuilt.eval(), twin):
        assert isinstance(other.repulsion, ZBLRepulsion)
        out = other(data.as_dict())
        assert torch.equal(out[K.ENERGY], ref[K.ENERGY])
        assert torch.equal(out[K.FORCES], ref[K.FORCES])
    # r_inner/r_outer follow the configured fractions
    ri, ro = radii_reference("O", "H", 0.45, 0.65)
    assert float(model.repulsion.r_inner[0, 1]) == pytest.approx(ri, rel=1e-12)
    assert float(model.repulsion.r_outer[0, 1]) == pytest.approx(ro, rel=1e-12)
    # a committee keeps it per member, and its metadata says so
    committee = Committee([small_model("egnn", seed=s) for s in (0, 1)])
    again = from_config(committee.config)
    assert all(isinstance(m.repulsion, ZBLRepulsion) for m in again.members)
    from mlpot.checkpoint import model_metadata

    assert model_metadata(committee, 1)["repulsion"] == "zbl"


def test_chunked_equals_unchunked_with_the_prior():
    model = small_model("dp_se_e2_a")
    data = T.to_data(close_contacts(n_far=4), model)
    model.chunk_atoms = 0
    whole = model(data.as_dict(), True, True)
    model.chunk_atoms = 3
    chunked = model(data.as_dict(), True, True)
    assert prior_only(model, close_contacts(n_far=4)) > 30.0
    for key in (K.ENERGY, K.ATOMIC_ENERGIES, K.FORCES, K.VIRIAL, K.STRESS):
        torch.testing.assert_close(chunked[key], whole[key], rtol=1e-12, atol=1e-10)


def test_export_checkpoint_and_ase_carry_the_prior(tmp_path):
    from mlpot.ase import MLPotCalculator

    model = small_model("dp_se_e2_a")
    model.set_reference_energies(torch.tensor([-2041.2, -13.6]))
    ckpt = str(tmp_path / "best.pt")
    save_checkpoint(model, ckpt)
    restored = model_from_checkpoint(ckpt)
    assert isinstance(restored.repulsion, ZBLRepulsion)
    path = str(tmp_path / "model.pt")
    export(ckpt, path)  # what `mlpot export` does
    info = read_metadata(path)
    assert info["repulsion"] == "zbl" and info["config"]["repulsion_radii"] == [0.4, 0.6]
    loaded = load(path)
    atoms = close_contacts(n_far=2)
    data = T.to_data(atoms, model)
    a = model(data.as_dict(), True, True)
    b = loaded(T.to_data(atoms, loaded).as_dict(), True, True)
    for key in (K.ENERGY, K.FORCES, K.STRESS):
        torch.testing.assert_close(b[key].detach(), a[key].detach(), rtol=0, atol=1e-10)
    # a close O-H pair in vacuum (0.35 A): a large force pushing the atoms apart, in ASE too
    pair = Atoms("OH", positions=[[0, 0, 0], [0.35, 0, 0]])
    pair.calc = MLPotCalculator(path, min_distance=None)
    forces = pair.get_forces()
    wall = -np.gradient([zbl_reference(r, 8, 1) for r in (0.35 - 1e-6, 0.35, 0.35 + 1e-6)],
                        1e-6)[1]
    assert forces[1, 0] > 100.0 and forces[0, 0] < -100.0  # repulsive
    assert forces[1, 0] == pytest.approx(wall, rel=0.05)  # the wall dominates the network
    # the float32 export keeps the prior in float64
    path32 = str(tmp_path / "model32.pt")
    export(model, path32, dtype="float32")
    e32 = load(path32)(T.to_data(atoms, model).as_dict())[K.ENERGY]
    assert float(e32.detach()) == pytest.approx(float(a[K.ENERGY].detach()), abs=1e-3)


def test_without_the_prior_nothing_changes():
    plain = small_model("dp_se_e2_a", repulsion=None)
    assert plain.repulsion is None and "repulsion" not in plain.config
    assert not any(k.startswith("repulsion") for k in plain.state_dict())
    assert read_metadata_of(plain)["repulsion"] is None
    with_prior = small_model("dp_se_e2_a")  # same seed: same network weights
    net_keys = {k: v for k, v in with_prior.state_dict().items() if not k.startswith("repulsion")}
    plain.load_state_dict(net_keys)
    # bonded geometries (every pair beyond r_outer): the prior adds exactly zero
    data = T.to_data(T.random_periodic(("O", "H"), n_atoms=10, seed=1, min_dist=0.9), plain)
    a, b = plain(data.as_dict(), True, True), with_prior(data.as_dict(), True, True)
    for key in (K.ENERGY, K.ATOMIC_ENERGIES, K.FORCES, K.STRESS):
        assert torch.equal(a[key], b[key]), key
    # close contacts: only the prior differs
    data = T.to_data(close_contacts(), plain)
    a, b = plain(data.as_dict()), with_prior(data.as_dict())
    assert float((b[K.ENERGY] - a[K.ENERGY]).detach()) == pytest.approx(
        prior_only(with_prior, close_contacts()), rel=1e-10)


def read_metadata_of(model):
    from mlpot.checkpoint import model_metadata

    return model_metadata(model, 1)


def test_reference_energies_are_fitted_to_the_labels_minus_the_prior():
    model = small_model("egnn")
    frames = [close_contacts(seed=s) for s in range(3)] + \
        [T.random_periodic(("O", "H"), 6, seed=s, min_dist=0.9) for s in range(3)]
    e0 = torch.tensor([-2041.2, -13.6], dtype=torch.float64)
    items = []
    for k, atoms in enumerate(frames):
        d = T.to_data(atoms, model)
        counts = torch.bincount(d.atom_types, minlength=2).double()
        d.energy = (counts @ e0 + prior_only(model, atoms)).reshape(1)
        items.append(d)
    offsets = model.prior_energies(items)
    assert min(offsets[:3]) > 30.0 and offsets[3:] == [0.0, 0.0, 0.0]
    torch.testing.assert_close(fit_reference_energies(items, 2, offsets=offsets), e0,
                               rtol=0, atol=1e-4)  # the fit's ridge: 3e-5 eV at 2000 eV
    assert float((fit_reference_energies(items, 2) - e0).abs().max()) > 1.0  # without: wrong


def test_trainer_builds_the_prior_and_fits_e0_without_it(tmp_path):
    from _fitting import labelled_cu_cells
    from ase.io import write

    from mlpot.train import Trainer

    frames = labelled_cu_cells(6, seed=0, stress=False)
    for atoms in frames:  # a Cu-Cu pair inside the switch (1.06-1.58 A): the prior is not zero
        atoms.positions[1] = atoms.positions[0] + [1.4, 0.0, 0.0]
    path = str(tmp_path / "cu.xyz")
    write(path, frames, format="extxyz")
    cfg = config_from_dict({
        "data": {"train": path, "validation_fraction": 0.2},
        "model": {"name": "egnn", "cutoff": 3.6, "repulsion": "zbl",
                  "hparams": {"hidden": 8, "edge_hidden": 8, "num_layers": 1,
                              "readout_hidden": 8}},
        "training": {"out_dir": str(tmp_path / "run"), "progress": False}})
    trainer = Trainer(cfg)
    model = trainer.members[0]
    assert isinstance(model.repulsion, ZBLRepulsion) and model.config["repulsion"] == "zbl"
    items = trainer.train_set.items
    offsets = model.prior_energies(items)
    expected = fit_reference_energies(items, 1, offsets=offsets)
    torch.testing.assert_close(model.reference_energies, expected, rtol=0, atol=1e-9)
    assert min(offsets) > 0.1
    assert float((expected - fit_reference_energies(items, 1)).abs().max()) > 0.01


def test_adding_the_prior_after_training_equals_training_with_it(tmp_path):
    """Where no training pair comes within the switch the prior is zero on every frame, so
    training with it gives the same weights and E0 as training without, and ``with_repulsion``
    (the trained model with the prior added, as stability_bench's ``--add-repulsion`` does) is
    the model trained with the prior, close contacts included."""
    from _fitting import labelled_cu_cells
    from ase.io import write

    from mlpot.data import read
    from mlpot.models import with_repulsion
    from mlpot.train import train as train_run

    path = str(tmp_path / "cu.xyz")
    write(path, labelled_cu_cells(6, seed=0, stress=False), format="extxyz")

    def train(repulsion):
        cfg = config_from_dict({
            "data": {"train": path, "validation_fraction": 0.2},
            "model": {"name": "egnn", "cutoff": 3.6, "repulsion": repulsion, "dtype": "float64",
                      "hparams": {"hidden": 8, "edge_hidden": 8, "num_layers": 1,
                                  "readout_hidden": 8}},
            "training": {"out_dir": str(tmp_path / f"run_{repulsion}"), "progress": False,
                         "max_epochs": 3, "batch_size": 2}})
        train_run(cfg)
        return model_from_checkpoint(str(tmp_path / f"run_{repulsion}" / "best.pt"))

    plain, with_prior = train(None), train("zbl")
    frames = read(path, type_map=with_prior.type_map)
    assert max(abs(e) for e in with_prior.prior_energies(frames)) == 0.0
    added = with_repulsion(plain)
    assert added.config == with_prior.config
    state = with_prior.state_dict()
    assert set(added.state_dict()) == set(state)
    for k, v in added.state_dict().items():
        assert torch.equal(v, state[k]), k
    atoms = close_contacts()
    atoms.set_chemical_symbols(["Cu"] * len(atoms))

    def energy(model):
        return float(model(T.to_data(atoms, model).as_dict(), False)[K.ENERGY].detach())

    assert energy(added) == energy(with_prior)
    assert energy(added) - energy(plain) > 10.0
    with pytest.raises(ValueError, match="prior already"):
        with_repulsion(with_prior)


# ---------------------------------------------------------------------------- errors
def test_config_and_build_errors_are_one_line():
    base = {"data": {"train": "x.xyz"}}
    with pytest.raises(ConfigError, match=r"model.repulsion = 'zbll' is not one of \['zbl'\]"):
        config_from_dict({**base, "model": {"repulsion": "zbll"}})
    with pytest.raises(ConfigError, match="repulsion_radii = \\[0.7, 0.5\\]: must be two"):
        config_from_dict({**base, "model": {"repulsion": "zbl", "repulsion_radii": [0.7, 0.5]}})
    with pytest.raises(ConfigError, match="repulsion_radii .* is set but model.repulsion is not"):
        config_from_dict({**base, "model": {"repulsion_radii": [0.5, 0.7]}})
    assert config_from_dict({**base, "model": {"repulsion": "zbl"}}).model.repulsion == "zbl"
    assert config_from_dict(base).model.repulsion is None  # off by default
    with pytest.raises(RepulsionError, match="Si-Si .* not inside the cutoff 1.2 A"):
        build_model("egnn", ["Si"], 1.2, repulsion="zbl")
    with pytest.raises(RepulsionError, match="not elements"):
        build_model("egnn", ["H", "Xx"], 3.5, repulsion="zbl")
    with pytest.raises(RepulsionError, match="not one of"):
        build_model("egnn", ["H"], 3.5, repulsion="lj")
    from mlpot.errors import UserError

    assert issubclass(RepulsionError, UserError)  # exit code 2 on the command line
