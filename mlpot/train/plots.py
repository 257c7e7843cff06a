"""Figures: parity plots of energies and forces, learning curves (PNG, matplotlib)."""
from __future__ import annotations

from typing import Dict, List

import torch


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def parity_from_arrays(arrays: Dict[str, torch.Tensor], metrics: Dict[str, float], path: str,
                       title: str = "") -> None:
    """Predicted vs reference per-atom energy (meV/atom offsets) and force components."""
    plt = _plt()
    panels = [k for k in ("energy", "forces") if k + "_pred" in arrays]
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(5 * max(len(panels), 1), 4.6))
    axes = [axes] if len(panels) <= 1 else list(axes)
    for ax, key in zip(axes, panels):
        ref = arrays[key + "_ref"].numpy()
        pred = arrays[key + "_pred"].numpy()
        ax.scatter(ref, pred, s=4, alpha=0.5, lw=0)
        lo, hi = min(ref.min(), pred.min()), max(ref.max(), pred.max())
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        if key == "energy":
            ax.set_xlabel("DFT energy (eV/atom)")
            ax.set_ylabel("mlpot energy (eV/atom)")
            rmse = metrics.get("energy_rmse_meV_per_atom")
            label = f"RMSE {rmse:.2f} meV/atom" if rmse is not None else ""
        else:
            ax.set_xlabel("DFT force component (eV/A)")
            ax.set_ylabel("mlpot force component (eV/A)")
            rmse = metrics.get("forces_rmse_meV_per_A")
            label = f"RMSE {rmse:.1f} meV/A" if rmse is not None else ""
        ax.set_title(label)
        ax.set_aspect("equal", adjustable="datalim")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parity_plot(model, dataset, path: str, batch_size: int, device) -> Dict[str, float]:
    from .metrics import MetricAccumulator

    model.eval()
    acc = MetricAccumulator()
    for batch in dataset.loader(batch_size):
        batch = batch.to(device)
        acc.add(model(batch.as_dict(), compute_forces=True), batch)
    metrics = acc.result()
    parity_from_arrays(acc.parity(), metrics, path)
    return metrics


def learning_curve(history: List[Dict[str, float]], path: str) -> None:
    """Validation energy and force RMSE (and the training loss) against epochs, log scale."""
    plt = _plt()
    if not history:
        return
    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("val_energy_rmse_meV_per_atom", "validation E RMSE (meV/atom)"),
                       ("val_forces_rmse_meV_per_A", "validation F RMSE (meV/A)")):
        if key in history[0]:
            ax[0].plot(epochs, [h[key] for h in history], label=label)
    ax[0].set_yscale("log")
    ax[0].set_xlabel("epoch")
    ax[0].legend()
    ax[1].plot(epochs, [h.get("train_loss", float("nan")) for h in history], label="train loss")
    ax[1].plot(epochs, [h.get("val_loss", float("nan")) for h in history], label="validation loss")
    ax[1].set_yscale("log")
    ax[1].set_xlabel("epoch")
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
