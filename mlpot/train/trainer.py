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

Committees (``training.ensemble: K`` >= 2): the data are read and the neighbor lists built once
(all members share the same datasets); member k is initialised and shuffles with seed + k (with
``training.bootstrap``, it trains on a bootstrap resample of the training frames drawn with
seed + k); the reference energies and statistics are fitted once on the whole training split and
are the same for every member (also with bootstrap: they are a normalisation of the targets,
not the fitted function, so sharing them keeps the members' disagreement about what they learned
rather than about resampling noise in their baselines). The members train in lockstep: at each
step every member takes its next batch and makes its own optimizer step (own optimizer, own
EMA), so a time limit gives every member the same training. Validation, "best" and early
stopping use the loss of the committee mean (the ``Committee`` of the EMA weights);
``best.pt``/``last.pt`` hold the committee (config ``{"model": "committee", ...}``, weights
``members.<k>.*``), with per-member optimizer, EMA and loader RNG states as lists. After
training, ``finalize`` fits the calibration factor on the validation split
(``MetricAccumulator.calibration_factor``) and stores it in ``best.pt``.

Data-parallel training (``torchrun --nproc-per-node N mlpot train CONFIG.yaml``): each process
trains on its shard of every global batch, DDP averages the gradients, rank 0 decides and writes;
the rules are in ``mlpot.train.distributed``. A committee's members are wrapped each in its own DDP.
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

from .. import keys as K
from ..checkpoint import (checkpoint_dict, file_kind, read_checkpoint, weights_of,
                          write_checkpoint)
from ..data import AtomicDataset
from ..dtypes import usable_device
from ..errors import UserError
from ..files import remove_stale_temporaries
from ..models import atomic_reference_energies, build_model, fit_reference_energies, force_rms
from ..models.committee import Committee
from ..models.mve import build_mve, gaussian_nll
from ..threads import poll_threads, stop_watching
from .config import Config, ConfigError, check_config
from .data import TrainingData, load_training_data
from .distributed import Distributed, ShardedBatches
from .loss import Loss, entry_counts
from .metrics import MetricAccumulator

# Training on energies alone (no force labels, or loss.forces 0) in batches smaller than
# ENERGY_ONLY_MIN_BATCH structures draws a warning that recommends ENERGY_ONLY_BATCH. Measured
# 2026-12-05 on 800 rMD17 ethanol energies (1 thread, 12 minutes, test force MAE): at batch 5 a
# small nequip (8 channels) and the EGNN stay at the mean energy for the whole run (energy
# parity slope 0.00-0.02; one number per structure, and a small batch's mean offset swamps the
# rest), a 32-channel nequip reaches 447 meV/A; at batch 32 nequip 257, EGNN 256 meV/A.
ENERGY_ONLY_MIN_BATCH = 16
# A model trained on energies alone whose validation energy parity slope ends below
# MEAN_ENERGY_SLOPE has stayed near the mean energy: a warning says what helped. Measured
# 2026-12-05 on 800 rMD17 aspirin energies (EGNN, batch 32): at a 5 A cutoff the slope stayed at
# 0.00 for 8,000 steps, at 3 A it reached 0.18 after 6,000 and kept rising.
MEAN_ENERGY_SLOPE = 0.3
ENERGY_ONLY_BATCH = 32


