"""Neighbor lists: the public API (C++ op when it builds), the pure-PyTorch fallback, ASE and a
brute-force reference must all give the same set of (i, j, S)."""
import functools
import itertools
import sys

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.neighborlist import neighbor_list as ase_neighbor_list

import mlpot
from mlpot import neighbors
from mlpot.neighbors import neighbor_list, neighbor_list_batch, neighbor_list_torch, pair_vectors
from mlpot.neighbors._torch import _neighbor_list_chunked

# --------------------------------------------------------------------------------------------
# references and helpers
# --------------------------------------------------------------------------------------------


def brute_force_ijS(positions, cell, pbc, cutoff):
    """Explicit loop over periodic images (numpy): the set of (i, j, S) with
    |x_j - x_i + S @ cell| < cutoff, S = 0 along non-periodic directions, (i, i, 0) excluded.

    The image range along a periodic direction d follows from h_d, the height of cell vector d
    above the span of the other periodic vectors: |x + S @ cell| >= |S_d| h_d - |x|.
    """
    pos = np.asarray(positions, dtype=float).reshape(-1, 3)
    cell = np.asarray(cell, dtype=float).reshape(3, 3)
    pbc = np.broadcast_to(np.asarray(pbc, dtype=bool), (3,))
    diff = pos[None, :, :] - pos[:, None, :]  # [i, j, 3]: x_j - x_i
    dmax = float(np.linalg.norm(diff, axis=-1).max()) if len(pos) else 0.0
    periodic = [d for d in range(3) if pbc[d]]
    ranges = []
    for d in range(3):
        if not pbc[d]:
            ranges.append([0])
            continue
        v = cell[d].copy()
        others = cell[[e for e in periodic if e != d]]
        if len(others):
            q, _ = np.linalg.qr(others.T)
            v = v - q @ (q.T @ v)
        m = int(np.ceil((cutoff + dmax) / np.linalg.norm(v)))
        ranges.append(range(-m, m + 1))
    found = set()
    masked_cell = np.where(pbc[:, None], cell, 0.0)
    for shift in itertools.product(*ranges):
        dist = np.linalg.norm(diff + np.asarray(shift, dtype=float) @ masked_cell, axis=-1)
        for i, j in zip(*np.nonzero(dist < cutoff)):
            if i == j and not any(shift):
                continue
            found.add((int(i), int(j), tuple(int(s) for s in shift)))
    return found


def as_set(i, j, S):
    i, j, S = (np.asarray(t.cpu() if torch.is_tensor(t) else t) for t in (i, j, S))
    return set(zip(i.tolist(), j.tolist(), map(tuple, S.reshape(-1, 3).tolist())))


def ase_set(positions, cell, pbc, cutoff):
    atoms = Atoms(positions=positions, cell=cell, pbc=pbc)
    return as_set(*ase_neighbor_list("ijS", atoms, cutoff))


def single(fn, positions, cell, pbc, cutoff, dtype=torch.float64):
    """Call a 5-argument (batch) neighbor-list function on one structure."""
    pos = torch.as_tensor(np.asarray(positions, dtype=float).reshape(-1, 3), dtype=dtype)
    cells = torch.as_tensor(np.asarray(cell, dtype=float).reshape(1, 3, 3), dtype=dtype)
    pbc_t = torch.as_tensor(np.broadcast_to(np.asarray(pbc, dtype=bool), (3,)).copy())[None]
    ptr = torch.tensor([0, pos.shape[0]], dtype=torch.long)
    return fn(pos, cells, pbc_t, ptr, float(cutoff))


def check_output(i, j, S, n_atoms):
    """dtype/shape/sortedness contract of every backend."""
    assert i.dtype == j.dtype == S.dtype == torch.int64
    assert i.dim() == 1 and j.shape == i.shape and S.shape == (i.shape[0], 3)
    if i.numel():
        assert bool((i[1:] >= i[:-1]).all()), "pairs must be sorted by i"
        assert int(i.min()) >= 0 and int(max(i.max(), j.max())) < n_atoms


def safe_cutoff(positions, cell, pbc, cutoff, margin=1e-4):
    """Move the cutoff until no pair distance lies within `margin` of it (ambiguous pairs)."""
    atoms = Atoms(positions=positions, cell=cell, pbc=pbc)
    for _ in range(100):
        d = ase_neighbor_list("d", atoms, cutoff + 2 * margin)
        if not np.any(np.abs(d - cutoff) < margin):
            return cutoff
        cutoff += 3.7 * margin
    raise AssertionError("no safe cutoff")


