"""Multilayer perceptrons."""
from typing import List, Sequence

import torch
from torch import nn

ACTIVATIONS = {"silu": nn.SiLU, "tanh": nn.Tanh, "gelu": nn.GELU, "softplus": nn.Softplus}


def activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation '{name}'; use one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


class MLP(nn.Module):
    """Linear layers of the given widths with an activation between them (none after the last)."""

    def __init__(self, widths: Sequence[int], act: str = "silu", bias_last: bool = True):
        super().__init__()
        layers: List[nn.Module] = []
        for k in range(len(widths) - 1):
            last = k == len(widths) - 2
            layers.append(nn.Linear(widths[k], widths[k + 1], bias=bias_last or not last))
            if not last:
                layers.append(activation(act))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
