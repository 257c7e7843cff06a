"""The neighbor-list op's fake (meta) implementation, so that ``torch.export`` traces it.

The op's output size (P pairs) depends on the positions: the fake returns tensors of a new
data-dependent size (an unbacked symbol), so an exported graph holds any number of pairs and
calls the compiled op itself at run time (the ``.pt2`` export, ``mlpot.aoti``).
"""
from __future__ import annotations

import torch

_DONE = {"fake": False}


def register_fake() -> None:
    """Register the fake of ``mlpot::neighbor_list`` (once; the op must be loaded)."""
    if _DONE["fake"]:
        return

    @torch.library.register_fake("mlpot::neighbor_list")
    def _neighbor_list_fake(positions, cells, pbc, ptr, cutoff):
        pairs = torch.library.get_ctx().new_dynamic_size()
        return (positions.new_empty(pairs, dtype=torch.long),
                positions.new_empty(pairs, dtype=torch.long),
                positions.new_empty((pairs, 3), dtype=torch.long))

    _DONE["fake"] = True
