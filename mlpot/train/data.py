"""Training data from a config: read, type, split, hash."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

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
                          forces_weight_key=d.forces_weight_key,
                          atomic_energies_key=d.atomic_energies_key,
                          hessian_key=d.hessian_key)
        elif d.energy_weight_key or d.forces_weight_key or d.atomic_energies_key \
                or d.hessian_key:
            raise DataError(f"{p}: data.energy_weight_key, forces_weight_key, "
                            "atomic_energies_key and hessian_key apply to "
                            "ASE formats (per-frame info), not to DeePMD npy data")
        out.extend(read(p, format=d.format, **kwargs))
    return out


def split_indices(n: int, validation_fraction: float, test_fraction: float, seed: int,
                  groups: Optional[Sequence[str]] = None,
                  copies: Optional[Sequence] = None) -> Tuple[List[int], List[int], List[int]]:
    """Frame indices of the train, validation and test parts, drawn by ``seed``.

    With ``groups`` (a label per frame, e.g. the config_type), each group is split in the same
    proportions (stratified), so that a small group such as surfaces appears in every part: a
    group of m units gives round(f * m) units to a part of fraction f, and at least one when
    f > 0 and the group has three or more. Without, the frames form one group. ``copies`` (a key
    per frame, ``equivalence_key``) keeps frames with the same key in the same part, so that a
    rotated copy of a training frame never lands in the test part; the units are then these
    sets of copies."""
    groups = list(groups) if groups is not None else [""] * n
    copies = list(copies) if copies is not None else list(range(n))
    if len(groups) != n or len(copies) != n:
        raise ValueError(f"{len(groups)} group labels and {len(copies)} keys for {n} frames")
    gen = torch.Generator().manual_seed(seed)
    parts: Tuple[List[int], List[int], List[int]] = ([], [], [])
    for label in sorted(set(groups)):
        units: Dict = {}  # key -> frames, in order of first appearance
        for k in range(n):
            if groups[k] == label:
                units.setdefault(copies[k], []).append(k)
        members = list(units.values())
        order = [members[k] for k in torch.randperm(len(members), generator=gen).tolist()]
        m = len(order)
        n_test = int(round(test_fraction * m))
        n_val = int(round(validation_fraction * m))
        if m >= 3:
            n_test = max(n_test, 1 if test_fraction > 0 else 0)
            n_val = max(n_val, 1 if validation_fraction > 0 else 0)
        elif len(set(groups)) == 1 and m == 2 and validation_fraction > 0:  # two units in all
            n_val, n_test = 1, 0
        for part, chosen in ((2, order[:n_test]), (1, order[n_test:n_test + n_val]),
                             (0, order[n_test + n_val:])):
            parts[part].extend(k for unit in chosen for k in unit)
    return sorted(parts[0]), sorted(parts[1]), sorted(parts[2])


def equivalence_key(frame: AtomicData):
    """Frames with equal keys are copies of one structure, up to rotation, reflection,
    translation and the order of the atoms (the mlearn sets hold strained cells three and six
    times, once per axis): the same elements, the same energy to 1 ueV and the same sorted force
    magnitudes to 0.1 meV/A. A frame without an energy label is its own key."""
    if frame.energy is None or not torch.isfinite(frame.energy).all():
        return id(frame)
    key = (tuple(sorted(frame.atomic_numbers.tolist())), round(float(frame.energy[0]), 6))
    if frame.forces is not None:
        norms = torch.linalg.norm(frame.forces.to(torch.float64), dim=1)
        key += (tuple(round(x, 4) for x in sorted(norms.tolist())),)
    return key


def _split_groups(paths: List[str], cfg: Config, n: int, setting: str) -> List[str]:
    """The label of every training frame under the info key that ``data.<setting>`` names
    (``split_key`` for a stratified split, ``copy_key`` for copies of one structure): an info
    value of ASE formats, or "system" for the folder of DeePMD data."""
    from ..data.readers import read_info

    d = cfg.data
    key = getattr(d, setting)
    labels: List[str] = []
    for p in paths:
        is_deepmd = d.format == "deepmd" or (d.format is None and os.path.isdir(p))
        labels.extend(read_info(p, key, format=None if is_deepmd else d.format,
                                setting=f"data.{setting}"))
    return labels[:n]  # data.max_frames keeps the first frames


def load_training_data(cfg: Config, require=("energy",)) -> TrainingData:
    """Read and check all data before training starts; split off validation (and test) frames by
    seed, stratified by ``data.split_key`` when it is set."""
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
    groups = _split_groups(train_paths, cfg, len(train), "split_key") if d.split_key else None
    test: List[AtomicData] = []
    if d.validation:
        validation = _read_all(_paths(d.validation), cfg, tm, require)
    if d.test_fraction > 0 or ((groups is not None or d.copy_key) and not d.validation):
        # copies stay together (new splits only): the data's own key, or found by their labels
        copies = _split_groups(train_paths, cfg, len(train), "copy_key") if d.copy_key \
            else [equivalence_key(f) for f in train]
        train_idx, val_idx, test_idx = split_indices(
            len(train), 0.0 if d.validation else d.validation_fraction, d.test_fraction,
            cfg.training.seed, groups, copies)
        if not d.validation:
            validation = [train[k] for k in val_idx]
        test = [train[k] for k in test_idx]
        train = [train[k] for k in train_idx]
    elif not d.validation:  # the original random split, kept as it was (old runs resume on
        # the same frames)
        gen = torch.Generator().manual_seed(cfg.training.seed)
        order = torch.randperm(len(train), generator=gen).tolist()
        n_val = int(round(d.validation_fraction * len(train)))
        if d.validation_fraction > 0 and n_val == 0 and len(train) > 1:
            n_val = 1
        val_idx = set(order[:n_val])
        validation = [train[k] for k in sorted(val_idx)]
        train = [train[k] for k in range(len(train)) if k not in val_idx]
    if d.test:
        test = _read_all(_paths(d.test), cfg, tm, require)
    if not train:
        raise DataError(f"{d.train}: the training split is empty; give more frames or lower "
                        "data.validation_fraction")
    if not validation:
        raise DataError("the validation split is empty; set data.validation or a "
                        "data.validation_fraction that leaves at least one frame")
    if (cfg.loss.atomic_energies > 0 or (cfg.loss.atomic_energies_start or 0) > 0) \
            and not any(s.atomic_energies is not None for s in train):
        where = f"under {d.atomic_energies_key!r}" if d.atomic_energies_key \
            else "(data.atomic_energies_key is not set)"
        raise DataError(f"{d.train}: loss.atomic_energies asks for per-atom energy labels, but no "
                        f"training frame has them {where}; name their array with "
                        "data.atomic_energies_key (mlpot distill writes DISTILL_atomic_energies) "
                        "or set loss.atomic_energies: 0")
    if (cfg.loss.hessian > 0 or (cfg.loss.hessian_start or 0) > 0) \
            and not any(s.hessian is not None for s in train):
        where = f"under {d.hessian_key!r}" if d.hessian_key else "(data.hessian_key is not set)"
        raise DataError(f"{d.train}: loss.hessian asks for Hessian labels, but no training frame "
                        f"has them {where}; name their array with data.hessian_key (mlpot "
                        "distill writes DISTILL_hessian) or set loss.hessian: 0")
    return TrainingData(train, validation, test, tm, hash_data(train_paths))
