"""Deep Potential se_e2_a (mlpot.models.deeppot): the physics checks of mlpot.testing, the
descriptor against a direct edge-wise evaluation of its equations, environment statistics, and a
short fit to EMT data."""
import numpy as np
import pytest
import torch
from ase.build import bulk
from ase.calculators.emt import EMT

from mlpot import keys as K
from mlpot import testing as T
from mlpot.data import AtomicData, TypeMap
from mlpot.models import build_model, fit_reference_energies, from_config, hparam_defaults
from mlpot.models.deeppot import DeepPotSeA, ideal_gas_statistics
from mlpot.nn import smooth_inverse_switch

# small widths keep the finite-difference checks fast; the defaults are checked separately
SMALL = dict(embedding=[8, 16], axis_neuron=4, fitting=[16, 16])


def make(dtype="float64", cutoff=4.0, **hp):
    torch.manual_seed(0)
    return build_model("dp_se_e2_a", ["O", "H"], cutoff=cutoff, dtype=dtype, **{**SMALL, **hp})


@pytest.fixture(scope="module")
def model():
    m = make()
    m.eval()
    return m


@pytest.fixture(scope="module")
def periodic(model):
    return T.to_data(T.random_periodic(n_atoms=12, seed=1), model)


@pytest.fixture(scope="module")
def mol(model):
    return T.to_data(T.small_molecule("CH3CH2OH"), build_model(
        "dp_se_e2_a", ["H", "C", "O"], cutoff=4.0, dtype="float64", **SMALL))


def test_defaults_match_the_water_example():
    m = build_model("dp_se_e2_a", ["O", "H"])
    net = m.net
    assert m.cutoff == 6.0 and net.rcut_smth == 0.5 and net.axis_neuron == 16
    assert hparam_defaults(DeepPotSeA)["embedding"] == [25, 50, 100]
    assert hparam_defaults(DeepPotSeA)["fitting"] == [240, 240, 240]
    assert len(net.embeddings) == 2 and len(net.fittings) == 2  # type_one_side: per neighbor type
    assert net.fittings[0].layers[0].linear.in_features == 100 * 16
    # the normaliser before fitting: neighbors at liquid-water atom density (~91 at 6 A)
    assert 85 < float(net.avg_num_neighbors) < 95


@pytest.mark.parametrize("type_one_side", [True, False])
def test_invariance_and_forces(type_one_side, periodic):
    m = make(type_one_side=type_one_side)
    mol = T.to_data(T.small_molecule("H2O"), m)
    for d in (periodic, mol):
        T.assert_invariance(m, d)
        T.assert_forces_are_gradients(m, d)


def test_forces_with_the_embedding_on_edges_only(periodic):
    """The path taken for inhomogeneous batches (padding would waste too many rows)."""
    m = make()
    m.net.pad_tolerance = 0.0
    T.assert_invariance(m, periodic)
    T.assert_forces_are_gradients(m, periodic)


def test_molecule_with_three_elements(mol):
    m = build_model("dp_se_e2_a", ["H", "C", "O"], cutoff=4.0, dtype="float64", **SMALL)
    T.assert_invariance(m, mol)
    T.assert_forces_are_gradients(m, mol)


def test_stress(model, periodic):
    T.assert_stress_is_strain_derivative(model, periodic)


def test_extensive(model):
    T.assert_extensive(model, T.random_periodic(n_atoms=8, seed=2))


def test_smooth_at_cutoff(model):
    T.assert_smooth_at_cutoff(model)
    T.assert_smooth_at_cutoff(model, symbols=("O", "O"))


def test_batch_equals_single(model, periodic):
    other = T.to_data(T.random_periodic(n_atoms=7, seed=3), model)
    T.assert_batch_equals_single(model, [periodic, other])
    mols = [T.to_data(T.small_molecule(n), model) for n in ("H2O", "H2O2")]
    T.assert_batch_equals_single(model, mols)


def test_script_equals_eager(model, periodic):
    T.assert_script_equals_eager(model, periodic)


def test_float32_close_to_float64(model, periodic):
    m32 = make("float32")
    m32.load_state_dict(model.state_dict())
    d32 = T.to_data(T.random_periodic(n_atoms=12, seed=1), m32, dtype=torch.float32)
    a = model(periodic.as_dict())
    b = m32(d32.as_dict())
    assert torch.allclose(b[K.ENERGY], a[K.ENERGY], atol=1e-5, rtol=1e-5)
    assert torch.allclose(b[K.FORCES].double(), a[K.FORCES], atol=1e-4, rtol=1e-4)


