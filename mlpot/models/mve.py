"""Cheap single-model uncertainty: a Potential with a small second network that predicts the size
of its own force error (mean-variance estimation, trained with a Gaussian negative log-likelihood).

Why this method. A committee's force deviation needs one backward pass per member; so does a
"shallow ensemble" of several readout heads on one body, because each head's forces need their
own backward pass through the whole body (the expensive part), so neither stays within 1.3x of a
single model in MD. Mean-variance estimation (Nix and Weigend, ICNN 1994; for interatomic
potentials compared with ensembles by Tan, Urata, Goldman, Dietschreit and Gomez-Bombarelli,
npj Comput. Mater. 9, 225 (2023)) predicts the variance directly, so it needs a forward pass of
the variance network and no backward pass at all. Here the variance network is a separate,
small network of any mlpot family (default: a small Deep Potential, a one-layer local model:
cheap, and unfamiliar local environments are what it has to notice), evaluated on the same
neighbor list as the model.

Outputs, with the committee's names and units so that every engine, the trust levels and
``--stop-uncertainty`` take either (``mlpot.uncertainty`` for the committee's definitions):

* ``forces_dev`` [N] (eV/A): s_i = softplus(sigma_net_i) * u, the predicted norm of atom i's
  force error (the force error's three Cartesian components are taken as independent Gaussians
  of standard deviation s_i / sqrt(3), so s_i is on the same footing as a committee's
  norm of the per-atom standard deviation); u is the model's force scale (``energy_scale``, the
  force RMS of the training data);
* ``max_force_dev`` [B] (eV/A): the largest s_i of each structure;
* ``energy_dev`` [B] (eV/atom): sqrt(sum_i (a_{t_i} s_i)^2) / N, with one learned length a_t
  (A) per element turning an atom's force uncertainty into an energy uncertainty (the atoms'
  energy errors taken as independent);
* ``<name>_calibrated``: times the calibration factor fitted on the validation split, as for a
  committee. There is no ``virial_dev`` and there are no members.

Training (``model.uncertainty: mve``): the loss adds w_nll times the Gaussian negative
log-likelihood of the mean model's errors, which are detached, so the mean model trains exactly
as without the variance network and the variance network learns only from the errors:

    per atom:      3 log s_i + (3 / 2) |F_pred,i - F_ref,i|^2 / s_i^2
    per structure: log sigma_E + (E_pred - E_ref)^2 / (2 sigma_E^2),  sigma_E = N * energy_dev

(constants dropped; the force term averaged over atoms, the energy term over structures).
Errors on training frames are smaller than on new ones, so the raw s_i is an optimistic
estimate; the calibration factor fitted on the validation split corrects its overall scale.
"""
from __future__ import annotations

import json
from typing import Dict, List

import torch
from torch import nn

from .. import keys as K
from ..neighbors import pair_vectors
from ..neighbors.module import NeighborList, SharedNeighbors
from ..uncertainty import calibrated
from .potential import Potential, fit_network_statistics

MVE = "mve"

#: The variance network when the config names none: a small Deep Potential.
DEFAULT_SIGMA_NET = {"name": "dp_se_e2_a",
                     "hparams": {"embedding": [8, 16], "axis_neuron": 4, "fitting": [32, 32]}}


