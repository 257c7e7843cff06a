"""AOTInductor packages (``.pt2``): a model compiled to native code, beside the TorchScript file.

``mlpot export CHECKPOINT -o model.pt2`` (``mlpot.export(..., format="aoti")``) writes one
PT2 archive holding the model compiled by AOTInductor (``torch._inductor.aot_compile``, C++ and
a shared library) and, as the archive's extra file ``mlpot.json``, the same metadata as the
TorchScript file plus ``"format": "aoti"``. ``mlpot.load`` reads it back as a ``CompiledModel``,
an ``ExportedModel`` with the same call: ``model(data, compute_forces, compute_stress)``.

What is compiled: the model's ``forward`` with forces and stress (autograd: -dE/dx and the
strain derivative), as one graph with inputs

    positions [N, 3], atom_types [N], cell [B, 3, 3], pbc [B, 3], batch [N], ptr [B + 1],
    local_atoms [1] (LAMMPS's n_local: atoms n_local.. are ghosts; N for none)

and the model's output dict (energy, atomic_energies, forces, virial, stress, and for a
committee or a variance network their members and deviations), for any N and B (torch.export
dynamic dimensions) and any number of neighbor pairs. The package holds one dtype (the model's,
float32 or float64), runs on the CPU, and always computes the stress (a few percent of a call);
the outputs a call did not ask for are dropped, as the TorchScript model does not make them.

How it traces:

* The neighbor list is mlpot's compiled op (``torch.ops.mlpot.neighbor_list``), registered with
  a fake implementation whose output size is data-dependent (``mlpot.neighbors.fake``); the
  package calls the op at run time, so the process that loads it needs the op
  (``mlpot.load`` loads it). The pure-PyTorch neighbor list does not trace: its cell list
  reads sizes from the data (bins, chunk counts) in Python.
* The autograd of forces and stress is traced below autograd first (``make_fx``, as NequIP's
  compiler does), then exported: ``torch.export`` of ``torch.autograd.grad`` itself keeps
  tensors of data-dependent size as constants, which AOTInductor then cannot compile.
* Sums over edges (``index_add``: messages, and the backward of every gather) are compiled as
  ATen sum-scatters: AOTInductor's own CPU code for them adds element by element with an
  atomic compare-and-swap, which took most of the time of a call.
* The Deep Potential compiles with Inductor's ``realize_reads_threshold`` 1 (an intermediate
  read twice is stored, not recomputed inside each reader): its embedding backward otherwise
  fused gathers into a reduction that recomputed them, 24 of 57 ms of a call at 192 atoms;
  measured 2026-12-03 (192 water atoms, 1 thread): 26.0 against 30.2 ms per call (TorchScript
  21.3). No gain for ``egnn`` (13.2 / 12.7 ms) or ``nequip`` (171 / 167 ms), which keep the
  defaults.
* Size-dependent blocking does not trace (a Python loop over a data-dependent number of
  blocks): the traced copy runs one block (``Potential.exporting``, ``chunk_atoms`` 0, the
  ``block_bytes`` of ``egnn`` and ``radial_block_bytes`` of ``nequip`` 0, the Deep Potential's
  traceable path). The memory of a call is then that of the whole system at once (see the
  README: the Deep Potential's [P, 4, M1] products are the largest).

Safety: a ``.pt2`` holds native code, and loading one runs it. Load only files you made or
trust; checkpoints and TorchScript files, by contrast, are read as data.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Dict, Optional, Union

import torch

from . import keys as K
from .export import METADATA_NAME, ExportedModel, ExportError, register_neighbor_op

__all__ = ["FORMAT", "SUFFIX", "CompiledModel", "export_aoti", "load_aoti", "is_aoti_archive",
           "traceable_copy"]

FORMAT = "aoti"
SUFFIX = ".pt2"
# the inputs of the compiled graph, in order
INPUTS = (K.POSITIONS, K.ATOM_TYPES, K.CELL, K.PBC, K.BATCH, K.PTR, K.LOCAL_ATOMS)
# what a call without forces keeps (the TorchScript models make no more); without stress, the
# keys naming the virial or the stress go
_ENERGY_KEYS = (K.ENERGY, K.ATOMIC_ENERGIES, K.ENERGY_MEMBERS)
_BLOCK_ATTRS = ("chunk_atoms", "block_bytes", "radial_block_bytes")  # 0: one block


def is_aoti_archive(path: str) -> bool:
    """Whether ``path`` is a PT2 archive holding an AOTInductor model (from its zip members)."""
    from .checkpoint import file_kind

    return file_kind(path) == "aoti"


class _FlatModel(torch.nn.Module):
    """The model behind flat tensor inputs (``INPUTS``), forces and stress always computed."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, positions, atom_types, cell, pbc, batch, ptr, local_atoms):
        data = dict(zip(INPUTS, (positions, atom_types, cell, pbc, batch, ptr, local_atoms)))
        return self.model(data, True, True)


