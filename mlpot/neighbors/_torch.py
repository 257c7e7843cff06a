"""Pure-PyTorch neighbor list: a cell list built from tensor operations.

Same contract as the C++ op ``torch.ops.mlpot.neighbor_list`` (see ``mlpot.neighbors``):
every (i, j, S) with i and j in the same structure and ``|x_j - x_i + S @ cell| < cutoff``,
S zero along non-periodic directions, (i, i, 0) excluded; sorted by i. O(N), vectorized (no
Python loop over atoms), works on any device and compiles with ``torch.jit.script``.

Algorithm (all structures of the batch at once, in float64; Python loops only over chunks):

1. Binning basis per structure: its periodic rows are the cell rows, its non-periodic rows
   unit vectors completing the periodic span (the normal of a slab). Fractional coordinates in
   it: non-periodic ones are shifted/scaled to the atoms' range (at least a cutoff wide), so
   they lie in [0, 1]; periodic ones are wrapped into [0, 1), recording the integer image n_i
   of each atom (x_i = x_wrapped_i + n_i @ cell).
2. Bins: along direction d, nbins_d bins whose perpendicular width (plane spacing / nbins_d)
   is at least cutoff / bins_per_cutoff; their total is capped at a few times the atom count.
   A neighbor lies at most k_d = ceil(cutoff * nbins_d / width_d) bins away, which can be many
   cells when the cell is smaller than the cutoff. Atoms are sorted by bin.
3. Rows: for every non-empty bin A and every offset within +-k, the neighbor bin, wrapped
   periodically (image shift T) or dropped outside a non-periodic range or when empty.
4. Entries: every atom with every row of its bin; the atoms of the row's bin are its
   candidates, expanded with repeat_interleave, filtered by distance (wrapped positions plus
   T @ cell); survivors get S = T + n_i - n_j. Atoms are visited in index order, so the
   output is sorted by i without a sort. Rows, entries and candidates are processed in
   bounded chunks, so temporary memory stays flat for 100k+ atoms.
"""
from typing import List, Tuple

import torch
from torch import Tensor


def _check_inputs(positions: Tensor, cells: Tensor, pbc: Tensor, ptr: Tensor, cutoff: float):
    if positions.dim() != 2 or positions.size(1) != 3:
        raise ValueError(
            "neighbor_list: positions must have shape [N, 3], got " + str(list(positions.shape))
        )
    if not positions.is_floating_point():
        raise ValueError(
            "neighbor_list: positions must be float32 or float64, got " + str(positions.dtype)
        )
    if cells.dim() != 3 or cells.size(1) != 3 or cells.size(2) != 3:
        raise ValueError(
            "neighbor_list: cells must have shape [B, 3, 3], got " + str(list(cells.shape))
        )
    if not cells.is_floating_point():
        raise ValueError("neighbor_list: cells must be a float tensor, got " + str(cells.dtype))
    n_struct = cells.size(0)
    if pbc.dim() != 2 or pbc.size(0) != n_struct or pbc.size(1) != 3:
        raise ValueError(
            "neighbor_list: pbc must have shape [B, 3] = ["
            + str(n_struct)
            + ", 3], got "
            + str(list(pbc.shape))
        )
    if pbc.dtype != torch.bool:
        raise ValueError("neighbor_list: pbc must be a bool tensor, got " + str(pbc.dtype))
    if ptr.dim() != 1 or ptr.size(0) != n_struct + 1:
        raise ValueError(
            "neighbor_list: ptr must have shape [B + 1] = ["
            + str(n_struct + 1)
            + "], got "
            + str(list(ptr.shape))
        )
    if ptr.is_floating_point() or ptr.dtype == torch.bool:
        raise ValueError("neighbor_list: ptr must be an integer tensor, got " + str(ptr.dtype))
    if not (cutoff > 0.0) or cutoff == float("inf"):
        raise ValueError(
            "neighbor_list: cutoff must be a positive finite number, got " + str(cutoff)
        )
    n_atoms = positions.size(0)
    if int(ptr[0].item()) != 0 or int(ptr[-1].item()) != n_atoms:
        raise ValueError(
            "neighbor_list: ptr must start at 0 and end at N = "
            + str(n_atoms)
            + " (number of positions), got ptr[0] = "
            + str(int(ptr[0].item()))
            + ", ptr[-1] = "
            + str(int(ptr[-1].item()))
        )
    if n_struct > 0 and bool((ptr[1:] < ptr[:-1]).any()):
        raise ValueError("neighbor_list: ptr must be non-decreasing")
    if n_atoms > 0 and not bool(torch.isfinite(positions).all()):
        raise ValueError("neighbor_list: positions contain non-finite values (NaN or inf)")


