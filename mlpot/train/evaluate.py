"""``mlpot test MODEL --data FILE``: metrics of a trained model on labelled data, as a table, as
JSON, and as parity plots. For a committee (checkpoint or exported file) also the ``uq_*``
calibration measures of ``mlpot.train.metrics`` on the data, with the model's stored factor."""
from __future__ import annotations

import json
import os
from typing import Dict, Optional, Tuple

import torch

from ..data import AtomicDataset, DataError, TypeMap, read
from ..threads import poll_threads
from .metrics import MetricAccumulator


def load_model_for_eval(path: str, device: str = "cpu") -> Tuple[torch.nn.Module, TypeMap, float]:
    """A model from a training checkpoint (EMA weights preferred) or an exported file; the kind
    is decided from the file's zip members, so each file is read once and never unpickled."""
    from ..checkpoint import CheckpointError, file_kind, model_from_checkpoint
    from ..dtypes import usable_device
    from ..export import load

    kind = file_kind(path)
    if kind == "missing":
        raise CheckpointError(f"{path}: no such model or checkpoint file")
    if kind == "checkpoint":
        model = model_from_checkpoint(path, device=usable_device(device, path))
        return model, TypeMap(model.type_map), model.cutoff
    model = load(path, device=device)  # an exported file; anything else: a one-line ExportError
    return model, TypeMap(model.type_map), float(model.cutoff)


def evaluate_file(model_path: str, data_path: str, out_dir: Optional[str] = None,
                  batch_size: int = 8, device: str = "cpu", **read_kwargs) -> Dict[str, float]:
    model, type_map, cutoff = load_model_for_eval(model_path, device)
    frames = read(data_path, type_map=type_map, **read_kwargs)
    dataset = AtomicDataset(frames, type_map, cutoff, name=data_path)
    acc = MetricAccumulator()
    for batch in dataset.loader(batch_size):
        poll_threads()  # fewer threads while another process takes a core (mlpot.threads)
        batch = batch.to(device)
        stress = batch.stress is not None and bool(batch.pbc.all())
        pred = model(batch.as_dict(), compute_forces=True, compute_stress=stress)
        acc.add(pred, batch)
    metrics = acc.result()
    if not metrics:
        raise DataError(f"{data_path}: no energy, force or stress labels to compare the model "
                        "with; label the frames (REF_energy/energy, REF_forces/forces) or name "
                        "the keys with --energy-key/--forces-key")
    if out_dir:
        from .plots import parity_from_arrays

        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "test_metrics.json"), "w") as f:
            json.dump({"model": model_path, "data": data_path, **metrics}, f, indent=1)
        parity_from_arrays(acc.parity(), metrics, os.path.join(out_dir, "parity.png"),
                           title=os.path.basename(data_path))
    return metrics


def format_table(metrics: Dict[str, float]) -> str:
    rows = [("frames", "frames", "{:.0f}"),
            ("energy MAE", "energy_mae_meV_per_atom", "{:.3f} meV/atom"),
            ("energy RMSE", "energy_rmse_meV_per_atom", "{:.3f} meV/atom"),
            ("energy slope", "energy_slope", "{:.4f} (parity fit; 1: no scale error)"),
            ("force MAE", "forces_mae_meV_per_A", "{:.2f} meV/A"),
            ("force RMSE", "forces_rmse_meV_per_A", "{:.2f} meV/A"),
            ("stress RMSE", "stress_rmse_meV_per_A3", "{:.3f} meV/A^3"),
            # a committee: how well its force deviation ranks and sizes the error (metrics.py)
            ("UQ calibration factor", "uq_calibration", "{:.4g} (stored in the model)"),
            ("UQ Spearman per frame", "uq_spearman_frame", "{:.3f} (max_force_dev vs max |dF|)"),
            ("UQ Spearman per atom", "uq_spearman_atom", "{:.3f} (forces_dev vs |dF|)"),
            ("UQ RMS error / RMS dev", "uq_rms_ratio", "{:.3f} (1: calibrated on average)"),
            ("UQ ENCE", "uq_ence", "{:.3f} (0: calibrated in every bin)")]
    width = max(len(name) for name, key, _ in rows if key in metrics) if metrics else 12
    lines = [f"{name:<{max(width, 12)}} {fmt.format(metrics[key])}" for name, key, fmt in rows
             if key in metrics]
    return "\n".join(lines)
