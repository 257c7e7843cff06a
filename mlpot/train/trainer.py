"""The trainer: fits a Potential to DFT data as a config says, with checkpoints that resume exactly.

Order of a run: read and check all data (errors before any training), build the model, fit
per-element reference energies by least squares and the network's data statistics on the
training split only, then epochs of Adam(W) steps with the loss weights and learning rate of the
schedule, gradient clipping and a weight EMA; after each validation: the CSV log, then (when
better) ``best.pt``, then ``last.pt``, each written atomically (temp file + rename). Written in
that order, every kill leaves a consistent pair: ``last.pt`` never records a best that ``best.pt``
does not hold (a kill between the two replays the epoch on resume, which rewrites both).
``resume=True`` continues from ``last.pt``: model, optimizer, EMA, RNG states, epoch, elapsed
time and log. Checkpoints are read as data only (``mlpot.checkpoint``).
"""
from __future__ import annotations

import csv
import json
import math
import os
import random
import time
import warnings
from typing import Dict, List, Optional

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel

from ..checkpoint import (checkpoint_dict, file_kind, read_checkpoint, weights_of,
                          write_checkpoint)
from ..data import AtomicDataset
from ..dtypes import usable_device
from ..files import remove_stale_temporaries
from ..models import build_model, fit_reference_energies, force_rms
from .config import Config, ConfigError, check_config
from .data import TrainingData, load_training_data
from .loss import Loss
from .metrics import MetricAccumulator


