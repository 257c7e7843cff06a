"""A dataset of structures with their neighbor lists, and a loader that batches them."""
from __future__ import annotations

from typing import Iterator, List, Optional, Sequence

import torch

from .atomic_data import AtomicData
from .errors import DataError
from .type_map import TypeMap


class AtomicDataset(torch.utils.data.Dataset):
    """Structures typed through ``type_map`` with neighbor pairs at ``cutoff`` (computed once)."""

    def __init__(self, structures: Sequence[AtomicData], type_map: TypeMap, cutoff: float,
                 name: str = "dataset"):
        if len(structures) == 0:
            raise DataError(f"{name}: no structures (an empty split? check the file and the "
                            "train/validation fractions)")
        self.type_map = type_map
        self.cutoff = float(cutoff)
        self.items: List[AtomicData] = []
        for s in structures:
            where = s.sources[0] if s.sources else name
            if s.atom_types is None:
                s.atom_types = type_map.types(s.atomic_numbers.numpy(), where)
            self.items.append(s.with_neighbors(self.cutoff))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, k: int) -> AtomicData:
        return self.items[k]

    def has(self, label: str) -> bool:
        """Whether any structure carries this label."""
        return any(getattr(s, label) is not None for s in self.items)

    def loader(self, batch_size: int, shuffle: bool = False,
               generator: Optional[torch.Generator] = None) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(self, batch_size=batch_size, shuffle=shuffle,
                                           collate_fn=AtomicData.collate, generator=generator)

    def __iter__(self) -> Iterator[AtomicData]:
        return iter(self.items)
