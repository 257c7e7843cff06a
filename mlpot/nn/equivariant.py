"""E(3)-equivariant building blocks on e3nn's real spherical harmonics and Clebsch-Gordan
coefficients (Geiger & Smidt, arXiv:2207.09453), written for speed on CPU and GPU.

Features are lists of tensors, one per irrep (l, p) (p = +1 even, -1 odd), each ``[N, 2l+1, C]``:
every irrep has the same number of channels C, components before channels, so that a linear map
of one irrep is one matmul over ``[N * (2l+1), C]`` and a tensor product with edge-dependent
Clebsch-Gordan matrices is one ``bmm`` per (input irrep, output l) pair. Clebsch-Gordan and
product-basis buffers are built in float64 and follow the model's ``.to(dtype)``.

Blocks:
  * ``PathConvolution``: the NequIP/TFN convolution ('uvu' tensor product with radial weights)
    A_i^{(o, path)} = sum_j R_path(r_ij) (h_j^{l1} (x) Y^{l2}(r_ij))^{l3}, one output per path.
  * ``IrrepsLinear``: channel mixing per irrep, optionally with a species-dependent self-connection.
  * ``Gate``: the gated nonlinearity (Weiler et al., NeurIPS 2018).
  * ``SymmetricContraction``: MACE's product basis (Batatia et al., NeurIPS 2022).
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import List, Tuple

import torch
from torch import nn

from .scatter import scatter_add_

Irrep = Tuple[int, int]  # (l, parity), parity +1 (even) or -1 (odd)


# ---------------------------------------------------------------------------- irreps helpers
def natural(l: int) -> Irrep:
    """The irrep of Y^l: parity (-1)^l."""
    return (l, 1 if l % 2 == 0 else -1)


def irreps_up_to(l_max: int, both_parities: bool) -> List[Irrep]:
    """(0e, [0o,] 1o, [1e,] 2e, [2o,] ...): natural parity first, the other one if asked."""
    out: List[Irrep] = []
    for l in range(l_max + 1):
        out.append(natural(l))
        if both_parities:
            out.append((l, -natural(l)[1]))
    return out


def irrep_name(ir: Irrep) -> str:
    """e3nn's name of an irrep: (1, -1) -> '1o'."""
    return f"{ir[0]}{'e' if ir[1] == 1 else 'o'}"


def allowed(l1: int, p1: int, l2: int, p2: int, l3: int, p3: int) -> bool:
    """Selection rule of the coupling (l1 p1) x (l2 p2) -> (l3 p3)."""
    return abs(l1 - l2) <= l3 <= l1 + l2 and p1 * p2 == p3


@lru_cache(maxsize=None)
def _cg(l1: int, l2: int, l3: int) -> torch.Tensor:
    from e3nn import o3

    return math.sqrt(2 * l3 + 1) * o3.wigner_3j(l1, l2, l3, dtype=torch.float64)


def clebsch_gordan(l1: int, l2: int, l3: int) -> torch.Tensor:
    """sqrt(2 l3 + 1) * w3j(l1, l2, l3)  # [2l1+1, 2l2+1, 2l3+1], float64

    e3nn's Wigner 3j symbols have unit Frobenius norm; the factor makes (x (x) y)^{l3} have unit
    mean square components when x and y have ('component' normalisation)."""
    return _cg(l1, l2, l3).clone()


def reachable(irreps_in: List[Irrep], sh_l_max: int, targets: List[Irrep]) -> List[Irrep]:
    """The targets that some (input x Y^l2) coupling can produce, in the order of ``targets``."""
    out = []
    for o in targets:
        if any(allowed(i[0], i[1], l2, natural(l2)[1], o[0], o[1])
               for i in irreps_in for l2 in range(sh_l_max + 1)):
            out.append(o)
    return out


def sources(irreps_in: List[Irrep], sh_l_max: int, targets: List[Irrep]) -> List[Irrep]:
    """The inputs that some (input x Y^l2) coupling takes to one of ``targets``, in the order of
    ``irreps_in``: what a layer with these targets can use of its input."""
    return [i for i in irreps_in
            if any(allowed(i[0], i[1], l2, natural(l2)[1], o[0], o[1])
                   for o in targets for l2 in range(sh_l_max + 1))]


