"""Training data from a config: read, type, split, hash."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional

import torch

from ..checkpoint import hash_data
from ..data import AtomicData, DataError, TypeMap, read
from .config import Config


@dataclass
class TrainingData:
    train: List[AtomicData]
    validation: List[AtomicData]
    test: List[AtomicData]
    type_map: TypeMap
    data_hash: str


def _paths(value) -> List[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _read_all(paths: List[str], cfg: Config, type_map: Optional[TypeMap], require) -> List[AtomicData]:
    d = cfg.data
    out: List[AtomicData] = []
    for p in paths:
        kwargs = dict(type_map=type_map, require=require, energy_unit=d.energy_unit,
                      length_unit=d.length_unit, min_distance=d.min_distance)
        is_deepmd = d.format == "deepmd" or (d.format is None and os.path.isdir(p))
        if not is_deepmd:
            kwargs.update(energy_key=d.energy_key, forces_key=d.forces_key,
                          stress_key=d.stress_key, virial_key=d.virial_key,
                          energy_weight_key=d.energy_weight_key,
                          forces_weight_key=d.forces_weight_key)
        elif d.energy_weight_key or d.forces_weight_key:
            raise DataError(f"{p}: data.energy_weight_key and data.forces_weight_key apply to "
                            "ASE formats (per-frame info), not to DeePMD npy data")
        out.extend(read(p, format=d.format, **kwargs))
    return out


def load_training_data(cfg: Config, require=("energy",)) -> TrainingData:
    """Read and check all data before training starts; split off validation frames by seed."""
    d = cfg.data
    train_paths = _paths(d.train)
    tm = TypeMap(d.type_map) if d.type_map else None
    train = _read_all(train_paths, cfg, tm, require)
    if d.max_frames is not None:
        train = train[: d.max_frames]
    if tm is None:
        tm = TypeMap.from_atomic_numbers(torch.cat([s.atomic_numbers for s in train]).tolist())
        for s in train:
            s.atom_types = tm.types(s.atomic_numbers.numpy(), s.sources[0])
    if d.validation:
        validation = _read_all(_paths(d.validation), cfg, tm, require)
    else:
        gen = torch.Generator().manual_seed(cfg.training.seed)
        order = torch.randperm(len(train), generator=gen).tolist()
        n_val = int(round(d.validation_fraction * len(train)))
        if d.validation_fraction > 0 and n_val == 0 and len(train) > 1:
            n_val = 1
        val_idx = set(order[:n_val])
        validation = [train[k] for k in sorted(val_idx)]
        train = [train[k] for k in range(len(train)) if k not in val_idx]
    test = _read_all(_paths(d.test), cfg, tm, require) if d.test else []
    if not train:
        raise DataError(f"{d.train}: the training split is empty; give more frames or lower "
                        "data.validation_fraction")
    if not validation:
        raise DataError("the validation split is empty; set data.validation or a "
                        "data.validation_fraction that leaves at least one frame")
    return TrainingData(train, validation, test, tm, hash_data(train_paths))
