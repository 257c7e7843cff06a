"""Force providers: the mlpot model adapter and analytic potentials for tests and examples.

Every provider is a callable ``fn(positions [R, N, 3], cell [R, 3, 3], compute_stress) -> dict``
returning "energy" [R] (eV), "forces" [R, N, 3] (eV/A) and, when asked, "stress" [R, 3, 3]
(eV/A^3, stress = (1/V) dU/d(strain) = -virial / V, ASE's sign).
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence

import torch

from mlpot import keys as K
from mlpot.inputs import read_outputs, replica_index, replica_inputs
from mlpot.neighbors import neighbor_list_batch, pair_vectors

from .state import det3, inv3, rows_times

Tensor = torch.Tensor


class MLPotForces:
    """Runs an mlpot model on R replicas at once, as one batch of R structures.

    The model is a ``torch.nn.Module`` (or TorchScript module) whose ``forward(data,
    compute_forces=True, compute_stress=False)`` takes the dict of ``AtomicData.as_dict()`` and
    returns "energy" [B], "forces" [N_total, 3] and "stress" [B, 3, 3].

    Args:
        model: the model, already on the device and in the dtype of the simulation.
        atom_types: [N] int64 type indices (the model's type map) of one replica.
        pbc: three bools.
        atomic_numbers: [N], passed along as ``atomic_numbers`` when given.

    A committee's extra outputs (``max_force_dev`` [R], ``forces_dev`` [R, N], ``energy_dev``
    [R], ``virial_dev`` [R] with stress, their ``*_calibrated`` values and the members' energies
    and forces; ``mlpot.inputs.read_outputs``) are returned too: the integrators keep them in
    ``MDState.outputs``, where the thermo CSV, ``model_devi.out`` and the uncertainty stop read
    them. ``committee`` is the number of members (0 for a single model); ``uncertainty`` says
    what gives the deviations (``"committee"``, ``"mve"``: a variance network, or None). A model
    with a variance network (``mlpot.models.mve``) gives the same deviations without members.
    """

    def __init__(self, model, atom_types, pbc=(True, True, True), atomic_numbers=None):
        self.model = model
        self.atom_types = torch.as_tensor(atom_types, dtype=torch.long).reshape(-1)
        self.pbc = torch.as_tensor(pbc, dtype=torch.bool).reshape(-1).expand(3)
        self.atomic_numbers = None if atomic_numbers is None else \
            torch.as_tensor(atomic_numbers, dtype=torch.long).reshape(-1)
        self._static: Dict[tuple, Dict[str, Tensor]] = {}
        self.committee = int(getattr(model, "committee", 0) or 0)
        # what gives the deviations: "committee", "mve" (a variance network) or None
        self.uncertainty = getattr(model, "uncertainty", None)
        if self.uncertainty is None and hasattr(model, "config_json"):  # a module, not a file
            from mlpot.checkpoint import uncertainty_kind

            self.uncertainty = uncertainty_kind(model)

    def _static_keys(self, r: int, device: torch.device) -> Dict[str, Tensor]:
        """The per-batch integer tensors, built once per (R, device)."""
        key = (r, str(device))
        if key not in self._static:
            d = replica_index(r, self.atom_types.numel(), device)
            d[K.ATOM_TYPES] = self.atom_types.to(device).repeat(r)
            d[K.PBC] = self.pbc.to(device).expand(r, 3).clone()
            if self.atomic_numbers is not None:
                d[K.ATOMIC_NUMBERS] = self.atomic_numbers.to(device).repeat(r)
            self._static[key] = d
        return self._static[key]

    def __call__(self, positions: Tensor, cell: Tensor, compute_stress: bool) -> Dict[str, Tensor]:
        r, n = positions.shape[:2]
        if n != self.atom_types.numel():
            raise ValueError(f"{n} atoms per replica but {self.atom_types.numel()} atom types")
        static = self._static_keys(r, positions.device)
        data = replica_inputs(positions, static[K.ATOM_TYPES], cell, static[K.PBC], static)
        if K.ATOMIC_NUMBERS in static:
            data[K.ATOMIC_NUMBERS] = static[K.ATOMIC_NUMBERS]
        out = self.model(data, compute_forces=True, compute_stress=compute_stress)
        res = read_outputs(out, r, compute_stress)
        res.pop(K.ATOMIC_ENERGIES, None)
        return res


class Harmonic:
    """Atoms tied to fixed centres: U = sum_i k_i/2 |u_i|^2 + c/4 |u_i|^4, u_i = x_i - x0_i.

    Forces F_i = -(k_i + c |u_i|^2) u_i. With c = 0 each atom is a 3D harmonic oscillator of
    angular frequency sqrt(k_i / m_i). The stress of an external field is not defined; zeros are
    returned when asked.

    Args:
        spring_constant: k in eV/A^2, a float or [N].
        center: [N, 3] or [R, N, 3] Angstrom (default: the origin).
        quartic: c in eV/A^4.
    """

    def __init__(self, spring_constant, center=None, quartic: float = 0.0):
        self.k = torch.as_tensor(spring_constant, dtype=torch.float64)
        self.center = None if center is None else torch.as_tensor(center, dtype=torch.float64)
        self.quartic = float(quartic)

    def __call__(self, positions: Tensor, cell: Tensor, compute_stress: bool) -> Dict[str, Tensor]:
        c0 = 0.0 if self.center is None else self.center.to(positions)
        u = positions - c0  # [R, N, 3]
        u2 = (u * u).sum(-1, keepdim=True)  # [R, N, 1]
        k = self.k.to(positions)
        k = k.reshape(-1)[None, :, None] if k.dim() else k
        energy = (0.5 * k * u2 + 0.25 * self.quartic * u2 * u2).sum((-1, -2))
        out = {"energy": energy.double(), "forces": -(k + self.quartic * u2) * u}
        if compute_stress:
            out["stress"] = torch.zeros_like(cell)
        return out


class IdealGas:
    """Non-interacting particles in a box whose energy may depend on the cell: U = U_cell(cell).

    With ``cell_energy`` None this is the ideal gas (U = 0). Otherwise U_cell maps [R, 3, 3] to
    [R] (eV) and its stress comes from autograd: for a strain eps acting on row vectors,
    cell -> cell (1 + eps), so stress = sym(cell^T dU/dcell) / V.
    """

    def __init__(self, cell_energy: Optional[Callable[[Tensor], Tensor]] = None):
        self.cell_energy = cell_energy

    def __call__(self, positions: Tensor, cell: Tensor, compute_stress: bool) -> Dict[str, Tensor]:
        r = positions.shape[0]
        out = {"forces": torch.zeros_like(positions)}
        if self.cell_energy is None:
            out["energy"] = torch.zeros(r, dtype=torch.float64, device=positions.device)
            if compute_stress:
                out["stress"] = torch.zeros_like(cell)
            return out
        with torch.enable_grad():
            h = cell.detach().double().requires_grad_(True)
            u = self.cell_energy(h)
            (g,) = torch.autograd.grad(u.sum(), h)
        out["energy"] = u.detach()
        if compute_stress:
            s = h.detach().transpose(-1, -2) @ g / det3(h.detach())[:, None, None]
            out["stress"] = (0.5 * (s + s.transpose(-1, -2))).to(cell.dtype)
        return out


class LennardJones:
    """Periodic Lennard-Jones with mlpot's neighbor list and a Verlet skin.

    phi(r) = 4 eps ((sigma/r)^12 - (sigma/r)^6), truncated at r_c and shifted to zero there
    (``switch_width_A`` = 0), or multiplied by the C2 switch S(t) = 1 - 10 t^3 + 15 t^4 - 6 t^5,
    t = (r - r_c + w) / w on the last w Angstrom (``switch_width_A`` = w > 0; smooth forces, for
    energy-conservation tests). Pairs are listed within r_c + skin and reused until the largest
    non-affine displacement, plus the cell deformation, could bring an unlisted pair inside r_c.

    Energy U = 1/2 sum_{(i,j,S)} phi(r_ij) over the full list; F_i = sum_j phi'(r) d_ij / r;
    stress = 1/(2V) sum phi'(r) d d^T / r (d = x_j - x_i + S cell, mlpot's pair convention).
    """

    def __init__(self, epsilon_eV: float = 0.0104, sigma_A: float = 3.4, cutoff_A: float = 8.5,
                 skin_A: float = 1.0, switch_width_A: float = 0.0,
                 pbc: Sequence[bool] = (True, True, True)):
        if not 0 <= switch_width_A < cutoff_A:
            raise ValueError("switch_width_A must be in [0, cutoff_A)")
        self.eps, self.sigma, self.rc = float(epsilon_eV), float(sigma_A), float(cutoff_A)
        self.skin, self.width = float(skin_A), float(switch_width_A)
        self.pbc = torch.as_tensor(pbc, dtype=torch.bool).reshape(-1).expand(3)
        sr6 = (self.sigma / self.rc) ** 6
        self.shift = 0.0 if self.width > 0 else 4.0 * self.eps * (sr6 * sr6 - sr6)
        self._ref = None  # (positions, cell, i, j, S, batch) of the last neighbor list
        self.rebuilds = 0

    def _pairs(self, positions: Tensor, cell: Tensor):
        r, n = positions.shape[:2]
        if self._ref is not None and not self._stale(positions, cell):
            return self._ref[2:]
        flat = positions.detach().reshape(r * n, 3)
        ptr = torch.arange(r + 1, device=positions.device) * n
        pbc = self.pbc.to(positions.device).expand(r, 3)
        i, j, s = neighbor_list_batch(flat, cell.detach(), pbc, ptr, self.rc + self.skin)
        batch = torch.arange(r, device=positions.device).repeat_interleave(n)
        self._ref = (positions.detach().clone(), cell.detach().clone(), i, j, s, batch)
        self.rebuilds += 1
        return i, j, s, batch

    def _stale(self, positions: Tensor, cell: Tensor) -> bool:
        x0, h0 = self._ref[0], self._ref[1]
        if x0.shape != positions.shape:
            return True
        if not bool(self.pbc.all()):  # no cell moves without full periodicity
            deform = torch.zeros(positions.shape[0], device=positions.device, dtype=positions.dtype)
            affine = x0
        else:
            f = (inv3(h0.double()) @ cell.double()).to(positions.dtype)  # h0^-1 h
            eye = torch.eye(3, dtype=f.dtype, device=f.device)
            deform = (f - eye).square().sum((-1, -2)).sqrt()  # [R], Frobenius >= spectral norm
            affine = rows_times(x0, f)
        move = (positions - affine).norm(dim=-1).amax(-1)  # [R]
        return bool(((self.rc + self.skin) * deform + 2.0 * move > self.skin).any())

    def __call__(self, positions: Tensor, cell: Tensor, compute_stress: bool) -> Dict[str, Tensor]:
        r, n = positions.shape[:2]
        i, j, s, batch = self._pairs(positions, cell)
        flat = positions.reshape(r * n, 3)
        rep = batch[i]  # [P] replica of each pair
        d = pair_vectors(flat, cell, batch, i, j, s)  # [P, 3] x_j - x_i + S cell
        dist = d.norm(dim=-1)
        inside = dist < self.rc
        safe = torch.where(inside, dist, torch.full_like(dist, self.rc))
        phi, dphi = self._phi(safe)
        phi, dphi = torch.where(inside, phi, 0.0), torch.where(inside, dphi, 0.0)
        energy = torch.zeros(r, dtype=torch.float64, device=positions.device)
        energy.index_add_(0, rep, 0.5 * phi.double())
        fpair = (dphi / safe)[:, None] * d  # [P, 3], force on atom i from j
        forces = torch.zeros(r * n, 3, dtype=positions.dtype, device=positions.device)
        forces.index_add_(0, i, fpair)
        out = {"energy": energy, "forces": forces.reshape(r, n, 3)}
        if compute_stress:
            vir = torch.zeros(r, 3, 3, dtype=positions.dtype, device=positions.device)
            vir.index_add_(0, rep, 0.5 * fpair[:, :, None] * d[:, None, :])
            vol = det3(cell).abs().clamp_min(1e-12)
            out["stress"] = vir / vol[:, None, None]
        return out

    def _phi(self, r: Tensor):
        """(phi(r) in eV, dphi/dr in eV/A) with the shift or switch applied."""
        sr6 = (self.sigma / r) ** 6
        phi = 4.0 * self.eps * (sr6 * sr6 - sr6)
        dphi = -24.0 * self.eps * (2.0 * sr6 * sr6 - sr6) / r
        if self.width <= 0:
            return phi - self.shift, dphi
        t = ((r - (self.rc - self.width)) / self.width).clamp(0.0, 1.0)
        sw = 1.0 - t**3 * (10.0 - 15.0 * t + 6.0 * t * t)
        dsw = -30.0 * t * t * (1.0 - t) ** 2 / self.width
        return phi * sw, dphi * sw + phi * dsw