class Trainer:
    def __init__(self, cfg: Config, data: Optional[TrainingData] = None):
        check_config(cfg)  # a Config built in Python too: every value before any data are read
        usable_device(cfg.training.device, "training.device")
        self.cfg = cfg
        self.loss_fn = Loss(cfg.loss)
        require = ["energy"] if cfg.loss.energy > 0 or (cfg.loss.energy_start or 0) > 0 else []
        if self.loss_fn.needs_forces:
            require.append("forces")
        if self.loss_fn.needs_stress:
            require.append("stress")
        self.data = data if data is not None else load_training_data(cfg, tuple(require))
        if cfg.training.threads:
            torch.set_num_threads(cfg.training.threads)
        self.device = torch.device(cfg.training.device)
        _seed_everything(cfg.training.seed)
        mc = cfg.model
        self.model = build_model(mc.name, self.data.type_map.symbols, mc.cutoff, mc.dtype,
                                 **mc.hparams)
        cutoff = self.model.cutoff
        self.train_set = AtomicDataset(self.data.train, self.data.type_map, cutoff, "training")
        self.val_set = AtomicDataset(self.data.validation, self.data.type_map, cutoff,
                                     "validation")
        self._fit_statistics()
        self.model.to(self.device)
        self.optimizer = _make_optimizer(self.model, cfg)
        self.ema = None
        if cfg.optim.ema_decay > 0:
            self.ema = AveragedModel(self.model, avg_fn=_ema_avg_fn(cfg.optim.ema_decay),
                                     use_buffers=True)
        self.generator = torch.Generator().manual_seed(cfg.training.seed)
        self.epoch = 0
        self.step = 0
        self.elapsed_s = 0.0
        self.best_val = math.inf
        self.best_step = -1  # the step whose weights best.pt holds
        self.epochs_since_best = 0
        self.plateau_scale = 1.0
        self.history: List[Dict[str, float]] = []
        self.tb_writer = None  # a TensorBoard SummaryWriter with training.tensorboard
        self.out_dir = cfg.training.out_dir

    # ------------------------------------------------------------------ set-up
    def _fit_statistics(self) -> None:
        """Reference energies, energy scale and network statistics from the training split."""
        items = self.train_set.items
        e0 = fit_reference_energies(items, len(self.data.type_map))
        self.model.set_reference_energies(e0)
        scale = force_rms(items) if any(s.forces is not None for s in items) else 1.0
        self.model.energy_scale.fill_(max(scale, 1e-3))
        self.model.fit_statistics(items[: min(len(items), 200)])

    # ------------------------------------------------------------------ schedule
    def progress(self) -> float:
        """Fraction of the run done: by epochs or by wall-clock time, whichever is further."""
        steps_per_epoch = max(1, math.ceil(len(self.train_set) / self.cfg.training.batch_size))
        p = self.step / (steps_per_epoch * self.cfg.training.max_epochs)
        if self.cfg.training.max_time_min:
            p = max(p, self.elapsed_s / (60.0 * self.cfg.training.max_time_min))
        return min(p, 1.0)

    def lr(self) -> float:
        o = self.cfg.optim
        p = self.progress()
        if o.scheduler == "exponential":
            return o.lr * (o.lr_final / o.lr) ** p
        if o.scheduler == "cosine":
            return o.lr_final + 0.5 * (o.lr - o.lr_final) * (1 + math.cos(math.pi * p))
        if o.scheduler == "plateau":
            return o.lr * self.plateau_scale
        return o.lr

    # ------------------------------------------------------------------ loop
    def train_epoch(self) -> Dict[str, float]:
        self.model.train()
        cfg = self.cfg
        sums: Dict[str, float] = {}
        n = 0
        loader = self.train_set.loader(cfg.training.batch_size, shuffle=True,
                                       generator=self.generator)
        for batch in loader:
            t0 = time.perf_counter()
            batch = batch.to(self.device)
            lr = self.lr()
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            pred = self.model(batch.as_dict(), compute_forces=self.loss_fn.needs_forces,
                              compute_stress=self.loss_fn.needs_stress)
            loss, parts = self.loss_fn(pred, batch, lr / cfg.optim.lr)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"epoch {self.epoch + 1}, step {self.step}: the loss is {float(loss)}; lower "
                    "optim.lr or check the data (last good checkpoint: last.pt)")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.optim.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
            self.optimizer.step()
            if self.ema is not None:
                self.ema.update_parameters(self.model)
            self.step += 1
            n += 1
            sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
            for k, v in parts.items():
                sums["mse_" + k] = sums.get("mse_" + k, 0.0) + v
            self.elapsed_s += time.perf_counter() - t0
            if self.time_is_up():  # stop within a step of the limit, not at the epoch's end
                break
        return {k: v / max(n, 1) for k, v in sums.items()}

    def time_is_up(self) -> bool:
        t = self.cfg.training.max_time_min
        return bool(t) and self.elapsed_s >= 60.0 * t

    def eval_model(self) -> torch.nn.Module:
        return self.ema.module if self.ema is not None else self.model

    def evaluate(self, dataset) -> Dict[str, float]:
        """Metrics and the final-weight loss of the (EMA) model on a dataset."""
        model = self.eval_model()
        model.eval()
        acc = MetricAccumulator()
        total, count = 0.0, 0
        for batch in dataset.loader(self.cfg.training.batch_size):
            batch = batch.to(self.device)
            pred = model(batch.as_dict(), compute_forces=True,
                         compute_stress=batch.stress is not None and bool(batch.pbc.all()))
            loss, _ = self.loss_fn(pred, batch, lr_ratio=0.0)
            total += float(loss.detach()) * batch.num_structures
            count += batch.num_structures
            acc.add(pred, batch)
        out = acc.result()
        out["loss"] = total / max(count, 1)
        return out

    def fit(self, resume: bool = False) -> Dict[str, float]:
        """Train until max_epochs, the time limit or early stopping; returns the last metrics."""
        os.makedirs(self.out_dir, exist_ok=True)
        last = os.path.join(self.out_dir, "last.pt")
        best = os.path.join(self.out_dir, "best.pt")
        for path in (last, best, os.path.join(self.out_dir, "log.csv")):
            remove_stale_temporaries(path)  # left by a kill -9 during a write
        if os.path.exists(os.path.join(self.out_dir, "log.csv.tmp")):
            os.remove(os.path.join(self.out_dir, "log.csv.tmp"))
        if resume:
            if not os.path.exists(last):
                raise ConfigError(f"--resume: no checkpoint {last} to resume from")
            self.load_state(read_checkpoint(last))
            self._check_best(best)
        elif os.path.exists(last):
            raise ConfigError(f"{self.out_dir} already holds a run (last.pt); use --resume to "
                              "continue it, or choose another training.out_dir")
        self._write_config()
        if self.cfg.training.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb_writer = SummaryWriter(os.path.join(self.out_dir, "tensorboard"))
        bar = _progress_bar(self.cfg, self.progress())
        metrics: Dict[str, float] = {}
        while not self.done():
            train_metrics = self.train_epoch()
            self.epoch += 1
            if self.epoch % self.cfg.training.eval_every == 0 or self.done():
                metrics = self.after_validation(train_metrics)
            if bar is not None:  # progress in % of the run (epochs or wall time), with ETA
                bar.n = round(100 * self.progress(), 1)
                bar.set_postfix_str(f"epoch {self.epoch} " + _short(metrics))
        if bar is not None:
            bar.close()
        if self.tb_writer is not None:
            self.tb_writer.close()
        if not os.path.exists(best):  # no validation improved since a broken pair was found
            warnings.warn(f"{best}: no validation wrote it in this run; it holds the last "
                          "weights", stacklevel=2)
            write_checkpoint(self.state_dict(), best)
        return metrics

    def _check_best(self, best: str) -> None:
        """On resume: does best.pt hold the best that last.pt records? A pair written by the
        present code always agrees (best.pt is written first; if it is newer than last.pt, the
        replayed epoch rewrites it). Older mlpot wrote last.pt first, so a kill between the
        writes left best.pt missing or stale for good: then the best weights are lost, and the
        best is tracked afresh so that the next validation writes best.pt."""
        if not math.isfinite(self.best_val):
            return
        why = None
        if file_kind(best) != "checkpoint":
            why = "is missing or unreadable"
        else:
            held = read_checkpoint(best)
            newer = int(held.get("step", -1)) > self.step
            if not newer and held.get("best_val") != self.best_val:
                why = (f"holds a validation loss of {held.get('best_val')} while last.pt records "
                       f"a best of {self.best_val}")
        if why:
            warnings.warn(f"{best} {why} (a kill between the checkpoint writes of an older "
                          "mlpot); the best weights are lost: best.pt will hold the best of the "
                          "validations from now on", stacklevel=3)
            self.best_val = math.inf
            self.best_step = -1

    def done(self) -> bool:
        t = self.cfg.training
        if self.epoch >= t.max_epochs:
            return True
        if self.time_is_up():
            return True
        return bool(t.early_stopping_patience) and self.epochs_since_best >= t.early_stopping_patience

    def after_validation(self, train_metrics: Dict[str, float]) -> Dict[str, float]:
        val = self.evaluate(self.val_set)
        row = {"epoch": self.epoch, "step": self.step, "time_s": round(self.elapsed_s, 3),
               "lr": self.lr(), **{"train_" + k: v for k, v in train_metrics.items()},
               **{"val_" + k: v for k, v in val.items()}}
        self.history.append(row)
        better = val["loss"] < self.best_val
        if better:
            self.best_val = val["loss"]
            self.best_step = self.step
            self.epochs_since_best = 0
        else:
            self.epochs_since_best += self.cfg.training.eval_every
            if self.cfg.optim.scheduler == "plateau" and \
                    self.epochs_since_best % self.cfg.optim.plateau_patience == 0:
                self.plateau_scale *= self.cfg.optim.plateau_factor
        self._write_log()
        if self.tb_writer is not None:
            for key, value in row.items():
                if key not in ("epoch", "step") and isinstance(value, float):
                    self.tb_writer.add_scalar(key, value, self.step)
            self.tb_writer.flush()
        state = self.state_dict()
        if better:  # best first: last.pt must never record a best that best.pt lacks
            write_checkpoint(state, os.path.join(self.out_dir, "best.pt"))
        _kill_point("between-best-and-last")
        write_checkpoint(state, os.path.join(self.out_dir, "last.pt"))
        return row

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict:
        return checkpoint_dict(
            self.model, ema=None if self.ema is None else self.ema.module.state_dict(),
            data_hash=self.data.data_hash,
            ema_state=None if self.ema is None else self.ema.state_dict(),
            optimizer=self.optimizer.state_dict(), train_config=self.cfg.to_dict(),
            epoch=self.epoch, step=self.step, elapsed_s=self.elapsed_s,
            best_val=self.best_val, best_step=self.best_step,
            epochs_since_best=self.epochs_since_best, plateau_scale=self.plateau_scale,
            history=self.history, rng=_rng_state(self.generator))

    def load_state(self, state: Dict) -> None:
        if state["config"] != self.model.config:
            old, new = _flat(state["config"]), _flat(self.model.config)
            diff = {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
                    if old.get(k) != new.get(k)}
            raise ConfigError("--resume: the checkpoint's model differs from the config's "
                              f"(key: (checkpoint, config) = {diff}); resume with the same config")
        self.model.load_state_dict(state["model"])
        if self.ema is not None and state.get("ema_state") is not None:
            self.ema.load_state_dict(state["ema_state"])
        self.optimizer.load_state_dict(state["optimizer"])
        for key in ("epoch", "step", "elapsed_s", "best_val", "epochs_since_best",
                    "plateau_scale", "history"):
            setattr(self, key, state[key])
        self.best_step = int(state.get("best_step", -1))
        _set_rng_state(state["rng"], self.generator)

    def _write_config(self) -> None:
        import yaml

        with open(os.path.join(self.out_dir, "config.yaml"), "w") as f:
            yaml.safe_dump(self.cfg.to_dict(), f, sort_keys=False)

    def _write_log(self) -> None:
        path = os.path.join(self.out_dir, "log.csv")
        keys: List[str] = []
        for row in self.history:
            keys += [k for k in row if k not in keys]
        tmp = path + ".tmp"
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(self.history)
        os.replace(tmp, path)