class Trainer:
    def __init__(self, cfg: Config, data: Optional[TrainingData] = None,
                 dist: Optional[Distributed] = None):
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
            stop_watching()  # the config's count holds while training runs
        self.dist = dist if dist is not None else Distributed()
        if self.dist.active and self.loss_fn.needs_hessian:
            raise ConfigError("loss.hessian (Hessian distillation) trains in one process: run "
                              "mlpot train without torchrun, or set loss.hessian: 0")
        self.device = self.dist.device(cfg.training.device)
        mc = cfg.model
        seed, k_members = cfg.training.seed, cfg.training.ensemble
        self.members: List[torch.nn.Module] = []
        for k in range(k_members):  # member k: weights initialised with seed + k
            _seed_everything(seed + k)
            member = build_model(mc.name, self.data.type_map.symbols, mc.cutoff, mc.dtype,
                                 repulsion=mc.repulsion, repulsion_radii=mc.repulsion_radii,
                                 **mc.hparams)
            if mc.uncertainty == "mve":  # the variance network (mlpot.models.mve)
                member = build_mve(member, mc.uncertainty_net)
            self.members.append(member)
        _seed_everything(seed)
        cutoff = self.members[0].cutoff
        # read once, neighbor lists built once: every member trains on these objects
        self.train_set = AtomicDataset(self.data.train, self.data.type_map, cutoff, "training")
        self.val_set = AtomicDataset(self.data.validation, self.data.type_map, cutoff,
                                     "validation")
        self.member_frames: List[Optional[List[int]]] = [
            bootstrap_indices(len(self.train_set), seed + k) if cfg.training.bootstrap else None
            for k in range(k_members)]
        self._fit_statistics()
        for m in self.members:
            m.to(self.device)
        # what a training step calls: DDP around each member (rank 0's weights broadcast now)
        self.step_models = [self.dist.wrap(m, self.device) for m in self.members]
        # K = 1: the Potential itself (checkpoint layout as before); K >= 2: the Committee
        self.model = self.members[0] if k_members == 1 else \
            Committee(self.members).to(self.device)
        self.optimizers = [_make_optimizer(m, cfg) for m in self.members]
        self.emas: Optional[List[AveragedModel]] = None
        if cfg.optim.ema_decay > 0:
            self.emas = [AveragedModel(m, avg_fn=_ema_avg_fn(cfg.optim.ema_decay),
                                       use_buffers=True) for m in self.members]
        self.generators = [torch.Generator().manual_seed(seed + k) for k in range(k_members)]
        self.optimizer = self.optimizers[0]
        self.ema = None if self.emas is None else self.emas[0]
        self.generator = self.generators[0]
        self._eval_committee = None
        if k_members > 1 and self.emas is not None:
            self._eval_committee = Committee([e.module for e in self.emas]).to(self.device)
        self.epoch = 0
        self.step = 0
        self.elapsed_s = 0.0
        self._frame_counts: Optional[torch.Tensor] = None  # see global_counts
        self.best_val = math.inf
        self.best_step = -1  # the step whose weights best.pt holds
        self.epochs_since_best = 0
        self.plateau_scale = 1.0
        self.history: List[Dict[str, float]] = []
        self.tb_writer = None  # a TensorBoard SummaryWriter with training.tensorboard
        self.out_dir = cfg.training.out_dir

    # ------------------------------------------------------------------ set-up
    @property
    def committee_size(self) -> int:
        return len(self.members)

    @property
    def mve(self) -> bool:
        """A single model with a variance network (``model.uncertainty: mve``)."""
        return self.cfg.model.uncertainty == "mve"

    def _fit_statistics(self) -> None:
        """Reference energies, energy scale and network statistics from the training split,
        fitted once and given to every member."""
        items = self.train_set.items
        base = getattr(self.members[0], "potential", self.members[0])  # mve wraps a Potential
        # E0 fitted to the labels minus the repulsion prior (zero at bonded distances)
        e0 = fit_reference_energies(items, len(self.data.type_map),
                                    offsets=base.prior_energies(items))
        if self.loss_fn.needs_atomic_energies and base.repulsion is None:
            # a teacher's atomic energies pin each element's share, which the totals of a
            # fixed composition leave open: start from the teacher's split
            e0 = atomic_reference_energies(items, len(self.data.type_map), e0)
        scale = force_rms(items) if any(s.forces is not None for s in items) else 1.0
        for m in self.members:  # the same deterministic statistics from the same frames
            m.set_reference_energies(e0)
            m.energy_scale.fill_(max(scale, 1e-3))
            m.fit_statistics(items[: min(len(items), 200)])

    @property
    def energies_only(self) -> bool:
        """The model learns from energies alone (no force labels, or loss.forces 0)."""
        return not (self.loss_fn.needs_forces
                    and any(s.forces is not None for s in self.train_set.items))

    def _warn_energy_only_batch(self) -> None:
        """A warning when the model learns from energies alone in batches smaller than
        ENERGY_ONLY_MIN_BATCH structures (see there)."""
        batch = self.cfg.training.batch_size * self.dist.world_size
        if self.energies_only and batch < ENERGY_ONLY_MIN_BATCH:
            warnings.warn(f"training on energies alone in batches of {batch} structures: small "
                          "batches often leave the model at the mean energy (validation energy "
                          f"slope near 0); use training.batch_size {ENERGY_ONLY_BATCH} or more",
                          stacklevel=2)

    def member_batches(self, k: int) -> ShardedBatches:
        """Member k's frame indices per step over the shared training set (or its bootstrap
        resample), shuffled by its generator; this process's shard when data-parallel."""
        frames = self.member_frames[k]
        return ShardedBatches(range(len(self.train_set)) if frames is None else frames,
                              self.cfg.training.batch_size, self.dist.world_size,
                              self.dist.rank, self.generators[k])

    def member_loader(self, k: int):
        """Member k's batches for one epoch (see ``member_batches``), each with the label counts
        of its whole global batch (data-parallel; see ``global_counts``)."""
        from ..data import AtomicData

        for frames, global_frames in self.member_batches(k).with_global():
            yield AtomicData.collate([self.train_set[i] for i in frames]), \
                self.global_counts(global_frames) if self.dist.active else None

    def global_counts(self, frames: List[int]) -> torch.Tensor:
        """``entry_counts`` of the global batch made of these training frames [4]: the sum of
        every process's batch counts, from per-frame counts that every process holds (all of
        them read the whole training set), so no step waits on a collective for them."""
        if self._frame_counts is None:
            self._frame_counts = torch.stack([entry_counts(s) for s in self.train_set.items])
        return self._frame_counts[torch.tensor(frames, dtype=torch.long)].sum(0)

    # ------------------------------------------------------------------ schedule
    def progress(self) -> float:
        """Fraction of the run done: by epochs or by wall-clock time, whichever is further."""
        if not hasattr(self, "_steps_per_epoch"):  # the same for every member and epoch
            self._steps_per_epoch = max(1, self.member_batches(0).global_batches())
        steps_per_epoch = self._steps_per_epoch
        total = steps_per_epoch * self.cfg.training.max_epochs
        if self.cfg.training.max_steps:
            total = min(total, self.cfg.training.max_steps)
        p = self.step / total
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
        """One epoch; a committee's members step in lockstep (each its own next batch and
        optimizer step per step). Training losses are averaged over steps and members."""
        for m in self.members:
            m.train()
        cfg = self.cfg
        sums: Dict[str, float] = {}
        n = 0
        loaders = [self.member_loader(k) for k in range(self.committee_size)]
        world = self.dist.world_size
        # largest |force| each member predicted this epoch, and the largest reference |force|
        # (kept on the device: no synchronisation per step); see _check_forces_alive
        f_max = [torch.zeros((), device=self.device) for _ in range(self.committee_size)]
        f_ref_max = torch.zeros((), device=self.device)
        for step_batches in zip(*loaders):
            poll_threads()  # fewer threads while another process takes a core (mlpot.threads)
            t0 = time.perf_counter()
            lr = self.lr()
            batches = [b for b, _ in step_batches]
            counts = None
            if self.dist.active:  # the global batch's label counts, per member [K, 3]
                counts = torch.stack([c for _, c in step_batches])
            for k, batch in enumerate(batches):
                batch = batch.to(self.device)
                model, optimizer = self.step_models[k], self.optimizers[k]
                for group in optimizer.param_groups:
                    group["lr"] = lr
                inputs, positions = batch.as_dict(), None
                if self.loss_fn.needs_hessian and batch.hessian is not None:
                    # the Hessian term differentiates the forces again w.r.t. these positions
                    positions = inputs[K.POSITIONS].detach().requires_grad_(True)
                    inputs[K.POSITIONS] = positions
                pred = model(inputs, compute_forces=self.loss_fn.needs_forces
                             or positions is not None, compute_stress=self.loss_fn.needs_stress)
                loss, parts = self.loss_fn(pred, batch, lr / cfg.optim.lr,
                                           counts=None if counts is None else counts[k],
                                           positions=positions)
                if self.mve:  # the variance network's likelihood of the (detached) errors
                    nll = gaussian_nll(pred, batch.forces, batch.energy, batch.num_atoms,
                                       None if counts is None else
                                       (float(counts[k][1]) / 3.0, float(counts[k][0])))
                    loss = loss + cfg.loss.nll * nll
                    sums["nll"] = sums.get("nll", 0.0) + float(nll.detach()) / len(batches)
                if batch.forces is not None and K.FORCES in pred:
                    f_max[k] = torch.maximum(f_max[k], pred[K.FORCES].detach().abs().amax())
                    if k == 0:
                        f_ref_max = torch.maximum(
                            f_ref_max, torch.nan_to_num(batch.forces).abs().amax())
                if not torch.isfinite(loss):
                    who = f" (committee member {k})" if self.committee_size > 1 else ""
                    raise FloatingPointError(
                        f"epoch {self.epoch + 1}, step {self.step}{who}: the loss is "
                        f"{float(loss)}; lower optim.lr or check the data (last good "
                        "checkpoint: last.pt)")
                optimizer.zero_grad(set_to_none=True)
                # data-parallel: this process's share of the global loss, times N as DDP
                # averages the gradients over the N processes
                (loss * world if world > 1 else loss).backward()
                member = self.members[k]
                if cfg.optim.grad_clip:  # mve: the mean model's norm alone, as without it
                    groups = member.parameter_groups() if hasattr(member, "parameter_groups") \
                        else [member.parameters()]
                    for group in groups:
                        torch.nn.utils.clip_grad_norm_(group, cfg.optim.grad_clip)
                optimizer.step()
                if self.emas is not None:
                    self.emas[k].update_parameters(member)
                sums["loss"] = sums.get("loss", 0.0) + float(loss.detach()) / len(batches)
                for key, v in parts.items():
                    sums["mse_" + key] = sums.get("mse_" + key, 0.0) + v / len(batches)
            self.step += 1
            n += 1
            self.elapsed_s += time.perf_counter() - t0
            if cfg.training.max_time_min:  # rank 0's clock for every process: the schedule
                self.elapsed_s = self.dist.from_main(self.elapsed_s)  # and time limit agree
            if self.time_is_up() or self.steps_are_done():  # within a step, not at epoch end
                break
        self.elapsed_s = self.dist.from_main(self.elapsed_s)  # (without a time limit: here)
        self._check_forces_alive(f_max, f_ref_max)
        if self.dist.active and sums:  # each process holds its share of the global means
            names = sorted(sums)
            total = self.dist.all_reduce_sum(torch.tensor([sums[k] for k in names],
                                                          dtype=torch.float64))
            sums = {k: float(v) for k, v in zip(names, total)}
        return {k: v / max(n, 1) for k, v in sums.items()}

    def _check_forces_alive(self, f_max: List[torch.Tensor], f_ref_max: torch.Tensor) -> None:
        """Stop a run whose model predicts practically zero forces on every structure of an
        epoch (all below 1e-6 of the largest reference force) while the reference forces are
        not zero: its activations saturated (tanh or sigmoid in their flat tails, most often
        from a learning rate too high at the start), its energy hardly depends on the positions,
        and the gradients that could undo it vanish with the forces. Seen with a Deep Potential
        on mlearn Ni at lr 3e-3 held by a cosine schedule: such a run stayed dead for its whole
        14 minutes (README)."""
        ref = float(f_ref_max)
        if ref == 0.0 or self.epoch == 0:  # from the second epoch: a model whose first epoch
            return  # is one step may start at zero forces (a zero-initialised readout)
        for k, m in enumerate(f_max):
            if float(m) < DEAD_FORCE_FRACTION * ref:
                who = f" of committee member {k}" if self.committee_size > 1 else ""
                lr = self.cfg.optim.lr
                raise TrainingFailed(
                    f"epoch {self.epoch + 1}, step {self.step}: the forces{who} are practically "
                    f"zero on every training structure (largest {float(m):.2g} eV/A, the data's "
                    f"{ref:.3g}): the network's activations saturated, which training does not "
                    f"undo; start a new run with a lower optim.lr (now {lr:g}; try "
                    f"{lr / 3:.2g}) in another training.out_dir")

    def steps_are_done(self) -> bool:
        n = self.cfg.training.max_steps
        return bool(n) and self.step >= n

    def time_is_up(self) -> bool:
        t = self.cfg.training.max_time_min
        return bool(t) and self.elapsed_s >= 60.0 * t

    def eval_model(self) -> torch.nn.Module:
        """The model validated and saved as the weights to use: the EMA weights (of every
        member: a Committee of the EMA modules) when the EMA is on."""
        if self.committee_size > 1:
            return self._eval_committee if self._eval_committee is not None else self.model
        return self.ema.module if self.ema is not None else self.model

    def evaluate(self, dataset) -> Dict[str, float]:
        """Metrics and the final-weight loss of the (EMA) model on a dataset."""
        return self._evaluate(dataset)[0]

    def _evaluate(self, dataset):
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
        return out, acc

    def energy_shift(self) -> Optional[torch.Tensor]:
        """Per-element corrections dE0 [T] (eV) of the reference energies that remove the
        eval model's mean energy residual on the training split: least squares of
        E_ref - E_pred on the element counts, with the small ridge of
        ``fit_reference_energies`` (for a fixed composition, e.g. always 64 O : 128 H, the
        minimum-norm split of one constant). The energy loss is small beside the force loss
        (a 5 meV/atom offset adds 2.5e-5 eV^2 to it, against force terms ~1e-3), so a constant
        offset is learned late; the correction is the least-squares refit of the same linear
        term as at the start (DeePMD-kit's "change bias" does the same after training).
        None without energy labels."""
        model = self.eval_model()
        model.eval()
        preds: List[float] = []
        items = self.train_set.items
        with torch.no_grad():  # in the items' order (no shuffling)
            for batch in self.train_set.loader(self.cfg.training.batch_size):
                batch = batch.to(self.device)
                preds += model(batch.as_dict(), compute_forces=False)[K.ENERGY].tolist()
        if not any(s.energy is not None and bool(torch.isfinite(s.energy).all())
                   for s in items):
            return None
        return fit_reference_energies(items, len(self.data.type_map), offsets=preds)

    def calibrate(self) -> float:
        """Fit the committee's calibration factor on the validation split with the weights it
        holds now: c = sqrt( mean_i |F_pred,i - F_ref,i|^2 / mean_i forces_dev_i^2 ) over the
        validation atoms, so that ``forces_dev_calibrated`` is an RMS-calibrated estimate of
        the per-atom force error. Sets it on the committee and returns it."""
        model = self.eval_model()
        model.set_calibration(1.0)
        _, acc = self._evaluate(self.val_set)
        try:
            factor = acc.calibration_factor()
        except ValueError as err:  # the trained committee stays usable, uncalibrated
            warnings.warn(f"calibration on the validation split: {err}; the factor stays 1",
                          stacklevel=2)
            factor = 1.0
        model.set_calibration(factor)
        self.model.set_calibration(factor)
        return factor

    def fit(self, resume: bool = False) -> Dict[str, float]:
        """Train until max_epochs, max_steps, the time limit or early stopping; returns the last metrics."""
        main = self.dist.is_main
        last = os.path.join(self.out_dir, "last.pt")
        best = os.path.join(self.out_dir, "best.pt")
        if main:
            os.makedirs(self.out_dir, exist_ok=True)
            for path in (last, best, os.path.join(self.out_dir, "log.csv")):
                remove_stale_temporaries(path)  # left by a kill -9 during a write
            if os.path.exists(os.path.join(self.out_dir, "log.csv.tmp")):
                os.remove(os.path.join(self.out_dir, "log.csv.tmp"))
        self.dist.barrier()  # the others read the out_dir only after rank 0 tidied it
        if resume:
            if not os.path.exists(last):
                raise ConfigError(f"--resume: no checkpoint {last} to resume from")
            self.load_state(read_checkpoint(last))
            self._check_best(best)
        elif os.path.exists(last):
            raise ConfigError(f"{self.out_dir} already holds a run (last.pt); use --resume to "
                              "continue it, or choose another training.out_dir")
        elif self.cfg.training.init_from:  # on resume, last.pt holds the weights already
            self.init_weights(self.cfg.training.init_from)
        if main and not resume:
            self._warn_energy_only_batch()
        if self.dist.active and main:
            b = self.cfg.training.batch_size
            print(f"data-parallel training: {self.dist.world_size} processes "
                  f"({self.dist.backend}), training.batch_size {b} per process, global batch "
                  f"{b * self.dist.world_size} structures, gradients averaged through "
                  f"{self.dist.averaging}", flush=True)
        if main:
            self._write_config()
        if self.cfg.training.tensorboard and main:
            from torch.utils.tensorboard import SummaryWriter

            self.tb_writer = SummaryWriter(os.path.join(self.out_dir, "tensorboard"))
        bar = _progress_bar(self.cfg, self.progress()) if main else None
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
        if main and not os.path.exists(best):  # no validation improved since a broken pair was found
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
        if self.time_is_up() or self.steps_are_done():
            return True
        return bool(t.early_stopping_patience) and self.epochs_since_best >= t.early_stopping_patience

    def after_validation(self, train_metrics: Dict[str, float]) -> Dict[str, float]:
        """Validate, log, track the best, write best.pt (when better) then last.pt. Data-parallel:
        rank 0 validates and writes; the others take its validation loss for the decisions."""
        main = self.dist.is_main
        val = self.evaluate(self.val_set) if main else {"loss": math.nan}
        val["loss"] = self.dist.from_main(val["loss"])
        row = {"epoch": self.epoch, "step": self.step, "time_s": round(self.elapsed_s, 3),
               "lr": self.lr(), **{"train_" + k: v for k, v in train_metrics.items()},
               **{"val_" + k: v for k, v in val.items()}}
        if self.dist.active:
            row["world_size"] = self.dist.world_size
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
        if not main:
            return row
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
        """The checkpoint; for a committee, optimizer, EMA state and loader RNG are per-member
        lists (a single model's layout is unchanged)."""
        single = self.committee_size == 1
        ema_state = None
        if self.emas is not None:
            ema_state = self.emas[0].state_dict() if single else [e.state_dict()
                                                                  for e in self.emas]
        return checkpoint_dict(
            self.model, ema=None if self.emas is None else self.eval_model().state_dict(),
            data_hash=self.data.data_hash, ema_state=ema_state,
            optimizer=self.optimizer.state_dict() if single else [o.state_dict()
                                                                  for o in self.optimizers],
            train_config=self.cfg.to_dict(),
            epoch=self.epoch, step=self.step, elapsed_s=self.elapsed_s,
            best_val=self.best_val, best_step=self.best_step,
            epochs_since_best=self.epochs_since_best, plateau_scale=self.plateau_scale,
            history=self.history, rng=_rng_state(self.generators))

    def init_weights(self, path: str, where: str = "training.init_from") -> None:
        """Start from the weights of another run's checkpoint ``path`` (fine-tuning, and the
        warm start of `mlpot learn`): its EMA weights when it has them go into the model and
        into every member's EMA; the optimizer, the learning-rate schedule and the step count
        start afresh, and the checkpoint's reference energies and scales come with its weights.
        A checkpoint of another model (architecture, cutoff, type map, committee size) is a
        ``ConfigError`` (one line) and changes nothing."""
        state = read_checkpoint(path)
        diff = _config_diff(state["config"], self.model.config)
        if diff:
            raise ConfigError(f"{where} {path}: its model differs from the config's (key: "
                              f"(checkpoint, config) = {diff}); give a checkpoint of the same "
                              "model, or change the model section to match it")
        weights = weights_of(state)
        self.model.load_state_dict(weights)
        if self.emas is not None:
            single = self.committee_size == 1
            for k, ema in enumerate(self.emas):
                pre = "" if single else f"members.{k}."
                ema.module.load_state_dict({n[len(pre):]: v for n, v in weights.items()
                                            if n.startswith(pre)})

    def load_state(self, state: Dict) -> None:
        held = state["config"]
        held_k = len(held.get("members", [])) if held.get("model") == "committee" else 1
        if held_k != self.committee_size:
            what = f"a committee of {held_k}" if held_k > 1 else "a single model"
            raise ConfigError(f"--resume: the checkpoint holds {what} but training.ensemble = "
                              f"{self.committee_size}; resume with training.ensemble: {held_k}")
        diff = _config_diff(state["config"], self.model.config)
        if diff:
            raise ConfigError("--resume: the checkpoint's model differs from the config's "
                              f"(key: (checkpoint, config) = {diff}); resume with the same config")
        self.model.load_state_dict(state["model"])
        single = self.committee_size == 1
        ema_states = state.get("ema_state")
        if self.emas is not None and ema_states is not None:
            for ema, es in zip(self.emas, [ema_states] if single else ema_states):
                ema.load_state_dict(es)
        for opt, os_ in zip(self.optimizers,
                            [state["optimizer"]] if single else state["optimizer"]):
            try:
                opt.load_state_dict(os_)
            except ValueError:  # another parameter list: an older mlpot's model layout
                raise ConfigError(
                    "--resume: the checkpoint's optimizer state does not fit this model's "
                    "parameters (written by an older mlpot whose model had other weights); "
                    "continue from its weights instead: training.init_from: <its last.pt>, "
                    "without --resume") from None
        for key in ("epoch", "step", "elapsed_s", "best_val", "epochs_since_best",
                    "plateau_scale", "history"):
            setattr(self, key, state[key])
        self.best_step = int(state.get("best_step", -1))
        _set_rng_state(state["rng"], self.generators)

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
    """Adam(W) with torch's fused kernel where the device has one (CPU and CUDA): one pass over
    all parameters instead of a few small operations per tensor. A Deep Potential's 2 million
    parameters in 130 tensors took 12 ms per step the other way and 2 ms fused, on one core of a
    2-core machine: a quarter of a 27-atom molecule's training step."""
    o = cfg.optim
    cls = torch.optim.AdamW if o.optimizer == "adamw" else torch.optim.Adam
    params = list(model.parameters())
    try:
        return cls(params, lr=o.lr, weight_decay=o.weight_decay, fused=True)
    except RuntimeError:  # a device or parameter type without the fused kernel
        return cls(params, lr=o.lr, weight_decay=o.weight_decay)