def test_config_round_trip(periodic):
    model = make()
    with torch.no_grad():
        model.net.env_mean.fill_(0.3)  # a buffer must travel with the state dict
    other = from_config(model.config)
    other.load_state_dict(model.state_dict())
    a, b = model(periodic.as_dict()), other(periodic.as_dict())
    assert torch.equal(a[K.ENERGY], b[K.ENERGY]) and torch.equal(a[K.FORCES], b[K.FORCES])
    with pytest.raises(ValueError, match="axis_neuron"):
        build_model("dp_se_e2_a", ["O"], axis_neurons=4)
    with pytest.raises(ValueError, match="axis_neuron"):
        build_model("dp_se_e2_a", ["O"], embedding=[4, 8], axis_neuron=16)


# ---------------------------------------------------------------- the descriptor itself
def reference_descriptor(net: DeepPotSeA, types, edge_index, vectors):
    """D_i from the equations with an edge-wise scatter, no layout tricks  # [N, M1 * M2]"""
    i, j = edge_index
    r = vectors.norm(dim=1)
    s = smooth_inverse_switch(r, net.rcut_smth, net.cutoff)
    env = torch.cat([s[:, None], s[:, None] * vectors / r[:, None]], 1) / net.env_std[types[i]]
    x = ((s - net.env_mean[types[i]]) / net.env_std[types[i], 0])[:, None]
    g = torch.zeros(len(s), net.m1, dtype=s.dtype)
    group = types[j] if net.type_one_side else types[i] * net.num_types + types[j]
    for p in range(len(s)):  # one edge at a time through its own network
        g[p] = net.embeddings[int(group[p])](x[p:p + 1])[0]
    t = torch.zeros(len(types), 4, net.m1, dtype=s.dtype)
    t.index_add_(0, i, env[:, :, None] * g[:, None, :])
    t = t / net.avg_num_neighbors
    d = t.transpose(1, 2) @ t[:, :, : net.axis_neuron]
    return d.reshape(len(types), -1)


@pytest.mark.parametrize("type_one_side", [True, False])
@pytest.mark.parametrize("pad_tolerance", [0.0, 1e9])  # embedding on edges / on padded blocks
def test_descriptor_matches_the_equations(type_one_side, pad_tolerance):
    m = make(type_one_side=type_one_side)
    net = m.net
    net.pad_tolerance = pad_tolerance
    with torch.no_grad():
        net.env_mean.copy_(torch.tensor([0.3, 0.2]))
        net.env_std.copy_(torch.tensor([[0.2, 0.1, 0.1, 0.1], [0.15, 0.12, 0.12, 0.12]]))
    # unsorted edges, atoms of mixed types, an atom without neighbors
    atoms = T.random_periodic(n_atoms=9, seed=5)
    d = T.to_data(atoms, m).with_neighbors(m.cutoff)
    perm = torch.randperm(d.edge_index.shape[1], generator=torch.Generator().manual_seed(0))
    ei = d.edge_index[:, perm]
    vec = d.edge_vectors()[perm]
    keep = ei[0] != 4
    keep &= ei[1] != 4
    ei, vec = ei[:, keep], vec[keep]
    got = net.descriptor(d.atom_types, ei, vec)
    ref = reference_descriptor(net, d.atom_types, ei, vec)
    assert torch.allclose(got, ref, atol=1e-12, rtol=1e-10)
    assert float(got[4].detach().abs().max()) == 0.0
    # rotation invariance of the descriptor itself
    rot = T._rotation(3)
    assert torch.allclose(net.descriptor(d.atom_types, ei, vec @ rot.T), got, atol=1e-12)


def test_no_fixed_neighbor_limit():
    """A dense cluster (every atom sees all others) and an empty structure both work."""
    m = make(cutoff=6.0)
    rng = np.random.default_rng(0)
    from ase import Atoms

    pos = rng.uniform(0, 4.0, (150, 3))
    dense = Atoms("OH" * 75, positions=pos)  # about 150 neighbors each
    d = T.to_data(dense, m)
    out = m(d.as_dict())
    assert torch.isfinite(out[K.FORCES]).all()
    lone = T.to_data(Atoms("O", positions=[[0, 0, 0]]), m)
    out = m(lone.as_dict())
    assert out[K.FORCES].abs().max() == 0.0