@functools.lru_cache(maxsize=None)
def random_case(seed):
    """Seeded random structure: (positions, cell, pbc, cutoff, kind). Cached: do not modify."""
    rng = np.random.default_rng(1000 + seed)
    kind = ["triclinic", "small", "skewed", "mixed", "molecule", "outside"][seed % 6]
    n = int(rng.integers(1, 25))
    cutoff = float(rng.uniform(1.5, 5.0))
    if kind == "triclinic":
        L = rng.uniform(4.0, 9.0)
        cell = L * (np.eye(3) + rng.uniform(-0.4, 0.4, (3, 3)))
        pbc = [True, True, True]
    elif kind == "small":  # cell smaller than the cutoff: many images, self-images
        n = int(rng.integers(1, 5))
        L = rng.uniform(0.9, 2.5)
        cell = L * (np.eye(3) + rng.uniform(-0.3, 0.3, (3, 3)))
        cutoff = float(rng.uniform(2.0, 4.5))
        pbc = [True, True, True]
    elif kind == "skewed":  # strongly sheared (angles down to ~15 degrees)
        L = rng.uniform(1.5, 6.0)
        s = rng.uniform(-3.5, 3.5, 3)
        cell = L * np.array([[1.0, 0.0, 0.0], [s[0], 1.0, 0.0], [s[1], s[2], 1.0]])
        cell = cell @ np.linalg.qr(rng.normal(size=(3, 3)))[0]  # arbitrary orientation
        pbc = [True, True, True]
    elif kind == "mixed":
        L = rng.uniform(2.0, 8.0)
        cell = L * (np.eye(3) + rng.uniform(-0.5, 0.5, (3, 3)))
        pbc = [[True, False, True], [False, True, False], [True, True, False],
               [False, False, True]][seed % 4]
        if seed % 12 < 6:  # zero cell vectors along the non-periodic directions
            cell = np.where(np.asarray(pbc)[:, None], cell, 0.0)
    elif kind == "molecule":
        L = rng.uniform(3.0, 12.0)
        cell = np.zeros((3, 3)) if seed % 12 < 6 else rng.normal(size=(3, 3))
        pbc = [False, False, False]
    else:  # positions far outside the cell
        L = rng.uniform(2.0, 7.0)
        cell = L * (np.eye(3) + rng.uniform(-0.5, 0.5, (3, 3)))
        pbc = [True, True, True] if seed % 12 < 6 else [True, False, True]
    if kind == "molecule":
        positions = rng.uniform(0.0, L, (n, 3))
    elif kind == "outside":
        positions = rng.uniform(-3.0, 4.0, (n, 3)) @ cell
    else:
        positions = rng.uniform(0.0, 1.0, (n, 3)) @ (cell if np.any(cell) else L * np.eye(3))
        positions += rng.normal(scale=0.3, size=positions.shape)  # some slightly outside
    cutoff = safe_cutoff(positions, cell, pbc, cutoff)
    return positions, cell, np.asarray(pbc), cutoff, kind


RANDOM_SEEDS = list(range(60))


@functools.lru_cache(maxsize=None)
def ase_reference(seed):
    positions, cell, pbc, cutoff, _ = random_case(seed)
    return ase_set(positions, cell, pbc, cutoff)

SPECIAL_CASES = {
    # one atom in a 1 A cell with a 5 A cutoff: only self-images (484 of them)
    "one_atom_tiny_cell": (np.zeros((1, 3)), np.eye(3), [True] * 3, 5.0),
    "one_atom_periodic": (np.full((1, 3), 0.3), 3.0 * np.eye(3), [True] * 3, 3.5),
    "one_atom_molecule": (np.zeros((1, 3)), np.zeros((3, 3)), [False] * 3, 5.0),
    "one_atom_mixed": (np.zeros((1, 3)), 2.0 * np.eye(3), [False, True, False], 4.5),
    "zero_atoms_periodic": (np.zeros((0, 3)), 3.0 * np.eye(3), [True] * 3, 5.0),
    "zero_atoms_molecule": (np.zeros((0, 3)), np.zeros((3, 3)), [False] * 3, 5.0),
    "no_pairs": (np.array([[0.0, 0, 0], [5, 5, 5], [0, 9, 1]]), 20.0 * np.eye(3), [True] * 3, 1.0),
    "no_pairs_molecule": (np.array([[0.0, 0, 0], [50, 0, 0]]), np.zeros((3, 3)), [False] * 3, 3.0),
    "flat_molecule": (np.array([[0.0, 0, 0], [1, 0, 0], [0, 1.5, 0], [2, 2, 0]]), np.zeros((3, 3)),
                      [False] * 3, 2.5),
    "duplicate_positions": (np.array([[1.0, 1, 1], [1, 1, 1], [1.5, 1, 1]]), 4.0 * np.eye(3),
                            [True] * 3, 2.2),
    "needle_cell": (np.array([[0.0, 0, 0], [0.3, 2, 1]]),
                    np.array([[0.7, 0, 0], [0, 9.0, 0], [0, 0, 9.0]]), [True] * 3, 3.1),
    "slab_tiny_period": (np.array([[0.1, 0.2, 0.0], [0.5, 0.1, 1.3]]),
                         np.array([[1.1, 0, 0], [0.4, 0.9, 0], [0, 0, 0]]),
                         [True, True, False], 3.3),
}


