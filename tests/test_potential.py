"""The Potential wrapper (forces, stress, precision, scripting) on a small pairwise network, and the
physics checks of mlpot.testing themselves (they must fail on a broken model)."""
import pytest
import torch
from torch import nn

from mlpot import keys as K
from mlpot import testing as T
from mlpot.models import Potential, fit_reference_energies
from mlpot.nn import BesselBasis, MLP, polynomial_cutoff, scatter_sum


class PairNet(nn.Module):
    """E_i = sum_j MLP([bessel(r_ij), onehot(t_i), onehot(t_j)]) * u(r_ij)."""

    def __init__(self, num_types: int, cutoff: float, broken: bool = False):
        super().__init__()
        self.cutoff = cutoff
        self.num_types = num_types
        self.basis = BesselBasis(cutoff, 6)
        self.mlp = MLP([6 + 2 * num_types, 16, 1])
        self.broken = broken

    def forward(self, atom_types, edge_index, edge_vectors):
        r = torch.linalg.norm(edge_vectors, dim=1)
        oh = nn.functional.one_hot(atom_types, self.num_types).to(r.dtype)
        x = torch.cat([self.basis(r), oh[edge_index[0]], oh[edge_index[1]]], dim=1)
        e = self.mlp(x).squeeze(1)
        if not self.broken:
            e = e * polynomial_cutoff(r, self.cutoff)
        return scatter_sum(e, edge_index[0], atom_types.shape[0])


def make(dtype=torch.float64, broken=False, cutoff=3.5):
    torch.manual_seed(0)
    return Potential(PairNet(2, cutoff, broken), ["O", "H"], cutoff,
                     {"model": "pair"}, dtype=dtype)


@pytest.fixture(scope="module")
def model():
    return make()


def test_physics_checks_pass(model):
    periodic = T.to_data(T.random_periodic(n_atoms=10, seed=1), model)
    mol = T.to_data(T.small_molecule("H2O"), model)
    for d in (periodic, mol):
        T.assert_invariance(model, d)
        T.assert_forces_are_gradients(model, d)
    T.assert_stress_is_strain_derivative(model, periodic)
    T.assert_extensive(model, T.random_periodic(n_atoms=8, seed=2))
    T.assert_smooth_at_cutoff(model)
    T.assert_batch_equals_single(model, [periodic, T.to_data(T.random_periodic(n_atoms=7, seed=3), model)])
    T.assert_script_equals_eager(model, periodic)


def test_a_model_without_envelope_fails_the_cutoff_check():
    with pytest.raises(AssertionError, match="across the cutoff"):
        T.assert_smooth_at_cutoff(make(broken=True))


