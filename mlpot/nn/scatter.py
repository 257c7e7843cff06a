"""Scatter operations (TorchScript-friendly, no extra dependency)."""
import torch


def scatter_sum(src: torch.Tensor, index: torch.Tensor, dim_size: int) -> torch.Tensor:
    """out[k] = sum of src[p] over p with index[p] == k, along the first dimension."""
    shape = [dim_size] + list(src.shape[1:])
    out = torch.zeros(shape, dtype=src.dtype, device=src.device)
    return out.index_add_(0, index, src)
