"""The model contract (docstring of mlpot.models) for EVERY registered family.

Each family in ``mlpot.models.available()`` (built-in or added by a package through the entry-point
group ``mlpot.models``) is built with its small ``TEST_HPARAMS`` and run through every check of
``mlpot.testing``: invariance, forces and stress as finite-difference derivatives, extensivity,
smoothness at the cutoff, batch == single, TorchScript == eager (also after save/load). A new
family gets these tests without a new test file. Also: a family registered through an entry point
is found and passes the same checks, hyperparameters are declared once (the constructor's
signature) and checked (unknown keys with the nearest valid name, bad values in one line), and the
neighbor normalisation follows one convention.
"""
from __future__ import annotations

import importlib.metadata
import inspect

import pytest
import torch
from torch import nn

from mlpot import testing as T
from mlpot.models import (ENTRY_POINT_GROUP, MODELS, Network, available, build_model,
                          hparam_defaults, network_class)
from mlpot.models.family import mean_neighbor_count
from mlpot.nn import polynomial_cutoff

CUTOFF = 3.5

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def small_model(name: str, dtype: str = "float64", seed: int = 0, **hp):
    torch.manual_seed(seed)
    cls = network_class(name)
    hp = {**getattr(cls, "TEST_HPARAMS", {}), **hp}
    return build_model(name, ["O", "H"], CUTOFF, dtype, **hp).eval()


def run_contract(model) -> None:
    """Every physics check of mlpot.testing on one model (float64)."""
    T.assert_model_contract(model)
    mol = T.to_data(T.small_molecule("H2O"), model)
    T.assert_invariance(model, mol)


# ---------------------------------------------------------------------------- every family
@pytest.mark.parametrize("name", available())
def test_every_family_passes_the_physics_checks(name):
    run_contract(small_model(name))


@pytest.mark.parametrize("name", available())
def test_every_family_declares_its_hyperparameters_once(name):
    """The defaults are the constructor's, the config stores all of them, and rebuilding from
    the config gives the same model."""
    cls = network_class(name)
    params = inspect.signature(cls.__init__).parameters
    assert list(params)[1:3] == ["num_types", "cutoff"]
    assert cls.DEFAULT_CUTOFF > 0
    defaults = hparam_defaults(cls)
    assert set(defaults) == {k for k, p in params.items()
                             if k not in ("self", "num_types", "cutoff")
                             and p.kind is p.POSITIONAL_OR_KEYWORD}
    assert not hasattr(cls, "DEFAULTS")  # no second list of defaults to drift apart
    model = small_model(name)
    assert model.config["hparams"] == {**defaults, **getattr(cls, "TEST_HPARAMS", {})}
    assert build_model(name, ["O"]).cutoff == cls.DEFAULT_CUTOFF


@pytest.mark.parametrize("name", available())
def test_unknown_hyperparameters_are_rejected_with_the_nearest_name(name):
    cls = network_class(name)
    key = sorted(hparam_defaults(cls))[0]
    typo = key + "x"
    with pytest.raises(ValueError, match=f"no hyperparameter '{typo}'.*Did you mean '{key}'"):
        build_model(name, ["O", "H"], **{typo: 1})
    if issubclass(cls, Network):  # also when the network is constructed directly
        with pytest.raises(ValueError, match=f"no hyperparameter '{typo}'.*Did you mean '{key}'"):
            cls(2, CUTOFF, **{typo: 1})


BAD_VALUES = {
    "dp_se_e2_a": [("rcut_smth", 4.0, "rcut_smth = 4.0: must be below the cutoff"),
                   ("embedding", [], "embedding = \\[\\]: must be a non-empty list"),
                   ("axis_neuron", 200, "axis_neuron = 200: must be at most"),
                   ("fitting", [16, 0], "fitting = \\[16, 0\\]: must be a list of integer")],
    "egnn": [("hidden", 0, "hidden = 0: must be an integer >= 1"),
             ("num_layers", 1.5, "num_layers = 1.5: must be an integer"),
             ("activation", "relu", "activation = 'relu': must be one of"),
             ("avg_num_neighbors", -1.0, "avg_num_neighbors = -1.0: must be a number > 0")],
    "nequip": [("l_max", -1, "l_max = -1: must be an integer >= 0"),
               ("num_features", 0, "num_features = 0: must be an integer >= 1"),
               ("correlation", 4, "correlation = 4: must be one of \\[1, 2, 3\\]"),
               ("radial_mlp", [64, -1], "radial_mlp = \\[64, -1\\]: must be a list"),
               ("parity", "yes", "parity = 'yes': must be true or false")],
}


@pytest.mark.parametrize("name,key,value,message",
                         [(n, *case) for n, cases in BAD_VALUES.items() for case in cases])