class MVEPotential(SharedNeighbors):
    """A Potential (``potential``: energy, forces, stress) and a variance network
    (``sigma_net``: a network of any family, one value per atom) on one neighbor list."""
    __jit_unused_properties__ = ["config", "energy_scale"]

    def __init__(self, potential: Potential, sigma_net: nn.Module, sigma_config: Dict,
                 calibration: float = 1.0):
        super().__init__()
        self.potential = potential
        self.sigma_net = sigma_net.to(potential.model_dtype)
        self.type_map = list(potential.type_map)
        self.cutoff = float(potential.cutoff)
        self.model_dtype = potential.model_dtype
        self.neighbor_list = NeighborList(self.cutoff)
        n_types = len(self.type_map)
        # a_t = softplus(raw) A, starting near 0.5 A
        self.energy_length_raw = nn.Parameter(torch.full((n_types,), -0.43, dtype=torch.float64))
        self.register_buffer("calibration", torch.tensor(float(calibration), dtype=torch.float64))
        self.config_json = json.dumps({"model": MVE, "potential": potential.config,
                                       "sigma_net": dict(sigma_config),
                                       "type_map": self.type_map, "cutoff": self.cutoff,
                                       "dtype": potential.config.get("dtype", "float32")},
                                      sort_keys=True)

    @property
    def config(self) -> Dict:
        return json.loads(self.config_json)

    @property
    def energy_scale(self) -> torch.Tensor:
        """The mean model's energy scale (the trainer fills it with the force RMS)."""
        return self.potential.energy_scale

    def forward(self, data: Dict[str, torch.Tensor], compute_forces: bool = True,
                compute_stress: bool = False) -> Dict[str, torch.Tensor]:
        n_struct = data[K.CELL].shape[0]
        inputs, batch = self.shared_inputs(data)  # the neighbor list once for both networks
        out = self.potential(inputs, compute_forces, compute_stress)
        out.update(self.deviations(inputs, batch, n_struct))
        return out

    def deviations(self, inputs: Dict[str, torch.Tensor], batch: torch.Tensor,
                   n_struct: int) -> Dict[str, torch.Tensor]:
        """``forces_dev``, ``max_force_dev``, ``energy_dev`` and their calibrated values from the
        variance network (no gradient to the positions: it is never differentiated)."""
        edge_index = inputs[K.EDGE_INDEX]
        types = inputs[K.ATOM_TYPES]
        vectors = pair_vectors(inputs[K.POSITIONS].detach(), inputs[K.CELL].detach(), batch,
                               edge_index[0], edge_index[1], inputs[K.EDGE_SHIFTS])
        raw = self.sigma_net(types, edge_index, vectors.to(self.model_dtype))  # [N]
        s = nn.functional.softplus(raw.to(torch.float64)) * self.potential.energy_scale \
            + 1e-6  # [N] eV/A; the floor keeps the likelihood finite
        max_dev = torch.zeros(n_struct, dtype=torch.float64, device=s.device)
        max_dev = max_dev.scatter_reduce(0, batch, s, reduce="amax", include_self=True)
        length = nn.functional.softplus(self.energy_length_raw).index_select(0, types)  # [N] A
        var_e = torch.zeros(n_struct, dtype=torch.float64, device=s.device)
        var_e = var_e.index_add(0, batch, (length * s).pow(2))
        atoms = torch.zeros(n_struct, dtype=torch.float64, device=s.device).index_add(
            0, batch, torch.ones_like(s)).clamp(min=1.0)  # [B] (not bincount: see committee)
        dev = {K.FORCES_DEV: s, K.MAX_FORCE_DEV: max_dev, K.ENERGY_DEV: var_e.sqrt() / atoms}
        dev.update(calibrated(dev, float(self.calibration)))
        return dev

    # ------------------------------------------------------------------ python-side helpers
    @torch.jit.unused
    def parameter_groups(self) -> List[List[nn.Parameter]]:
        """The mean model's parameters and the variance part's, clipped apart in training so
        that the mean model's steps do not depend on the variance network."""
        mean = list(self.potential.parameters())
        ids = {id(p) for p in mean}
        return [mean, [p for p in self.parameters() if id(p) not in ids]]

    @torch.jit.unused
    def set_reference_energies(self, energies: torch.Tensor) -> None:
        self.potential.set_reference_energies(energies)

    @torch.jit.unused
    def fit_statistics(self, structures) -> None:
        """Both networks' data statistics (the variance network as a Potential would)."""
        self.potential.fit_statistics(structures)
        fit_network_statistics(self.sigma_net, structures, self.cutoff, self.model_dtype)

    @torch.jit.unused
    def set_calibration(self, factor: float) -> None:
        """The factor applied to the ``*_calibrated`` outputs (fitted on validation data)."""
        if not factor > 0 or factor != factor or factor == float("inf"):
            raise ValueError(f"the calibration factor must be a finite number > 0, got {factor}")
        self.calibration.fill_(float(factor))

    def __deepcopy__(self, memo):
        """A copy rebuilt from the config (see ``Potential.__deepcopy__``)."""
        new = mve_from_config(self.config)
        new.load_state_dict(self.state_dict())
        for p_new, p_old in zip(new.parameters(), self.parameters()):
            p_new.requires_grad_(p_old.requires_grad)
        memo[id(self)] = new
        return new.to(self.calibration.device).train(self.training)


