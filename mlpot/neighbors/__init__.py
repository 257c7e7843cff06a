"""Neighbor lists: the C++ op ``torch.ops.mlpot.neighbor_list`` and its pure-PyTorch fallback.

Convention (ASE's): a pair (i, j, S) means atom j, moved by the integer cell shift S, lies within
the cutoff of atom i; its vector is ``positions[j] - positions[i] + S @ cell`` (cells are rows).
The list is full (both (i, j, S) and (j, i, -S)); an atom is paired with its own periodic images
when the cell is smaller than the cutoff, never with itself (S = 0). Distances are strictly less
than the cutoff. Shifts are zero along non-periodic directions.

The op returns integers only; pair vectors and distances are computed here in PyTorch from
positions, cell and shifts (``pair_vectors``), so forces and stresses get gradients through them.
"""
from __future__ import annotations

import os
import warnings
from typing import Optional, Tuple

import torch

from ._torch import neighbor_list_torch

__all__ = [
    "neighbor_list",
    "neighbor_list_batch",
    "pair_vectors",
    "backend",
    "library_path",
    "neighbor_list_torch",
    "empty_cache",
]

_STATE = {"backend": None, "library": None, "reason": ""}


def _select_backend() -> str:
    """Build/load the C++ op once; fall back to PyTorch (with one warning) where it cannot."""
    if _STATE["backend"] is not None:
        return _STATE["backend"]
    if os.environ.get("MLPOT_NO_EXTENSION", "") not in ("", "0"):
        _STATE.update(backend="torch", reason="MLPOT_NO_EXTENSION is set")
        return "torch"
    try:
        from . import _extension

        _STATE["library"] = _extension.load_library()
        _STATE["backend"] = "cpp"
    except Exception as err:  # noqa: BLE001 - any build failure means: use the fallback
        _STATE.update(backend="torch", reason=f"{type(err).__name__}: {err}")
        warnings.warn(
            "mlpot: the C++ neighbor-list op could not be built or loaded, so the pure-PyTorch "
            "neighbor list is used (same results, several times slower on large systems). "
            f"Reason: {_STATE['reason']}. Run `python -m mlpot.neighbors` for a diagnosis.",
            RuntimeWarning,
            stacklevel=3,
        )
    return _STATE["backend"]


def backend() -> str:
    """'cpp' when the compiled op is in use, 'torch' for the pure-PyTorch fallback."""
    return _select_backend()


def library_path() -> Optional[str]:
    """Path of the compiled op library (for ``torch.ops.load_library`` in another process)."""
    _select_backend()
    return _STATE["library"]


def empty_cache() -> None:
    """Give back the memory the C++ op keeps for reuse between calls: its work buffers and the
    blocks of freed output tensors (up to 4 GiB; reusing them spares large lists a page fault per
    4 KiB on every call). Tensors still in use are not touched."""
    if _select_backend() == "cpp":
        torch.ops.mlpot.empty_cache()


def _cuda_kernel_available() -> bool:
    return _select_backend() == "cpp" and torch._C._dispatch_has_kernel_for_dispatch_key(
        "mlpot::neighbor_list", "CUDA"
    )


def neighbor_list_batch(
    positions: torch.Tensor,
    cells: torch.Tensor,
    pbc: torch.Tensor,
    ptr: torch.Tensor,
    cutoff: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Neighbor pairs of many structures at once.

    Args:
        positions: [N, 3] float32/float64, Angstrom, all structures concatenated.
        cells: [B, 3, 3], rows are lattice vectors (ignored along non-periodic directions).
        pbc: [B, 3] bool.
        ptr: [B + 1] int64; structure b holds atoms ptr[b]:ptr[b+1].
        cutoff: Angstrom, > 0.

    Returns:
        (i, j, S): int64 tensors [P], [P], [P, 3] with global atom indices, sorted by i.
    """
    pbc = pbc.to(device=positions.device, dtype=torch.bool)
    ptr = ptr.to(device=positions.device, dtype=torch.long)
    cells = cells.to(device=positions.device, dtype=positions.dtype)
    if _select_backend() == "cpp" and (positions.device.type == "cpu" or _cuda_kernel_available()):
        return torch.ops.mlpot.neighbor_list(positions, cells, pbc, ptr, float(cutoff))
    return neighbor_list_torch(positions, cells, pbc, ptr, float(cutoff))


def neighbor_list(
    positions: torch.Tensor,
    cell: Optional[torch.Tensor] = None,
    pbc=None,
    cutoff: float = 5.0,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Neighbor pairs (i, j, S) of one structure, equal as a set to ASE's ``neighbor_list('ijS')``.

    Args:
        positions: [N, 3] tensor (or array), Angstrom.
        cell: [3, 3], rows are lattice vectors; None for a molecule.
        pbc: three bools (or one for all directions); None means periodic where the cell
            vector is non-zero.
        cutoff: Angstrom.
    """
    positions = torch.as_tensor(positions)
    if not positions.is_floating_point():
        positions = positions.to(torch.float64)
    if cell is None:
        cell = torch.zeros(3, 3, dtype=positions.dtype)
    cell = torch.as_tensor(cell).to(device=positions.device, dtype=positions.dtype).reshape(3, 3)
    if pbc is None:
        pbc = cell.abs().sum(dim=1) > 0
    pbc = torch.as_tensor(pbc, dtype=torch.bool, device=positions.device).reshape(-1)
    if pbc.numel() == 1:
        pbc = pbc.expand(3)
    ptr = torch.tensor([0, positions.shape[0]], dtype=torch.long, device=positions.device)
    return neighbor_list_batch(positions, cell[None], pbc[None], ptr, cutoff)


def pair_vectors(
    positions: torch.Tensor,
    cells: torch.Tensor,
    batch: torch.Tensor,
    i: torch.Tensor,
    j: torch.Tensor,
    shifts: torch.Tensor,
) -> torch.Tensor:
    """Differentiable pair vectors x_j - x_i + S @ cell[batch[i]]  # [P, 3]

    The one place that turns a neighbor list into vectors: models (``Potential``), data,
    validation and the integrators' reference forces all call it. TorchScript-able (scripted
    models call it). Gradients flow to ``positions`` and ``cells`` (the latter gives the
    virial). cells may be [3, 3] for a single structure or [B, 3, 3] with ``batch`` the structure
    index of each atom.
    """
    if cells.dim() == 2:
        shift_vec = shifts.to(positions.dtype) @ cells  # [P, 3]
    else:
        pair_cells = cells.index_select(0, batch.index_select(0, i))  # [P, 3, 3]
        shift_vec = torch.bmm(shifts.to(positions.dtype).unsqueeze(1), pair_cells).squeeze(1)
    return positions.index_select(0, j) - positions.index_select(0, i) + shift_vec
