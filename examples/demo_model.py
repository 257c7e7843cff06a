"""The small untrained model the MD examples run when no --model is given (shared by them).

An untrained EGNN is smooth and bounded, which is all an MD example needs to show the workflow;
for physics, pass a model trained with `mlpot train` and exported with `mlpot export`.
"""
import os
from typing import Sequence

import torch

import mlpot
from mlpot.models import build_model


def demo_model(folder: str, elements: Sequence[str] = ("H", "O")) -> str:
    """Export an untrained EGNN for ``elements`` into ``folder``; its path."""
    torch.manual_seed(0)
    model = build_model("egnn", list(elements), cutoff=4.0, dtype="float32", hidden=32,
                        edge_hidden=32, num_layers=2, readout_hidden=16)
    name = "demo_egnn" + ("" if list(elements) == ["H", "O"] else "_" + "".join(elements).lower())
    return mlpot.export.export(model, os.path.join(folder, name + ".pt"))
