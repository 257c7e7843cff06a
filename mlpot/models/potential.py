"""Potential: what every mlpot model is from the outside.

A network maps atom types and pair vectors to per-atom energies; ``Potential`` wraps it with
everything the physics needs, in one place for all models:

    E_b = sum_{i in b} [ scale * net_i + E0[type_i] (+ prior_i) ]  (summed in float64)
    F_i = -dE/dx_i                                         (autograd)
    W_b = -dE/d(eps_b),  stress_b = -W_b / V_b             (displacement trick: x -> x (1 + eps),
                                                            cell -> cell (1 + eps), eps symmetric)
    W_i = -1/2 sum_{e of i} v_e (x) dE/dv_e                 (per atom, asked for with the input flag
                                                            ``compute_atomic_virial``: each edge's
                                                            share split between its two atoms)

An optional short-range prior (``repulsion``, e.g. the ZBL wall of ``mlpot.nn.zbl``, built with
``model.repulsion: zbl``) adds its per-atom energies (float64, from the same edges) beside E0, in
training too, so that the network learns the remainder; its forces and stress come with the rest.

With ``local_atoms`` in the input (``mlpot.keys.LOCAL_ATOMS``, n_local: LAMMPS's domain
decomposition) atoms n_local.. are ghosts, copies of atoms owned by another process or periodic
images: their atomic energies are 0, so the energy sums local atoms only, while forces are still
returned for every atom (LAMMPS sends the ghosts' forces back to their owners). The ghosts must
cover the receptive field (``mlpot.checkpoint.receptive_field``) around the local atoms. Local
networks (below) are evaluated on local centres only.

Networks run in float32 or float64 (``dtype``); reference energies E0, the scale and the totals
are always float64 (float32 totals lose meV on large systems). Forces and the virial come out in
the dtype of the input positions. With ``training`` set, the force graph is kept (create_graph) so
that force losses can be trained.

Local networks (one layer of neighbors, as the Deep Potential) may also offer
    centre_energies(centre_types [Nc], edge_centre [P], neighbor_types [P], edge_vectors [P, 3])
        -> [Nc] energies of centres 0..Nc-1 from their own edges
and are then evaluated in inference in chunks of ``chunk_atoms`` centres when a system is larger:
forward and backward of one chunk at a time, forces and virial from the gradients with respect to
the chunk's pair vectors. The numbers are the same; the working set stays the size of one chunk,
so the time per atom does not grow with N (fresh large buffers cost page faults, and no longer fit
any cache) and the peak memory is that of one chunk. Not used in training, nor when the positions
come in requiring gradients (the caller wants a graph back to them).

A network is an ``nn.Module`` with
    forward(atom_types [N] int64, edge_index [2, P] int64, edge_vectors [P, 3]) -> [N] energies
and, optionally, ``fit_statistics(samples)`` (a plain Python method; samples are a list of
(atom_types, edge_index, edge_vectors) of training structures) for data-dependent normalisation.
"""
from __future__ import annotations

import json
from typing import Dict, List, Optional

import torch
from torch import nn

from .. import keys as K
from ..neighbors import pair_vectors
from ..neighbors.module import NeighborList


