"""NequIP (mlpot.models.nequip) and its MACE option: the physics checks of mlpot.testing,
equivariance of the intermediate features, the e3nn blocks against e3nn's own tensor product,
the product basis, precision, scripting, config round trip, statistics and a short fit to EMT."""
import json
from pathlib import Path

import pytest
import torch

from mlpot import keys as K
from mlpot import testing as T
from mlpot.models import build_model, from_config, hparam_defaults, script
from mlpot.models.nequip import InteractionLayer, NequIP
from mlpot.nn.equivariant import (PathConvolution, SymmetricContraction, irrep_name,
                                  irreps_up_to, rotate_features, symmetric_basis)

from _fitting import fit_emt_forces

TYPES = ["H", "C", "O"]
CUTOFF = 4.0
SMALL = {"num_features": 8, "num_layers": 3, "radial_mlp": [16], "readout_hidden": 8,
         "avg_num_neighbors": 8.0}
MACE = {**SMALL, "correlation": 3, "feature_l_max": 1, "l_max": 2, "num_layers": 2}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def make(dtype="float64", seed=0, **hp):
    torch.manual_seed(seed)
    return build_model("nequip", TYPES, CUTOFF, dtype, **{**SMALL, **hp}).eval()


@pytest.fixture(scope="module")
def model():
    return make()


@pytest.fixture(scope="module")
def mace():
    return make(**MACE)


@pytest.fixture(scope="module")
def periodic(model):
    return T.to_data(T.random_periodic(("O", "H", "C"), n_atoms=10, seed=1), model)


@pytest.fixture(scope="module")
def mol(model):
    return T.to_data(T.small_molecule("CH3CH2OH"), model)


@pytest.mark.parametrize("which", ["model", "mace"])
def test_invariance_and_forces(which, request, periodic, mol):
    m = request.getfixturevalue(which)
    for d in (periodic, mol):
        T.assert_invariance(m, d)
        T.assert_forces_are_gradients(m, d)


@pytest.mark.parametrize("which", ["model", "mace"])
def test_stress_extensivity_smoothness(which, request, periodic):
    m = request.getfixturevalue(which)
    T.assert_stress_is_strain_derivative(m, periodic)
    T.assert_extensive(m, T.random_periodic(("O", "H", "C"), n_atoms=6, seed=2))
    T.assert_smooth_at_cutoff(m, ("O", "H"))


@pytest.mark.parametrize("which", ["model", "mace"])
def test_batch_and_script(which, request, periodic, mol):
    m = request.getfixturevalue(which)
    other = T.to_data(T.random_periodic(("O", "H"), n_atoms=7, seed=3), m)
    T.assert_batch_equals_single(m, [periodic, other])
    T.assert_batch_equals_single(m, [mol, T.to_data(T.small_molecule("H2O"), m)])
    T.assert_script_equals_eager(m, periodic)


def test_natural_parity_variant(periodic):
    m = make(parity=False, num_layers=2)
    assert all(p == (1 if l % 2 == 0 else -1) for ir in m.net.layer_irreps for l, p in ir)
    T.assert_invariance(m, periodic)
    T.assert_forces_are_gradients(m, periodic)


@pytest.mark.parametrize("which", ["model", "mace"])
def test_features_are_equivariant_under_rotations_and_inversion(which, request, periodic):
    """Rotating (or inverting) the structure maps every layer's features by D(R) per irrep."""
    m = request.getfixturevalue(which)
    d = periodic.with_neighbors(m.cutoff)
    types, edges, vec = d.atom_types, d.edge_index, d.edge_vectors()
    with torch.no_grad():
        ref = m.net.features(types, edges, vec)
        for rot in (T._rotation(5), -T._rotation(6)):
            got = m.net.features(types, edges, vec @ rot.T)
            for k, irreps in enumerate(m.net.layer_irreps):
                want = rotate_features(ref[k], irreps, rot)
                for (l, p), a, b in zip(irreps, got[k], want):
                    assert (a - b).abs().max() < 1e-10 * (1 + b.abs().max()), (k, l, p)
    # the features are not trivially zero: odd and l > 0 irreps carry signal
    assert all(float(x.abs().max()) > 1e-6 for x in ref[0])


