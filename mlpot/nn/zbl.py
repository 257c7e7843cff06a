"""ZBL screened nuclear repulsion: a physical wall at close contact, switched off before bonds.

The universal screened nuclear repulsion of Ziegler, Biersack and Littmark (The Stopping and Range
of Ions in Solids, Pergamon 1985), for atoms i, j at distance r:

    E_ZBL(r) = k Z_i Z_j / r * phi(r / a),      k = e^2 / (4 pi eps0) = 14.399645 eV A
    a = 0.46850 A / (Z_i^0.23 + Z_j^0.23)
    phi(x) = 0.18175 e^(-3.19980 x) + 0.50986 e^(-0.94229 x) + 0.28022 e^(-0.40290 x)
             + 0.02817 e^(-0.20162 x)

It is the nuclear Coulomb repulsion screened by the electrons; it is right at close contact
(r well below a bond length) and far too large at bond lengths, where chemical bonding, which it
knows nothing of, dominates (C-H at 1.09 A: about 3 eV). So it is switched off before the bonds:

    E_pair(r) = E_ZBL(r) * S(t),   t = (r - r_inner) / (r_outer - r_inner) clamped to [0, 1],
    S(t) = 1 - 10 t^3 + 15 t^4 - 6 t^5   (quintic smoothstep: S, S', S'' vanish at t = 0 and 1)

so the energy and its first and second derivatives (forces, and the force constants) are
continuous at both radii; beyond r_outer the prior is exactly zero (no energy, force or stress).

**The radii, per element pair** (the rule): with R_cov the covalent radii of ``ase.data``
(Cordero et al., Dalton Trans. 2008),

    r_inner = f_inner * (R_cov,i + R_cov,j),   r_outer = f_outer * (R_cov,i + R_cov,j),
    f_inner = 0.4, f_outer = 0.6 by default (``model.repulsion_radii: [f_inner, f_outer]``).

That gives (A; covalent sum, r_inner, r_outer, and the equilibrium bond length for comparison):

    H-H   0.62  0.248  0.372   (H2 0.74)
    C-H   1.07  0.428  0.642   (1.09)
    O-H   0.97  0.388  0.582   (water 0.96)
    C-C   1.52  0.608  0.912   (1.54; C=C 1.34; C#C 1.20)
    Si-Si 2.22  0.888  1.332   (2.35)

r_outer is 0.50-0.61 of these bonds (0.76 of C#C), so the prior does not fight the data: on the
DFT sets mlpot's benchmarks use (rMD17, 3BPA up to 1200 K, acac at 600 K, liquid water, and the
compressed and strained Cu, Ge, Li, Mo, Ni, Si cells of mlearn; 16 000 frames) no pair comes
within r_outer (closest: molecules 1.33 r_outer, Mo-Mo in mlearn at 1.02 r_outer), so it is
exactly zero there; the trainer fits reference energies to the labels minus the prior anyway.
Below r_inner the full ZBL wall acts (C-H at 0.428 A: 38 eV; H-H at 0.248 A: 23 eV; at r_outer,
before the switch, 11-23 eV for the pairs above). r_outer must be below the model's cutoff for
every pair of the type map.

``ZBLRepulsion`` gives per-atom energies from the full neighbor list of ``Potential`` (both (i, j)
and (j, i)): each atom takes half of each of its pair energies, summed over its own edges only,
so that the energy of an atom is a function of its own edges (``centre_energies``, as the local
networks, for ``Potential``'s chunked inference). Computed in float64 whatever the network's
precision.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..errors import UserError

__all__ = ["ZBLRepulsion", "RepulsionError", "REPULSIONS", "DEFAULT_RADII", "COULOMB",
           "check_repulsion", "switch", "zbl_energy"]

REPULSIONS = ["zbl"]  # the allowed values of model.repulsion (None: no prior)
COULOMB = 14.399645  # e^2 / (4 pi eps0), eV A
SCREENING = 0.46850  # A
EXPONENT = 0.23
DEFAULT_RADII = (0.4, 0.6)  # (f_inner, f_outer): fractions of the pair's covalent-radius sum


class RepulsionError(UserError, ValueError):
    """A repulsion prior that cannot be built (bad radii, a type that is not an element)."""


def check_repulsion(repulsion: Optional[str], radii: Optional[Sequence[float]] = None
                    ) -> Optional[Tuple[float, float]]:
    """The (f_inner, f_outer) fractions of a prior, None without one; RepulsionError (one line)
    for an unknown kind, radii that are not 0 < f_inner < f_outer, or radii without a prior."""
    if repulsion is None:
        if radii is not None:
            raise RepulsionError(f"model.repulsion_radii = {list(radii)} is set but "
                                 "model.repulsion is not: add model.repulsion: zbl, or remove "
                                 "model.repulsion_radii")
        return None
    if repulsion not in REPULSIONS:
        raise RepulsionError(f"model.repulsion = {repulsion!r} is not one of {REPULSIONS} "
                             "(or null for no prior)")
    if radii is None:
        return DEFAULT_RADII
    values = list(radii)
    if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                   for v in values) or not 0.0 < values[0] < values[1]:
        raise RepulsionError(f"model.repulsion_radii = {values}: must be two numbers "
                             "[f_inner, f_outer] with 0 < f_inner < f_outer (fractions of the "
                             f"pair's covalent-radius sum), e.g. {list(DEFAULT_RADII)}")
    return float(values[0]), float(values[1])


def zbl_energy(r: torch.Tensor, z_product: torch.Tensor, inv_screening: torch.Tensor
               ) -> torch.Tensor:
    """E_ZBL(r) for pairs with k Z_i Z_j (``z_product``, eV A) and 1 / a (1/A)  # [P]"""
    x = r * inv_screening  # the universal screening function phi(x), ZBL 1985
    phi = 0.18175 * torch.exp(-3.19980 * x) + 0.50986 * torch.exp(-0.94229 * x) \
        + 0.28022 * torch.exp(-0.40290 * x) + 0.02817 * torch.exp(-0.20162 * x)
    return z_product / r * phi