def test_bad_hyperparameter_values_are_one_line_errors(name, key, value, message):
    """Checked before the network is built (build_model, the training config) and when the
    network class is constructed directly."""
    with pytest.raises(ValueError, match=message) as err:
        build_model(name, ["O", "H"], CUTOFF, **{key: value})
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=message):
        network_class(name)(2, CUTOFF, **{key: value})


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("cutoff", [0.0, -1.0, float("nan")])
def test_cutoff_must_be_positive(name, cutoff):
    with pytest.raises(ValueError, match="cutoff = .*must be a number of Angstrom > 0"):
        build_model(name, ["O", "H"], cutoff)


# ---------------------------------------------------------------------------- normalisation
def _samples(model, structures):
    out = []
    for atoms in structures:
        d = T.to_data(atoms, model).with_neighbors(model.cutoff)
        out.append((d.atom_types, d.edge_index, d.edge_vectors()))
    return out


def _n_avg(model) -> float:
    net = model.net
    if hasattr(net, "message_scale"):  # the EGNN stores 1 / n_avg
        return 1.0 / float(net.message_scale)
    return float(net.avg_num_neighbors)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_neighbor_normalisation_is_one_convention(name):
    """fit_statistics sets n_avg = pairs / atoms of the training structures, at least 1 (a
    dimer far apart: 0 pairs per atom would have made the EGNN's and the Deep Potential's
    sums larger, not means)."""
    from ase import Atoms

    model = small_model(name)
    dense = _samples(model, [T.random_periodic(("O", "H"), n_atoms=10, seed=s) for s in (1, 2)])
    pairs = sum(int(s[1].shape[1]) for s in dense)
    atoms = sum(int(s[0].shape[0]) for s in dense)
    assert mean_neighbor_count(dense) == pytest.approx(pairs / atoms)
    model.net.fit_statistics(dense)
    assert _n_avg(model) == pytest.approx(pairs / atoms, rel=1e-6)
    sparse = _samples(model, [Atoms("OHH", positions=[[0, 0, 0], [1.0, 0, 0], [9, 9, 9]])])
    assert int(sparse[0][1].shape[1]) == 2  # 2 pairs (O-H, H-O), 3 atoms
    assert mean_neighbor_count(sparse) == 1.0
    model.net.fit_statistics(sparse)
    assert _n_avg(model) == pytest.approx(1.0)


# ---------------------------------------------------------------------------- entry points
class PairToy(Network):
    """A family registered by a 'third-party package' in the tests: a smooth pair potential
    E_i = 1/2 sum_j a[t_i, t_j] exp(-r_ij / width) u(r_ij) (u: polynomial envelope)."""

    DEFAULT_CUTOFF = 4.0
    TEST_HPARAMS = {"width": 0.8}

    def __init__(self, num_types: int, cutoff: float, width: float = 1.0):
        super().__init__()
        self.cutoff = float(cutoff)
        self.width = float(width)
        self.num_types = int(num_types)
        self.strength = nn.Parameter(torch.rand(num_types * num_types) + 0.5)

    @classmethod
    def validate_hparams(cls, cutoff, hparams):
        if not hparams["width"] > 0:
            raise ValueError(f"hyperparameter width = {hparams['width']!r}: must be > 0")

    def forward(self, atom_types: torch.Tensor, edge_index: torch.Tensor,
                edge_vectors: torch.Tensor) -> torch.Tensor:
        r = torch.linalg.norm(edge_vectors, dim=1)  # [P]
        pair = atom_types.index_select(0, edge_index[0]) * self.num_types \
            + atom_types.index_select(0, edge_index[1])
        e = 0.5 * self.strength.index_select(0, pair) * torch.exp(-r / self.width) \
            * polynomial_cutoff(r, self.cutoff)
        return torch.zeros(atom_types.shape[0], dtype=e.dtype, device=e.device) \
            .index_add(0, edge_index[0], e)


class NoEnvelope(PairToy):
    """PairToy without its cutoff envelope: the energy jumps where a pair leaves the cutoff."""

    def forward(self, atom_types: torch.Tensor, edge_index: torch.Tensor,
                edge_vectors: torch.Tensor) -> torch.Tensor:
        r = torch.linalg.norm(edge_vectors, dim=1)
        e = 0.5 * self.strength[0] * torch.exp(-r / self.width)
        return torch.zeros(atom_types.shape[0], dtype=e.dtype).index_add(0, edge_index[0], e)


def test_the_contract_check_fails_on_a_broken_family():
    from mlpot.models import Potential

    model = Potential(NoEnvelope(2, CUTOFF), ["O", "H"], CUTOFF, {}, dtype=torch.float64)
    with pytest.raises(AssertionError, match="energy jumps .* across the cutoff"):
        T.assert_model_contract(model)


