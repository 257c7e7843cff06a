"""EGNN (mlpot.models.egnn): the physics checks of mlpot.testing, precision, scripting, config
round trip, statistics, the atom-level message Linear, and a short fit to EMT data."""
import json

import pytest
import torch

from mlpot import keys as K
from mlpot import testing as T
from mlpot.models import build_model, from_config, hparam_defaults
from mlpot.models.egnn import EGNN
from mlpot.nn import polynomial_cutoff

from _fitting import fit_emt_forces

TYPES = ["H", "C", "O"]
SMALL = {"hidden": 16, "edge_hidden": 24, "num_layers": 3, "readout_hidden": 8}


def make(dtype="float64", seed=0, **hp):
    torch.manual_seed(seed)
    model = build_model("egnn", TYPES, 3.5, dtype, **{**SMALL, **hp}).eval()
    with torch.no_grad():  # a non-trivial normalisation, as after fit_statistics
        model.net.message_scale.fill_(1 / 6)
    return model


@pytest.fixture(scope="module")
def model():
    return make()


@pytest.fixture(scope="module")
def periodic(model):
    return T.to_data(T.random_periodic(("O", "H", "C"), n_atoms=12, seed=1), model)


@pytest.fixture(scope="module")
def mol(model):
    return T.to_data(T.small_molecule("CH3CH2OH"), model)


def test_invariance_and_forces(model, periodic, mol):
    for d in (periodic, mol):
        T.assert_invariance(model, d)
        T.assert_forces_are_gradients(model, d)


def test_stress_extensivity_smoothness(model, periodic):
    T.assert_stress_is_strain_derivative(model, periodic)
    T.assert_extensive(model, T.random_periodic(("O", "H", "C"), n_atoms=8, seed=2))
    T.assert_smooth_at_cutoff(model, ("O", "H"))
    T.assert_smooth_at_cutoff(model, ("C", "C"))


def test_batch_and_script(model, periodic, mol):
    other = T.to_data(T.random_periodic(("O", "H"), n_atoms=7, seed=3), model)
    T.assert_batch_equals_single(model, [periodic, other])
    T.assert_batch_equals_single(model, [mol, T.to_data(T.small_molecule("H2O"), model)])
    T.assert_script_equals_eager(model, periodic)


@pytest.mark.parametrize("block_bytes", [1, 24 * 8 * 5])
def test_edge_blocks_give_the_same_numbers(model, periodic, block_bytes):
    """Messages summed a few edges at a time (as for large systems on CPUs): energy, forces and
    stress equal to one pass, eager and scripted, forces still the energy's gradient."""
    from mlpot.models import script
    from mlpot.models.egnn import EGNNLayer

    whole = model(periodic.as_dict(), True, True)
    blocked = make()
    layers = [m for m in blocked.modules() if isinstance(m, EGNNLayer)]
    assert layers and all(m.block_bytes >= 1 << 20 for m in layers)  # one pass above
    for layer in layers:
        layer.block_bytes = block_bytes  # one edge, five edges per block
    for b in (blocked, script(blocked)):
        got = b(periodic.as_dict(), True, True)
        for k in (K.ENERGY, K.FORCES, K.STRESS):
            assert torch.allclose(got[k], whole[k], atol=1e-11, rtol=0), k
    T.assert_forces_are_gradients(blocked, periodic)


def test_attention_variant_is_smooth_and_conservative(periodic):
    m = make(attention=True)
    T.assert_smooth_at_cutoff(m)
    T.assert_forces_are_gradients(m, periodic)
    T.assert_invariance(m, periodic)
    T.assert_script_equals_eager(m, periodic)


