"""NequIP: an E(3)-equivariant message-passing potential, with MACE's higher body-order messages
as an option.

Batzner et al., "E(3)-equivariant graph neural networks for data-efficient and accurate
interatomic potentials", Nat. Commun. 13, 2453 (2022); product basis: Batatia et al., "MACE:
Higher order equivariant message passing neural networks for fast and accurate force fields",
NeurIPS 2022. Clebsch-Gordan coefficients and spherical harmonics come from e3nn
(Geiger & Smidt, arXiv:2207.09453).

Symbols (code names in brackets), for a pair i <- j with vector r_ij = x_j - x_i + S cell:

    Y_ij   = Y^{l}(r_ij / |r_ij|) u(|r_ij|) / n_avg,  l = 0..l_max   [y]  (component-normalised
             real spherical harmonics; u the polynomial envelope with p = cutoff_p; n_avg the
             average neighbor count, so the sums below are means)
    e_ij   = Bessel basis sin(n pi r / r_c) / r, n = 1..num_basis        [basis]
    h_i^0  = W_emb onehot(t_i)  (C scalars, 0e)                          [h]
  each layer k (NequIP's interaction block):
    x_i    = W_pre h_i  (per irrep, a channel mixing)
    A_i^{path} = sum_j R^k_{path}(e_ij) (x_j (x) Y_ij)^{path}           PathConvolution
             paths (l1 p1) x (l2 (-1)^l2) -> (l3 p3), R^k an MLP per layer (radial_mlp widths,
             its last Linear computed per path group)
    [correlation > 1: MACE's product basis on the mixed A of natural parity, l <= l_max:
     B_i = sum_{nu <= correlation} W^nu_{t_i} U^nu (A_i)^(x)nu   SymmetricContraction]
    h_i^{k+1} = Gate( W_post A_i (or B_i) + S_{t_i} h_i^k )           (self-connection S per type)
  E_i = MLP(h_i^{L, 0e})  [readout]

Feature irreps: l = 0..feature_l_max (default l_max), with both parities when ``parity``
(NequIP's O(3) features, e.g. 0e+0o+1o+1e+2e+2o) or the natural one only ((-1)^l: 0e+1o+2e, only
paths with l1+l2+l3 even). The last layer computes only what the energy needs (0e), and each
layer before it only the irreps from which the next layer's messages reach what that layer
computes (``layer_targets``; with 3 layers and both parities the middle layer keeps 0e+1o+2e:
1e and 2o cannot couple with a spherical harmonic to 0e, so they never reached the energy;
their parameters would get no gradient, which data-parallel training refuses). Every
message carries u(r), which vanishes with two derivatives at r_c: energies and forces are
continuous as atoms cross the cutoff.

Defaults: 32 channels, l_max 2, both parities, 3 layers, 8 trainable Bessel functions, radial
MLP 64-64 with SiLU, p = 6 (NequIP's published settings, with 3 layers for speed); correlation 1
(NequIP). ``parity=False`` is 20-30% faster. n_avg: ``avg_num_neighbors`` when given, else the
mean neighbor count from ``fit_statistics`` (until then 0.1 atoms/A^3 * 4/3 pi r_c^3).
MACE-like (MACE "small": 64x0e hidden, l_max 3, correlation 3): ``feature_l_max=0, l_max=3,
correlation=3, num_layers=2, num_features=64, radial_mlp=[64, 64, 64], cutoff_p=5,
parity=False``. Differences from MACE: a gate (SiLU on the scalars) after each layer, one
readout on the last layer instead of a sum of per-layer readouts, NequIP's embedding and
self-connection.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..nn import MLP, BesselBasis, polynomial_cutoff
from ..nn.equivariant import (Gate, Irrep, IrrepsLinear, PathConvolution, SymmetricContraction,
                              gate_widths, irreps_up_to, sources)
from .family import (Network, mean_neighbor_count, need_bool, need_choice, need_int, need_number,
                     need_widths, uniform_neighbor_count)


class _Skip(nn.Module):
    """Stands in for a missing ``IrrepsLinear`` (returns x)."""

    def forward(self, x: List[torch.Tensor], h: List[torch.Tensor], onehot: torch.Tensor
                ) -> List[torch.Tensor]:
        return x


class _NoProduct(nn.Module):
    """Stands in for the product basis when correlation is 1 (returns a)."""

    def forward(self, a: List[torch.Tensor], atom_types: torch.Tensor) -> List[torch.Tensor]:
        return a


class InteractionLayer(nn.Module):
    """One NequIP interaction block (with MACE's product basis when correlation > 1)."""

    def __init__(self, irreps_in: List[Irrep], targets: List[Irrep], l_max: int, channels: int,
                 num_types: int, radial_widths: List[int], correlation: int, first: bool):
        super().__init__()
        c = channels
        n_in = len(irreps_in)
        self.pre = _Skip() if first else IrrepsLinear(irreps_in, [c] * n_in, [c] * n_in, [], c,
                                                     num_types)
        self.mix_a: nn.Module = _Skip()
        self.product: nn.Module = _NoProduct()
        if correlation == 1:
            self.conv = PathConvolution(irreps_in, l_max, targets)
            irreps_out = self.conv.irreps_out
            fan_in = [c * n for n in self.conv.paths_per_output]
        else:
            self.conv = PathConvolution(irreps_in, l_max, irreps_up_to(l_max, False))
            a_irreps = self.conv.irreps_out
            self.mix_a = IrrepsLinear(a_irreps, [c * n for n in self.conv.paths_per_output],
                                      [c] * len(a_irreps), [], c, num_types)
            self.product = SymmetricContraction(a_irreps, targets, correlation, c, num_types)
            irreps_out = self.product.irreps_out
            fan_in = [c] * len(irreps_out)
        self.irreps_out = irreps_out
        self.num_paths = self.conv.num_paths
        self.channels = c
        # the radial MLP R^k: hidden layers, then its last Linear split by path group
        self.radial_hidden = MLP(list(radial_widths)) if len(radial_widths) > 1 else nn.Identity()
        self.radial_act = nn.SiLU() if len(radial_widths) > 1 else nn.Identity()
        self.radial_out = nn.ModuleList([nn.Linear(radial_widths[-1], n * c)
                                         for n in self.conv.group_paths])
        # values per edge the radial MLP keeps for the backward pass (activations, weights)
        self.radial_width = 2 * sum(radial_widths[1:]) + c * sum(self.conv.group_paths)
        # CPU: edges per radial MLP pass (32 MB of those); 0: all edges in one block
        self.radial_block_bytes = 1 << 25
        self.post = IrrepsLinear(irreps_out, fan_in, gate_widths(irreps_out, c), irreps_in, c,
                                 num_types)
        self.gate = Gate(irreps_out, c)

    def forward(self, h: List[torch.Tensor], y: torch.Tensor, basis: torch.Tensor,
                centre: torch.Tensor, neighbor: torch.Tensor, onehot: torch.Tensor,
                atom_types: torch.Tensor) -> List[torch.Tensor]:
        x = self.pre(h, h, onehot)
        c = self.channels
        conv = self.conv
        # the radial MLP runs on super-blocks of edges (a whole number of message blocks, about
        # radial_block_bytes), so that its [P, H] activations and weights are never made for all
        # edges at once on large systems, and it is one pass on small ones
        acc = conv.accumulators(x[0].shape[0], c, y)
        if self.radial_block_bytes <= 0:  # one block (the .pt2 export: loops over a
            # data-dependent number of blocks do not trace)
            r = self.radial_act(self.radial_hidden(basis))  # [P, H]
            conv.add_block(acc, conv.gather(x, neighbor), y, [lin(r) for lin in self.radial_out],
                           centre)
        else:
            self._add_blocks(acc, x, y, basis, centre, neighbor)
        a = conv.finish(acc, c)  # [N, 2l+1, paths(o) * C] per output irrep
        a = self.product(self.mix_a(a, h, onehot), atom_types)  # MACE: [N, 2L+1, C] per irrep
        return self.gate(self.post(a, h, onehot))

    def _add_blocks(self, acc: List[torch.Tensor], x: List[torch.Tensor], y: torch.Tensor,
                    basis: torch.Tensor, centre: torch.Tensor, neighbor: torch.Tensor) -> None:
        """The messages of all edges added to ``acc`` in blocks (see ``forward``)."""
        c = self.channels
        conv = self.conv
        n_pairs = y.shape[0]
        edges = conv.edges_per_block(n_pairs, c, y)
        per_pass = edges * max(1, self.radial_block_bytes
                               // (edges * self.radial_width * y.element_size())) \
            if y.device.type == "cpu" else max(1, n_pairs)
        xs = [x_j.split(edges) for x_j in conv.gather(x, neighbor)]
        ys, cs = y.split(edges), centre.split(edges)
        k = 0
        for b in basis.split(per_pass):
            r = self.radial_act(self.radial_hidden(b))  # [P_pass, H]
            ws = [lin(r).split(edges) for lin in self.radial_out]  # [Pk, n_p * C] per group
            for q in range(len(ws[0])):
                conv.add_block(acc, [x_j[k] for x_j in xs], ys[k], [w[q] for w in ws], cs[k])
                k += 1


def layer_targets(hidden: List[Irrep], l_max: int, num_layers: int, correlation: int
                  ) -> List[List[Irrep]]:
    """Each layer's output irreps as far as the energy can use them: 0e for the last layer; for
    a layer before it, the hidden irreps from which the next layer's convolution reaches that
    layer's own targets (``sources``). With MACE's product basis (correlation > 1) every layer
    keeps ``hidden`` (its convolution makes every natural irrep up to l_max)."""
    out: List[List[Irrep]] = [[(0, 1)]]
    for _ in range(num_layers - 1):
        out.insert(0, list(hidden) if correlation > 1 else sources(hidden, l_max, out[0]))
    return out


def _conv_layout(conv: PathConvolution, irreps_in: List[Irrep]
                 ) -> Tuple[List[Tuple[int, Irrep]], List[List[Tuple[Irrep, int, Irrep]]]]:
    """A convolution's path groups, as (l3, input irrep), and each group's paths in the order
    of its radial weights, as (input irrep, l2, output irrep): names that do not depend on
    which other irreps a layer has."""
    out = conv.irreps_out
    groups: List[Tuple[int, Irrep]] = []
    paths: List[List[Tuple[Irrep, int, Irrep]]] = []
    for i, l2, k in conv.paths:
        g = (out[k][0], irreps_in[i])
        if g not in groups:
            groups.append(g)
            paths.append([])
        paths[groups.index(g)].append((irreps_in[i], l2, out[k]))
    return groups, paths


class NequIP(Network):
    """Per-atom energies of an equivariant interatomic potential (see the module docstring).

    Hyperparameters: num_features (channels C of every irrep), l_max (spherical harmonics and
    messages up to l_max), feature_l_max (hidden features up to this l; None: l_max), parity
    (both parities in the hidden features, O(3) as NequIP), num_layers, num_basis (Bessel
    functions), trainable_basis (Bessel frequencies trained, as NequIP), radial_mlp (hidden
    widths of each layer's radial MLP), cutoff_p (polynomial envelope exponent), correlation
    (1: NequIP; 2 or 3: MACE product basis, body order + 1), avg_num_neighbors (None: fitted by
    fit_statistics, an estimate until then), readout_hidden."""

    DEFAULT_CUTOFF = 5.0
    TEST_HPARAMS = {"num_features": 4, "l_max": 2, "num_layers": 2}

    def __init__(self, num_types: int, cutoff: float, num_features: int = 32, l_max: int = 2,
                 feature_l_max: Optional[int] = None, parity: bool = True, num_layers: int = 3,
                 num_basis: int = 8, trainable_basis: bool = True,
                 radial_mlp: Sequence[int] = (64, 64), cutoff_p: float = 6.0,
                 correlation: int = 1, avg_num_neighbors: Optional[float] = None,
                 readout_hidden: int = 16):
        super().__init__()
        c, l_max = int(num_features), int(l_max)
        f_l_max = l_max if feature_l_max is None else int(feature_l_max)
        self.num_types = num_types
        self.cutoff = float(cutoff)
        self.cutoff_p = float(cutoff_p)
        self.l_max = l_max
        self.basis = BesselBasis(self.cutoff, int(num_basis), bool(trainable_basis))
        self.embedding = nn.Parameter(torch.randn(num_types, c))
        hidden = irreps_up_to(f_l_max, bool(parity))
        n_layers, correlation = int(num_layers), int(correlation)
        radial = [int(num_basis)] + [int(w) for w in radial_mlp]
        self.full_targets = [hidden] * (n_layers - 1) + [[(0, 1)]]
        targets = layer_targets(hidden, l_max, n_layers, correlation)
        # the layers are first made with every hidden irrep (the random draws of the models
        # made before the trimming, so a seed gives the same weights as then), then remade with
        # only the irreps the energy can use, which take over their share of those weights
        self.layers = nn.ModuleList(
            self._make_layers(self.full_targets, l_max, c, num_types, radial, correlation))
        if targets != self.full_targets:
            full = {f"layers.{k}": v for k, v in self.layers.state_dict().items()}
            with torch.random.fork_rng(devices=[]):
                self.layers = nn.ModuleList(
                    self._make_layers(targets, l_max, c, num_types, radial, correlation))
            self._trim_state(full, "")
            self.layers.load_state_dict({k[len("layers."):]: v for k, v in full.items()})
        self.layer_irreps: List[List[Irrep]] = [layer.irreps_out for layer in self.layers]
        self.readout = MLP([c, int(readout_hidden), 1])
        self.fixed_avg = avg_num_neighbors is not None
        avg = float(avg_num_neighbors) if self.fixed_avg \
            else uniform_neighbor_count(self.cutoff, 0.1)  # ~condensed matter, 0.1 atoms/A^3
        self.register_buffer("avg_num_neighbors", torch.tensor(avg))
        from e3nn import o3

        self.sh = o3.SphericalHarmonics(list(range(l_max + 1)), normalize=False,
                                        normalization="component")

    @staticmethod
    def _make_layers(targets: List[List[Irrep]], l_max: int, channels: int, num_types: int,
                     radial: List[int], correlation: int) -> List[InteractionLayer]:
        irreps: List[Irrep] = [(0, 1)]
        layers: List[InteractionLayer] = []
        for k, t in enumerate(targets):
            layers.append(InteractionLayer(irreps, t, l_max, channels, num_types, radial,
                                           correlation, k == 0))
            irreps = layers[-1].irreps_out
        return layers

    def _trim_state(self, state: Dict[str, torch.Tensor], prefix: str) -> None:
        """Rewrite, in place, the layers' entries of ``state`` from the layout with every hidden
        irrep in every layer (``full_targets``: the models made before the trimming) to this
        model's: a layer's outputs and inputs are picked by irrep, its radial weights by path
        (input irrep, l2, output irrep), the gates of the 0e block by the irrep they gate; the
        convolution's constant buffers are this model's own. Exact: what is left out never
        reached the energy."""
        irreps_full: List[Irrep] = [(0, 1)]
        irreps_new: List[Irrep] = [(0, 1)]
        for k, (layer, t_full) in enumerate(zip(self.layers, self.full_targets)):
            conv_full = PathConvolution(irreps_full, self.l_max, t_full)
            out_full, out_new = conv_full.irreps_out, layer.irreps_out
            if out_full == out_new and irreps_full == irreps_new:
                irreps_full, irreps_new = out_full, out_new
                continue
            pk = f"{prefix}layers.{k}."
            c = layer.channels
            old = {key[len(pk):]: state.pop(key) for key in list(state) if key.startswith(pk)}
            new: Dict[str, torch.Tensor] = {}
            own = layer.state_dict()
            for key, value in old.items():
                head, _, rest = key.partition(".")
                if key.startswith("conv."):
                    continue
                if head == "pre" and rest.startswith("mixes."):
                    j, _, name = rest[len("mixes."):].partition(".")
                    ir = irreps_full[int(j)]
                    if ir in irreps_new:
                        new[f"pre.mixes.{irreps_new.index(ir)}.{name}"] = value
                elif head == "post" and rest.startswith("mixes."):
                    j, _, name = rest[len("mixes."):].partition(".")
                    ir = out_full[int(j)]
                    if ir not in out_new:
                        continue
                    if ir == (0, 1):  # [scalars | gates of each gated irrep]
                        gated_full = [o for o in out_full if o[0] > 0]
                        cols = list(range(c)) + [
                            c * (1 + gated_full.index(o)) + m
                            for o in out_new if o[0] > 0 for m in range(c)]
                        value = value.index_select(1, torch.tensor(cols))
                    new[f"post.mixes.{out_new.index(ir)}.{name}"] = value
                elif head == "radial_out":
                    continue  # below, by path
                else:
                    new[key] = value
            groups_full, paths_full = _conv_layout(conv_full, irreps_full)
            groups_new, paths_new = _conv_layout(layer.conv, irreps_new)
            for g, (group, paths) in enumerate(zip(groups_new, paths_new)):
                go = groups_full.index(group)
                rows = [paths_full[go].index(path) * c + m for path in paths for m in range(c)]
                for name in ("weight", "bias"):
                    new[f"radial_out.{g}.{name}"] = old[f"radial_out.{go}.{name}"].index_select(
                        0, torch.tensor(rows))
            for key, value in own.items():
                if key.startswith("conv."):
                    new[key] = value
            state.update({pk + key: value for key, value in new.items()})
            irreps_full, irreps_new = out_full, out_new

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Checkpoints of models made before the trimming (every hidden irrep in every layer)
        load into this layout (``_trim_state``)."""
        for k, layer in enumerate(self.layers):
            n_mixes = sum(1 for key in state_dict
                          if key.startswith(f"{prefix}layers.{k}.post.mixes.")
                          and key.endswith(".weight"))
            if n_mixes > len(layer.irreps_out):
                self._trim_state(state_dict, prefix)
                break
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @classmethod
    def validate_hparams(cls, cutoff: float, hparams: Dict[str, Any]) -> None:
        for key in ("num_features", "num_layers", "num_basis", "readout_hidden"):
            need_int(hparams, key, 1)
        need_int(hparams, "l_max", 0)
        if hparams["feature_l_max"] is not None:
            need_int(hparams, "feature_l_max", 0)
        need_bool(hparams, "parity")
        need_bool(hparams, "trainable_basis")
        need_widths(hparams, "radial_mlp", allow_empty=True)
        need_number(hparams, "cutoff_p", 0.0)
        need_choice(hparams, "correlation", (1, 2, 3))
        need_number(hparams, "avg_num_neighbors", 0.0, optional=True)

    def edge_terms(self, edge_vectors: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(Y u / n_avg [P, (l_max+1)^2], Bessel basis [P, num_basis])."""
        r = torch.linalg.norm(edge_vectors, dim=1)  # [P]
        y = self.sh(edge_vectors / r.unsqueeze(1))  # [P, (l_max+1)^2]
        envelope = polynomial_cutoff(r, self.cutoff, self.cutoff_p) / self.avg_num_neighbors
        return y * envelope.unsqueeze(1), self.basis(r)

    def features(self, atom_types: torch.Tensor, edge_index: torch.Tensor,
                 edge_vectors: torch.Tensor) -> List[List[torch.Tensor]]:
        """The features after each layer: per layer a list over ``layer_irreps[k]`` of
        [N, 2l+1, C] tensors."""
        centre, neighbor = edge_index[0], edge_index[1]
        y, basis = self.edge_terms(edge_vectors)
        onehot = nn.functional.one_hot(atom_types, self.num_types).to(y.dtype)  # [N, T]
        h = [torch.matmul(onehot, self.embedding).unsqueeze(1)]  # [N, 1, C]
        out: List[List[torch.Tensor]] = []
        for layer in self.layers:
            h = layer(h, y, basis, centre, neighbor, onehot, atom_types)
            out.append(h)
        return out

    def forward(self, atom_types: torch.Tensor, edge_index: torch.Tensor,
                edge_vectors: torch.Tensor) -> torch.Tensor:
        h = self.features(atom_types, edge_index, edge_vectors)[-1][0]  # [N, 1, C]
        return self.readout(h.squeeze(1)).squeeze(1)  # [N]

    @torch.jit.unused
    def fit_statistics(self, samples) -> None:
        """n_avg = mean number of neighbors per atom over the training structures (unless the
        hyperparameter fixes it)."""
        if self.fixed_avg:
            return
        n_avg = mean_neighbor_count(samples)
        if n_avg is not None:
            self.avg_num_neighbors.fill_(n_avg)