class NoCutoff(nn.Module):
    def __init__(self, num_types, cutoff):
        super().__init__()


@pytest.fixture
def plugins(monkeypatch):
    """Two families 'installed' through the entry-point group (one breaks the contract) next to
    whatever else is installed."""
    real = importlib.metadata.entry_points

    def entry_points(**kw):
        if kw.get("group") != ENTRY_POINT_GROUP:
            return real(**kw)
        fake = [importlib.metadata.EntryPoint(name=n, value=v, group=ENTRY_POINT_GROUP)
                for n, v in (("pair_toy", f"{__name__}:PairToy"),
                             ("no_cutoff", f"{__name__}:NoCutoff"),
                             ("egnn", f"{__name__}:PairToy"))]  # a built-in name: ignored
        return list(real(**kw)) + fake

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)


def test_a_family_from_an_entry_point_is_registered_and_checked(plugins):
    assert {"pair_toy", "no_cutoff", "dp_se_e2_a", "egnn", "nequip"} <= set(available())
    assert network_class("pair_toy") is PairToy
    assert network_class("egnn").__name__ == "EGNN"  # built-ins cannot be taken over
    model = small_model("pair_toy")
    assert model.config["model"] == "pair_toy" and model.config["hparams"] == {"width": 0.8}
    run_contract(model)  # the physics checks, for free
    with pytest.raises(ValueError, match="no hyperparameter 'widht'.*Did you mean 'width'"):
        build_model("pair_toy", ["O"], widht=2.0)
    with pytest.raises(ValueError, match="width = -1.0: must be > 0"):
        build_model("pair_toy", ["O"], width=-1.0)
    with pytest.raises(ValueError, match="no_cutoff.*does not follow.*DEFAULT_CUTOFF"):
        build_model("no_cutoff", ["O"])
    with pytest.raises(ValueError, match="unknown model 'pair_toi'.*Did you mean 'pair_toy'"):
        build_model("pair_toi", ["O"])


def test_training_config_accepts_an_entry_point_family(plugins):
    from mlpot.train import ConfigError, config_from_dict

    cfg = config_from_dict({"data": {"train": "x.xyz"},
                            "model": {"name": "pair_toy", "hparams": {"width": 2.0}}})
    assert cfg.model.name == "pair_toy"
    with pytest.raises(ConfigError, match="model.hparams: .*width = 0: must be > 0"):
        config_from_dict({"data": {"train": "x.xyz"},
                          "model": {"name": "pair_toy", "hparams": {"width": 0}}})


# ---------------------------------------------------------------------------- ghosts (LAMMPS)
def _with_ghosts(atoms, radius: float):
    """The atoms of a periodic cell (local, first) and, as ghosts, every periodic image within
    ``radius`` of the cell's atoms: positions [N + G, 3], the owner of each atom, and the count
    of local atoms. A non-periodic cluster, as a LAMMPS process sees its domain."""
    import itertools

    import numpy as np

    pos = atoms.get_positions()
    cell = np.asarray(atoms.cell)
    n = len(atoms)
    reach = [int(np.ceil(radius / h)) + 1 for h in atoms.cell.volume / np.linalg.norm(
        np.cross(cell[[1, 2, 0]], cell[[2, 0, 1]]), axis=1)]
    images, owners = [pos], [np.arange(n)]
    for s in itertools.product(*(range(-r, r + 1) for r in reach)):
        if s == (0, 0, 0):
            continue
        p = pos + np.asarray(s) @ cell
        d = np.linalg.norm(p[:, None, :] - pos[None, :, :], axis=2).min(axis=1)
        keep = d < radius
        images.append(p[keep])
        owners.append(np.arange(n)[keep])
    return np.concatenate(images), np.concatenate(owners), n


def _cluster_run(model, atoms, radius: float, local_atoms: bool = True):
    """Energy, forces folded onto owners and virial sum(x F) of the ghost cluster."""
    from mlpot import keys as K
    from mlpot.data import TypeMap
    from mlpot.inputs import structure_inputs

    pos, owners, n = _with_ghosts(atoms, radius)
    types = TypeMap(model.type_map).types(atoms.numbers[owners])
    x = torch.tensor(pos, dtype=torch.float64)
    data = structure_inputs(x, torch.as_tensor(types))
    if local_atoms:
        data[K.LOCAL_ATOMS] = torch.tensor(n)
    out = model(data, compute_forces=True)
    f = out[K.FORCES].detach()
    folded = torch.zeros(n, 3, dtype=f.dtype).index_add_(0, torch.as_tensor(owners), f)
    virial = (x.unsqueeze(2) * f.unsqueeze(1)).sum(0)  # sum_k x_k F_k
    return float(out[K.ENERGY].detach().sum()), folded, virial, out, len(pos) - n


