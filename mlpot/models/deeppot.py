"""Deep Potential with the smooth two-body embedding descriptor ``se_e2_a`` (DeepPot-SE).

References: L. Zhang, J. Han, H. Wang, W. A. Saidi, R. Car, W. E, "End-to-end symmetry preserving
inter-atomic potential energy model for finite and extended systems", NeurIPS 2018 (DeepPot-SE);
L. Zhang, J. Han, H. Wang, R. Car, W. E, "Deep Potential Molecular Dynamics: a scalable model with
the accuracy of quantum mechanics", PRL 120, 143001 (2018).

For a centre atom i and each neighbor j within the cutoff (r_ij = |x_j - x_i|):

    s_ij   = s(r_ij)                          smooth 1/r weight, ``smooth_inverse_switch``: 1/r
                                              below rcut_smth, switched to 0 (C2) at the cutoff
    R_ij   = (s_ij, s_ij x_ij/r_ij, s_ij y_ij/r_ij, s_ij z_ij/r_ij) / sigma[t_i]     # [4]
    G_ij   = G_{t_j}((s_ij - mu[t_i]) / sigma_r[t_i])                                # [M1]
    T_i    = (1 / N_norm) sum_j R_ij^T G_ij                                          # [4, M1]
    D_i    = T_i^T T_i[:, :M2]            (M2 = axis_neuron)                         # [M1, M2]
    E_i    = F_{t_i}(flatten(D_i))

D_i is invariant under rotations (the xyz rows of T_i rotate together and T^T T contracts them),
under permutations of the neighbors (a sum over j) and translations (only x_j - x_i enter).

Choices, and how they relate to DeePMD-kit's se_e2_a:
- Environment statistics (``fit_statistics``, stored in buffers): per centre type, mu and
  sigma_r are the mean and standard deviation of s over the training neighbors, sigma_a the root
  mean square of the s x/r, s y/r, s z/r components. The rows R_ij are divided by sigma but NOT
  shifted by mu: DeePMD-kit shifts them too, which stays smooth there only because every centre
  has a fixed number (``sel``) of padded rows, and a neighbor entering the cutoff replaces a
  padded row of the same value. Without padding a shifted row would jump in by -mu/sigma at the
  cutoff, so here every R_ij is proportional to s_ij and vanishes (with two derivatives) there.
  The mean is used where it is harmless: to standardise the input of the embedding networks.
  Before fitting, the statistics are those of an ideal gas (uniform density inside the cutoff).
- N_norm (buffer ``avg_num_neighbors``): DeePMD-kit divides T_i by the padded count sum(sel),
  which the user must choose. Here it is the mean number of neighbors per atom in the training
  data (a constant, so the energy stays smooth; the mean rather than the maximum, which would
  keep growing with more data; mlpot's one convention, ``mlpot.models.family``). Default: the
  expected count at liquid-water atom density, 0.1003 atoms/A^3 x 4/3 pi rcut^3 (about 91 at
  6 A).
- Embedding networks per neighbor type (``type_one_side=True``, as in DeePMD-kit's water example
  and in the peer benchmark) by default: T networks instead of T^2, and each sees T times more
  edges, so the matmuls are larger. ``type_one_side=False`` gives one per (centre, neighbor) pair.
- Residual connections (DeePMD-kit style, in our words): a hidden layer h -> tanh(W h + b) that
  keeps the width adds its input back; one that doubles the width adds its input repeated twice.
  In the fitting networks the update of a width-preserving layer is scaled by a trainable
  per-neuron step (``resnet_dt``, initialised at 0.1), so every block starts close to identity.
- Defaults: DeePMD-kit's examples/water/se_e2_a (rcut 6, rcut_smth 0.5, embedding [25, 50, 100],
  axis_neuron 16, fitting [240, 240, 240]). There is no ``sel``: the neighbor count is free.

Implementation: one sort of the edges by (embedding group, centre) gives every edge a row in a
padded block [N, K_g] per group (K_g = most edges of that group at one centre in this call,
found on the fly, so there is no user-set maximum). Each embedding network runs as a few large
matmuls on its block (or, when padding would waste more than 25% of the rows, on the edges alone
before a scatter into the block), and each group's share of T_i is one batched matmul. Centres
are relabelled in atom-type order so that each fitting network runs on one contiguous block.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Sequence, Tuple

import torch
from torch import nn

from ..nn import smooth_inverse_switch
from .family import (Network, mean_neighbor_count, need_bool, need_int, need_number,
                     need_widths, uniform_neighbor_count)

WATER_ATOM_DENSITY = 0.1003  # atoms / A^3 in liquid water at 1 g/cm^3 (3 atoms per 29.9 A^3)
STD_FLOOR = 1e-2  # 1/A: lower bound of fitted standard deviations (e.g. a dimer has sigma_r = 0)


class ResidualTanhLayer(nn.Module):
    """y = shortcut(x) + dt * tanh(W x + b), shortcut = x (same width), [x, x] (doubled width)
    or nothing (other widths); dt (``step_scale``, DeePMD-kit's ``resnet_dt``) a trainable
    per-neuron scale of the residual step when ``resnet_dt`` and a shortcut exists, else 1.

    tanh(z) is evaluated as 2 sigmoid(2 z) - 1 (the factor 2 goes into the matmul, the -1 into
    the shortcut): the same function, but PyTorch's CPU sigmoid is several times faster than its
    tanh, and the tanh's are a large part of the model's time."""

    def __init__(self, n_in: int, n_out: int, resnet_dt: bool = False):
        super().__init__()
        self.linear = nn.Linear(n_in, n_out)
        self.n_in = n_in
        self.shortcut = 1 if n_out == n_in else (2 if n_out == 2 * n_in else 0)
        if resnet_dt and self.shortcut > 0:
            self.step_scale = nn.Parameter(torch.full((n_out,), 0.1))
        else:
            self.register_parameter("step_scale", None)
        # the .pt2 export: no backward that asks whether the row count (data-dependent there)
        # is 1, which torch.export cannot answer (the doubled input as a concatenation)
        self.exporting = False

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Checkpoints written before the rename call ``step_scale`` ``timestep``."""
        old = prefix + "timestep"
        if old in state_dict and prefix + "step_scale" not in state_dict:
            state_dict[prefix + "step_scale"] = state_dict.pop(old)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w2, b2 = 2.0 * self.linear.weight, 2.0 * self.linear.bias  # tiny: not on [P, n_out]
        if self.exporting and self.n_in == 1:  # addmm's backward asks whether [P, 1] is
            h = torch.sigmoid(x * w2.t() + b2)  # column-major, i.e. P == 1: a product instead
        else:
            h = torch.sigmoid(torch.addmm(b2, x, w2.t()))  # [P, n_out], tanh(W x + b) = 2 h - 1
        if self.shortcut == 0:
            return 2.0 * h - 1.0
        if self.shortcut == 2 and self.exporting:
            x = torch.cat([x, x], dim=1)  # [P, n_out]
        elif self.shortcut == 2:  # [x, x] + ..., without building the concatenation
            x = x.unsqueeze(1)  # [P, 1, n_in]
            h = h.view(-1, 2, self.n_in)  # [P, 2, n_in]
        dt = self.step_scale
        if dt is None:
            y = torch.add(x - 1.0, h, alpha=2.0)  # x + (2 h - 1)
        else:
            dt = dt.view(h.shape[1:])
            y = torch.addcmul(x - dt, h, dt, value=2.0)  # x + dt (2 h - 1)
        return y.view(-1, self.linear.out_features)


class TanhResNet(nn.Module):
    """ResidualTanhLayer's of the given widths, optionally followed by a linear scalar output."""

    def __init__(self, widths: List[int], resnet_dt: bool = False, scalar_out: bool = False):
        super().__init__()
        self.layers = nn.ModuleList([ResidualTanhLayer(widths[k], widths[k + 1], resnet_dt)
                                     for k in range(len(widths) - 1)])
        self.scalar_out = scalar_out
        self.out = nn.Linear(widths[-1], 1) if scalar_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.out(x)


def ideal_gas_statistics(rcut_smth: float, cutoff: float, n_grid: int = 4000
                         ) -> Tuple[float, float, float]:
    """(mu, sigma_r, sigma_a) of s(r) for neighbors at uniform density inside the cutoff
    (weight r^2 dr, midpoint rule): the statistics used before ``fit_statistics``."""
    r = (torch.arange(n_grid, dtype=torch.float64) + 0.5) * (cutoff / n_grid)  # [n_grid]
    w = r * r / (r * r).sum()
    s = smooth_inverse_switch(r, rcut_smth, cutoff)  # [n_grid]
    mean = float((w * s).sum())
    second = float((w * s * s).sum())
    return mean, math.sqrt(max(second - mean * mean, 0.0)), math.sqrt(second / 3.0)


class DeepPotSeA(Network):
    """Deep Potential se_e2_a: per-atom energies from the smooth embedding descriptor (module
    docstring for the equations and choices).

    Hyperparameters: rcut_smth (A, where 1/r starts being switched off), embedding (widths of
    the embedding networks, M1 = last), axis_neuron (M2, columns of G kept on the right of
    D = T^T T<), fitting (hidden widths of the per-element fitting networks), type_one_side
    (embedding per neighbor type, else per type pair), resnet_dt (trainable step on the fitting
    networks' residuals)."""

    DEFAULT_CUTOFF = 6.0
    TEST_HPARAMS = {"embedding": [8, 16], "axis_neuron": 4, "fitting": [16, 16]}

    def __init__(self, num_types: int, cutoff: float, rcut_smth: float = 0.5,
                 embedding: Sequence[int] = (25, 50, 100), axis_neuron: int = 16,
                 fitting: Sequence[int] = (240, 240, 240), type_one_side: bool = True,
                 resnet_dt: bool = True):
        super().__init__()
        embedding, fitting = [int(w) for w in embedding], [int(w) for w in fitting]
        self.num_types = int(num_types)
        self.cutoff = float(cutoff)
        self.rcut_smth = float(rcut_smth)
        self.axis_neuron = int(axis_neuron)
        self.m1 = embedding[-1]
        self.type_one_side = bool(type_one_side)
        self.num_groups = self.num_types if self.type_one_side else self.num_types ** 2
        self.embeddings = nn.ModuleList([TanhResNet([1] + embedding)
                                         for _ in range(self.num_groups)])
        self.fittings = nn.ModuleList([
            TanhResNet([self.m1 * self.axis_neuron] + fitting, resnet_dt, scalar_out=True)
            for _ in range(self.num_types)])
        mean, std_r, std_a = ideal_gas_statistics(self.rcut_smth, self.cutoff)
        self.register_buffer("env_mean", torch.full((num_types,), mean))  # [T] mu
        self.register_buffer("env_std", torch.tensor([[std_r, std_a, std_a, std_a]]
                                                     ).repeat(num_types, 1))  # [T, 4] sigma
        n_norm = uniform_neighbor_count(self.cutoff, WATER_ATOM_DENSITY)
        self.register_buffer("avg_num_neighbors", torch.tensor(n_norm))  # [] N_norm
        # run the embedding on the padded blocks when they have at most this many rows per edge
        self.pad_tolerance = 1.25
        # the .pt2 export (mlpot.aoti) sets this: a path without sizes read from the data (per
        # type and group index lists, the environment sum scattered from [P, 4, M1] products)
        self.exporting = False
        self.reset_parameters()

    @classmethod
    def validate_hparams(cls, cutoff: float, hparams: Dict[str, Any]) -> None:
        rcut_smth = need_number(hparams, "rcut_smth", 0.0, strict=False)
        if rcut_smth >= cutoff:
            raise ValueError(f"hyperparameter rcut_smth = {hparams['rcut_smth']!r}: must be "
                             f"below the cutoff ({cutoff:g} A)")
        m1 = need_widths(hparams, "embedding")[-1]
        need_int(hparams, "axis_neuron", 1)
        if hparams["axis_neuron"] > m1:
            raise ValueError(f"hyperparameter axis_neuron = {hparams['axis_neuron']}: must be "
                             f"at most the last embedding width ({m1})")
        need_widths(hparams, "fitting", allow_empty=True)
        need_bool(hparams, "type_one_side")
        need_bool(hparams, "resnet_dt")

    @torch.jit.unused
    def reset_parameters(self) -> None:
        """Weights N(0, 1/n_in); embedding biases N(0, 1) (the first layer's tanh centres spread
        over the standardised input range), fitting biases 0, a small output layer."""
        for net in list(self.embeddings) + list(self.fittings):
            for layer in net.layers:
                lin = layer.linear
                nn.init.normal_(lin.weight, std=lin.in_features ** -0.5)
                if net.scalar_out:
                    nn.init.zeros_(lin.bias)
                else:
                    nn.init.normal_(lin.bias, std=1.0)
            if net.scalar_out:
                nn.init.normal_(net.out.weight, std=0.1 * net.out.in_features ** -0.5)
                nn.init.zeros_(net.out.bias)

    # ------------------------------------------------------------------ forward
    def forward(self, atom_types: torch.Tensor, edge_index: torch.Tensor,
                edge_vectors: torch.Tensor) -> torch.Tensor:
        return self.centre_energies(atom_types, edge_index[0],
                                    atom_types.index_select(0, edge_index[1]), edge_vectors)

    def centre_energies(self, centre_types: torch.Tensor, edge_centre: torch.Tensor,
                        neighbor_types: torch.Tensor, edge_vectors: torch.Tensor
                        ) -> torch.Tensor:
        """Energies of the centres 0..Nc-1 from their own edges alone  # [Nc]

        The model is local (one layer: an atom's energy depends on its neighbors' types and
        vectors only), so ``Potential`` may evaluate a large system in chunks of centres, each
        with the edges of its centres (``centre_types`` [Nc], ``edge_centre`` [P] in 0..Nc-1,
        ``neighbor_types`` [P], ``edge_vectors`` [P, 3])."""
        if self.exporting:
            return self._traceable_centre_energies(centre_types, edge_centre, neighbor_types,
                                                   edge_vectors)
        descriptor, type_sizes, rank = self._sorted_descriptor(
            centre_types, edge_centre, neighbor_types, edge_vectors)
        energies: List[torch.Tensor] = []
        start = 0
        for t, net in enumerate(self.fittings):
            size = type_sizes[t]
            energies.append(net(descriptor[start:start + size]).squeeze(1))  # [N_t]
            start += size
        return torch.cat(energies).index_select(0, rank)  # [N], back to the input order

    def descriptor(self, atom_types: torch.Tensor, edge_index: torch.Tensor,
                   edge_vectors: torch.Tensor) -> torch.Tensor:
        """D_i flattened, in the input atom order  # [N, M1 * M2]"""
        descriptor, _, rank = self._sorted_descriptor(
            atom_types, edge_index[0], atom_types.index_select(0, edge_index[1]), edge_vectors)
        return descriptor.index_select(0, rank)

    def _sorted_descriptor(self, atom_types: torch.Tensor, edge_centre: torch.Tensor,
                           neighbor_types: torch.Tensor, edge_vectors: torch.Tensor
                           ) -> Tuple[torch.Tensor, List[int], torch.Tensor]:
        """D_i with atoms in type order  # [N, M1 * M2]; atoms per type; rank[i] = row of i."""
        n_atoms = atom_types.shape[0]
        order = torch.argsort(atom_types, stable=True)  # [N] atoms in type order
        rank = torch.empty_like(order).index_copy_(
            0, order, torch.arange(n_atoms, dtype=order.dtype, device=order.device))  # [N]
        sorted_types = atom_types.index_select(0, order)  # [N]
        centre = rank.index_select(0, edge_centre)  # [P] centre rows in type order
        centre_type = atom_types.index_select(0, edge_centre)  # [P]
        group = neighbor_types  # [P] embedding network of each edge
        if not self.type_one_side:
            group = centre_type * self.num_types + group

        env, s_hat = self._environment(centre_type, edge_vectors)
        t = self._environment_sum(s_hat, env, centre, group, n_atoms)  # [N, 4, M1]
        d = self._from_environment_sum(t, sorted_types)
        type_sizes: List[int] = torch.bincount(atom_types, minlength=self.num_types).tolist()
        return d, type_sizes, rank

    def _environment(self, centre_type: torch.Tensor, edge_vectors: torch.Tensor
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
        """(env [P, 4] = s(r) (1, x/r, y/r, z/r), the standardised embedding input s_hat [P])."""
        r = torch.linalg.norm(edge_vectors, dim=1)  # [P]
        s = smooth_inverse_switch(r, self.rcut_smth, self.cutoff)  # [P]
        env = torch.cat([s.unsqueeze(1), (s / r).unsqueeze(1) * edge_vectors], dim=1)  # [P, 4]
        s_hat = (s - self.env_mean.index_select(0, centre_type)) \
            / self.env_std[:, 0].index_select(0, centre_type)  # [P]
        return env, s_hat

    def _from_environment_sum(self, t: torch.Tensor, centre_types: torch.Tensor) -> torch.Tensor:
        """D_i flattened from the environment sums [N, 4, M1] of centres of these types."""
        scale = 1.0 / (self.env_std * self.avg_num_neighbors)  # [T, 4]
        t = t * scale.index_select(0, centre_types).unsqueeze(2)  # [N, 4, M1]  T_i
        d = torch.bmm(t.transpose(1, 2), t[:, :, : self.axis_neuron])  # [N, M1, M2]
        return d.reshape(t.shape[0], self.m1 * self.axis_neuron)

    def _traceable_centre_energies(self, centre_types: torch.Tensor, edge_centre: torch.Tensor,
                                   neighbor_types: torch.Tensor, edge_vectors: torch.Tensor
                                   ) -> torch.Tensor:
        """``centre_energies`` without Python numbers from the data (torch.export): each
        network on the index list of its edges or atoms (sizes the trace leaves symbolic), the
        environment sum scattered from per-edge products  # [Nc]

        The same function; the [P, 4, M1] products cost 16 M1 bytes per edge in float32."""
        n_atoms = centre_types.shape[0]
        centre_type = centre_types.index_select(0, edge_centre)  # [P]
        group = neighbor_types
        if not self.type_one_side:
            group = centre_type * self.num_types + group
        env, s_hat = self._environment(centre_type, edge_vectors)
        x = s_hat.unsqueeze(1)  # [P, 1]
        g = env.new_zeros(env.shape[0], self.m1)  # [P, M1] G
        for k, net in enumerate(self.embeddings):
            idx = torch.nonzero(group == k).squeeze(1)
            g = g.index_copy(0, idx, net(x.index_select(0, idx)))
        products = (env.unsqueeze(2) * g.unsqueeze(1)).reshape(-1, 4 * self.m1)  # [P, 4 M1]
        t = env.new_zeros(n_atoms, 4 * self.m1).index_add(0, edge_centre, products)
        d = self._from_environment_sum(t.view(n_atoms, 4, self.m1), centre_types)
        energies = d.new_zeros(n_atoms)
        for k, net in enumerate(self.fittings):
            idx = torch.nonzero(centre_types == k).squeeze(1)
            energies = energies.index_copy(0, idx, net(d.index_select(0, idx)).squeeze(1))
        return energies  # [Nc]

    def _environment_sum(self, s_hat: torch.Tensor, env: torch.Tensor, centre: torch.Tensor,
                         group: torch.Tensor, n_atoms: int) -> torch.Tensor:
        """sum_j env_ij^T G_ij per centre  # [N, 4, M1]

        Group g's edges are laid out in a block [N, K_g] (K_g: most edges of that group at one
        centre), so each group's part of the sum is one batched matmul; padded rows have env = 0.
        The embedding runs on the padded block directly when that wastes little (homogeneous
        systems), else on the edges alone, whose G rows are then scattered into the block."""
        flat_input, edge_order, flat_sorted, edges_per_group, k = self._layout(
            centre, group, n_atoms)
        rows = n_atoms * sum(k)
        env_pad = env.new_zeros(rows, 4).index_copy_(0, flat_input, env)  # [R, 4]
        padded = rows <= self.pad_tolerance * env.shape[0]
        if padded:
            x = s_hat.new_zeros(rows).index_copy_(0, flat_input, s_hat).unsqueeze(1)  # [R, 1]
            g_pad = torch.zeros(0, self.m1, dtype=env.dtype, device=env.device)
        else:
            x = s_hat.index_select(0, edge_order).unsqueeze(1)  # [P, 1] edges by group
            g = self._embed_edges(x, edges_per_group)  # [P, M1]
            g_pad = g.new_zeros(rows, self.m1).index_copy_(0, flat_sorted, g)  # [R, M1]
        t = env.new_zeros(n_atoms, 4, self.m1)  # [N, 4, M1]
        start = 0
        for g, net in enumerate(self.embeddings):
            size = n_atoms * k[g]
            if size > 0:
                block = g_pad[start:start + size] if not padded \
                    else net(x[start:start + size])  # [N * K_g, M1]
                t = torch.baddbmm(t, env_pad[start:start + size].view(n_atoms, k[g], 4)
                                  .transpose(1, 2), block.view(n_atoms, k[g], self.m1))
            start += size
        return t

    def _embed_edges(self, x: torch.Tensor, edges_per_group: List[int]) -> torch.Tensor:
        """G for edges sorted by group: each network on its contiguous block  # [P, M1]"""
        out: List[torch.Tensor] = []
        start = 0
        for g, net in enumerate(self.embeddings):
            size = edges_per_group[g]
            if size > 0:
                out.append(net(x[start:start + size]))  # [P_g, M1]
            start += size
        if len(out) == 0:
            return torch.zeros(0, self.m1, dtype=x.dtype, device=x.device)
        return torch.cat(out) if len(out) > 1 else out[0]

    def _layout(self, centre: torch.Tensor, group: torch.Tensor, n_atoms: int
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, List[int], List[int]]:
        """Each edge's row in the padded blocks (input order), the edges sorted by (group,
        centre), their rows in that order, edges per group and K_g per group.

        Block g starts at row N * (K_0 + ... + K_{g-1}); an edge's row is that start
        + centre * K_g + (its rank among the edges of the same centre and group)."""
        n_groups = self.num_groups
        n_edges = centre.shape[0]
        key = group * n_atoms + centre  # [P] (group, centre) run of each edge
        runs = torch.bincount(key, minlength=n_groups * n_atoms)  # [G * N] edges per run
        sorted_key, edge_order = torch.sort(key)  # [P]
        run_start = torch.cumsum(runs, 0) - runs  # [G * N] first sorted position of each run
        rank = torch.arange(n_edges, dtype=key.dtype, device=key.device) \
            - run_start.index_select(0, sorted_key)  # [P] rank within the run, sorted order
        per_centre = runs.view(n_groups, n_atoms)  # [G, N]
        k_max = per_centre.max(1)[0] if n_atoms > 0 else per_centre.sum(1)  # [G] K_g
        block_start = (torch.cumsum(k_max, 0) - k_max) * n_atoms  # [G]
        sorted_group = torch.div(sorted_key, n_atoms, rounding_mode="floor")  # [P]
        sorted_centre = sorted_key - sorted_group * n_atoms  # [P]
        flat_sorted = block_start.index_select(0, sorted_group) \
            + sorted_centre * k_max.index_select(0, sorted_group) + rank  # [P]
        flat_input = torch.empty_like(flat_sorted).index_copy_(0, edge_order, flat_sorted)
        edges_per_group: List[int] = per_centre.sum(1).tolist()
        k: List[int] = k_max.tolist()
        return flat_input, edge_order, flat_sorted, edges_per_group, k

    # ------------------------------------------------------------------ statistics
    @torch.jit.unused
    def fit_statistics(self, samples) -> None:
        """mu, sigma (per centre type) and N_norm from training structures.

        ``samples``: (atom_types [N], edge_index [2, P], edge_vectors [P, 3]) per structure.
        mu = mean of s, sigma_r = its standard deviation, sigma_a = sqrt(mean(s^2) / 3) (the rms
        of s x/r, s y/r, s z/r), all over the edges whose centre has that type; types never seen
        as centres keep their values; N_norm = ``mean_neighbor_count`` (pairs / atoms, at
        least 1). Sums are taken in float64."""
        n_types = self.num_types
        n = torch.zeros(n_types, dtype=torch.float64)
        sum_s, sum_s2 = torch.zeros_like(n), torch.zeros_like(n)
        for types, edge_index, vectors in samples:
            r = torch.linalg.norm(vectors.detach().to(torch.float64).cpu(), dim=1)  # [P]
            s = smooth_inverse_switch(r, self.rcut_smth, self.cutoff)  # [P]
            ti = types.cpu()[edge_index[0].cpu()]  # [P]
            n += torch.bincount(ti, minlength=n_types).to(torch.float64)
            sum_s += torch.bincount(ti, weights=s, minlength=n_types)
            sum_s2 += torch.bincount(ti, weights=s * s, minlength=n_types)
        seen = (n > 0).to(self.env_mean.device)  # [T]
        mean = sum_s / n.clamp(min=1)
        second = sum_s2 / n.clamp(min=1)
        std_r = (second - mean * mean).clamp(min=0).sqrt().clamp(min=STD_FLOOR)
        std_a = (second / 3).sqrt().clamp(min=STD_FLOOR)
        std = torch.stack([std_r, std_a, std_a, std_a], dim=1)  # [T, 4]
        dev, dt = self.env_mean.device, self.env_mean.dtype
        self.env_mean.copy_(torch.where(seen, mean.to(dev, dt), self.env_mean))
        self.env_std.copy_(torch.where(seen.unsqueeze(1), std.to(dev, dt), self.env_std))
        n_avg = mean_neighbor_count(samples)
        if n_avg is not None:
            self.avg_num_neighbors.fill_(n_avg)