# ---------------------------------------------------------------- statistics
def test_fit_statistics(periodic):
    m = make()
    net = m.net
    before = m(periodic.as_dict())[K.ENERGY]
    frames = [T.to_data(T.random_periodic(n_atoms=12, seed=k), m).with_neighbors(m.cutoff)
              for k in range(3)]
    m.fit_statistics(frames)
    # by hand
    s_all, t_all, n_atoms, n_edges = [], [], 0, 0
    for f in frames:
        r = f.edge_vectors().norm(dim=1)
        s_all.append(smooth_inverse_switch(r, net.rcut_smth, net.cutoff))
        t_all.append(f.atom_types[f.edge_index[0]])
        n_atoms += len(f.atom_types)
        n_edges += f.edge_index.shape[1]
    s, t = torch.cat(s_all), torch.cat(t_all)
    for k in range(2):
        sk = s[t == k]
        assert torch.allclose(net.env_mean[k], sk.mean())
        assert torch.allclose(net.env_std[k, 0], sk.std(unbiased=False))
        assert torch.allclose(net.env_std[k, 1:], (sk.pow(2).mean() / 3).sqrt().expand(3))
    assert torch.allclose(net.avg_num_neighbors, torch.tensor(n_edges / n_atoms).double())
    assert "net.env_std" in m.state_dict() and "net.avg_num_neighbors" in m.state_dict()
    assert not torch.allclose(m(periodic.as_dict())[K.ENERGY], before)


def test_statistics_defaults_and_unseen_types():
    mean, std_r, std_a = ideal_gas_statistics(0.0, 6.0)
    # s = u^3 (...) switch over the whole range; must stay finite and ordered
    assert 0 < mean < 1.5 / 6.0 and std_r > 0 and std_a > 0
    mean, std_r, std_a = ideal_gas_statistics(5.999999, 6.0)  # ~1/r: mean 1.5/rc, <1/r^2> 3/rc^2
    assert abs(mean - 0.25) < 1e-3 and abs(std_a - (3 / 36 / 3) ** 0.5) < 1e-3
    m = make()
    default = m.net.env_std[1].clone()
    atoms = bulk("O", "sc", a=1.5).repeat((2, 2, 2))  # only type O as centres
    m.fit_statistics([T.to_data(atoms, m)])
    assert torch.equal(m.net.env_std[1], default)
    assert torch.all(m.net.env_std[0] >= 1e-2)  # a perfect lattice floors sigma_r


# ---------------------------------------------------------------- it learns
def emt_frames(n, seed=0):
    rng = np.random.default_rng(seed)
    frames = []
    for k in range(n):
        atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 1, 1))
        atoms.rattle(0.1, seed=int(rng.integers(1 << 30)))
        atoms.calc = EMT()
        d = AtomicData.from_ase(atoms, energy=atoms.get_potential_energy(),
                                forces=atoms.get_forces())
        d.atom_types = TypeMap(["Cu"]).types(d.atomic_numbers.numpy())
        frames.append(d)
    return frames


def test_fits_emt_forces():
    torch.manual_seed(0)
    m = build_model("dp_se_e2_a", ["Cu"], cutoff=4.5, dtype="float32",
                    embedding=[8, 16], axis_neuron=4, fitting=[32, 32])
    frames = [f.with_neighbors(4.5) for f in emt_frames(20)]
    m.fit_statistics(frames)
    m.set_reference_energies(fit_reference_energies(frames, 1))
    batch = AtomicData.collate(frames).as_dict()
    ref_f = torch.cat([f.forces for f in frames])

    def force_rmse():
        return float((m(batch)[K.FORCES].detach() - ref_f).pow(2).mean().sqrt())

    start = force_rmse()
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tensors this small gain nothing from threads, and lose on a busy CPU
    m.train()
    try:
        for step in range(100):
            opt.zero_grad()
            out = m(batch)
            loss = (out[K.FORCES] - ref_f).pow(2).mean() \
                + 1e-2 * (out[K.ENERGY] - batch[K.ENERGY]).pow(2).mean() / 8
            loss.backward()
            opt.step()
    finally:
        m.eval()
        torch.set_num_threads(threads)
    end = force_rmse()
    assert end < start / 5, f"force RMSE {start:.3f} -> {end:.3f} eV/A"