def test_wrong_forces_fail_the_gradient_check(model):
    class Liar(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.type_map = inner.type_map

        def forward(self, data, compute_forces: bool = True, compute_stress: bool = False):
            out = dict(self.inner(data, compute_forces, compute_stress))
            out[K.FORCES] = out[K.FORCES] * 1.01
            return out

    d = T.to_data(T.small_molecule("H2O"), model)
    with pytest.raises(AssertionError, match="finite differences"):
        T.assert_forces_are_gradients(Liar(model), d)


def test_energies_are_float64_sums_even_for_float32_networks():
    m32 = make(torch.float32)
    m32.set_reference_energies(torch.tensor([-2000.123456789, -13.5]))
    d = T.to_data(T.random_periodic(n_atoms=30, seed=4), m32)
    out = {k: v.detach() for k, v in m32(d.as_dict()).items()}
    assert out[K.ENERGY].dtype == torch.float64
    n_o = int((d.atom_types == 0).sum())
    n_h = 30 - n_o
    net_part = float(out[K.ENERGY][0]) - (n_o * -2000.123456789 + n_h * -13.5)
    # the reference part is carried to float64 precision, not float32's ~1e-4 eV at 3e4 eV
    assert abs(net_part) < 50 and abs(net_part - float(out[K.ATOMIC_ENERGIES].sum()
                                                       - (n_o * -2000.123456789 + n_h * -13.5))) < 1e-9


def test_training_mode_keeps_the_force_graph(model):
    d = T.to_data(T.small_molecule("H2O"), model)
    model.train()
    try:
        f = model(d.as_dict())[K.FORCES]
        loss = (f ** 2).sum()
        loss.backward()
        assert model.net.mlp.net[0].weight.grad is not None
    finally:
        model.eval()
        model.zero_grad()


def test_reference_energies_least_squares():
    from mlpot.data import AtomicData

    items = []
    for n_o, n_h, e in ((1, 2, -10.0), (2, 4, -20.0), (1, 0, -6.0), (0, 2, -4.0)):
        d = AtomicData.from_arrays([[0, 0, k] for k in range(n_o + n_h)], [8] * n_o + [1] * n_h,
                                   energy=e)
        d.atom_types = torch.tensor([0] * n_o + [1] * n_h)
        items.append(d)
    e0 = fit_reference_energies(items, 2)
    assert torch.allclose(e0, torch.tensor([-6.0, -2.0], dtype=torch.float64), atol=1e-6)


SMALL_MODELS = {
    "dp_se_e2_a": dict(cutoff=3.5, embedding=[8, 16], axis_neuron=4, fitting=[16, 16]),
    "egnn": dict(cutoff=3.5, hidden=16, edge_hidden=16, num_layers=2),
    "nequip": dict(cutoff=3.5, num_features=4, l_max=2, num_layers=2),
    "nequip-mace": dict(cutoff=3.5, num_features=4, l_max=2, feature_l_max=0, correlation=3,
                        num_layers=2, parity=False),
}


def _same_on_device(name: str, device: str) -> None:
    """Energy, forces and stress of a model (eager and scripted) on ``device`` equal the CPU's."""
    from mlpot.models import build_model, script

    torch.manual_seed(0)
    hp = dict(SMALL_MODELS[name])
    model = build_model(name.split("-")[0], ["O", "H"], dtype="float64", **hp).eval()
    data = T.to_data(T.random_periodic(("O", "H"), 24, seed=2), model)
    want = model(data.as_dict(), True, True)
    moved = model.to(device)
    for m in (moved, script(moved)):
        got = m(data.to(device).as_dict(), True, True)
        for key in (K.ENERGY, K.FORCES, K.STRESS):
            assert got[key].device.type == torch.device(device).type, key
            torch.testing.assert_close(got[key].cpu(), want[key].detach(), rtol=1e-9,
                                       atol=1e-10, msg=f"{name} {key} on {device}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", sorted(SMALL_MODELS))
def test_models_on_cuda_equal_cpu(name):
    """The three model families (and the MACE product basis) run on CUDA: one block of edges and
    atoms there instead of the CPU's blocks, the same numbers."""
    _same_on_device(name, "cuda")


def d_pairs(data, cutoff: float) -> int:
    return int(data.with_neighbors(cutoff).edge_index.shape[1])


def test_every_pair_vector_comes_from_neighbors_pair_vectors(monkeypatch):
    """Potential computes its pair vectors with mlpot.neighbors.pair_vectors (one function for
    models, data and integrators), whole and in chunks, and that function scripts."""
    import mlpot.models.potential as potential_module
    from mlpot.neighbors import pair_vectors

    calls = []

    def counted(*args):
        calls.append(args[3].shape[0])
        return pair_vectors(*args)

    monkeypatch.setattr(potential_module, "pair_vectors", counted)
    torch.manual_seed(0)
    model = Potential(PairNet(2, 3.0), ["O", "H"], 3.0, {}, dtype=torch.float64)
    data = T.to_data(T.random_periodic(("O", "H"), 12, seed=4), model)
    model(data.as_dict(), True, True)
    assert len(calls) == 1 and calls[0] > 0
    from mlpot.models import build_model

    local = build_model("dp_se_e2_a", ["O", "H"], 3.0, "float64", embedding=[4, 8],
                        axis_neuron=2, fitting=[8]).eval()
    local.chunk_atoms = 4  # 12 atoms: three chunks of centres
    calls.clear()
    local(data.as_dict(), True, True)
    assert len(calls) == 3 and sum(calls) == d_pairs(data, 3.0)
    scripted = torch.jit.script(pair_vectors)
    d = data.with_neighbors(3.0)
    i, j = d.edge_index
    for cell in (d.cell, d.cell[0]):
        want = pair_vectors(d.positions, cell, d.batch, i, j, d.edge_cell_shift)
        got = scripted(d.positions, cell, d.batch, i, j, d.edge_cell_shift)
        assert torch.equal(got, want)