def sigma_network(spec: Dict, num_types: int, cutoff: float) -> nn.Module:
    """The variance network of a spec ``{"name": family, "hparams": {...}}`` (checked as a
    model config is; ValueError with one line otherwise)."""
    from . import check_hparams, network_class

    if not isinstance(spec, dict) or set(spec) - {"name", "hparams"} or "name" not in spec:
        raise ValueError(f"model.uncertainty_net = {spec!r}: must be a mapping with 'name' (a "
                         "model family) and optionally 'hparams'")
    hp = check_hparams(spec["name"], dict(spec.get("hparams") or {}), cutoff)
    return network_class(spec["name"])(num_types=num_types, cutoff=cutoff, **hp)


def resolved_sigma_spec(spec) -> Dict:
    """The variance network's spec with every hyperparameter filled in (as stored)."""
    from . import check_hparams

    spec = dict(DEFAULT_SIGMA_NET if spec is None else spec)
    return {"name": spec["name"],
            "hparams": check_hparams(spec["name"], dict(spec.get("hparams") or {}))}


def build_mve(potential: Potential, spec=None) -> MVEPotential:
    """An MVEPotential around ``potential`` with a new variance network (``spec`` as
    ``model.uncertainty_net``; None: ``DEFAULT_SIGMA_NET``)."""
    full = resolved_sigma_spec(spec)
    net = sigma_network(full, len(potential.type_map), potential.cutoff)
    return MVEPotential(potential, net, full)


def mve_from_config(config: Dict) -> MVEPotential:
    """Rebuild an MVEPotential (untrained weights, calibration 1) from its ``config``."""
    from . import from_config

    return build_mve(from_config(config["potential"]), config["sigma_net"])


def gaussian_nll(pred: Dict[str, torch.Tensor], forces_ref, energy_ref,
                 num_atoms: torch.Tensor, counts=None) -> torch.Tensor:
    """The variance network's loss (module docstring) from the outputs of an MVEPotential and
    the references (NaN where a label is missing; masked). The errors are detached. ``counts``
    (atoms with forces, structures with energies) of a data-parallel global batch: the sums are
    divided by them instead of taking this batch's means."""
    total = pred[K.FORCES_DEV].new_zeros(())
    if forces_ref is not None and K.FORCES in pred:
        ok = torch.isfinite(forces_ref).all(dim=1)
        if bool(ok.any()):
            err2 = (pred[K.FORCES].detach() - forces_ref).to(torch.float64)[ok].pow(2).sum(dim=1)
            s = pred[K.FORCES_DEV][ok]
            terms = 3.0 * torch.log(s) + 1.5 * err2 / s.pow(2)
            total = total + (terms.mean() if counts is None else terms.sum() / counts[0])
    if energy_ref is not None:
        ok = torch.isfinite(energy_ref)
        if bool(ok.any()):
            atoms = num_atoms.to(torch.float64)[ok]
            err = (pred[K.ENERGY].detach() - energy_ref)[ok]
            sigma = pred[K.ENERGY_DEV][ok] * atoms
            terms = torch.log(sigma) + 0.5 * err.pow(2) / sigma.pow(2)
            total = total + (terms.mean() if counts is None else terms.sum() / counts[1])
    return total