@pytest.mark.parametrize("block_bytes", [None, 1, 300])
def test_convolution_equals_e3nn_tensor_product(block_bytes):
    """PathConvolution = e3nn's 'uvu' TensorProduct (coefficients sqrt(2 l3 + 1) w3j), summed
    over the neighbors; also with the edges in many blocks (one edge, a few edges per block)."""
    from e3nn import o3

    torch.manual_seed(1)
    c, n, n_pairs = 4, 5, 17
    irreps_in = [(0, 1), (1, -1), (1, 1), (2, 1)]
    conv = PathConvolution(irreps_in, 2, irreps_up_to(2, True)).double()
    if block_bytes is not None:
        conv.block_bytes = block_bytes
    h = [torch.randn(n, 2 * l + 1, c, dtype=torch.float64) for l, _ in irreps_in]
    centre, neighbor = torch.randint(0, n, (n_pairs,)), torch.randint(0, n, (n_pairs,))
    y = o3.spherical_harmonics([0, 1, 2], torch.randn(n_pairs, 3, dtype=torch.float64), True)
    w = torch.randn(n_pairs, conv.num_paths, c, dtype=torch.float64)
    got = conv(h, y, list(w.split(conv.group_paths, dim=1)), centre, neighbor)

    ir1 = o3.Irreps("+".join(f"{c}x{irrep_name(ir)}" for ir in irreps_in))
    ir_out = o3.Irreps("+".join(f"{c}x{irrep_name(conv.irreps_out[k])}"
                               for _, _, k in conv.paths))
    # e3nn scales a path by the square root of its path_weight
    instr = [(i, l2, q, "uvu", True, 2.0 * conv.irreps_out[k][0] + 1.0)
             for q, (i, l2, k) in enumerate(conv.paths)]
    torch.set_default_dtype(torch.float64)  # e3nn builds its coefficients in the default dtype
    try:
        tp = o3.TensorProduct(ir1, o3.Irreps("0e+1o+2e"), ir_out, instr, shared_weights=False,
                              internal_weights=False, irrep_normalization="none",
                              path_normalization="none")
    finally:
        torch.set_default_dtype(torch.float32)
    x1 = torch.cat([x.transpose(1, 2).reshape(n, -1) for x in h], 1)[neighbor]
    per_edge = tp(x1, y, w.reshape(n_pairs, -1))  # [P, sum over paths C (2l3+1)]
    ref = torch.zeros(n, per_edge.shape[1], dtype=torch.float64).index_add(0, centre, per_edge)
    pieces = ref.split([c * (2 * conv.irreps_out[k][0] + 1) for _, _, k in conv.paths], 1)
    for o, (l, _) in enumerate(conv.irreps_out):
        mine = [q for q, (_, _, k) in enumerate(conv.paths) if k == o]
        want = torch.stack([pieces[q].view(n, c, 2 * l + 1).transpose(1, 2) for q in mine], 2)
        assert torch.allclose(got[o], want.reshape(n, 2 * l + 1, -1), atol=1e-12), o


def _blocked(m, block_bytes, radial_block_bytes):
    b = make(**json.loads(m.config_json)["hparams"])
    b.load_state_dict(m.state_dict())
    convs = [mod for mod in b.modules() if isinstance(mod, (PathConvolution, SymmetricContraction))]
    assert convs
    for conv in convs:
        conv.block_bytes = block_bytes
    layers = [mod for mod in b.modules() if isinstance(mod, InteractionLayer)]
    assert layers and all(layer.radial_block_bytes >= 1 << 20 for layer in layers)
    for layer in layers:
        layer.radial_block_bytes = radial_block_bytes
    return b


@pytest.mark.parametrize("which", ["model", "mace"])
@pytest.mark.parametrize("block_bytes,radial_block_bytes", [
    (1, 3),            # one edge per message block and per radial MLP pass
    (2000, 6000),      # a few edges per block, a pass per block or two
    (2000, 1 << 30),   # a few edges per block, all of them in one radial MLP pass
])
def test_edge_blocks_give_the_same_numbers(which, block_bytes, radial_block_bytes, request,
                                           periodic):
    """Radial weights and messages formed one or a few edges at a time (as for large systems on
    CPUs): energy, forces and stress equal to one block, eager and scripted, and forces still the
    energy's gradient."""
    m = request.getfixturevalue(which)
    whole = m(periodic.as_dict(), True, True)
    blocked = _blocked(m, block_bytes, radial_block_bytes)
    for b in (blocked, script(blocked)):
        got = b(periodic.as_dict(), True, True)
        for k in (K.ENERGY, K.FORCES, K.STRESS):
            assert torch.allclose(got[k], whole[k], atol=1e-11, rtol=0), k
    T.assert_forces_are_gradients(blocked, periodic)


def test_product_basis():
    """The generalised Clebsch-Gordan basis: 1, 4 and 8 invariants of degree 1, 2, 3 in
    (0e, 1o, 2e, 3o), none of odd parity; the contraction is equivariant."""
    irreps = irreps_up_to(3, False)
    assert [symmetric_basis(irreps, nu, (0, 1)).shape[0] for nu in (1, 2, 3)] == [1, 4, 8]
    assert symmetric_basis(irreps, 3, (0, -1)).shape[0] == 0
    u = symmetric_basis(irreps, 2, (1, -1))  # orthonormal
    assert torch.allclose(u.flatten(1) @ u.flatten(1).T, torch.eye(u.shape[0], dtype=u.dtype))
    torch.manual_seed(0)
    sc = SymmetricContraction(irreps_up_to(2, False), [(0, 1), (1, -1), (2, 1)], 3, 3, 2)
    sc = sc.double()
    a = [torch.randn(6, 2 * l + 1, 3, dtype=torch.float64) for l, _ in irreps_up_to(2, False)]
    types = torch.tensor([0, 1, 1, 0, 1, 0])
    out = sc(a, types)
    rot = -T._rotation(3)
    again = sc(rotate_features(a, irreps_up_to(2, False), rot), types)
    for x, y in zip(again, rotate_features(out, sc.irreps_out, rot)):
        assert torch.allclose(x, y, atol=1e-12)
    # degree 3 in A: scaling A by s scales the pure third-order part by s^3
    with torch.no_grad():
        sc.w1.zero_()
        sc.w2.zero_()
    ratio = sc([2 * x for x in a], types)[0] / sc(a, types)[0]
    assert torch.allclose(ratio, torch.full_like(ratio, 8.0))


