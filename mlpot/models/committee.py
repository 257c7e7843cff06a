"""A committee (ensemble) of Potentials: one model whose outputs are the members' mean plus their
disagreement.

Every member shares the type map, cutoff and precision; the neighbor list is built once per call
and handed to each member. Outputs (``mlpot.keys``):

* ``energy``, ``forces``, ``atomic_energies``, and with ``compute_stress`` ``virial`` and
  ``stress`` (and ``atomic_virial`` when asked for): the mean over the members (what MD runs on);
* ``energy_members`` [K, B], ``forces_members`` [K, N, 3] (and ``virial_members`` [K, B, 3, 3]);
* the model deviation of ``mlpot.uncertainty`` (DeePMD-kit's definitions): ``forces_dev``,
  ``max_force_dev``, ``energy_dev`` (and ``virial_dev``), raw;
* ``<deviation>_calibrated``: the raw deviation times ``calibration`` (a buffer fitted on
  validation data by the trainer, 1 until then), for users who want an estimate of the error
  rather than the DP-GEN-compatible raw value.

``config`` is ``{"model": "committee", "members": [member configs], ...}``, so
``models.from_config`` rebuilds it and a checkpoint or exported file of a committee needs no
more than a single model's.
"""
from __future__ import annotations

import json
from typing import Dict, List

import torch
from torch import nn

from .. import keys as K
from ..neighbors.module import NeighborList, SharedNeighbors
from ..uncertainty import calibrated, model_deviation

COMMITTEE = "committee"


class Committee(SharedNeighbors):
    __jit_unused_properties__ = ["config"]

    def __init__(self, members: List[nn.Module], calibration: float = 1.0):
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"a committee needs at least 2 members, got {len(members)}")
        first = members[0]
        for k, m in enumerate(members[1:], start=1):
            if list(m.type_map) != list(first.type_map) or float(m.cutoff) != float(first.cutoff) \
                    or m.model_dtype != first.model_dtype:
                raise ValueError(f"committee member {k} differs from member 0 in type map, cutoff "
                                 "or dtype; members must share all three")
        self.members = nn.ModuleList(members)
        self.num_members = len(members)
        self.type_map = list(first.type_map)
        self.cutoff = float(first.cutoff)
        self.model_dtype = first.model_dtype
        self.neighbor_list = NeighborList(self.cutoff)
        self.register_buffer("calibration", torch.tensor(float(calibration), dtype=torch.float64))
        self.config_json = json.dumps(
            {"model": COMMITTEE, "members": [m.config for m in members],
             "type_map": self.type_map, "cutoff": self.cutoff,
             "dtype": first.config.get("dtype", "float32")}, sort_keys=True)

    @property
    def config(self) -> Dict:
        return json.loads(self.config_json)

    def forward(self, data: Dict[str, torch.Tensor], compute_forces: bool = True,
                compute_stress: bool = False) -> Dict[str, torch.Tensor]:
        n_struct = data[K.CELL].shape[0]
        inputs, batch = self.shared_inputs(data)  # the neighbor list once for all members

        energies: List[torch.Tensor] = []
        atomic: List[torch.Tensor] = []
        forces: List[torch.Tensor] = []
        virials: List[torch.Tensor] = []
        stresses: List[torch.Tensor] = []
        atomic_virials: List[torch.Tensor] = []
        for member in self.members:
            out = member(inputs, compute_forces, compute_stress)
            energies.append(out[K.ENERGY])
            atomic.append(out[K.ATOMIC_ENERGIES])
            if compute_forces:
                forces.append(out[K.FORCES])
            if compute_stress:
                virials.append(out[K.VIRIAL])
                stresses.append(out[K.STRESS])
            if K.ATOMIC_VIRIAL in out:
                atomic_virials.append(out[K.ATOMIC_VIRIAL])
        energy_members = torch.stack(energies)  # [K, B]
        res: Dict[str, torch.Tensor] = {
            K.ENERGY: energy_members.mean(dim=0),
            K.ATOMIC_ENERGIES: torch.stack(atomic).mean(dim=0),
            K.ENERGY_MEMBERS: energy_members,
        }
        if compute_forces:
            forces_members = torch.stack(forces)  # [K, N, 3]
            res[K.FORCES] = forces_members.mean(dim=0)
            res[K.FORCES_MEMBERS] = forces_members
            virial_members = torch.stack(virials) if compute_stress else None
            # [B] atoms per structure (not bincount: its size comes from the data, which the
            # .pt2 export cannot trace for one structure)
            num_atoms = torch.zeros(n_struct, dtype=torch.long, device=batch.device) \
                .index_add(0, batch, torch.ones_like(batch))
            dev = model_deviation(energy_members, forces_members, batch, num_atoms,
                                  virial_members)
            res.update(dev)
            res.update(calibrated(dev, float(self.calibration)))
        if compute_stress:
            res[K.VIRIAL_MEMBERS] = torch.stack(virials)
            res[K.VIRIAL] = res[K.VIRIAL_MEMBERS].mean(dim=0)
            res[K.STRESS] = torch.stack(stresses).mean(dim=0)
        if len(atomic_virials) > 0:
            res[K.ATOMIC_VIRIAL] = torch.stack(atomic_virials).mean(dim=0)
        return res

    def set_calibration(self, factor: float) -> None:
        """The factor applied to the ``*_calibrated`` outputs (fitted on validation data)."""
        if not factor > 0 or factor != factor or factor == float("inf"):
            raise ValueError(f"the calibration factor must be a finite number > 0, got {factor}")
        self.calibration.fill_(float(factor))

    def __deepcopy__(self, memo):
        """A copy rebuilt from the members' configs (see ``Potential.__deepcopy__``)."""
        import copy

        new = Committee([copy.deepcopy(m, memo) for m in self.members],
                        float(self.calibration))
        memo[id(self)] = new
        return new.to(self.calibration.device).train(self.training)


def committee_from_config(config: Dict) -> Committee:
    """Rebuild a committee (untrained weights, calibration 1) from its ``config``."""
    from . import from_config

    members = config.get("members")
    if not isinstance(members, list) or len(members) < 2:
        raise ValueError("a committee config needs 'members': a list of at least 2 model configs")
    return Committee([from_config(c) for c in members])