def api_single(positions, cell, pbc, cutoff, dtype=torch.float64):
    pos = torch.as_tensor(np.asarray(positions, dtype=float).reshape(-1, 3), dtype=dtype)
    return neighbor_list(pos, torch.as_tensor(np.asarray(cell, dtype=float)), pbc, cutoff=cutoff)


def torch_single(positions, cell, pbc, cutoff, dtype=torch.float64):
    return single(neighbor_list_torch, positions, cell, pbc, cutoff, dtype)


IMPLEMENTATIONS = {"api": api_single, "torch": torch_single}


def cpp_available():
    return neighbors.backend() == "cpp"


# --------------------------------------------------------------------------------------------
# correctness against ASE and the brute-force reference
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 5, 9, 10, 15, 16, 21, 23])
def test_brute_force_reference_agrees_with_ase(seed):
    positions, cell, pbc, cutoff, _ = random_case(seed)
    assert brute_force_ijS(positions, cell, pbc, cutoff) == ase_reference(seed)


@pytest.mark.parametrize("name", sorted(SPECIAL_CASES))
def test_special_cases_brute_force_and_ase(name):
    positions, cell, pbc, cutoff = SPECIAL_CASES[name]
    ref = brute_force_ijS(positions, cell, pbc, cutoff)
    assert ref == ase_set(positions, cell, pbc, cutoff)
    for impl, fn in IMPLEMENTATIONS.items():
        i, j, S = fn(positions, cell, pbc, cutoff)
        check_output(i, j, S, len(positions))
        assert as_set(i, j, S) == ref, impl


def test_special_case_counts():
    positions, cell, pbc, cutoff = SPECIAL_CASES["one_atom_tiny_cell"]
    i, j, S = api_single(positions, cell, pbc, cutoff)
    assert len(i) == 484 and bool((i == 0).all()) and bool((j == 0).all())
    assert not bool((S == 0).all(dim=1).any())
    for name in ["one_atom_molecule", "zero_atoms_periodic", "zero_atoms_molecule", "no_pairs",
                 "no_pairs_molecule"]:
        for fn in IMPLEMENTATIONS.values():
            i, j, S = fn(*SPECIAL_CASES[name])
            assert i.shape == (0,) and j.shape == (0,) and S.shape == (0, 3), name


@pytest.mark.parametrize("impl", sorted(IMPLEMENTATIONS))
@pytest.mark.parametrize("seed", RANDOM_SEEDS)
def test_random_cells_match_ase(seed, impl):
    positions, cell, pbc, cutoff, kind = random_case(seed)
    i, j, S = IMPLEMENTATIONS[impl](positions, cell, pbc, cutoff)
    check_output(i, j, S, len(positions))
    found = as_set(i, j, S)
    assert len(found) == len(i), "duplicate pairs"
    assert found == ase_reference(seed), kind
    assert not bool(S[:, ~torch.as_tensor(pbc)].any()), "non-zero shift along non-periodic"


def test_larger_systems_match_ase():
    """A few hundred atoms: many bins, both the periodic and the non-periodic binning paths."""
    rng = np.random.default_rng(7)
    cell = np.array([[14.0, 0.0, 0.0], [5.0, 13.0, 0.0], [-3.0, 2.0, 12.0]])
    positions = rng.uniform(-0.2, 1.2, (400, 3)) @ cell
    for pbc in ([True] * 3, [True, False, True], [False] * 3):
        ref = ase_set(positions, cell, pbc, 4.0)
        for fn in IMPLEMENTATIONS.values():
            i, j, S = fn(positions, cell, pbc, 4.0)
            check_output(i, j, S, len(positions))
            assert as_set(i, j, S) == ref