def _config_diff(held: Dict, mine: Dict) -> Dict:
    """The model-config keys (dotted) whose values differ: key -> (held, mine)."""
    old, new = _flat(held), _flat(mine)
    return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k)}


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


def bootstrap_indices(n: int, seed: int) -> List[int]:
    """A bootstrap resample of n training frames (n draws with replacement), from ``seed``
    alone (numpy's PCG64), so a resumed run draws the same frames."""
    return [int(i) for i in np.random.default_rng(seed).integers(0, n, size=n)]


def _rng_state(generators: List[torch.Generator]) -> Dict:
    """Every random stream as plain data (tensors, numbers, tuples): readable with
    ``weights_only=True``. numpy's Mersenne-Twister key becomes an int64 tensor. ``loader``: the
    loader generator's state, a list of them for a committee."""
    name, key, pos, has_gauss, gauss = np.random.get_state()
    loader = generators[0].get_state() if len(generators) == 1 else [g.get_state()
                                                                    for g in generators]
    return {"torch": torch.get_rng_state(),
            "numpy": [name, torch.from_numpy(key.astype(np.int64)), pos, has_gauss, gauss],
            "python": random.getstate(), "loader": loader}


def _set_rng_state(state: Dict, generators: List[torch.Generator]) -> None:
    torch.set_rng_state(state["torch"])
    name, key, pos, has_gauss, gauss = state["numpy"]  # version 1 held key as a numpy array
    key = key.numpy() if isinstance(key, torch.Tensor) else np.asarray(key)
    np.random.set_state((name, key.astype(np.uint32), int(pos), int(has_gauss), float(gauss)))
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    loader = state["loader"]
    for g, st in zip(generators, [loader] if len(generators) == 1 else loader):
        g.set_state(st)


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
    """Train as ``cfg`` says; writes checkpoints, log.csv, metrics.json and plots to out_dir.
    Under torchrun, data-parallel over the processes (``mlpot.train.distributed``); rank 0
    finalizes and returns the metrics, the other processes return an empty dict."""
    dist = Distributed.from_env(cfg.training.device)
    try:
        trainer = Trainer(cfg, dist=dist)
        trainer.fit(resume=resume)
        metrics = finalize(trainer) if dist.is_main else {}
        # all processes leave the group together: a gloo process that tears its group down while
        # a peer is still busy (rank 0 finalizing) can abort at exit ("terminate called ...")
        dist.barrier()
        return metrics
    finally:
        dist.close()