def _cross(a: Tensor, b: Tensor) -> Tensor:
    """Cross product along the last dimension (size 3), elementwise (no BLAS)."""
    a0, a1, a2 = a[..., 0], a[..., 1], a[..., 2]
    b0, b1, b2 = b[..., 0], b[..., 1], b[..., 2]
    return torch.stack([a1 * b2 - a2 * b1, a2 * b0 - a0 * b2, a0 * b1 - a1 * b0], dim=-1)


def _row_times(v: Tensor, m: Tensor) -> Tensor:
    """v @ m for v [K, 3] and m [K, 3, 3], elementwise: small 3x3 products stay off BLAS (and
    off its thread pool), which matters for many small calls."""
    return v[:, 0:1] * m[:, 0] + v[:, 1:2] * m[:, 1] + v[:, 2:3] * m[:, 2]


def _expand(counts: Tensor, total: int) -> Tensor:
    """[0]*counts[0] + [1]*counts[1] + ... (total = counts.sum()); the index form of
    repeat_interleave, much faster than repeat_interleave(values, counts) on CPU."""
    return torch.repeat_interleave(counts, output_size=total)


def _first_above(sorted_values: Tensor, limit: int) -> int:
    """Index of the first element of an ascending 1-D tensor that is > limit."""
    probe = torch.tensor([limit], dtype=sorted_values.dtype, device=sorted_values.device)
    return int(torch.searchsorted(sorted_values, probe, right=True).item())


def _floor_div(a: Tensor, b: Tensor) -> Tensor:
    return torch.div(a, b, rounding_mode="floor")


def neighbor_list_torch(
    positions: Tensor, cells: Tensor, pbc: Tensor, ptr: Tensor, cutoff: float
) -> Tuple[Tensor, Tensor, Tensor]:
    """Neighbor pairs of a batch of structures in pure PyTorch: the arguments, results and
    order of ``mlpot.neighbors.neighbor_list_batch`` (the C++ op's contract), the same pairs."""
    # Chunk sizes: (atom, bin offset) entries and candidate pairs processed at once; they bound
    # the temporary memory (~100 bytes per candidate) whatever the number of atoms.
    return _neighbor_list_chunked(positions, cells, pbc, ptr, cutoff, 1 << 16, 1 << 18)


