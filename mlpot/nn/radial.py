"""Radial basis expansions of interatomic distances."""
import math

import torch
from torch import nn


class BesselBasis(nn.Module):
    """e_n(r) = sqrt(2 / cutoff) sin(n pi r / cutoff) / r, n = 1..num_basis  # [P, num_basis]

    The Bessel basis of DimeNet (Klicpera et al. 2020) as used by NequIP; frequencies trainable
    when ``trainable`` is set.
    """

    def __init__(self, cutoff: float, num_basis: int = 8, trainable: bool = True):
        super().__init__()
        self.cutoff = float(cutoff)
        self.prefactor = math.sqrt(2.0 / self.cutoff)
        freqs = torch.arange(1, num_basis + 1, dtype=torch.get_default_dtype()) * math.pi / cutoff
        if trainable:
            self.freqs = nn.Parameter(freqs)
        else:
            self.register_buffer("freqs", freqs)

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        r = r.unsqueeze(-1)  # [P, 1]
        return self.prefactor * torch.sin(self.freqs * r) / r