def _chunked(m, chunk_atoms):
    c = make()
    c.load_state_dict(m.state_dict())
    c.eval()
    c.chunk_atoms = chunk_atoms
    return c


@pytest.mark.parametrize("chunk_atoms", [1, 5, 11])
def test_chunked_inference_equals_whole(model, periodic, chunk_atoms):
    """Inference in chunks of centres (large systems) gives the numbers of one whole pass: energy,
    per-atom energies, forces, virial and stress, for a batch of two cells, edges given unsorted,
    eager and scripted."""
    assert 0 < periodic.positions.shape[0] + 7 < model.chunk_atoms  # whole pass below
    other = T.to_data(T.random_periodic(n_atoms=7, seed=3), model)
    batch = AtomicData.collate([periodic, other]).with_neighbors(model.cutoff).as_dict()
    whole = model(dict(batch), True, True)
    perm = torch.randperm(batch[K.EDGE_INDEX].shape[1], generator=torch.Generator().manual_seed(0))
    shuffled = dict(batch, **{K.EDGE_INDEX: batch[K.EDGE_INDEX][:, perm],
                              K.EDGE_SHIFTS: batch[K.EDGE_SHIFTS][perm]})
    chunked = _chunked(model, chunk_atoms)
    for m in (chunked, torch.jit.script(chunked)):
        for inp in (batch, shuffled):
            got = m(dict(inp), True, True)
            for k in (K.ENERGY, K.ATOMIC_ENERGIES, K.FORCES, K.VIRIAL, K.STRESS):
                assert torch.allclose(got[k], whole[k], atol=1e-11, rtol=0), k
    # a molecule (no cell: zero stress, as in one pass)
    mol = T.to_data(T.small_molecule("H2O2"), model).with_neighbors(model.cutoff).as_dict()
    want = model(dict(mol), True, True)
    got = chunked(dict(mol), True, True)
    for k in (K.ENERGY, K.FORCES, K.STRESS):
        assert torch.allclose(got[k], want[k], atol=1e-11, rtol=0), k
    # energies alone (no gradients asked) and the finite-difference checks on the chunked path
    e = chunked(dict(batch), False, False)
    assert torch.allclose(e[K.ENERGY], whole[K.ENERGY], atol=1e-11) and K.FORCES not in e
    T.assert_forces_are_gradients(chunked, periodic)
    T.assert_stress_is_strain_derivative(chunked, periodic)


def test_chunking_is_not_used_for_training_or_graphs_to_positions(model, periodic):
    """Training (create_graph) and positions that require grad keep the one-graph pass."""
    chunked = _chunked(model, 2)
    inp = periodic.as_dict()
    pos = inp[K.POSITIONS].clone().requires_grad_(True)
    out = chunked(dict(inp, **{K.POSITIONS: pos}), True, False)
    assert out[K.ENERGY].requires_grad  # the one-graph pass: the energy depends on pos
    assert not chunked(dict(inp), True, False)[K.ENERGY].requires_grad  # chunks: it does not
    chunked.train()
    out = chunked(dict(inp), True, False)
    assert out[K.FORCES].requires_grad  # create_graph: force losses can be trained


def test_state_dicts_with_the_old_step_name_still_load(periodic):
    """ResidualTanhLayer's residual step scale was called ``timestep`` before the rename to
    ``step_scale``: checkpoints written then load into the new model with the same numbers."""
    torch.manual_seed(3)
    model = build_model("dp_se_e2_a", ["H", "C", "O"], 4.0, "float64", **SMALL).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("step_scale"):
                p.uniform_(0.05, 0.5)  # not the initial 0.1, so a skipped load would show
    old = {k.replace("step_scale", "timestep"): v for k, v in model.state_dict().items()}
    assert sum(k.endswith(".timestep") for k in old) >= 2
    again = from_config(model.config).eval()
    again.load_state_dict(old)  # strict: every old key is used, every new key is set
    a, b = again(periodic.as_dict(), True, True), model(periodic.as_dict(), True, True)
    for key in (K.ENERGY, K.FORCES, K.STRESS):
        assert torch.equal(a[key], b[key]), key