def _make_optimizer(model, cfg: Config) -> torch.optim.Optimizer:
    o = cfg.optim
    cls = torch.optim.AdamW if o.optimizer == "adamw" else torch.optim.Adam
    return cls(model.parameters(), lr=o.lr, weight_decay=o.weight_decay)


def _flat(d: Dict, prefix: str = "") -> Dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, prefix + k + "."))
        else:
            out[prefix + k] = v
    return out


def _ema_avg_fn(decay: float):
    """Exponential moving average with warm-up: the decay is min(decay, (1 + n) / (10 + n)) after
    n updates, so early weights are not dragged towards the random initialisation. Integer
    buffers are copied: averaging 3 with 3 in floating point can give 2.999..., stored as 2."""

    def avg(averaged: torch.Tensor, current: torch.Tensor, num_averaged) -> torch.Tensor:
        if not averaged.is_floating_point():  # index buffers (e3nn paths): copied, never mixed
            return current
        n = int(num_averaged)
        d = min(decay, (1.0 + n) / (10.0 + n))
        return averaged * d + current * (1.0 - d)

    return avg


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rng_state(generator: torch.Generator) -> Dict:
    """Every random stream as plain data (tensors, numbers, tuples): readable with
    ``weights_only=True``. numpy's Mersenne-Twister key becomes an int64 tensor."""
    name, key, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "numpy": [name, torch.from_numpy(key.astype(np.int64)), pos, has_gauss, gauss],
            "python": random.getstate(), "loader": generator.get_state()}