def test_sparse_system_caps_bins():
    """Few atoms spread over a huge box / extent with a small cutoff (bin cap path)."""
    rng = np.random.default_rng(3)
    positions = rng.uniform(0.0, 400.0, (40, 3))
    positions[1] = positions[0] + [0.5, 0.2, 0.0]
    positions[-1] = [1e6, -1e6, 3e5]
    for pbc, cell in (([True] * 3, 400.0 * np.eye(3)), ([False] * 3, np.zeros((3, 3))),
                      ([True, False, False], 400.0 * np.eye(3))):
        ref = ase_set(positions, cell, pbc, 1.0)
        assert len(ref) >= 2
        for fn in IMPLEMENTATIONS.values():
            assert as_set(*fn(positions, cell, pbc, 1.0)) == ref


def test_chunking_gives_identical_result():
    """Tiny chunk sizes (many row/entry/candidate chunks) give exactly the default result."""
    cases = [random_case(0), random_case(1), random_case(3)]
    for positions, cell, pbc, cutoff, _ in cases:
        args = (torch.tensor(positions), torch.tensor(cell)[None], torch.tensor(pbc)[None],
                torch.tensor([0, len(positions)]), cutoff)
        ref = neighbor_list_torch(*args)
        for entry_chunk, candidate_chunk in ((1, 1), (7, 5), (60, 300)):
            out = _neighbor_list_chunked(*args, entry_chunk, candidate_chunk)
            for a, b in zip(ref, out):
                assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------
# dtypes, batches, backends, TorchScript
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", sorted(IMPLEMENTATIONS))
def test_float32_matches_float64(impl):
    fn = IMPLEMENTATIONS[impl]
    for seed in range(0, 60, 5):
        positions, cell, pbc, cutoff, _ = random_case(seed)
        cutoff = safe_cutoff(positions, cell, pbc, cutoff, margin=1e-4)
        ref = as_set(*fn(positions, cell, pbc, cutoff, dtype=torch.float64))
        out = fn(positions, cell, pbc, cutoff, dtype=torch.float32)
        check_output(*out, len(positions))
        assert as_set(*out) == ref, seed


def _batch_inputs(seeds, extra_empty=True, dtype=torch.float64):
    cases = [random_case(s) for s in seeds]
    cutoff = 3.3
    structures = [(p, c, b) for p, c, b, _, _ in cases]
    if extra_empty:
        structures.insert(2, (np.zeros((0, 3)), 4.0 * np.eye(3), np.array([True] * 3)))
    for p, c, b in structures:
        safe_cutoff(p, c, b, cutoff)  # asserts that 3.3 is unambiguous for these seeds
    positions = torch.tensor(np.concatenate([p for p, _, _ in structures]), dtype=dtype)
    cells = torch.tensor(np.stack([c for _, c, _ in structures]), dtype=dtype)
    pbc = torch.tensor(np.stack([b for _, _, b in structures]))
    sizes = [len(p) for p, _, _ in structures]
    ptr = torch.tensor(np.concatenate([[0], np.cumsum(sizes)]), dtype=torch.long)
    return structures, (positions, cells, pbc, ptr, cutoff)


BATCH_SEEDS = [0, 1, 3, 4, 8, 11, 17, 20]


@pytest.mark.parametrize("impl", ["api", "torch"])
def test_batch_equals_concatenated_single_calls(impl):
    batch_fn = neighbor_list_batch if impl == "api" else neighbor_list_torch
    structures, args = _batch_inputs(BATCH_SEEDS)
    i, j, S = batch_fn(*args)
    check_output(i, j, S, args[0].shape[0])
    ptr = args[3].tolist()
    expected_i, expected_j, expected_s = [], [], []
    for b, (p, c, pb) in enumerate(structures):
        si, sj, ss = single(batch_fn, p, c, pb, args[4])
        expected_i.append(si + ptr[b])
        expected_j.append(sj + ptr[b])
        expected_s.append(ss)
        assert as_set(si, sj, ss) == ase_set(p, c, pb, args[4])
    expected = (torch.cat(expected_i), torch.cat(expected_j), torch.cat(expected_s))
    assert as_set(i, j, S) == as_set(*expected)
    assert torch.equal(i, expected[0])  # same order of centres
    if impl == "torch":  # the fallback is deterministic down to the order within a centre
        for a, e in zip((i, j, S), expected):
            assert torch.equal(a, e)
    # pairs never cross structures
    batch = torch.repeat_interleave(torch.arange(len(structures)), torch.diff(args[3]))
    assert torch.equal(batch[i], batch[j])