def switch(r: torch.Tensor, r_inner: torch.Tensor, r_outer: torch.Tensor) -> torch.Tensor:
    """S = 1 below r_inner, 0 beyond r_outer, the quintic smoothstep between (C2)  # [P]"""
    t = ((r - r_inner) / (r_outer - r_inner)).clamp(0.0, 1.0)
    return 1.0 - t * t * t * (10.0 - 15.0 * t + 6.0 * t * t)


class ZBLRepulsion(nn.Module):
    """Per-atom ZBL energies, switched off between r_inner and r_outer per element pair (see the
    module doc). Buffers (float64, per type or type pair): ``atomic_numbers`` [T],
    ``z_product`` = k Z_i Z_j [T, T], ``inv_screening`` = 1 / a [T, T], ``r_inner`` and
    ``r_outer`` [T, T]."""

    def __init__(self, type_map: List[str], cutoff: float,
                 radii: Sequence[float] = DEFAULT_RADII):
        super().__init__()
        from ase.data import atomic_numbers, covalent_radii

        f_inner, f_outer = check_repulsion("zbl", radii)
        unknown = [s for s in type_map if atomic_numbers.get(s, 0) == 0]
        if unknown:
            raise RepulsionError(f"model.repulsion: zbl needs chemical elements in the type map "
                                 f"(it uses their atomic numbers); {unknown} are not elements")
        z = torch.tensor([float(atomic_numbers[s]) for s in type_map], dtype=torch.float64)
        rcov = torch.tensor([float(covalent_radii[atomic_numbers[s]]) for s in type_map],
                            dtype=torch.float64)
        rsum = rcov.unsqueeze(1) + rcov.unsqueeze(0)  # [T, T]
        r_outer = f_outer * rsum
        worst = int(torch.argmax(r_outer))
        if float(r_outer.max()) >= cutoff:
            a, b = type_map[worst // len(type_map)], type_map[worst % len(type_map)]
            raise RepulsionError(
                f"model.repulsion: the ZBL switch of {a}-{b} ends at r_outer = "
                f"{float(r_outer.max()):.3f} A, not inside the cutoff {cutoff} A; raise "
                "model.cutoff or lower model.repulsion_radii")
        self.fractions = (f_inner, f_outer)
        zp = z.pow(EXPONENT)
        self.register_buffer("atomic_numbers", z)
        self.register_buffer("z_product", COULOMB * z.unsqueeze(1) * z.unsqueeze(0))
        self.register_buffer("inv_screening", (zp.unsqueeze(1) + zp.unsqueeze(0)) / SCREENING)
        self.register_buffer("r_inner", f_inner * rsum)
        self.register_buffer("r_outer", r_outer)
        self.num_types = len(type_map)

    def pair_energies(self, centre_types: torch.Tensor, neighbor_types: torch.Tensor,
                      r: torch.Tensor) -> torch.Tensor:
        """E_ZBL(r) * S(r) of pairs of the given types at distances r (float64)  # [P]"""
        pair = centre_types * self.num_types + neighbor_types
        r = r.to(torch.float64)
        e = zbl_energy(r, self.z_product.flatten().index_select(0, pair),
                       self.inv_screening.flatten().index_select(0, pair))
        return e * switch(r, self.r_inner.flatten().index_select(0, pair),
                          self.r_outer.flatten().index_select(0, pair))

    def forward(self, atom_types: torch.Tensor, edge_index: torch.Tensor,
                edge_vectors: torch.Tensor) -> torch.Tensor:
        """Per-atom energies [N] (float64): half of each pair energy to each atom."""
        return self.centre_energies(atom_types, edge_index[0],
                                    atom_types.index_select(0, edge_index[1]), edge_vectors)

    def centre_energies(self, centre_types: torch.Tensor, edge_centre: torch.Tensor,
                        neighbor_types: torch.Tensor, edge_vectors: torch.Tensor
                        ) -> torch.Tensor:
        """Energies of the centres 0..Nc-1 from their own edges  # [Nc] float64

        E_c = 1/2 sum over edges (c, j) of E_pair(r_cj): the full list holds each pair twice,
        once from each end, so the pair's energy is shared equally."""
        r = torch.linalg.norm(edge_vectors.to(torch.float64), dim=1)  # [P]
        e = 0.5 * self.pair_energies(centre_types.index_select(0, edge_centre), neighbor_types, r)
        out = torch.zeros(centre_types.shape[0], dtype=torch.float64, device=r.device)
        return out.index_add_(0, edge_centre, e)