class Potential(nn.Module):
    __jit_unused_properties__ = ["config"]

    def __init__(self, net: nn.Module, type_map: List[str], cutoff: float, config: Dict,
                 dtype: torch.dtype = torch.float32, repulsion: Optional[nn.Module] = None):
        super().__init__()
        self.net = net.to(dtype)
        self.type_map = list(type_map)
        self.cutoff = float(cutoff)
        self.neighbor_list = NeighborList(self.cutoff)
        self.register_buffer("reference_energies", torch.zeros(len(type_map), dtype=torch.float64))
        self.register_buffer("energy_scale", torch.ones((), dtype=torch.float64))
        self.config_json = json.dumps(config, sort_keys=True)
        self.model_dtype = dtype
        # a prior with forward(types, edge_index, vectors) -> [N] float64 (and centre_energies
        # as the local networks'), or None; kept in float64 whatever the network's dtype
        self.repulsion = repulsion
        # inference in chunks of this many centres for local networks (0: never)
        self.chunk_atoms = 128
        # set by the .pt2 export (mlpot.aoti): no Python numbers from tensor data, so that
        # torch.export traces one graph for any size (local atoms as a mask, no chunks, ghost
        # centres evaluated and masked rather than dropped); TorchScript compiles both paths
        self.exporting = False

    @property
    def config(self) -> Dict:
        return json.loads(self.config_json)

    def __deepcopy__(self, memo):
        """A copy rebuilt from the config (e3nn keeps TorchScript functions, which cannot be
        deep-copied), with this model's weights, buffers and train/eval mode."""
        from . import from_config

        new = from_config(self.config)
        new.load_state_dict(self.state_dict())
        for p_new, p_old in zip(new.parameters(), self.parameters()):
            p_new.requires_grad_(p_old.requires_grad)
        memo[id(self)] = new
        return new.to(self.reference_energies.device).train(self.training)

    def forward(self, data: Dict[str, torch.Tensor], compute_forces: bool = True,
                compute_stress: bool = False) -> Dict[str, torch.Tensor]:
        pos = data[K.POSITIONS]
        cell = data[K.CELL]
        types = data[K.ATOM_TYPES]
        n_atoms = pos.shape[0]
        n_struct = cell.shape[0]
        if K.BATCH in data:
            batch = data[K.BATCH]
        else:
            batch = torch.zeros(n_atoms, dtype=torch.long, device=pos.device)
        if K.EDGE_INDEX in data:
            i, j = data[K.EDGE_INDEX][0], data[K.EDGE_INDEX][1]
            shifts = data[K.EDGE_SHIFTS]
        else:
            if K.PTR in data:
                ptr = data[K.PTR]
            else:
                ptr = torch.tensor([0, n_atoms], dtype=torch.long, device=pos.device)
            i, j, shifts = self.neighbor_list(pos.detach(), cell.detach(), data[K.PBC], ptr)
        # atoms n_local.. are ghosts (LAMMPS): their atomic energies are not part of the total
        n_local = n_atoms
        local_mask: Optional[torch.Tensor] = None
        if K.LOCAL_ATOMS in data and self.exporting:  # the caller checked the count
            local_mask = torch.arange(n_atoms, device=pos.device) \
                < data[K.LOCAL_ATOMS].reshape(-1)[0]
        elif K.LOCAL_ATOMS in data:
            n_local = int(data[K.LOCAL_ATOMS].reshape(-1)[0].item())
            if n_local < 0 or n_local > n_atoms or n_struct != 1:
                raise ValueError("local_atoms must be a count between 0 and the number of atoms, "
                                 "for one structure")

        atomic_virial = K.COMPUTE_ATOMIC_VIRIAL in data and \
            bool(data[K.COMPUTE_ATOMIC_VIRIAL].reshape(-1)[0])
        if hasattr(self.net, "centre_energies"):  # alone: TorchScript drops the branch if not
            if n_local < n_atoms:  # a centre's energy needs its own edges only: drop ghosts'
                keep = i < n_local
                i, j, shifts = i[keep], j[keep], shifts[keep]
            if (not self.training) and (not pos.requires_grad) and self.chunk_atoms > 0 \
                    and (not self.exporting) and n_atoms > self.chunk_atoms:
                return self._forward_chunked(pos, cell, types, batch, i, j, shifts,
                                             compute_forces, compute_stress, n_local,
                                             atomic_virial)

        grad_inputs: List[torch.Tensor] = []
        if compute_forces and not pos.requires_grad:
            pos = pos.detach().requires_grad_(True)
        if compute_forces:
            grad_inputs.append(pos)
        strain = torch.zeros(n_struct, 3, 3, dtype=pos.dtype, device=pos.device)
        if compute_stress:
            strain.requires_grad_(True)
            grad_inputs.append(strain)
            sym = 0.5 * (strain + strain.transpose(1, 2))  # [B, 3, 3]
            pos = pos + torch.bmm(pos.unsqueeze(1), sym.index_select(0, batch)).squeeze(1)
            cell = cell + torch.bmm(cell, sym)

        vectors = pair_vectors(pos, cell, batch, i, j, shifts)  # [P, 3]
        if atomic_virial:
            if not vectors.requires_grad:
                vectors.requires_grad_(True)
            grad_inputs.append(vectors)
        edge_index = torch.stack([i, j])
        atomic = self.net(types, edge_index, vectors.to(self.model_dtype))  # [N]
        atomic = atomic.to(torch.float64) * self.energy_scale \
            + self.reference_energies.index_select(0, types)
        if self.repulsion is not None:
            atomic = atomic + self.repulsion(types, edge_index, vectors)
        if n_local < n_atoms:
            local_mask = torch.arange(n_atoms, device=pos.device) < n_local
        if local_mask is not None:
            atomic = torch.where(local_mask, atomic, torch.zeros_like(atomic))
        energy = torch.zeros(n_struct, dtype=torch.float64, device=pos.device)
        energy = energy.index_add(0, batch, atomic)  # [B]
        out: Dict[str, torch.Tensor] = {K.ENERGY: energy, K.ATOMIC_ENERGIES: atomic}
        if len(grad_inputs) > 0:
            grads = torch.autograd.grad([energy.sum()], grad_inputs, create_graph=self.training,
                                        allow_unused=True)
            k = 0
            if compute_forces:
                g = grads[0]
                out[K.FORCES] = -g if g is not None else torch.zeros_like(pos)
                k = 1
            if compute_stress:
                g = grads[k]
                de_deps = g if g is not None else torch.zeros_like(strain)
                self._add_virial_and_stress(out, de_deps, data[K.CELL])
                k += 1
            if atomic_virial:
                g = grads[k]
                if g is None:
                    g = torch.zeros_like(vectors)
                out[K.ATOMIC_VIRIAL] = self._atomic_virial(vectors.detach(), g, i, j, n_atoms)
        return out

    @staticmethod
    def _atomic_virial(vectors: torch.Tensor, g: torch.Tensor, i: torch.Tensor, j: torch.Tensor,
                       n_atoms: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[N, 3, 3] float64: -1/2 sym(v_e (x) g_e) added to both atoms of every edge (into
        ``out`` when given, for the chunked path); symmetric, as the virial they sum to."""
        outer = vectors.to(torch.float64).unsqueeze(2) * g.to(torch.float64).unsqueeze(1)
        half = -0.25 * (outer + outer.transpose(1, 2))
        if out is None:
            out = torch.zeros(n_atoms, 3, 3, dtype=torch.float64, device=vectors.device)
        return out.index_add_(0, i, half).index_add_(0, j, half)

    @staticmethod
    def _add_virial_and_stress(out: Dict[str, torch.Tensor], de_deps: torch.Tensor,
                               cell: torch.Tensor) -> None:
        """virial = -dE/d(eps), stress = dE/d(eps) / V (zero for cells without volume)."""
        volume = torch.linalg.det(cell).abs()  # [B]
        out[K.VIRIAL] = -de_deps
        safe = torch.where(volume > 0, volume, torch.ones_like(volume))
        stress = de_deps / safe.view(-1, 1, 1)
        out[K.STRESS] = torch.where((volume > 0).view(-1, 1, 1), stress, torch.zeros_like(stress))

    def _forward_chunked(self, pos: torch.Tensor, cell: torch.Tensor, types: torch.Tensor,
                         batch: torch.Tensor, i: torch.Tensor, j: torch.Tensor,
                         shifts: torch.Tensor, compute_forces: bool, compute_stress: bool,
                         n_local: int, atomic_virial: bool) -> Dict[str, torch.Tensor]:
        """``forward`` for a local network, ``chunk_atoms`` centres at a time (see the module
        doc). With v_e = x_j - x_i + S @ cell and g_e = dE/dv_e: F_i += g_e, F_j -= g_e, and
        dE/d(eps_b) = sym(sum_{e in b} v_e^T g_e) (a strain maps every v_e to v_e (1 + eps)).
        Only centres 0..n_local-1 are evaluated (the edges of ghost centres are already gone);
        the atomic energies of ghosts are 0."""
        n_atoms = pos.shape[0]
        n_struct = cell.shape[0]
        pos = pos.detach()
        cell = cell.detach()
        chunk = self.chunk_atoms
        n_chunks = (n_local + chunk - 1) // chunk
        edge_chunk = torch.div(i, chunk, rounding_mode="floor")  # [P]
        if edge_chunk.shape[0] > 1 and bool((edge_chunk[1:] < edge_chunk[:-1]).any()):
            order = torch.argsort(edge_chunk, stable=True)
            i, j, shifts = i.index_select(0, order), j.index_select(0, order), \
                shifts.index_select(0, order)
        counts: List[int] = torch.bincount(edge_chunk, minlength=n_chunks).tolist()
        need_grad = compute_forces or compute_stress or atomic_virial
        atomic = torch.zeros(n_atoms, dtype=torch.float64, device=pos.device)
        w_atoms = torch.zeros(n_atoms if atomic_virial else 0, 3, 3, dtype=torch.float64,
                              device=pos.device)
        forces = torch.zeros_like(pos)
        de_dsym = torch.zeros(n_struct, 3, 3, dtype=pos.dtype, device=pos.device)
        e0 = 0
        for c in range(n_chunks):
            a, b = c * chunk, min((c + 1) * chunk, n_local)
            ic, jc = i[e0:e0 + counts[c]], j[e0:e0 + counts[c]]
            sc = shifts[e0:e0 + counts[c]]
            e0 += counts[c]
            vectors = pair_vectors(pos, cell, batch, ic, jc, sc)  # [Pc, 3]
            if need_grad:
                vectors.requires_grad_(True)
            centre_types = types[a:b]
            e = self.net.centre_energies(centre_types, ic - a, types.index_select(0, jc),
                                         vectors.to(self.model_dtype))  # [Nc]
            e = e.to(torch.float64) * self.energy_scale \
                + self.reference_energies.index_select(0, centre_types)
            if self.repulsion is not None:
                e = e + self.repulsion.centre_energies(centre_types, ic - a,
                                                       types.index_select(0, jc), vectors)
            atomic[a:b] = e.detach()
            if need_grad and ic.shape[0] > 0:
                g = torch.autograd.grad([e.sum()], [vectors], allow_unused=True)[0]
                if g is not None:
                    if compute_forces:
                        forces.index_add_(0, ic, g)
                        forces.index_add_(0, jc, -g)
                    if compute_stress:
                        outer = vectors.detach().unsqueeze(2) * g.unsqueeze(1)  # [Pc, 3, 3]
                        de_dsym.index_add_(0, batch.index_select(0, ic), outer)
                    if atomic_virial:
                        self._atomic_virial(vectors.detach(), g, ic, jc, n_atoms, w_atoms)
        energy = torch.zeros(n_struct, dtype=torch.float64, device=pos.device)
        energy = energy.index_add(0, batch, atomic)  # [B]
        out: Dict[str, torch.Tensor] = {K.ENERGY: energy, K.ATOMIC_ENERGIES: atomic}
        if compute_forces:
            out[K.FORCES] = forces
        if compute_stress:
            self._add_virial_and_stress(out, 0.5 * (de_dsym + de_dsym.transpose(1, 2)), cell)
        if atomic_virial:
            out[K.ATOMIC_VIRIAL] = w_atoms
        return out

    # ------------------------------------------------------------------ python-side helpers
    @torch.jit.unused
    def fit_statistics(self, structures) -> None:
        """Data-dependent normalisation of the network (e.g. Deep Potential environment
        statistics) from training structures with neighbors (``AtomicData``)."""
        fit_network_statistics(self.net, structures, self.cutoff, self.model_dtype)

    @torch.jit.unused
    def prior_energies(self, structures) -> List[float]:
        """The energy of the repulsion prior in each structure (``AtomicData``), eV; zeros
        without a prior. The trainer fits reference energies to the labels minus these."""
        if self.repulsion is None:
            return [0.0] * len(structures)
        out = []
        with torch.no_grad():
            for s in structures:
                s = s if s.edge_index is not None and s.cutoff == self.cutoff \
                    else s.with_neighbors(self.cutoff)
                out.append(float(self.repulsion(s.atom_types, s.edge_index,
                                                s.edge_vectors()).sum()))
        return out

    @torch.jit.unused
    def set_reference_energies(self, energies: torch.Tensor) -> None:
        self.reference_energies.copy_(torch.as_tensor(energies, dtype=torch.float64))


def fit_network_statistics(net: nn.Module, structures, cutoff: float,
                           dtype: torch.dtype) -> None:
    """``net.fit_statistics(samples)`` (if the network has one) on (atom_types, edge_index,
    edge_vectors) of the structures, neighbors at ``cutoff``, vectors in ``dtype``."""
    fit = getattr(net, "fit_statistics", None)
    if fit is None:
        return
    samples = []
    for s in structures:
        s = s if s.edge_index is not None and s.cutoff == cutoff else s.with_neighbors(cutoff)
        samples.append((s.atom_types, s.edge_index, s.edge_vectors().to(dtype)))
    with torch.no_grad():
        fit(samples)


def script(model: nn.Module) -> torch.jit.ScriptModule:
    """TorchScript-compile a Potential (with e3nn's scripting for e3nn parts)."""
    from .. import jit

    with jit.quiet(), jit.ordered_constants():
        try:
            from e3nn.util.jit import script as e3nn_script
        except ImportError:  # pragma: no cover - e3nn is a dependency
            return torch.jit.script(model)
        return e3nn_script(model)