def _set_rng_state(state: Dict, generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    name, key, pos, has_gauss, gauss = state["numpy"]  # version 1 held key as a numpy array
    key = key.numpy() if isinstance(key, torch.Tensor) else np.asarray(key)
    np.random.set_state((name, key.astype(np.uint32), int(pos), int(has_gauss), float(gauss)))
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    generator.set_state(state["loader"])


def _kill_point(name: str) -> None:
    """Test hook: ``MLPOT_TEST_KILL_AT=<name>`` ends the process here as ``kill -9`` would."""
    if os.environ.get("MLPOT_TEST_KILL_AT") == name:
        os._exit(137)


def _progress_bar(cfg: Config, start: float):
    if not cfg.training.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=100, initial=round(100 * start, 1), unit="%", desc="training",
                dynamic_ncols=True, bar_format="{l_bar}{bar}| {n:.0f}% [{elapsed}<{remaining}{postfix}]")


def _short(m: Dict[str, float]) -> str:
    parts = []
    if "val_energy_rmse_meV_per_atom" in m:
        parts.append(f"E {m['val_energy_rmse_meV_per_atom']:.2f} meV/atom")
    if "val_forces_rmse_meV_per_A" in m:
        parts.append(f"F {m['val_forces_rmse_meV_per_A']:.1f} meV/A")
    return ", ".join(parts)


def train(cfg: Config, resume: bool = False) -> Dict[str, float]:
    """Train as ``cfg`` says; writes checkpoints, log.csv, metrics.json and plots to out_dir."""
    trainer = Trainer(cfg)
    trainer.fit(resume=resume)
    return finalize(trainer)


def finalize(trainer: Trainer) -> Dict[str, float]:
    """Metrics of the best checkpoint on validation (and test), written to metrics.json, and the
    learning-curve and parity plots."""
    from .plots import learning_curve, parity_plot

    best = read_checkpoint(os.path.join(trainer.out_dir, "best.pt"))
    trainer.eval_model().load_state_dict(weights_of(best))
    results = {"validation": trainer.evaluate(trainer.val_set)}
    if trainer.data.test:
        test_set = AtomicDataset(trainer.data.test, trainer.data.type_map, trainer.model.cutoff,
                                 "test")
        results["test"] = trainer.evaluate(test_set)
        parity_plot(trainer.eval_model(), test_set, os.path.join(trainer.out_dir, "parity.png"),
                    trainer.cfg.training.batch_size, trainer.device)
    else:
        parity_plot(trainer.eval_model(), trainer.val_set,
                    os.path.join(trainer.out_dir, "parity.png"), trainer.cfg.training.batch_size,
                    trainer.device)
    results["epochs"] = trainer.epoch
    results["train_time_s"] = trainer.elapsed_s
    with open(os.path.join(trainer.out_dir, "metrics.json"), "w") as f:
        json.dump(results, f, indent=1)
    learning_curve(trainer.history, os.path.join(trainer.out_dir, "learning_curve.png"))
    return results