def test_fallback_equals_extension():
    if not cpp_available():
        pytest.skip(f"C++ op not in use (backend={neighbors.backend()!r}): "
                    f"{neighbors._STATE.get('reason', '')}")
    op = torch.ops.mlpot.neighbor_list
    for seed in RANDOM_SEEDS[::2]:
        positions, cell, pbc, cutoff, _ = random_case(seed)
        for dtype in (torch.float64, torch.float32):
            a = single(op, positions, cell, pbc, cutoff, dtype)
            b = single(neighbor_list_torch, positions, cell, pbc, cutoff, dtype)
            check_output(*a, len(positions))
            assert as_set(*a) == as_set(*b), (seed, dtype)
    for name, case in SPECIAL_CASES.items():
        assert as_set(*single(op, *case)) == as_set(*single(neighbor_list_torch, *case)), name
    _, args = _batch_inputs(BATCH_SEEDS)
    a, b = op(*args), neighbor_list_torch(*args)
    assert as_set(*a) == as_set(*b) and torch.equal(a[0], b[0])
    # a larger periodic box
    rng = np.random.default_rng(11)
    positions = rng.uniform(0.0, 18.0, (3000, 3))
    cell = np.diag([18.0, 18.0, 18.0])
    a = single(op, positions, cell, True, 5.0)
    b = single(neighbor_list_torch, positions, cell, True, 5.0)
    assert as_set(*a) == as_set(*b)


def test_scripted_fallback_equals_eager():
    scripted = torch.jit.script(neighbor_list_torch)
    cases = [random_case(s)[:4] for s in (0, 1, 2, 3, 4, 5)] + list(SPECIAL_CASES.values())
    for positions, cell, pbc, cutoff in cases:
        for dtype in (torch.float64, torch.float32):
            a = single(scripted, positions, cell, pbc, cutoff, dtype)
            b = single(neighbor_list_torch, positions, cell, pbc, cutoff, dtype)
            for x, y in zip(a, b):
                assert torch.equal(x, y)
    _, args = _batch_inputs(BATCH_SEEDS)
    for x, y in zip(scripted(*args), neighbor_list_torch(*args)):
        assert torch.equal(x, y)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    _, args = _batch_inputs(BATCH_SEEDS)
    cuda_args = [a.cuda() if torch.is_tensor(a) else a for a in args]
    for fn in (neighbor_list_torch, neighbor_list_batch):
        out = fn(*cuda_args)
        assert all(t.device.type == "cuda" for t in out)
        assert as_set(*out) == as_set(*neighbor_list_torch(*args))


# --------------------------------------------------------------------------------------------
# gradients through pair_vectors
# --------------------------------------------------------------------------------------------


def _smooth_energy(vectors, cutoff):
    d = vectors.norm(dim=1)
    return (torch.exp(-d) * (0.5 * torch.cos(np.pi * d / cutoff) + 0.5) ** 2).sum()


@pytest.mark.parametrize("small_cell", [False, True])
def test_gradients_flow_to_positions_and_cell(small_cell):
    rng = np.random.default_rng(5)
    if small_cell:  # images of the atoms themselves contribute to the cell gradient
        cell_np = np.array([[2.0, 0.1, 0.0], [0.6, 2.2, 0.0], [0.3, -0.2, 2.4]])
        n, cutoff = 3, 3.0
    else:
        cell_np = np.array([[5.0, 0.2, 0.0], [1.0, 5.5, 0.0], [0.4, -0.6, 6.0]])
        n, cutoff = 8, 3.5
    positions = torch.tensor(rng.uniform(0, 1, (n, 3)) @ cell_np, requires_grad=True)
    cell = torch.tensor(cell_np, requires_grad=True)
    i, j, S = neighbor_list(positions.detach(), cell.detach(), True, cutoff=cutoff)
    assert len(i) > 0
    batch = torch.zeros(n, dtype=torch.long)

    def energy(pos, c):
        return _smooth_energy(pair_vectors(pos, c, batch, i, j, S), cutoff)

    assert torch.autograd.gradcheck(energy, (positions, cell))

    def energy_batched(pos, c):
        return _smooth_energy(pair_vectors(pos, c[None], batch, i, j, S), cutoff)

    assert torch.autograd.gradcheck(energy_batched, (positions, cell))
    # inputs that require grad are fine; the integer outputs carry no graph
    i2, j2, S2 = neighbor_list_torch(positions, cell[None], torch.ones(1, 3, dtype=torch.bool),
                                     torch.tensor([0, n]), cutoff)
    assert not (i2.requires_grad or S2.requires_grad)
    assert as_set(i2, j2, S2) == as_set(i, j, S)
    # pair vectors from the fallback's shifts have lengths below the cutoff
    v = pair_vectors(positions.detach(), cell.detach(), batch, i2, j2, S2)
    assert bool((v.norm(dim=1) < cutoff).all())