def test_float32_close_to_float64(model, periodic):
    m32 = make("float32")
    m32.load_state_dict(model.state_dict())
    d32 = periodic.to(dtype=torch.float32)
    out32 = m32(d32.as_dict(), compute_stress=True)
    out64 = model(periodic.as_dict(), compute_stress=True)
    assert out32[K.ENERGY].dtype == torch.float64 and out32[K.FORCES].dtype == torch.float32
    for key in (K.ENERGY, K.FORCES, K.STRESS):
        a, b = out32[key].detach().double(), out64[key].detach()
        assert (a - b).abs().max() <= 1e-4 * (1 + b.abs().max()), key


def test_config_round_trip(model, periodic):
    config = json.loads(json.dumps(model.config))
    assert config["hparams"] == {**hparam_defaults(EGNN), **SMALL}
    again = from_config(config).eval()
    again.load_state_dict(model.state_dict())
    a, b = again(periodic.as_dict()), model(periodic.as_dict())
    assert torch.equal(a[K.ENERGY], b[K.ENERGY]) and torch.equal(a[K.FORCES], b[K.FORCES])
    assert build_model("egnn", TYPES).cutoff == EGNN.DEFAULT_CUTOFF == 5.0
    with pytest.raises(ValueError, match="num_layers"):
        build_model("egnn", TYPES, num_layer=2)
    with pytest.raises(ValueError, match="avg_num_neighbors"):
        build_model("egnn", TYPES, avg_num_neighbors=0.0)


def test_fit_statistics_sets_the_neighbor_normalisation(periodic, mol):
    m = build_model("egnn", TYPES, 3.5, "float64", **SMALL)
    structures = [periodic.with_neighbors(3.5), mol]
    m.fit_statistics(structures)
    d = [s.with_neighbors(3.5) for s in structures]
    n_edges = sum(s.edge_index.shape[1] for s in d)
    n_atoms = sum(s.positions.shape[0] for s in d)
    assert abs(float(m.net.message_scale) - n_atoms / n_edges) < 1e-12
    assert "net.message_scale" in m.state_dict()
    fixed = build_model("egnn", TYPES, 3.5, "float64", avg_num_neighbors=20.0, **SMALL)
    fixed.fit_statistics(structures)
    assert float(fixed.net.message_scale) == pytest.approx(1 / 20)


def test_atom_level_message_linear_equals_edge_level_messages(model, periodic):
    """sum_j w_ij (W_2 s_ij + b_2) computed per edge equals the layer's atom-level form."""
    d = periodic.with_neighbors(model.cutoff)
    net = model.net
    vec = d.edge_vectors()
    i, j = d.edge_index
    r = vec.norm(dim=1)
    feats = torch.cat([net.basis(r), (r * r / net.cutoff ** 2).unsqueeze(1)], dim=1)
    env = polynomial_cutoff(r, net.cutoff, net.envelope_p).unsqueeze(1)
    env_sum = torch.zeros(len(d.positions), 1, dtype=r.dtype).index_add(0, i, env)
    h = net.embedding(d.atom_types)
    with torch.no_grad():
        for layer in net.layers:
            a, b = layer.node_proj(h).split(layer.edge_hidden, dim=1)
            s = torch.nn.functional.silu(a[i] + b[j] + layer.radial(feats))
            msg = layer.message_out(s) * env  # phi_e(h_i, h_j, e_ij) u_ij, per edge
            m = torch.zeros_like(h).index_add(0, i, msg) * net.message_scale
            ref = h + layer.update(torch.cat([h, m], dim=1))
            got = layer(h, i, j, feats, env, env_sum, net.message_scale)
            assert torch.allclose(got, ref, atol=1e-12)
            h = got


@pytest.mark.slow
def test_learns_emt_forces():
    torch.manual_seed(0)
    model = build_model("egnn", ["Cu", "Au"], 4.0, "float32", hidden=32, edge_hidden=32,
                        num_layers=2, readout_hidden=16)
    start, end = fit_emt_forces(model, steps=200)
    assert end < 0.15 * start, f"force RMSE {start:.3f} -> {end:.3f} eV/A"
