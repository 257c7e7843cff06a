"""The type map: which chemical element each model type index stands for."""
from __future__ import annotations

from typing import Iterable, List, Sequence, Union

import numpy as np
import torch
from ase.data import atomic_numbers as _Z_OF_SYMBOL
from ase.data import chemical_symbols as _SYMBOLS

from .errors import DataError


class TypeMap:
    """An explicit, ordered list of elements: type k of a model is ``symbols[k]``.

    >>> tm = TypeMap(["O", "H"])
    >>> tm.types([8, 1, 1]).tolist()
    [0, 1, 1]
    """

    def __init__(self, symbols: Sequence[Union[str, int]]):
        out: List[str] = []
        for s in symbols:
            if isinstance(s, (int, np.integer)):
                if not 0 < int(s) < len(_SYMBOLS):
                    raise DataError(f"type map: {s} is not an atomic number")
                s = _SYMBOLS[int(s)]
            s = str(s).strip()
            if s not in _Z_OF_SYMBOL or s == "X":
                raise DataError(
                    f"type map: '{s}' is not a chemical element symbol (write e.g. 'O', 'H', 'Si')"
                )
            if s in out:
                raise DataError(f"type map: element '{s}' is listed twice in {list(symbols)}")
            out.append(s)
        if not out:
            raise DataError("type map: empty; list the elements of your data, e.g. ['O', 'H']")
        self.symbols = out
        self.atomic_numbers = [_Z_OF_SYMBOL[s] for s in out]
        lookup = np.full(len(_SYMBOLS), -1, dtype=np.int64)
        lookup[self.atomic_numbers] = np.arange(len(out))
        self._lookup = lookup

    @classmethod
    def from_atomic_numbers(cls, numbers: Iterable[int]) -> "TypeMap":
        """A type map of the elements present, ordered by atomic number."""
        return cls(sorted({int(z) for z in numbers}))

    def __len__(self) -> int:
        return len(self.symbols)

    def __iter__(self):
        return iter(self.symbols)

    def __eq__(self, other) -> bool:
        return isinstance(other, TypeMap) and self.symbols == other.symbols

    def __repr__(self) -> str:
        return f"TypeMap({self.symbols})"

    def types(self, atomic_numbers, where: str = "") -> torch.Tensor:
        """Type index of each atom  # [N] int64; a clear error for an element not in the map."""
        z = np.asarray(atomic_numbers, dtype=np.int64).reshape(-1)
        bad = (z <= 0) | (z >= len(_SYMBOLS))
        t = np.where(bad, -1, self._lookup[np.clip(z, 0, len(_SYMBOLS) - 1)])
        if (t < 0).any():
            missing = sorted({int(v) for v in z[t < 0]})
            names = [_SYMBOLS[v] if 0 < v < len(_SYMBOLS) else str(v) for v in missing]
            raise DataError(
                f"{where + ': ' if where else ''}element(s) {names} not in the type map "
                f"{self.symbols}; add them to type_map (model types are fixed at training time)"
            )
        return torch.from_numpy(t)