@pytest.mark.parametrize("name", sorted(MODELS))
def test_local_atoms_with_ghosts_give_the_periodic_energy_forces_and_virial(name):
    """A cluster of the cell's atoms (local) and their periodic images within the receptive field
    (ghosts, each a separate atom) with ``local_atoms`` gives the periodic system's energy; the
    forces folded onto their owners and sum(x F) give its forces and virial (LAMMPS's newton-on
    reverse communication and virial_fdotr)."""
    from mlpot import keys as K
    from mlpot.checkpoint import receptive_field

    model = small_model(name)
    atoms = T.random_periodic(n_atoms=10, seed=3, density=0.08)
    ref = model(T.to_data(atoms, model).as_dict(), compute_forces=True, compute_stress=True)
    field = receptive_field(model)
    assert field == pytest.approx(CUTOFF * (1 if name == "dp_se_e2_a"
                                            else network_class(name).TEST_HPARAMS["num_layers"]))
    energy, forces, virial, out, n_ghosts = _cluster_run(model, atoms, field + 0.1)
    assert n_ghosts > len(atoms)
    assert energy == pytest.approx(float(ref[K.ENERGY].detach().sum()), rel=1e-10, abs=1e-9)
    torch.testing.assert_close(forces, ref[K.FORCES].detach(), rtol=0, atol=1e-9)
    torch.testing.assert_close(virial, ref[K.VIRIAL].detach()[0], rtol=0, atol=1e-8)
    assert bool((out[K.ATOMIC_ENERGIES][len(atoms):] == 0).all())
    # without the count, the ghosts' energies are part of the total: not the periodic energy
    e_all = _cluster_run(model, atoms, field + 0.1, local_atoms=False)[0]
    assert abs(e_all - energy) > 1e-6


@pytest.mark.parametrize("name", ["egnn", "nequip"])
def test_ghosts_must_cover_the_receptive_field_of_message_passing(name):
    """One cutoff of ghosts is not enough for a 2-layer model (the check that the receptive
    field, not the cutoff, sets the ghost region can fail)."""
    from mlpot import keys as K

    model = small_model(name)
    atoms = T.random_periodic(n_atoms=10, seed=3, density=0.08)
    ref = model(T.to_data(atoms, model).as_dict(), compute_forces=True)
    energy = _cluster_run(model, atoms, CUTOFF + 0.1)[0]
    assert abs(energy - float(ref[K.ENERGY].detach().sum())) > 1e-6


def test_local_atoms_pass_through_committee_and_scripted_models():
    """A committee and the TorchScript export take ``local_atoms`` as the Potential does."""
    from mlpot import keys as K
    from mlpot.checkpoint import model_metadata
    from mlpot.models import script
    from mlpot.models.committee import Committee

    committee = Committee([small_model("egnn", seed=0), small_model("egnn", seed=1)]).eval()
    assert model_metadata(committee, 1)["receptive_field"] == pytest.approx(2 * CUTOFF)
    atoms = T.random_periodic(n_atoms=10, seed=3, density=0.08)
    ref = committee(T.to_data(atoms, committee).as_dict(), compute_forces=True)
    for model in (committee, script(committee)):
        energy, forces = _cluster_run(model, atoms, 2 * CUTOFF + 0.1)[:2]
        assert energy == pytest.approx(float(ref[K.ENERGY].detach().sum()), rel=1e-10, abs=1e-9)
        torch.testing.assert_close(forces, ref[K.FORCES].detach(), rtol=0, atol=1e-9)


def test_local_atoms_in_chunked_inference_of_a_local_model():
    """The Deep Potential's chunked inference (more atoms than ``chunk_atoms``) evaluates local
    centres only and gives the unchunked numbers."""
    from mlpot import keys as K

    model = small_model("dp_se_e2_a")
    atoms = T.random_periodic(n_atoms=10, seed=3, density=0.08)
    whole = _cluster_run(model, atoms, CUTOFF + 0.1)
    model.chunk_atoms = 4
    chunked = _cluster_run(model, atoms, CUTOFF + 0.1)
    assert chunked[0] == pytest.approx(whole[0], rel=1e-12, abs=1e-10)
    torch.testing.assert_close(chunked[1], whole[1], rtol=0, atol=1e-10)
    torch.testing.assert_close(chunked[2], whole[2], rtol=0, atol=1e-9)
    assert bool((chunked[3][K.ATOMIC_ENERGIES][len(atoms):] == 0).all())
