"""EGNN: an E(n)-invariant message-passing energy model, mlpot's cheap option.

Satorras, Hoogeboom, Welling, "E(n) Equivariant Graph Neural Networks", ICML 2021 (eqs. 3-6),
used here as an invariant energy model: forces and stress are derivatives of the energy
(taken by ``Potential``), so the paper's equivariant coordinate update (eq. 4,
x_i' = x_i + C sum_j (x_i - x_j) phi_x(m_ij)) is not needed and not implemented. Only the
invariant node features h are updated.

Symbols (code names in brackets), for a pair i <- j with r_ij = |x_j - x_i + S cell| [r]:

    h_i^0   = embed(t_i)                                                  [h]
    e_ij    = [ B_1(r_ij), ..., B_K(r_ij), r_ij^2 / r_c^2 ]                [edge_features]
    u_ij    = u(r_ij / r_c)  (polynomial envelope, p = 6)                  [envelope]
    m_ij    = phi_e(h_i, h_j, e_ij) * u_ij                                 (eq. 3, envelope added)
    m_i     = (1 / n_avg) sum_j m_ij                                       (eq. 5, sum aggregation)
    h_i'    = h_i + phi_h(h_i, m_i)                                        (eq. 6, residual)
    E_i     = phi_out(h_i^L)                                               [per-atom energy]

B_k is the Bessel basis sin(k pi r / r_c) / r (Klicpera et al., ICLR 2020) - a radial basis of r
in place of the raw squared distance of the paper, which is kept as one more input (scaled by
r_c^2 so it lies in [0, 1]). Because every message carries u_ij, which vanishes with its first
two derivatives at r_c, the energy and forces are continuous as an atom crosses the cutoff.

phi_e is Linear-SiLU-Linear (the paper's appendix has a second SiLU at the end; without it the
last Linear commutes with the sum over neighbors and runs per atom instead of per edge, see
``EGNNLayer``), phi_h is Linear-SiLU-Linear and phi_out Linear-SiLU-Linear, all with SiLU as in
the paper. The first Linear of phi_e is split by its inputs, W [h_i, h_j, e_ij] =
W_a h_i + W_b h_j + W_e e_ij, so that the h terms are node-level matmuls gathered to the edges.
The edge work per layer is then two gathers, one [P, K+1] x [K+1, E] matmul, one SiLU and one
weighted scatter-sum. With ``attention`` the message is gated as in the paper's edge inference
(Sec. 3.3), m_ij <- m_ij * sigmoid(phi_inf(m_ij)) with phi_inf linear, and the envelope
multiplies the gated message.

n_avg is the average neighbor count: the hyperparameter ``avg_num_neighbors`` when given,
else fitted by ``fit_statistics`` (1 until then).

Everything is built from the pair vectors (which carry the periodic cell shifts), never from
absolute positions, so periodic cells need nothing special. Defaults: the paper used H = 128 and
7 layers on QM9; mlpot's cheap option takes H = 64, 4 layers (receptive field 4 r_c), r_c = 5 A,
8 Bessel functions and the envelope exponent p = 6 of DimeNet.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import nn

from ..nn import MLP, BesselBasis, activation, polynomial_cutoff, scatter_sum
from ..nn.mlp import ACTIVATIONS
from .family import Network, mean_neighbor_count, need_bool, need_choice, need_int, need_number


class EGNNLayer(nn.Module):
    """One EGNN update h -> h + phi_h(h, m), m_i = (1/n_avg) sum_j w_ij phi_e(h_i, h_j, e_ij).

    phi_e = Linear-SiLU-Linear: s_ij = silu(W_a h_i + W_b h_j + W_e e_ij + c) [P, E], then
    phi_e = W_2 s_ij + b_2. With edge weights w_ij = u_ij (times the gate sigmoid(v s_ij + d)
    with ``attention``), the last Linear commutes with the weighted sum:
        sum_j w_ij (W_2 s_ij + b_2) = W_2 (sum_j w_ij s_ij) + b_2 sum_j w_ij,
    so it runs on atoms, not edges (exactly the same function, a fraction of the cost).
    """

    def __init__(self, hidden: int, edge_hidden: int, num_edge_features: int,
                 act: str = "silu", attention: bool = False):
        super().__init__()
        self.edge_hidden = edge_hidden
        # phi_e's first Linear, split by inputs: W_a, W_b on atoms, W_e (and c) on edges
        self.node_proj = nn.Linear(hidden, 2 * edge_hidden, bias=False)
        self.radial = nn.Linear(num_edge_features, edge_hidden)
        self.act = activation(act)
        self.use_attention = attention
        self.gate = nn.Linear(edge_hidden, 1) if attention else nn.Identity()
        self.message_out = nn.Linear(edge_hidden, hidden)  # W_2, b_2
        self.update = MLP([2 * hidden, hidden, hidden], act)  # phi_h
        # CPU, no attention: edges in blocks whose [P_k, E] messages take about this many bytes
        # (0: one block)
        self.block_bytes = 1 << 23

    def forward(self, h: torch.Tensor, centre: torch.Tensor, neighbor: torch.Tensor,
                edge_features: torch.Tensor, envelope: torch.Tensor, envelope_sum: torch.Tensor,
                scale: torch.Tensor) -> torch.Tensor:
        n_atoms = h.shape[0]
        a, b = self.node_proj(h).split(self.edge_hidden, dim=1)  # [N, E] each
        if self.use_attention:  # the gate needs every message before the weighted sum
            z = self.radial(edge_features) + a.index_select(0, centre)  # [P, E]
            s = self.act(z + b.index_select(0, neighbor))  # [P, E]
            w = envelope * torch.sigmoid(self.gate(s))  # [P, 1]
            w_sum = scatter_sum(w, centre, n_atoms)  # [N, 1]
            agg = scatter_sum(s * w, centre, n_atoms)  # [N, E]
        else:
            # CPU: messages formed and summed in blocks of edges, so that the transient [P, E]
            # tensors stay in cache (at 10k atoms one is hundreds of MB); one block elsewhere and
            # with block_bytes 0 (the .pt2 export: a data-dependent loop does not trace)
            w_sum = envelope_sum  # [N, 1]
            agg = torch.zeros(n_atoms, self.edge_hidden, dtype=h.dtype, device=h.device)
            if self.block_bytes <= 0 or h.device.type != "cpu":
                s = self.act(self.radial(edge_features) + a.index_select(0, centre)
                             + b.index_select(0, neighbor))  # [P, E]
                agg.index_add_(0, centre, s * envelope)  # [N, E]
            else:
                edges = max(1, self.block_bytes // (self.edge_hidden * h.element_size()))
                efs, cs = edge_features.split(edges), centre.split(edges)
                ns, ws = neighbor.split(edges), envelope.split(edges)
                for k in range(len(cs)):
                    s = self.act(self.radial(efs[k]) + a.index_select(0, cs[k])
                                 + b.index_select(0, ns[k]))  # [P_k, E]
                    agg.index_add_(0, cs[k], s * ws[k])  # [N, E]
        m = (torch.matmul(agg, self.message_out.weight.t())
             + w_sum * self.message_out.bias) * scale  # [N, H]
        return h + self.update(torch.cat([h, m], dim=1))  # [N, H]


class EGNN(Network):
    """EGNN per-atom energies (Satorras, Hoogeboom, Welling, ICML 2021); see the module doc.

    Hyperparameters: hidden (width H of the node features h and messages m), edge_hidden (width
    E of phi_e's hidden layer, per edge), num_layers (message-passing layers), num_basis (Bessel
    functions of r, plus r^2 / r_c^2), envelope_p (polynomial envelope exponent, DimeNet),
    readout_hidden (hidden width of the per-atom energy MLP), attention (gate messages by
    sigmoid(phi_inf(m_ij)), paper Sec. 3.3), avg_num_neighbors (message normalisation n_avg;
    None: fitted by fit_statistics), activation."""

    DEFAULT_CUTOFF = 5.0
    TEST_HPARAMS = {"hidden": 16, "edge_hidden": 16, "num_layers": 2, "readout_hidden": 8}

    def __init__(self, num_types: int, cutoff: float, hidden: int = 64, edge_hidden: int = 64,
                 num_layers: int = 4, num_basis: int = 8, envelope_p: int = 6,
                 readout_hidden: int = 32, attention: bool = False,
                 avg_num_neighbors: Optional[float] = None, activation: str = "silu"):
        super().__init__()
        hidden, edge_hidden, num_basis = int(hidden), int(edge_hidden), int(num_basis)
        num_layers, readout_hidden = int(num_layers), int(readout_hidden)
        self.cutoff = float(cutoff)
        self.edge_hidden = edge_hidden
        self.envelope_p = float(envelope_p)
        self.fixed_avg = avg_num_neighbors is not None
        n_avg = float(avg_num_neighbors) if avg_num_neighbors is not None else 1.0
        self.register_buffer("message_scale", torch.tensor(1.0 / n_avg))
        self.embedding = nn.Embedding(num_types, hidden)
        self.basis = BesselBasis(cutoff, num_basis, trainable=False)
        self.layers = nn.ModuleList([EGNNLayer(hidden, edge_hidden, num_basis + 1, activation,
                                               attention)
                                     for _ in range(num_layers)])
        self.readout = MLP([hidden, readout_hidden, 1], activation)

    @classmethod
    def validate_hparams(cls, cutoff: float, hparams: Dict[str, Any]) -> None:
        for key in ("hidden", "edge_hidden", "num_layers", "num_basis", "readout_hidden"):
            need_int(hparams, key, 1)
        need_number(hparams, "envelope_p", 0.0)
        need_bool(hparams, "attention")
        need_number(hparams, "avg_num_neighbors", 0.0, optional=True)
        need_choice(hparams, "activation", ACTIVATIONS)

    def forward(self, atom_types: torch.Tensor, edge_index: torch.Tensor,
                edge_vectors: torch.Tensor) -> torch.Tensor:
        centre, neighbor = edge_index[0], edge_index[1]
        n_atoms = atom_types.shape[0]
        r2 = (edge_vectors * edge_vectors).sum(dim=1)  # [P]
        r = torch.sqrt(r2)  # [P]
        edge_features = torch.cat(
            [self.basis(r), (r2 / (self.cutoff * self.cutoff)).unsqueeze(1)], dim=1)  # [P, K+1]
        envelope = polynomial_cutoff(r, self.cutoff, self.envelope_p).unsqueeze(1)  # [P, 1]
        envelope_sum = scatter_sum(envelope, centre, n_atoms)  # [N, 1]
        h = self.embedding(atom_types)  # [N, H]
        for layer in self.layers:
            h = layer(h, centre, neighbor, edge_features, envelope, envelope_sum,
                      self.message_scale)  # [N, H]
        return self.readout(h).squeeze(1)  # [N]

    @torch.jit.unused
    def fit_statistics(self, samples) -> None:
        """Set 1 / n_avg from the mean number of neighbors per atom of the training structures
        (``mean_neighbor_count``; samples: (atom_types, edge_index, edge_vectors) tuples); kept
        when the hyperparameter ``avg_num_neighbors`` was given."""
        if self.fixed_avg:
            return
        n_avg = mean_neighbor_count(samples)
        if n_avg is not None:
            self.message_scale.fill_(1.0 / n_avg)