@contextlib.contextmanager
def _eager_e3nn():
    """e3nn modules built meanwhile call plain Python functions (e3nn scripts some, e.g. the
    spherical harmonics, under torch < 2.10: TorchScript functions do not trace)."""
    try:
        import e3nn
    except ImportError:  # pragma: no cover - e3nn is a dependency
        yield
        return
    saved = e3nn.get_optimization_defaults()["jit_mode"]
    e3nn.set_optimization_defaults(jit_mode="eager")
    try:
        yield
    finally:
        e3nn.set_optimization_defaults(jit_mode=saved)


def traceable_copy(model: torch.nn.Module) -> torch.nn.Module:
    """An eval-mode copy of ``model`` with every size-dependent blocking off and the traceable
    paths on (see the module doc); the weights are the model's, without gradients."""
    import copy

    with _eager_e3nn():
        model = copy.deepcopy(model).eval()  # rebuilt from the config
    for p in model.parameters():
        p.requires_grad_(False)
    for m in model.modules():
        if hasattr(m, "exporting"):
            m.exporting = True
        for name in _BLOCK_ATTRS:
            if isinstance(getattr(m, name, None), int):
                setattr(m, name, 0)
    return model


def _example_inputs(model, dtype: torch.dtype):
    """Four replicas of a small periodic structure, every type present: sizes that differ from
    each other and from the fixed dimensions (3), so that no dimension is taken for another."""
    n_types = len(model.type_map)
    n = max(7, n_types)  # atoms per replica
    replicas = 4
    g = torch.Generator().manual_seed(0)
    side = max(4.0, float(model.cutoff))
    pos = torch.rand(replicas * n, 3, generator=g, dtype=torch.float64) * side
    cell = (torch.eye(3, dtype=torch.float64) * side).expand(replicas, 3, 3).contiguous()
    return (pos.to(dtype), (torch.arange(replicas * n) % n_types),
            cell.to(dtype), torch.ones(replicas, 3, dtype=torch.bool),
            torch.arange(replicas).repeat_interleave(n), torch.arange(replicas + 1) * n,
            torch.tensor([replicas * n]))


def _dynamic_shapes():
    from torch.export import Dim

    atoms = Dim("atoms", min=1)
    structures = Dim("structures", min=1)
    return ({0: atoms}, {0: atoms}, {0: structures}, {0: structures}, {0: atoms},
            {0: structures + 1}, None)


def _trace(model, dtype: torch.dtype):
    """The ExportedProgram of ``model`` behind ``INPUTS`` (see the module doc)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from .neighbors.fake import register_fake

    if register_neighbor_op() is None:
        raise ExportError(
            "the .pt2 export needs mlpot's compiled neighbor-list op, which is not available "
            "here (" + ("MLPOT_NO_EXTENSION is set" if os.environ.get("MLPOT_NO_EXTENSION", "")
                        not in ("", "0") else "`python -m mlpot.neighbors` says why") + "): the "
            "pure-PyTorch neighbor list does not trace. Build the op, or export a TorchScript "
            "file (-o model.pt)")
    register_fake()
    flat = _FlatModel(traceable_copy(model))
    example = _example_inputs(model, dtype)
    try:
        graph = make_fx(flat, tracing_mode="symbolic", _allow_non_fake_inputs=True,
                        _error_on_data_dependent_ops=True)(*example)
        return torch.export.export(graph, example, dynamic_shapes=_dynamic_shapes(),
                                   strict=False)
    except Exception as err:  # noqa: BLE001 - a model torch.export cannot trace
        name = model.config.get("model", type(model).__name__)
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ExportError(
            f"the '{name}' model cannot be exported as a .pt2 with torch {torch.__version__}: "
            f"torch.export stopped at {type(err).__name__}: {first[:300]}. Export a TorchScript "
            "file instead (-o model.pt)") from err


def _index_add_as_scatter(x, dim, index, source, *, alpha=1):
    """index_add as a sum-scatter with the index broadcast to the source's shape (a view)."""
    if alpha != 1:
        source = source * alpha
    shape = [1] * source.dim()
    shape[dim] = -1
    return x.scatter_reduce(dim, index.view(shape).expand_as(source), source, "sum",
                            include_self=True)


@contextlib.contextmanager
def _sums_in_aten():
    """Sums over edges (index_add: the forward messages, the backward of every gather) run by
    ATen's scatter kernel: AOTInductor's own CPU code for them adds element by element with an
    atomic compare-and-swap, the largest part of a call (``benchmarks/pt2_bench.py --profile``),
    while a sum-scatter it hands to ATen (``cpp.fallback_scatter_reduce_sum``). Inductor's
    decomposition table is private: where it is missing, nothing is changed."""
    import torch._inductor.compile_fx as compile_fx

    original = getattr(compile_fx, "select_decomp_table", None)
    if original is None:  # pragma: no cover - another torch
        yield
        return

    def table():
        return {**original(), torch.ops.aten.index_add.default: _index_add_as_scatter}

    compile_fx.select_decomp_table = table
    try:
        yield
    finally:
        compile_fx.select_decomp_table = original


def _family_options(model) -> Dict:
    """Inductor settings measured faster for a model family (module docstring)."""
    from .models.deeppot import DeepPotSeA

    if any(isinstance(m, DeepPotSeA) for m in model.modules()):
        return {"realize_reads_threshold": 1}
    return {}