def test_float32_close_to_float64(model, periodic):
    m32 = make("float32")
    m32.load_state_dict(model.state_dict())
    out32 = m32(periodic.to(dtype=torch.float32).as_dict(), compute_stress=True)
    out64 = model(periodic.as_dict(), compute_stress=True)
    assert out32[K.ENERGY].dtype == torch.float64 and out32[K.FORCES].dtype == torch.float32
    for key in (K.ENERGY, K.FORCES, K.STRESS):
        a, b = out32[key].detach().double(), out64[key].detach()
        assert (a - b).abs().max() <= 1e-4 * (1 + b.abs().max()), key


def test_config_round_trip(mace, periodic):
    config = json.loads(json.dumps(mace.config))
    assert config["hparams"] == {**hparam_defaults(NequIP), **MACE}
    again = from_config(config).eval()
    again.load_state_dict(mace.state_dict())
    a, b = again(periodic.as_dict()), mace(periodic.as_dict())
    # same numbers up to the order of threaded floating-point sums
    assert torch.allclose(a[K.ENERGY], b[K.ENERGY], rtol=0, atol=1e-12)
    assert torch.allclose(a[K.FORCES], b[K.FORCES], rtol=0, atol=1e-12)
    assert build_model("nequip", TYPES).cutoff == NequIP.DEFAULT_CUTOFF == 5.0
    with pytest.raises(ValueError, match="num_layers"):
        build_model("nequip", TYPES, num_layer=2)
    with pytest.raises(ValueError, match="correlation"):
        build_model("nequip", TYPES, correlation=4)


def test_fit_statistics_sets_the_average_neighbor_count(periodic, mol):
    m = make(avg_num_neighbors=None)
    structures = [periodic, mol]
    m.fit_statistics(structures)
    d = [s.with_neighbors(CUTOFF) for s in structures]
    mean = sum(s.edge_index.shape[1] for s in d) / sum(s.positions.shape[0] for s in d)
    assert float(m.net.avg_num_neighbors) == pytest.approx(mean)
    assert "net.avg_num_neighbors" in m.state_dict()
    fixed = make()  # avg_num_neighbors=8 given: kept
    fixed.fit_statistics(structures)
    assert float(fixed.net.avg_num_neighbors) == 8.0


@pytest.mark.slow
def test_learns_emt_forces():
    torch.manual_seed(0)
    model = build_model("nequip", ["Cu", "Au"], 4.0, "float32", num_features=16, l_max=1,
                        num_layers=2, radial_mlp=[32], readout_hidden=16)
    start, end = fit_emt_forces(model, steps=150)
    assert end < 0.15 * start, f"force RMSE {start:.3f} -> {end:.3f} eV/A"


# ---------------------------------------------------------------------------- trimmed layers
UNTRIMMED = Path(__file__).parent / "data" / "nequip_untrimmed"


def test_a_checkpoint_of_the_untrimmed_layout_gives_its_numbers():
    """A 3-layer model written before the layers were trimmed (its middle layer still had the
    1e and 2o weights that never reached the energy, tests/data/nequip_untrimmed) loads into
    the trimmed layout with fewer parameters and the same energy and forces."""
    from ase.io import read

    from mlpot.checkpoint import model_from_checkpoint

    expected = json.loads((UNTRIMMED / "expected.json").read_text())
    model = model_from_checkpoint(str(UNTRIMMED / "nequip_3layers.pt"))
    assert model.net.layer_irreps[1] == [(0, 1), (1, -1), (2, 1)]
    assert sum(p.numel() for p in model.parameters()) < expected["parameters"]
    out = T._run(model, T.to_data(read(UNTRIMMED / "cuau.xyz"), model))
    assert abs(out[K.ENERGY].item() - expected["energy"]) < 1e-10
    assert torch.allclose(out[K.FORCES], torch.tensor(expected["forces"], dtype=torch.float64),
                          rtol=0, atol=1e-10)


@pytest.mark.parametrize("hp", [
    {},                                                    # 3 layers, both parities
    {"num_layers": 4, "l_max": 1, "feature_l_max": 3},     # features beyond what Y^1 couples
    {**MACE, "num_layers": 3},                             # the product basis
    {**MACE, "correlation": 2},                            # an empty third-order weight
], ids=["parity-3", "flmax3-4", "mace-3", "mace-corr2"])
def test_every_parameter_reaches_the_energy(periodic, hp):
    """No weight without a gradient from the energy and forces (data-parallel training refuses
    such weights, and they cost time for nothing)."""
    model = make(**hp).train()
    out = model(periodic.as_dict(), compute_forces=True)
    (out[K.ENERGY].sum() + out[K.FORCES].pow(2).sum()).backward()
    assert [k for k, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