# --------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------


def _error_backends():
    backends = [("torch", neighbor_list_torch), ("scripted", torch.jit.script(neighbor_list_torch))]
    if cpp_available():
        backends.append(("cpp", torch.ops.mlpot.neighbor_list))
    return backends


def _ok_args():
    positions = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.5, 0.2]], dtype=torch.float64)
    cells = (3.0 * torch.eye(3, dtype=torch.float64))[None]
    pbc = torch.ones(1, 3, dtype=torch.bool)
    ptr = torch.tensor([0, 2])
    return [positions, cells, pbc, ptr, 2.5]


def _with(index, value):
    args = _ok_args()
    args[index] = value(args[index]) if callable(value) else value
    return args


ERROR_CASES = {
    "cutoff_zero": (_with(4, 0.0), r"(?i)cutoff"),
    "cutoff_negative": (_with(4, -1.5), r"(?i)cutoff"),
    "nan_positions": (_with(0, lambda p: p.index_fill(0, torch.tensor([1]), float("nan"))),
                      r"(?i)finite|nan"),
    "inf_positions": (_with(0, lambda p: p.index_fill(0, torch.tensor([0]), float("inf"))),
                      r"(?i)finite|inf"),
    "zero_periodic_cell": (_with(1, torch.zeros(1, 3, 3, dtype=torch.float64)),
                           r"(?i)degenerate|volume|singular"),
    "flat_periodic_cell": (_with(1, torch.tensor([[[3.0, 0, 0], [0, 3, 0], [3, 3, 0]]],
                                                 dtype=torch.float64)),
                           r"(?i)degenerate|volume|singular"),
    "positions_not_n_by_3": (_with(0, lambda p: p[:, :2].contiguous()), r"(?i)positions|shape"),
    "positions_1d": (_with(0, lambda p: p.reshape(-1)), r"(?i)positions|shape"),
    "cells_not_b33": (_with(1, lambda c: c[0]), r"(?i)cell|shape"),
    "pbc_wrong_shape": (_with(2, lambda b: b[:, :2]), r"(?i)pbc|shape"),
    "ptr_wrong_length": (_with(3, torch.tensor([0, 1, 2])), r"(?i)ptr|shape"),
    "ptr_wrong_end": (_with(3, torch.tensor([0, 3])), r"(?i)ptr"),
}


@pytest.mark.parametrize("name", sorted(ERROR_CASES))
def test_errors(name):
    args, pattern = ERROR_CASES[name]
    for backend, fn in _error_backends():
        # errors raised inside TorchScript come out as torch.jit.Error (an Exception)
        expected = (ValueError, RuntimeError, torch.jit.Error) if backend == "scripted" else (
            ValueError, RuntimeError)
        with pytest.raises(expected, match=pattern):
            fn(*args)
    with pytest.raises((ValueError, RuntimeError), match=pattern):
        neighbor_list_batch(*args)


def test_degenerate_direction_allowed_when_not_periodic():
    # the same flat cell is fine when the degenerate direction is not periodic
    cell = np.array([[3.0, 0, 0], [0, 3, 0], [0, 0, 0]])
    positions = np.array([[0.0, 0, 0], [1.0, 1.0, 0.5]])
    pbc = [True, True, False]
    ref = brute_force_ijS(positions, cell, pbc, 2.9)
    for fn in IMPLEMENTATIONS.values():
        assert as_set(*fn(positions, cell, pbc, 2.9)) == ref


def test_public_api_errors():
    with pytest.raises((ValueError, RuntimeError), match=r"(?i)cutoff"):
        neighbor_list(torch.zeros(2, 3), torch.eye(3) * 3, True, cutoff=0.0)
    with pytest.raises((ValueError, RuntimeError), match=r"(?i)finite|nan"):
        neighbor_list(torch.full((2, 3), float("nan")), None, False, cutoff=2.0)


def test_exported_in_package():
    assert mlpot.neighbors.neighbor_list_torch is neighbor_list_torch