def export_aoti(model, path: str, info: Dict, check: bool = True,
                inductor_options: Optional[Dict] = None) -> str:
    """Compile ``model`` (a Potential, committee or variance model, in its dtype) into the PT2
    archive ``path`` with ``info`` (``model_metadata``) as its ``mlpot.json``;
    ``inductor_options``: more AOTInductor settings (e.g. kernel profiling for a benchmark)."""
    from torch._inductor import aot_compile
    from torch.export.pt2_archive._package import package_pt2

    from .files import atomic_write

    dtype = model.model_dtype
    program = _trace(model, dtype)
    info = dict(info, format=FORMAT)
    text = json.dumps(info, sort_keys=True, indent=1)
    with tempfile.TemporaryDirectory(prefix="mlpot-aoti-") as tmp:
        options = {"aot_inductor.package": True, "aot_inductor.output_path": tmp,
                   # OpenMP threads taken at run time (torch.set_num_threads), not compile time
                   "cpp.dynamic_threads": True, **_family_options(model),
                   **(inductor_options or {})}
        args, kwargs = program.example_inputs
        with _sums_in_aten():
            files = aot_compile(program.module(check_guards=False), args, kwargs,
                                options=options)

        def write(target: str) -> None:
            with open(target, "wb+") as f:
                package_pt2(f, aoti_files={"model": files}, extra_files={METADATA_NAME: text})

        atomic_write(path, write)
    if check:
        from .export import _self_check

        _self_check(model, load_aoti(path, info), dtype)
    return os.fspath(path)


class CompiledModel(ExportedModel):
    """An AOTInductor package read back: ``module`` is the compiled runner; calls take and give
    the same dicts as a TorchScript ``ExportedModel`` (one dtype, CPU). The package finds its
    own neighbors: ``edge_index`` and ``edge_cell_shift`` in the input (as ``mlpot test``'s
    datasets carry, the same pairs at the same cutoff) are not used."""

    format = FORMAT

    def __call__(self, data: Dict[str, torch.Tensor], compute_forces: bool = True,
                 compute_stress: bool = False) -> Dict[str, torch.Tensor]:
        pos = data[K.POSITIONS].detach().to(self.dtype)
        n_atoms = pos.shape[0]
        cell = data[K.CELL].detach().to(self.dtype)
        n_struct = cell.shape[0]
        batch = data[K.BATCH] if K.BATCH in data \
            else torch.zeros(n_atoms, dtype=torch.long)
        ptr = data[K.PTR] if K.PTR in data else torch.tensor([0, n_atoms])
        if K.LOCAL_ATOMS in data:
            n_local = int(data[K.LOCAL_ATOMS].reshape(-1)[0])
            if n_local < 0 or n_local > n_atoms or n_struct != 1:
                raise ValueError("local_atoms must be a count between 0 and the number of atoms, "
                                 "for one structure")
            local = torch.tensor([n_local])
        else:
            local = torch.tensor([n_atoms])
        out = self.module(pos, data[K.ATOM_TYPES].to(torch.long), cell,
                          data[K.PBC].to(torch.bool), batch.to(torch.long), ptr.to(torch.long),
                          local)
        if not compute_forces:
            return {k: v for k, v in out.items() if k in _ENERGY_KEYS}
        if not compute_stress:
            return {k: v for k, v in out.items()
                    if not (k.startswith(K.VIRIAL) or k.startswith(K.STRESS))}
        return dict(out)

    def to(self, device) -> "CompiledModel":
        if torch.device(device).type != "cpu":
            raise ExportError(f"{self.path or 'this .pt2 model'} is compiled for the CPU; export "
                              f"a TorchScript file (-o model.pt) to run on {device}")
        return self

    def __repr__(self) -> str:
        return "Compiled" + super().__repr__()


def load_aoti(path: str, info: Dict, device: Union[str, torch.device] = "cpu") -> CompiledModel:
    """The package at ``path`` (metadata ``info``, read already) as a ``CompiledModel``. Runs the
    package's native code: only for files you made or trust."""
    from torch._inductor import aoti_load_package

    if torch.device(device).type != "cpu":
        raise ExportError(f"{path} is compiled for the CPU; export a TorchScript file "
                          f"(-o model.pt) to run on {device}")
    if register_neighbor_op() is None:
        raise ExportError(f"{path} calls mlpot's compiled neighbor-list op, which is not "
                          "available in this process: build it (`python -m mlpot.neighbors` "
                          "says why not), or use the model's TorchScript file")
    try:
        runner = aoti_load_package(os.fspath(path))
    except Exception as err:  # noqa: BLE001 - a damaged archive or library fails in many ways
        made = info.get("torch_version", "?")
        here = torch.__version__.split("+")[0]
        hint = (f"; it was compiled with torch {made}, this is torch {here}: export it again "
                "with this torch" if made != here else ", it may be truncated or damaged")
        raise ExportError(f"{path}: the compiled model does not load{hint} "
                          f"({type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]})"
                          ) from err
    return CompiledModel(runner, info, os.fspath(path))