def _normal(fan_in: int, fan_out: int) -> nn.Parameter:
    return nn.Parameter(torch.randn(fan_in, fan_out) / math.sqrt(fan_in))


# ---------------------------------------------------------------------------- convolution
class PathConvolution(nn.Module):
    """Tensor-product convolution of NequIP (Batzner et al., Nat. Commun. 2022, eqs. 3-5):

        A_i^{path, m3, c} = sum_j R_{path,c}(r_ij) sum_{m1 m2} C^{l1 l2 l3}_{m1 m2 m3}
                             h_j^{l1, m1, c} Y^{l2, m2}_ij

    for every path (l1 p1) x (l2 (-1)^l2) -> (l3 p3) from an input irrep to a target irrep
    (Y carries the cutoff envelope and 1/n_avg). Paths stay apart: the next ``IrrepsLinear``
    mixes them with the channels, as e3nn's 'uvu' tensor product followed by a linear layer does.

    Per edge, the paths from one input irrep to the outputs of one l3 form one matrix
    Z[p, (m3, path), m1] = sum_m2 Y[p, m2] C[m1, m2, m3] (for all edges and groups one matmul
    Y @ CG); ``bmm`` applies it to the gathered h_j (a broadcast product for l1 = 0), the radial
    weights (per path and channel, so they commute with the sum over m1) multiply by
    broadcasting over m3, and the result is scattered to the centres. On CPUs the rows go through
    ``bmm`` in blocks small enough (output < 3 kB per edge) for the BLAS fast path for small
    matrices: there, larger per-edge matrices ran 5-15 times slower (torch 2.9, x86).

    forward(h: list [N, 2l1+1, C], y [P, (l_max+1)^2], weights: list over groups [P, n_p, C]
    (``group_paths`` paths each, in the order of ``paths``), centre [P], neighbor [P])
      -> list over ``irreps_out`` of [N, 2l3+1, n_paths(o) * C].
    On CPUs the edges go in blocks whose messages take about ``block_bytes``: each block's
    messages are formed, scattered and freed while in cache. A caller that makes the weights
    itself (``InteractionLayer`` and its radial MLP) runs the same loop with ``gather``,
    ``accumulators``, ``add_block`` and ``finish``, so that no per-edge tensor of the size of all
    edges is made but h_j: on CPUs, tensors above glibc's 32 MB mmap threshold are fresh pages at
    every call, and page faults then cost more than the arithmetic.
    """

    def __init__(self, irreps_in: List[Irrep], sh_l_max: int, targets: List[Irrep]):
        super().__init__()
        self.irreps_out = reachable(irreps_in, sh_l_max, targets)
        sh_dim = (sh_l_max + 1) ** 2
        out = self.irreps_out
        ls = sorted({o[0] for o in out})
        # paths sorted by (l3, input, output, l2); a group = (l3, input)
        self.paths: List[Tuple[int, int, int]] = [
            (i, l2, k) for l3 in ls for i, ir in enumerate(irreps_in)
            for k, o in enumerate(out) if o[0] == l3 for l2 in range(sh_l_max + 1)
            if allowed(ir[0], ir[1], l2, natural(l2)[1], o[0], o[1])]
        self.num_paths = len(self.paths)
        self.used_inputs = sorted({i for i, _, _ in self.paths})
        groups: List[Tuple[int, int]] = []
        for i, _, k in self.paths:
            if (out[k][0], i) not in groups:
                groups.append((out[k][0], i))
        self.g_l3 = [ls.index(l3) for l3, _ in groups]
        self.g_in = [self.used_inputs.index(i) for _, i in groups]
        self.g_d1 = [2 * irreps_in[i][0] + 1 for _, i in groups]
        self.g_d3 = [2 * l3 + 1 for l3, _ in groups]
        self.g_paths = [sum(1 for i, _, k in self.paths if (out[k][0], i) == g) for g in groups]
        self.group_paths = self.g_paths
        cgs = []
        for (l3, i), n_p in zip(groups, self.g_paths):
            l1 = irreps_in[i][0]
            qs = [q for q, (i2, _, k) in enumerate(self.paths) if (out[k][0], i2) == (l3, i)]
            cg = torch.zeros(sh_dim, 2 * l3 + 1, n_p, 2 * l1 + 1, dtype=torch.float64)
            for col, q in enumerate(qs):
                l2 = self.paths[q][1]
                cg[l2 * l2:(l2 + 1) ** 2, :, col] = clebsch_gordan(l1, l2, l3).permute(1, 2, 0)
            cgs.append(cg.flatten(1))
        self.register_buffer("cg", torch.cat(cgs, 1))  # [d2, *], float64 until cast
        self.l3_groups = [[g for g in range(len(groups)) if self.g_l3[g] == c]
                          for c in range(len(ls))]
        self.paths_per_output = [sum(1 for _, _, k in self.paths if k == o)
                                 for o in range(len(out))]
        self.out_l3 = [ls.index(o[0]) for o in out]
        # per output, its paths' positions among the paths of its l3 (which are contiguous)
        first = {l3: min(q for q, (_, _, k) in enumerate(self.paths) if out[k][0] == l3)
                 for l3 in ls}
        pos = [q - first[out[o][0]] for o in range(len(out))
               for q, (_, _, k) in enumerate(self.paths) if k == o]
        self.register_buffer("picks", torch.tensor(pos, dtype=torch.long))
        self.block_bytes = 1 << 21  # CPU: edges per block so that a block's messages take 2 MB

    def rows(self, g: int, c: int, y: torch.Tensor) -> int:
        """Rows (m3, path) of group g's per-edge matrix that go through one ``bmm``: on CPUs few
        enough that an edge's output stays under 3 kB (the BLAS fast path for small matrices),
        a whole number of paths; all of them for scalar inputs and on GPUs."""
        n_p, d3 = self.g_paths[g], self.g_d3[g]
        if self.g_d1[g] == 1 or y.device.type != "cpu":
            return d3 * n_p
        return min(d3 * n_p, max(1, max(1, 3072 // (c * y.element_size())) // n_p) * n_p)

    def edges_per_block(self, n_pairs: int, c: int, y: torch.Tensor) -> int:
        """Edges per block on CPUs, so that the block's largest message takes about
        ``block_bytes``; all edges on GPUs."""
        if y.device.type != "cpu":
            return max(1, n_pairs)
        widest = 1
        for g in range(len(self.g_in)):
            widest = max(widest, self.rows(g, c, y) * c)
        return max(1, self.block_bytes // (widest * y.element_size()))

    def gather(self, h: List[torch.Tensor], neighbor: torch.Tensor) -> List[torch.Tensor]:
        """h_j of every edge, per used input irrep: [P, d1, C]. Gathered once for all edges
        (2-D index_select, rows of contiguous memory, is the fast path): gathers per block would
        each cost a full [N, d1, C] gradient in the backward pass."""
        out: List[torch.Tensor] = []
        for i in self.used_inputs:
            x = h[i]
            out.append(x.reshape(x.shape[0], -1).index_select(0, neighbor)
                       .view(neighbor.shape[0], x.shape[1], x.shape[2]))
        return out

    def accumulators(self, n_atoms: int, c: int, y: torch.Tensor) -> List[torch.Tensor]:
        """Zeroed sums over the edges: per group and bmm row chunk, [N, rows * C]."""
        acc: List[torch.Tensor] = []
        for g in range(len(self.g_in)):
            total, rows = self.g_d3[g] * self.g_paths[g], self.rows(g, c, y)
            for start in range(0, total, rows):
                acc.append(torch.zeros(n_atoms, min(rows, total - start) * c, dtype=y.dtype,
                                       device=y.device))
        return acc

    def add_block(self, acc: List[torch.Tensor], x_j: List[torch.Tensor], y: torch.Tensor,
                  weights: List[torch.Tensor], centre: torch.Tensor):
        """Adds the messages of a block of edges to ``acc``: x_j per used input [Pk, d1, C],
        y [Pk, (l_max+1)^2], weights per group [Pk, n_p * C] (or [Pk, n_p, C]), centre [Pk]."""
        n_pairs, c = y.shape[0], x_j[0].shape[2]
        zs = torch.matmul(y, self.cg).split(
            [a * b * d for a, b, d in zip(self.g_d3, self.g_paths, self.g_d1)], dim=1)
        q = 0
        for g in range(len(self.g_in)):
            n_p, d3, d1 = self.g_paths[g], self.g_d3[g], self.g_d1[g]
            w = weights[g].view(n_pairs, 1, n_p, c)  # [Pk, 1, n_p, C]
            x = x_j[self.g_in[g]]  # [Pk, d1, C]
            z = zs[g].view(n_pairs, d3 * n_p, d1)  # [Pk, (m3, path), d1]
            for zb in z.split(self.rows(g, c, y), dim=1):
                b = zb.shape[1] // n_p
                if d1 == 1:  # scalar input: an outer product
                    m = zb.reshape(n_pairs, b, n_p, 1) * (x.unsqueeze(1) * w)
                else:
                    m = torch.bmm(zb, x).view(n_pairs, b, n_p, c) * w  # [Pk, b, n_p, C]
                scatter_add_(acc[q], centre, m.reshape(n_pairs, b * n_p * c))
                q += 1

    def finish(self, acc: List[torch.Tensor], c: int) -> List[torch.Tensor]:
        """The sums in ``acc`` as the outputs: list over ``irreps_out`` of
        [N, 2l3+1, n_paths(o) * C]."""
        n_atoms = acc[0].shape[0]
        node: List[torch.Tensor] = []
        q = 0
        for g in range(len(self.g_in)):
            n_p, d3 = self.g_paths[g], self.g_d3[g]
            parts: List[torch.Tensor] = []
            rows = 0
            while rows < d3 * n_p:
                rows += acc[q].shape[1] // c
                parts.append(acc[q].view(n_atoms, -1, n_p, c))
                q += 1
            node.append(torch.cat(parts, dim=1) if len(parts) > 1 else parts[0])  # [N,d3,n_p,C]
        per_l3 = [torch.cat([node[g] for g in gs], dim=2) if len(gs) > 1 else node[gs[0]]
                  for gs in self.l3_groups]  # [N, d3, paths of l3, C]
        result: List[torch.Tensor] = []
        for o, pick in enumerate(self.picks.split(self.paths_per_output)):
            a = per_l3[self.out_l3[o]].index_select(2, pick)  # [N, d3, n_o, C]
            result.append(a.reshape(n_atoms, a.shape[1], -1))  # [N, d3, n_o * C]
        return result

    def forward(self, h: List[torch.Tensor], y: torch.Tensor, weights: List[torch.Tensor],
                centre: torch.Tensor, neighbor: torch.Tensor) -> List[torch.Tensor]:
        c = h[0].shape[2]
        acc = self.accumulators(h[0].shape[0], c, y)
        edges = self.edges_per_block(y.shape[0], c, y)
        xs = [x.split(edges) for x in self.gather(h, neighbor)]
        ws = [w.split(edges) for w in weights]
        ys, cs = y.split(edges), centre.split(edges)
        for k in range(len(ys)):
            self.add_block(acc, [x[k] for x in xs], ys[k], [w[k] for w in ws], cs[k])
        return self.finish(acc, c)


# ---------------------------------------------------------------------------- linear, gate
class _IrrepMix(nn.Module):
    """One irrep of ``IrrepsLinear``."""

    def __init__(self, fan_in: int, fan_out: int, sc_index: int, sc_fan_in: int):
        super().__init__()
        self.weight = _normal(fan_in, fan_out)
        self.sc_index = sc_index
        self.sc_weight = _normal(max(sc_fan_in, 1), fan_out) if sc_index >= 0 else None

    def forward(self, x: torch.Tensor, h: List[torch.Tensor], onehot: torch.Tensor
                ) -> torch.Tensor:
        y = torch.matmul(x, self.weight)  # [N, 2l+1, fan_out]
        w = self.sc_weight
        if w is not None:
            hs = h[self.sc_index]  # [N, 2l+1, C]
            ht = hs.unsqueeze(2) * onehot.view(onehot.shape[0], 1, onehot.shape[1], 1)
            y = y + torch.matmul(ht.flatten(2), w)  # [N, 2l+1, fan_out]
        return y


class IrrepsLinear(nn.Module):
    """out^o = x^o W_o (+ (h^o (x) onehot(t)) S_o): per irrep a channel mixing, equivariant because
    it does not touch the m index; S_o is NequIP's species-dependent self-connection
    (a linear map whose weights depend on the atom's type), used where h has irrep o.

    x: list [N, 2l+1, fan_in(o)]; h: list [N, 2l+1, C] over ``sc_irreps``; onehot [N, T].
    """

    def __init__(self, irreps: List[Irrep], fan_in: List[int], fan_out: List[int],
                 sc_irreps: List[Irrep], channels: int, num_types: int):
        super().__init__()
        self.mixes = nn.ModuleList([
            _IrrepMix(a, b, sc_irreps.index(ir) if ir in sc_irreps else -1,
                      num_types * channels)
            for ir, a, b in zip(irreps, fan_in, fan_out)])

    def forward(self, x: List[torch.Tensor], h: List[torch.Tensor], onehot: torch.Tensor
                ) -> List[torch.Tensor]:
        out: List[torch.Tensor] = []
        for o, mix in enumerate(self.mixes):
            out.append(mix(x[o], h, onehot))
        return out


class Gate(nn.Module):
    """Gated nonlinearity (Weiler et al., NeurIPS 2018; used by NequIP):

        0e: silu(s), 0o: tanh(s) (odd, so parity is kept), l > 0: h^l * sigmoid(g^l),

    with one gate scalar g per channel of each l > 0 irrep; the gates ride on the 0e block, which
    has C * (1 + number of gated irreps) channels: [scalars | gates of irrep 1 | ...].
    """

    def __init__(self, irreps: List[Irrep], channels: int):
        super().__init__()
        assert irreps[0] == (0, 1), "the first irrep must be 0e"
        self.kind: List[int] = []  # 0: 0e, 1: 0o, 2: gated
        for ir in irreps:
            self.kind.append(0 if ir == (0, 1) else 1 if ir[0] == 0 else 2)
        self.num_gated = sum(1 for k in self.kind if k == 2)
        self.channels = channels

    def forward(self, x: List[torch.Tensor]) -> List[torch.Tensor]:
        c = self.channels
        s = x[0]  # [N, 1, C * (1 + G)]
        gates = torch.sigmoid(s.narrow(2, c, c * self.num_gated)) if self.num_gated > 0 else s
        out: List[torch.Tensor] = []
        g = 0
        for k, v in enumerate(x):
            kind = self.kind[k]
            if kind == 0:
                out.append(torch.nn.functional.silu(v.narrow(2, 0, c)))  # [N, 1, C]
            elif kind == 1:
                out.append(torch.tanh(v))
            else:
                out.append(v * gates.narrow(2, g * c, c))  # [N, 2l+1, C]
                g += 1
        return out


def gate_widths(irreps: List[Irrep], channels: int) -> List[int]:
    """Channels the layer before a ``Gate`` must produce per irrep."""
    n_gated = sum(1 for ir in irreps if ir[0] > 0)
    return [channels * (1 + n_gated) if ir == (0, 1) else channels for ir in irreps]


# ---------------------------------------------------------------------------- product basis
def _coupling_trees(irreps: List[Irrep], nu: int, out_l_max: int
                    ) -> List[Tuple[torch.Tensor, Irrep]]:
    """Every coupling ((a1 (x) a2)^{l12} (x) a3)^{l123} ... of ``nu`` input irreps, as tensors
    T[M, m_1, ..., m_nu] over the concatenated input components (D of them), with their (L, p).
    Intermediate l are capped where they could no longer reach out_l_max."""
    dims = [2 * l + 1 for l, _ in irreps]
    offs = [sum(dims[:a]) for a in range(len(dims))]
    d = sum(dims)
    l_in = max(l for l, _ in irreps)
    level: List[Tuple[torch.Tensor, Irrep]] = []
    for a, ir in enumerate(irreps):
        t = torch.zeros(dims[a], d, dtype=torch.float64)
        t[:, offs[a]:offs[a] + dims[a]] = torch.eye(dims[a], dtype=torch.float64)
        level.append((t, ir))
    for step in range(1, nu):
        cap = out_l_max + (nu - 1 - step) * l_in
        nxt: List[Tuple[torch.Tensor, Irrep]] = []
        for t, (lam, par) in level:
            for a, (la, pa) in enumerate(irreps):
                for big_l in range(abs(lam - la), min(lam + la, cap) + 1):
                    c = clebsch_gordan(lam, la, big_l)  # [2lam+1, 2la+1, 2L+1]
                    tt = torch.tensordot(c, t, dims=([0], [0]))  # [2la+1, 2L+1, D..]
                    new = torch.zeros((2 * big_l + 1,) + t.shape[1:] + (d,), dtype=torch.float64)
                    new[..., offs[a]:offs[a] + dims[a]] = tt.movedim(0, -1)
                    nxt.append((new, (big_l, par * pa)))
        level = nxt
    return level


def symmetric_basis(irreps: List[Irrep], nu: int, out: Irrep) -> torch.Tensor:
    """``_symmetric_basis`` (cached: models of the same shape share it)."""
    return _symmetric_basis(tuple(irreps), nu, out).clone()


@lru_cache(maxsize=64)
def _symmetric_basis(irreps: Tuple[Irrep, ...], nu: int, out: Irrep, tol: float = 1e-9
                     ) -> torch.Tensor:
    """Orthonormal basis U[k, M, m_1..m_nu] of the equivariant maps from the symmetric nu-th power
    of the input irreps to ``out``: the generalised Clebsch-Gordan coefficients of MACE's product
    basis (Batatia et al. 2022, eq. 10), found as the span of all coupling trees, symmetrised
    over the nu inputs, by an SVD. Returns [K, 2L+1, D**nu] (K may be 0)."""
    from itertools import permutations

    d = sum(2 * l + 1 for l, _ in irreps)
    cands = []
    for t, ir in _coupling_trees(list(irreps), nu, out[0]):
        if ir != out:
            continue
        sym = sum(t.permute([0] + [1 + q for q in perm]) for perm in permutations(range(nu)))
        cands.append(sym.reshape(-1))
    if not cands:
        return torch.zeros(0, 2 * out[0] + 1, d ** nu, dtype=torch.float64)
    _, s, vh = torch.linalg.svd(torch.stack(cands), full_matrices=False)
    keep = s > tol  # candidates have norms of order 1; symmetrisation can cancel them exactly
    return vh[keep].reshape(-1, 2 * out[0] + 1, d ** nu)


class SymmetricContraction(nn.Module):
    """MACE's product basis with species-dependent weights, per channel c (Batatia et al. 2022,
    eqs. 10-11):

        B_i^{L M, c} = sum_{nu=1..corr} sum_k W^{nu}_{t_i, k, c}
                       sum_{m_1..m_nu} U^{nu, L}_{k, M, m_1..m_nu} A_i^{m_1, c} ... A_i^{m_nu, c}

    evaluated as a Horner scheme (highest order first, one index contracted per step):
        X = (U^corr W^corr_{t_i}) . A,   X = (X + U^{nu} W^{nu}_{t_i}) . A  for nu = corr-1 .. 1.
    Each species' atoms go through the scheme together (the first step is one bmm), so the
    [C, d_out D^(corr-1), N] intermediates are never gathered per atom.

    forward(a: list over input irreps [N, 2l+1, C], atom_types [N]) -> list over outputs
    [N, 2L+1, C]. ``irreps_out`` keeps only outputs with a nonzero basis.
    """

    def __init__(self, irreps_in: List[Irrep], targets: List[Irrep], correlation: int,
                 channels: int, num_types: int):
        super().__init__()
        if not 1 <= correlation <= 3:
            raise ValueError(f"correlation must be 1, 2 or 3, got {correlation}")
        self.dim = sum(2 * l + 1 for l, _ in irreps_in)
        bases = [[symmetric_basis(irreps_in, nu, o) for o in targets]
                 for nu in range(1, correlation + 1)]
        self.irreps_out = [o for q, o in enumerate(targets) if any(b[q].shape[0] for b in bases)]
        self.out_dims = [2 * l + 1 for l, _ in self.irreps_out]
        d_out = sum(self.out_dims)
        self.correlation = correlation
        self.num_types = num_types
        self.d_out = d_out
        for nu in range(1, 4):
            u = torch.zeros(0, d_out * self.dim ** nu, dtype=torch.float64)
            if nu <= correlation:
                u = self._embed(bases[nu - 1], targets, d_out, nu)  # [K_nu, d_out * D**nu]
            self.register_buffer(f"u{nu}", u)  # float64 until the model is cast
            w = torch.randn(num_types, u.shape[0], channels) / math.sqrt(max(u.shape[0], 1))
            # [T, K_nu, C]; empty above the correlation, and then not trained (no gradient
            # reaches it, which data-parallel training would refuse)
            setattr(self, f"w{nu}", nn.Parameter(w, requires_grad=nu <= correlation))
        self.block_bytes = 1 << 21  # CPU: atoms per block so that a block's intermediate is 2 MB

    def _embed(self, per_out: List[torch.Tensor], targets: List[Irrep], d_out: int, nu: int
               ) -> torch.Tensor:
        """The bases of all outputs in one [K_nu, d_out * D**nu] (zero outside their M rows)."""
        blocks = []
        off = 0
        for q, o in enumerate(targets):
            if o not in self.irreps_out:
                continue
            u = per_out[q]  # [K, 2L+1, D**nu]
            full = torch.zeros(u.shape[0], d_out, self.dim ** nu, dtype=torch.float64)
            full[:, off:off + u.shape[1]] = u
            blocks.append(full)
            off += u.shape[1]
        return torch.cat(blocks).flatten(1)

    def _weighted(self, nu: int, t: int) -> torch.Tensor:
        """sum_k W^nu_{t,k,c} U^nu_k for species t: [C, d_out * D**nu]."""
        u, w = (self.u1, self.w1) if nu == 1 else (self.u2, self.w2) if nu == 2 \
            else (self.u3, self.w3)
        return torch.matmul(w[t].t(), u)  # [C, K] @ [K, Q]

    def forward(self, a: List[torch.Tensor], atom_types: torch.Tensor) -> List[torch.Tensor]:
        n = atom_types.shape[0]
        a_c = torch.cat(a, dim=1).permute(2, 1, 0)  # [C, D, N]
        c, d = a_c.shape[0], self.dim
        xs: List[torch.Tensor] = []
        idxs: List[torch.Tensor] = []
        for t in range(self.num_types):  # the Horner scheme on the atoms of each species
            idx = (atom_types == t).nonzero().squeeze(1)
            if idx.shape[0] == 0:
                continue
            top = self._weighted(self.correlation, t)  # [C, Q * D]
            lower = [self._weighted(nu, t).unsqueeze(2)
                     for nu in range(self.correlation - 1, 0, -1)]  # [C, Q', 1]
            # CPU: atoms in blocks whose first intermediate takes about 2 MB (it is
            # C * Q floats per atom, 64 kB at MACE-small settings), so that it stays in cache
            per_atom = c * (top.shape[1] // d) * a_c.element_size()
            block = max(1, self.block_bytes // per_atom) if a_c.device.type == "cpu" \
                else max(1, idx.shape[0])
            a_t = a_c.index_select(2, idx)  # [C, D, N_t]
            for a_b in a_t.split(block, dim=2):  # [C, D, N_b]
                x = torch.bmm(top.view(c, top.shape[1] // d, d), a_b)  # [C, Q, N_b]
                for w_nu in lower:
                    x = x + w_nu  # [C, Q, N_b]
                    x = (x.view(c, x.shape[1] // d, d, a_b.shape[2])
                         * a_b.unsqueeze(1)).sum(2)  # [C, Q/D, N_b]
                xs.append(x)
            idxs.append(idx)
        b = torch.zeros(c, self.d_out, n, dtype=a_c.dtype, device=a_c.device)
        if len(xs) > 0:
            b = b.index_copy(2, torch.cat(idxs), torch.cat(xs, dim=2))  # [C, d_out, N]
        return list(b.permute(2, 1, 0).split(self.out_dims, dim=1))  # [N, 2L+1, C] each


def rotate_features(h: List[torch.Tensor], irreps: List[Irrep], rotation: torch.Tensor
                    ) -> List[torch.Tensor]:
    """h^l -> D^l(R) h^l for each irrep (e3nn's Wigner D, parity included for improper R), for
    tests. e3nn builds D in the default dtype, so it is raised to float64 meanwhile."""
    from e3nn import o3

    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        ds = [o3.Irrep(l, p).D_from_matrix(rotation.to(torch.float64)) for l, p in irreps]
    finally:
        torch.set_default_dtype(default)
    return [torch.einsum("mk,nkc->nmc", d.to(x.dtype), x) for d, x in zip(ds, h)]