def _neighbor_list_chunked(
    positions: Tensor,
    cells: Tensor,
    pbc: Tensor,
    ptr: Tensor,
    cutoff: float,
    entry_chunk: int,
    candidate_chunk: int,
) -> Tuple[Tensor, Tensor, Tensor]:
    """``neighbor_list_torch`` with explicit chunk sizes (small ones exercise the chunking)."""
    if entry_chunk < 1 or candidate_chunk < 1:
        raise ValueError("neighbor_list: chunk sizes must be positive")
    # Tuning constants (locals: TorchScript cannot close over module-level floats).
    # Bins per cutoff length: 1 gives bins >= one cutoff wide and 27 neighbor bins; 2 (125
    # smaller bins, ~half the candidate pairs but 5x the rows) measured no faster on a 10k-atom
    # water box and slower on 100k atoms.
    bins_per_cutoff: float = 1.0
    # At most this many bins per atom (plus one) in a structure, so sparse systems stay O(N).
    max_bins_per_atom: int = 2
    # Volume (area for two periodic directions) of the periodic cell vectors over the product
    # of their lengths at or below which a cell is rejected as degenerate (as the C++ op).
    degenerate_tol: float = 1e-10
    # Refuse cutoffs spanning more (atom, bin offset) combinations than this per atom.
    max_offsets: int = 10_000_000

    _check_inputs(positions, cells, pbc, ptr, cutoff)
    device = positions.device
    f64 = torch.float64
    n_atoms = positions.size(0)
    n_struct = cells.size(0)
    ptr = ptr.to(device=device, dtype=torch.long)
    pbc = pbc.to(device)

    # Cells: only periodic rows matter (non-periodic rows may be zero, arbitrary or NaN).
    cell = cells.detach().to(device=device, dtype=f64)
    cell = torch.where(pbc[:, :, None], cell, torch.zeros(1, dtype=f64, device=device))
    if bool((pbc[:, :, None] & ~torch.isfinite(cell)).any()):
        raise ValueError("neighbor_list: a periodic cell vector contains non-finite values")
    norms = torch.linalg.vector_norm(cell, dim=2)  # [B, 3]
    if bool((pbc & (norms <= 0.0)).any()):
        raise ValueError(
            "neighbor_list: degenerate cell: a periodic direction has a zero cell vector"
        )
    unit = cell / torch.where(pbc, norms, torch.ones_like(norms))[:, :, None]
    # Volume (area) of the periodic vectors relative to the product of their lengths; rows of
    # `unit` are zero along non-periodic directions.
    n_periodic = pbc.sum(dim=1)
    cross_vec = (
        _cross(unit[:, 0], unit[:, 1])
        + _cross(unit[:, 0], unit[:, 2])
        + _cross(unit[:, 1], unit[:, 2])
    )  # for a slab: the cross product of its two periodic unit vectors
    rel_volume = torch.where(
        n_periodic == 3,
        (unit[:, 0] * _cross(unit[:, 1], unit[:, 2])).sum(dim=1).abs(),
        torch.where(
            n_periodic == 2,
            torch.linalg.vector_norm(cross_vec, dim=1),
            torch.ones_like(n_periodic, dtype=f64),
        ),
    )
    if bool((rel_volume <= degenerate_tol).any()):
        raise ValueError(
            "neighbor_list: degenerate cell: the periodic cell vectors are linearly dependent "
            "(zero volume/area)"
        )

    empty = torch.zeros(0, dtype=torch.long, device=device)
    if n_atoms == 0:
        return empty, empty, torch.zeros(0, 3, dtype=torch.long, device=device)

    x = positions.detach().to(f64)
    counts_per_struct = ptr[1:] - ptr[:-1]  # [B]
    batch = _expand(counts_per_struct, n_atoms)  # [N] structure of each atom

    # 1. Binning basis: periodic rows are the cell rows, non-periodic rows unit vectors that
    # complete them: the normal of a slab; for one periodic direction u, two unit vectors
    # perpendicular to u and to each other; the Cartesian axes for a molecule.
    eye = torch.eye(3, dtype=f64, device=device)
    u = unit.sum(dim=1)  # [B, 3]: the periodic unit vector when there is exactly one
    axis = eye.index_select(0, torch.argmin(u.abs(), dim=1))  # axis least aligned with u
    perp1 = _cross(u, axis)
    perp1 = perp1 / torch.linalg.vector_norm(perp1, dim=1, keepdim=True).clamp(min=1e-300)
    perp2 = _cross(u, perp1)
    normal = cross_vec / torch.linalg.vector_norm(cross_vec, dim=1, keepdim=True).clamp(min=1e-300)
    zero3 = torch.zeros_like(u)
    n_p = n_periodic[:, None, None]
    candidates = torch.where(
        n_p == 0,
        eye.expand(n_struct, 3, 3),
        torch.where(
            n_p == 1,
            torch.stack([perp1, perp2, zero3], dim=1),
            torch.stack([normal, zero3, zero3], dim=1),
        ),
    )  # [B, 3, 3]: complement vectors, in order
    rank = torch.cumsum((~pbc).to(torch.long), dim=1) - 1  # rank among non-periodic dims
    rank = torch.where(pbc, torch.zeros_like(rank), rank)  # [B, 3]
    comp = torch.gather(candidates, 1, rank[:, :, None].expand(n_struct, 3, 3))
    basis = torch.where(pbc[:, :, None], cell, comp)  # [B, 3, 3] rows
    # inverse by cofactors: column d of basis^-1 is (r_{d+1} x r_{d+2}) / det
    dual = torch.stack(
        [
            _cross(basis[:, 1], basis[:, 2]),
            _cross(basis[:, 2], basis[:, 0]),
            _cross(basis[:, 0], basis[:, 1]),
        ],
        dim=1,
    )  # [B, 3 (d), 3 (xyz)]
    det = (basis[:, 0] * dual[:, 0]).sum(dim=1)
    dual = dual / det[:, None, None]  # frac_d = x . dual[d]
    width = 1.0 / torch.linalg.vector_norm(dual, dim=2)  # [B, 3] plane spacings

    # 2. Fractional coordinates. Non-periodic ones are shifted and scaled to the atoms' range
    # [0, 1] (at least one cutoff wide); periodic ones are wrapped into [0, 1), recording the
    # integer image of each atom: x = x_wrapped + image @ cell.
    frac = _row_times(x, dual.index_select(0, batch).transpose(1, 2))  # [N, 3]
    index3 = batch[:, None].expand(n_atoms, 3)
    lo = torch.zeros(n_struct, 3, dtype=f64, device=device).scatter_reduce(
        0, index3, frac, "amin", include_self=False
    )
    hi = torch.zeros(n_struct, 3, dtype=f64, device=device).scatter_reduce(
        0, index3, frac, "amax", include_self=False
    )
    extent = torch.where(pbc, torch.ones_like(lo), torch.maximum(hi - lo, cutoff / width))
    lo = torch.where(pbc, torch.zeros_like(lo), lo)
    width = width * extent
    frac = (frac - lo.index_select(0, batch)) / extent.index_select(0, batch)
    pbc_atom = pbc.index_select(0, batch)
    image = torch.where(pbc_atom, torch.floor(frac), torch.zeros_like(frac))  # [N, 3]
    frac = frac - image
    x_wrapped = x - _row_times(image, cell.index_select(0, batch))
    image = image.to(torch.long)

    # 3. Bins per direction: perpendicular width >= cutoff / bins_per_cutoff (with a relative
    # margin against rounding), total capped at max_bins_per_atom * atoms + 1.
    cap = (counts_per_struct * max_bins_per_atom + 1).to(f64)  # [B]
    nbins = torch.floor(width * bins_per_cutoff / (cutoff * (1.0 + 1e-9)))
    nbins = torch.minimum(torch.clamp(nbins, min=1.0), cap[:, None])
    for _ in range(64):
        total = nbins.prod(dim=1)
        over = total > cap
        if not bool(over.any()):
            break
        n_free = (nbins > 1.0).sum(dim=1).clamp(min=1).to(f64)
        factor = torch.pow(cap / total, 1.0 / n_free)
        shrunk = torch.clamp(torch.floor(nbins * factor[:, None]), min=1.0)
        # guarantee progress: shrink the largest direction by at least one bin
        largest = nbins == nbins.max(dim=1, keepdim=True).values
        shrunk = torch.where(largest & (shrunk >= nbins), torch.clamp(nbins - 1.0, min=1.0), shrunk)
        nbins = torch.where(over[:, None], shrunk, nbins)
    reach = torch.ceil(cutoff * nbins / width)
    # a non-periodic direction never needs offsets beyond its own bins
    reach = torch.where(pbc, reach, torch.minimum(reach, nbins - 1.0))
    if bool(((2.0 * reach + 1.0).prod(dim=1) > max_offsets).any()):
        raise ValueError(
            "neighbor_list: the cutoff spans more than "
            + str(max_offsets)
            + " bins/periodic images of a cell; the cell is far too small for this cutoff"
        )
    nbins = nbins.to(torch.long)
    reach = reach.to(torch.long)  # [B, 3]

    nbins_atom = nbins.index_select(0, batch)
    cbin = torch.minimum(torch.floor(frac * nbins_atom.to(f64)).to(torch.long), nbins_atom - 1)
    cbin = torch.clamp(cbin, min=0)  # [N, 3]
    bins_per_struct = nbins.prod(dim=1)
    bin_start = torch.cumsum(bins_per_struct, dim=0) - bins_per_struct
    n_bins = int(bins_per_struct.sum().item())
    bin_id = (
        (cbin[:, 0] * nbins_atom[:, 1] + cbin[:, 1]) * nbins_atom[:, 2]
        + cbin[:, 2]
        + bin_start.index_select(0, batch)
    )  # [N] global bin of each atom
    order = torch.sort(bin_id, stable=True)[1]  # atoms in bin order
    bin_count = torch.bincount(bin_id, minlength=n_bins)
    bin_first = torch.cumsum(bin_count, dim=0) - bin_count  # first slot of each bin in `order`
    # wrapped coordinates in bin order, one contiguous tensor per direction
    x_sorted = x_wrapped.index_select(0, order).t().contiguous()  # [3, N]
    x_centre = x_wrapped.t().contiguous()  # [3, N]

    # 4. Bin offsets of each structure: (2k+1)^3 of them, many when the cell is small.
    width_k = 2 * reach + 1  # [B, 3]
    n_offsets = width_k.prod(dim=1)  # [B]

    # 5. Rows: (non-empty bin A, offset) -> non-empty neighbor bin (first slot, count), image
    # shift T and T @ cell. Rows are grouped by A, offsets in a fixed order.
    bin_struct = _expand(bins_per_struct, n_bins)
    nonempty = torch.nonzero(bin_count > 0).squeeze(1)  # [M]
    n_nonempty = nonempty.size(0)
    ne_struct = bin_struct.index_select(0, nonempty)
    ne_rows = n_offsets.index_select(0, ne_struct)  # rows before filtering, per non-empty bin
    ne_row_end = torch.cumsum(ne_rows, dim=0)
    rows_per_ne_l: List[Tensor] = []
    row_vec_l: List[Tensor] = []
    row_first_l: List[Tensor] = []
    row_cnt_l: List[Tensor] = []
    row_shift_l: List[Tensor] = []
    m0 = 0
    while m0 < n_nonempty:
        done = 0 if m0 == 0 else int(ne_row_end[m0 - 1].item())
        m1 = _first_above(ne_row_end, done + entry_chunk)
        m1 = min(max(m1, m0 + 1), n_nonempty)
        n_rows = int(ne_row_end[m1 - 1].item()) - done
        owner = _expand(ne_rows[m0:m1], n_rows) + m0
        q = torch.arange(done, done + n_rows, device=device) - (
            ne_row_end.index_select(0, owner) - ne_rows.index_select(0, owner)
        )
        s = ne_struct.index_select(0, owner)
        nb = nbins.index_select(0, s)
        local = nonempty.index_select(0, owner) - bin_start.index_select(0, s)
        c2 = local % nb[:, 2]
        local = torch.div(local, nb[:, 2], rounding_mode="floor")
        c1 = local % nb[:, 1]
        c0 = torch.div(local, nb[:, 1], rounding_mode="floor")
        kw = width_k.index_select(0, s)
        kr = reach.index_select(0, s)
        o2 = q % kw[:, 2] - kr[:, 2]
        q = torch.div(q, kw[:, 2], rounding_mode="floor")
        o1 = q % kw[:, 1] - kr[:, 1]
        o0 = torch.div(q, kw[:, 1], rounding_mode="floor") - kr[:, 0]
        target = torch.stack([c0 + o0, c1 + o1, c2 + o2], dim=1)
        shift = _floor_div(target, nb)  # periodic image of the neighbor bin
        target = target - shift * nb
        lin = (
            (target[:, 0] * nb[:, 1] + target[:, 1]) * nb[:, 2]
            + target[:, 2]
            + bin_start.index_select(0, s)
        )
        cnt = bin_count.index_select(0, lin)
        # outside a non-periodic direction (shift != 0 there) or empty: no row
        valid = (pbc.index_select(0, s) | (shift == 0)).all(dim=1) & (cnt > 0)
        keep = torch.nonzero(valid).squeeze(1)
        shift = shift.index_select(0, keep)
        rows_per_ne_l.append(
            torch.bincount(owner.index_select(0, keep) - m0, minlength=m1 - m0)
        )
        row_first_l.append(bin_first.index_select(0, lin.index_select(0, keep)))
        row_cnt_l.append(cnt.index_select(0, keep))
        row_shift_l.append(shift.to(torch.int32))
        row_vec_l.append(  # T @ cell
            _row_times(shift.to(f64), cell.index_select(0, s.index_select(0, keep))).t()
        )
        m0 = m1
    rows_per_ne = torch.cat(rows_per_ne_l)  # [M]
    row_first = torch.cat(row_first_l)  # [R]
    row_cnt = torch.cat(row_cnt_l)  # [R]
    row_shift = torch.cat(row_shift_l)  # [R, 3] int32
    row_vec = torch.cat(row_vec_l, dim=1)  # [3, R]
    rows_count_bin = torch.zeros(n_bins, dtype=torch.long, device=device).index_copy(
        0, nonempty, rows_per_ne
    )
    rows_start_bin = torch.cumsum(rows_count_bin, dim=0) - rows_count_bin

    # 6. Entries (atom, row of its bin), atoms in index order so the output is sorted by i;
    # each entry's candidates are the atoms of the row's neighbor bin.
    atom_rows = rows_count_bin.index_select(0, bin_id)  # [N]
    entry_ptr = torch.cat(
        [torch.zeros(1, dtype=torch.long, device=device), torch.cumsum(atom_rows, dim=0)]
    )  # [N + 1]
    row_base = rows_start_bin.index_select(0, bin_id) - entry_ptr[:-1]  # row = row_base[a] + e
    cutoff2 = cutoff * cutoff

    out_i: List[Tensor] = []
    out_j: List[Tensor] = []
    out_s: List[Tensor] = []
    a0 = 0
    while a0 < n_atoms:
        e0 = int(entry_ptr[a0].item())
        a1 = _first_above(entry_ptr, e0 + entry_chunk) - 1
        a1 = min(max(a1, a0 + 1), n_atoms)
        e1 = int(entry_ptr[a1].item())
        n_e = e1 - e0
        if n_e > 0:
            atom = _expand(atom_rows[a0:a1], n_e) + a0
            row = row_base.index_select(0, atom) + torch.arange(e0, e1, device=device)
            cnt = row_cnt.index_select(0, row)
            # centre minus image shift: the pair vector is x_wrapped[j] - centre
            centre0 = x_centre[0].index_select(0, atom) - row_vec[0].index_select(0, row)
            centre1 = x_centre[1].index_select(0, atom) - row_vec[1].index_select(0, row)
            centre2 = x_centre[2].index_select(0, atom) - row_vec[2].index_select(0, row)
            cum = torch.cumsum(cnt, dim=0)
            # slot in `order` of candidate g (numbered within this chunk) of entry e
            base = row_first.index_select(0, row) - (cum - cnt)
            n_cand = int(cum[-1].item())
            s = 0
            while s < n_e:
                g0 = 0 if s == 0 else int(cum[s - 1].item())
                if n_cand - g0 <= candidate_chunk:
                    t = n_e
                else:
                    t = _first_above(cum, g0 + candidate_chunk)
                    t = max(t, s + 1)
                g1 = int(cum[t - 1].item())
                rep = _expand(cnt[s:t], g1 - g0).add_(s)
                slot = base.index_select(0, rep).add_(torch.arange(g0, g1, device=device))
                d = x_sorted[0].index_select(0, slot).sub_(centre0.index_select(0, rep))
                d2 = d.mul_(d)
                d = x_sorted[1].index_select(0, slot).sub_(centre1.index_select(0, rep))
                d2.addcmul_(d, d)
                d = x_sorted[2].index_select(0, slot).sub_(centre2.index_select(0, rep))
                d2.addcmul_(d, d)
                close = torch.nonzero(d2 < cutoff2).squeeze(1)
                rep = rep.index_select(0, close)
                j = order.index_select(0, slot.index_select(0, close))
                i = atom.index_select(0, rep)
                t_shift = row_shift.index_select(0, row.index_select(0, rep)).to(torch.long)
                sel = torch.nonzero((i != j) | (t_shift != 0).any(dim=1)).squeeze(1)
                i = i.index_select(0, sel)
                j = j.index_select(0, sel)
                out_i.append(i)
                out_j.append(j)
                t_shift = t_shift.index_select(0, sel)
                out_s.append(t_shift + image.index_select(0, i) - image.index_select(0, j))
                s = t
        a0 = a1
    if len(out_i) == 0:
        return empty, empty, torch.zeros(0, 3, dtype=torch.long, device=device)
    return torch.cat(out_i), torch.cat(out_j), torch.cat(out_s)