@pytest.mark.skipif(neighbors.backend() != "cpp", reason="the compiled op is not in use")
def test_large_outputs_reuse_memory_without_aliasing_live_tensors():
    """Outputs of 1 MiB or more come from blocks the op recycles: a list still held must not be
    overwritten by the next call, and a recycled block must give the same list again."""
    rng = np.random.default_rng(5)
    cell = np.eye(3) * 24.0
    pos = torch.tensor(rng.uniform(0, 24.0, (2800, 3)))  # ~290k pairs at 5 A
    args = (pos, torch.tensor(cell), torch.ones(3, dtype=torch.bool), 5.0)
    first = neighbor_list(*args)
    assert first[0].numel() * 8 >= 2**20, "the case must exceed the recycling threshold"
    kept = [t.clone() for t in first]
    moved = (pos + 0.3) % 24.0  # a different list of about the same size
    second = neighbor_list(moved, *args[1:])
    for a, b in zip(first, kept):
        assert torch.equal(a, b)
    del first, second
    third = neighbor_list(*args)  # may reuse the freed blocks
    for a, b in zip(third, kept):
        assert torch.equal(a, b)
    i, j, S = third
    d = (pos[j] - pos[i] + S.double() @ torch.tensor(cell)).norm(dim=1)
    assert float(d.max()) < 5.0
    neighbors.empty_cache()
    assert torch.equal(third[0], kept[0])  # live tensors are untouched by empty_cache


@pytest.mark.skipif(neighbors.backend() != "cpp", reason="the compiled op is not in use")
def test_md_steps_reuse_the_recycled_blocks():
    """An MD-like sequence of calls of about the same size keeps reusing its blocks: the memory
    the process holds stays flat. (Blocks are whole multiples of 2 MiB; a 2.1 MB list once got
    a 4 MiB block that the next step refused as too large, so every step cached one more block,
    up to 4 GiB: 7 GB of RSS in a 10 ps NVT run of 5 x 192 waters.)"""
    def rss_mb():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20

    rng = np.random.default_rng(6)
    cell = torch.tensor(np.eye(3) * 18.0)
    pos0 = torch.tensor(rng.uniform(0, 18.0, (1000, 3)))
    pbc = torch.ones(3, dtype=torch.bool)
    out = neighbor_list(pos0, cell, pbc, 5.0)
    assert 2**20 <= out[2].numel() * 8 <= 3 * 2**20, "a list whose block is rounded up 2x"
    for _ in range(5):
        out = neighbor_list((pos0 + torch.tensor(rng.normal(0, 0.05, (1000, 3)))) % 18.0,
                            cell, pbc, 5.0)
    start = rss_mb()
    for _ in range(60):
        out = neighbor_list((pos0 + torch.tensor(rng.normal(0, 0.05, (1000, 3)))) % 18.0,
                            cell, pbc, 5.0)
    assert rss_mb() - start < 40, "the op's output cache grows at every call"


# --------------------------------------------------------------------------------------------
# the cache of the compiled op: a library there is code, loaded only when it is the user's own
# --------------------------------------------------------------------------------------------


def _private_tree(tmp_path):
    """root/ops/lib.so, all owned by the user, folders 0o700 and the file 0o644."""
    root = tmp_path / "root"
    lib = root / "ops" / "lib.so"
    lib.parent.mkdir(parents=True)
    root.chmod(0o700)
    lib.parent.chmod(0o700)
    lib.write_bytes(b"not really a library")
    lib.chmod(0o644)
    return root, lib


def test_cache_check_accepts_private_tree(tmp_path):
    from mlpot.cache import check_private

    root, lib = _private_tree(tmp_path)
    check_private(lib, root)
    check_private(root / "ops" / "missing.so", root)  # not there yet: it will be built private


@pytest.mark.parametrize("where,mode,who", [("root", 0o777, "group and others"),
                                            ("ops", 0o770, "group"),
                                            ("file", 0o646, "others")])
def test_cache_check_refuses_writable_by_others(tmp_path, where, mode, who):
    from mlpot.cache import UnsafeCacheError, check_private
    from mlpot.errors import UserError

    root, lib = _private_tree(tmp_path)
    bad = {"root": root, "ops": lib.parent, "file": lib}[where]
    bad.chmod(mode)
    with pytest.raises(UnsafeCacheError) as info:
        check_private(lib, root)
    msg = str(info.value)
    assert "\n" not in msg
    assert f"{bad} is writable by {who}" in msg
    assert f"chmod go-w {bad}" in msg and "MLPOT_CACHE_DIR" in msg
    assert isinstance(info.value, UserError)


def test_cache_check_refuses_another_owner(tmp_path, monkeypatch):
    import os

    from mlpot.cache import UnsafeCacheError, check_private

    root, lib = _private_tree(tmp_path)
    me = os.stat(lib).st_uid
    monkeypatch.setattr(os, "getuid", lambda: me + 1)
    with pytest.raises(UnsafeCacheError, match=f"owned by user id {me}, not by you"):
        check_private(lib, root)


