"""The neighbor list as a TorchScript-able module, for models that find their own neighbors.

``NeighborList(cutoff)`` picks the compiled op when it is built (``torch.ops.mlpot.neighbor_list``,
so an exported model calls it inside OpenMM too) and the PyTorch fallback otherwise.
"""
from typing import Dict, Tuple

import torch
from torch import nn

from .. import keys as K
from ._torch import neighbor_list_torch


class NeighborListOp(nn.Module):
    """Calls the compiled op; inputs on a GPU go through the CPU kernel when no CUDA kernel was
    built."""

    def __init__(self, cutoff: float, has_cuda_kernel: bool):
        super().__init__()
        self.cutoff = float(cutoff)
        self.has_cuda_kernel = has_cuda_kernel

    def forward(self, positions: torch.Tensor, cells: torch.Tensor, pbc: torch.Tensor,
                ptr: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if positions.device.type == "cpu" or self.has_cuda_kernel:
            return torch.ops.mlpot.neighbor_list(positions, cells, pbc, ptr, self.cutoff)
        dev = positions.device
        i, j, s = torch.ops.mlpot.neighbor_list(positions.cpu(), cells.cpu(), pbc.cpu(),
                                                ptr.cpu(), self.cutoff)
        return i.to(dev), j.to(dev), s.to(dev)


class NeighborListTorch(nn.Module):
    """The pure-PyTorch cell list (same results as the op)."""

    def __init__(self, cutoff: float):
        super().__init__()
        self.cutoff = float(cutoff)

    def forward(self, positions: torch.Tensor, cells: torch.Tensor, pbc: torch.Tensor,
                ptr: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return neighbor_list_torch(positions, cells, pbc, ptr, self.cutoff)


def NeighborList(cutoff: float) -> nn.Module:  # noqa: N802 - used like a class
    """The best available neighbor-list module for this process."""
    from . import _cuda_kernel_available, backend

    if backend() == "cpp":
        return NeighborListOp(cutoff, _cuda_kernel_available())
    return NeighborListTorch(cutoff)


class SharedNeighbors(nn.Module):
    """Base of the models that run several networks on one neighbor list (a committee's
    members, a model and its variance network): ``shared_inputs`` builds the list once (with
    the subclass's ``neighbor_list``, a ``NeighborList``) unless the caller gave one."""

    def shared_inputs(self, data: Dict[str, torch.Tensor]
                      ) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
        """(the inputs with ``edge_index`` and ``edge_shifts``, the [N] structure index)."""
        pos = data[K.POSITIONS]
        n_atoms = pos.shape[0]
        inputs = dict(data)
        if K.EDGE_INDEX not in inputs:
            if K.PTR in data:
                ptr = data[K.PTR]
            else:
                ptr = torch.tensor([0, n_atoms], dtype=torch.long, device=pos.device)
            i, j, shifts = self.neighbor_list(pos.detach(), data[K.CELL].detach(), data[K.PBC],
                                              ptr)
            inputs[K.EDGE_INDEX] = torch.stack([i, j])
            inputs[K.EDGE_SHIFTS] = shifts
        if K.BATCH in data:
            batch = data[K.BATCH]
        else:
            batch = torch.zeros(n_atoms, dtype=torch.long, device=pos.device)
        return inputs, batch
