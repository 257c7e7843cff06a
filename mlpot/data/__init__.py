"""The data layer: one representation of structures and batches, readers, validation."""
from .atomic_data import AtomicData
from .dataset import AtomicDataset
from .errors import DataError
from .readers import read, read_ase, read_deepmd
from .type_map import TypeMap
from .validate import check_structure

__all__ = ["AtomicData", "AtomicDataset", "DataError", "TypeMap", "read", "read_ase",
           "read_deepmd", "check_structure"]