def test_cache_folders_are_created_private(tmp_path, monkeypatch):
    import stat

    from mlpot.cache import make_private_dir

    monkeypatch.setenv("MLPOT_CACHE_DIR", str(tmp_path / "cache"))
    made = make_private_dir(tmp_path / "cache" / "v-hash")
    for p in (made, made.parent):
        assert stat.S_IMODE(p.stat().st_mode) == 0o700


def test_planted_library_is_not_loaded_and_the_fallback_is_used(tmp_path, monkeypatch):
    """A library placed in a world-writable MLPOT_CACHE_DIR is refused before load_library, and
    mlpot falls back to the pure-PyTorch neighbor list with its one warning."""
    from mlpot.neighbors import _extension

    cache = tmp_path / "shared"
    monkeypatch.setenv("MLPOT_CACHE_DIR", str(cache))
    folder, name = _extension._build_id(False)
    folder.mkdir(parents=True)
    (folder / f"{name}.so").write_bytes(b"\x7fELF planted")
    cache.chmod(0o777)
    loaded, built = [], []
    monkeypatch.setattr(torch.ops, "load_library", lambda p: loaded.append(p))
    monkeypatch.setattr(_extension, "_build", lambda *a, **k: built.append(a))
    with pytest.raises(_extension.UnsafeCacheError, match="refusing the cached library"):
        _extension._load_or_build(False, False)
    assert loaded == [] and built == []

    # through the backend selection: one warning naming the reason, then the fallback
    monkeypatch.setattr(_extension, "_LOADED", None)
    monkeypatch.setattr(_extension, "_op_registered", lambda: False)
    monkeypatch.setattr(_extension, "cuda_decision", lambda: (False, "test"))
    for key in ("backend", "library", "reason"):
        monkeypatch.setitem(neighbors._STATE, key, None if key != "reason" else "")
    monkeypatch.delenv("MLPOT_NO_EXTENSION", raising=False)
    with pytest.warns(RuntimeWarning, match=r"pure-PyTorch.*writable by group and others"):
        assert neighbors.backend() == "torch"
    assert loaded == [] and built == []
    # mlpot doctor passes on why and what to do
    import io

    from mlpot.doctor import Report, extension

    report = Report(out=io.StringIO())
    extension(report)
    assert any(a.startswith("mlpot: refusing the cached library") and f"chmod go-w {cache}" in a
               for a in report.advice), report.advice


def test_stale_build_folders_are_removed(tmp_path):
    import os
    import subprocess
    import sys

    from mlpot.neighbors._extension import remove_stale_builds

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead_pid = int(gone.stdout)
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for name in (f"build-{dead_pid}-abc", f"build-{alive.pid}-def", f"build-{os.getpid()}-x",
                     "v-hash-keep"):
            (tmp_path / name).mkdir()
            (tmp_path / name / "obj.o").write_bytes(b"")
        (tmp_path / f"build-{dead_pid}-file").write_bytes(b"")  # not a folder: kept
        removed = remove_stale_builds(tmp_path)
    finally:
        alive.kill()
        alive.wait()
    assert sorted(p.name for p in removed) == sorted([f"build-{dead_pid}-abc",
                                                      f"build-{os.getpid()}-x"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"build-{alive.pid}-def", "v-hash-keep", f"build-{dead_pid}-file"])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_build_subprocess_dies_with_a_killed_parent(tmp_path):
    """What cpp_extension starts (ninja) while mlpot builds gets SIGTERM when mlpot is killed -9."""
    import os
    import signal
    import subprocess
    import time

    pid_file = tmp_path / "pid"
    script = (
        "from mlpot.neighbors._extension import _CompilerDiesWithUs\n"
        "from torch.utils import cpp_extension\n"
        "with _CompilerDiesWithUs():\n"
        f"    cpp_extension.subprocess.run(['sh', '-c', 'echo $$ > {pid_file}; exec sleep 60'])\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.time() + 120
        while not (pid_file.is_file() and pid_file.read_text().strip()) and time.time() < deadline:
            time.sleep(0.1)
        child = int(pid_file.read_text())
        os.kill(parent.pid, signal.SIGKILL)
    finally:
        parent.kill()
        parent.wait()

    def running(pid):
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
        except FileNotFoundError:
            return False

    deadline = time.time() + 10
    while running(child) and time.time() < deadline:
        time.sleep(0.1)
    alive = running(child)
    if alive:
        os.kill(child, signal.SIGKILL)
    assert not alive, "the build's subprocess outlived its killed parent"