def _shift_reference_energies(state: Dict[str, torch.Tensor], shift: torch.Tensor) -> None:
    """Add ``shift`` [T] to every reference-energy buffer of a state dict (a Potential's, a
    committee's members', a variance-network model's mean)."""
    for key, value in state.items():
        if key.endswith("reference_energies"):
            state[key] = value + shift.to(value.dtype)


# a model whose largest predicted |force| over an epoch stays below this fraction of the data's
# largest has died (Trainer._check_forces_alive)
DEAD_FORCE_FRACTION = 1e-6


class TrainingFailed(UserError, RuntimeError):
    """A run that cannot go on with its settings (the message says which to change). Exit 2."""


def finalize(trainer: Trainer) -> Dict[str, float]:
    """Metrics of the best checkpoint on validation (and test), written to metrics.json, and the
    learning-curve and parity plots."""
    from .plots import learning_curve, parity_plot

    best_path = os.path.join(trainer.out_dir, "best.pt")
    best = read_checkpoint(best_path)
    trainer.eval_model().load_state_dict(weights_of(best))
    results: Dict = {}
    if trainer.cfg.training.energy_shift and not best.get("energy_shift_done"):
        shift = trainer.energy_shift()
        if shift is not None:
            for key in ("model", "ema"):
                if best.get(key) is not None:
                    _shift_reference_energies(best[key], shift)
            best["energy_shift_done"] = True
            write_checkpoint(best, best_path)
            trainer.eval_model().load_state_dict(weights_of(best))
            results["energy_shift_eV"] = [float(x) for x in shift]
    if trainer.committee_size > 1 or trainer.mve:  # the calibration factor, stored in best.pt
        factor = trainer.calibrate()
        for key in ("model", "ema"):
            if best.get(key) is not None:
                best[key]["calibration"] = torch.tensor(factor, dtype=torch.float64)
        best["calibration"] = factor
        write_checkpoint(best, best_path)
        if trainer.mve:
            results["uncertainty"] = "mve"
        else:
            results["committee"] = trainer.committee_size
        results["calibration_factor"] = factor
    results["validation"] = trainer.evaluate(trainer.val_set)
    slope = results["validation"].get("energy_slope")
    if trainer.energies_only and slope is not None and slope < MEAN_ENERGY_SLOPE:
        warnings.warn(f"trained on energies alone, the model stayed near the mean energy "
                      f"(validation parity slope {slope:.2f}; 1 is a fit): train longer, in "
                      f"batches of {ENERGY_ONLY_BATCH} or more, or with a shorter model.cutoff "
                      "(on a 21-atom molecule 3 A learned where 5 A did not)", stacklevel=2)
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
    results["world_size"] = trainer.dist.world_size
    results["epochs"] = trainer.epoch
    results["steps"] = trainer.step
    results["train_time_s"] = trainer.elapsed_s
    with open(os.path.join(trainer.out_dir, "metrics.json"), "w") as f:
        json.dump(results, f, indent=1)
    learning_curve(trainer.history, os.path.join(trainer.out_dir, "learning_curve.png"))
    return results
