// CUDA kernel of mlpot::neighbor_list (same contract as the CPU kernel in neighbor_list.cpp).
//
// Steps: the per-structure geometry (binning basis, bins, search reach) is computed on the host
// by the shared C++ code (geometry_table) from the small cell/pbc tensors and the extent of the
// atoms along non-periodic directions (a GPU reduction); then on the GPU: fractional coordinates,
// wrap and bin of every atom (kernel), stable sort by bin (at::sort), bin starts (bincount +
// cumsum), a count kernel (pairs per atom), an exclusive prefix sum, and a fill kernel that
// writes the pairs of atom i at its offset, so the output is sorted by i. Threads walk the atoms
// in bin order (neighboring threads read the same bins). Float64 throughout.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <tuple>

namespace mlpot_nl {

// Defined in neighbor_list.cpp (host code shared with the CPU kernel).
void check_inputs(const at::Tensor& positions, const at::Tensor& cells, const at::Tensor& pbc,
                  const at::Tensor& ptr, double cutoff);
void check_ptr(const int64_t* ptr_data, int64_t B, int64_t N);
at::Tensor geometry_table(const at::Tensor& cells, const at::Tensor& pbc, const at::Tensor& lo,
                          const at::Tensor& hi, const at::Tensor& natoms, double cutoff,
                          bool basis_only);

namespace {

// Row layout of geometry_table: keep in sync with GeoField in neighbor_list.cpp.
constexpr int kGeoCell = 0;
constexpr int kGeoRecip = 9;
constexpr int kGeoLo = 18;
constexpr int kGeoScale = 21;
constexpr int kGeoBinWidth = 24;
constexpr int kGeoNb = 27;
constexpr int kGeoK = 30;
constexpr int kGeoPeriodic = 33;
constexpr int kGeoOrthogonal = 36;
constexpr int kGeoBinOffset = 37;
constexpr int kGeoFields = 38;

constexpr double kMaxFrac = 1073741824.0;    // 2^30, as on the CPU
constexpr double kPruneMargin = 1.0 + 1e-6;  // as on the CPU
constexpr int kThreads = 128;

__device__ __forceinline__ long long floor_div(long long a, long long b) {  // b > 0
  return a >= 0 ? a / b : -((-a + b - 1) / b);
}

inline unsigned int n_blocks(int64_t n) {
  return static_cast<unsigned int>((n + kThreads - 1) / kThreads);
}

// Fractional coordinates f = x @ recip of every atom.
__global__ void fractional_kernel(const double* __restrict__ x, const int64_t* __restrict__ batch,
                                  const double* __restrict__ table, double* __restrict__ frac,
                                  int64_t n) {
  const int64_t a = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (a >= n) return;
  const double* g = table + batch[a] * kGeoFields;
  const double x0 = x[3 * a], x1 = x[3 * a + 1], x2 = x[3 * a + 2];
  for (int d = 0; d < 3; ++d) {
    frac[3 * a + d] = x0 * g[kGeoRecip + d] + x1 * g[kGeoRecip + 3 + d] + x2 * g[kGeoRecip + 6 + d];
  }
}

// Wrap along periodic directions, bin coordinates, global bin id.
__global__ void bin_kernel(const double* __restrict__ x, const double* __restrict__ frac,
                           const int64_t* __restrict__ batch, const double* __restrict__ table,
                           int32_t* __restrict__ cbin, double* __restrict__ vbin,
                           int32_t* __restrict__ moff, double* __restrict__ xw,
                           int64_t* __restrict__ gbin, int* __restrict__ too_far, int64_t n) {
  const int64_t a = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (a >= n) return;
  const double* g = table + batch[a] * kGeoFields;
  double w[3] = {x[3 * a], x[3 * a + 1], x[3 * a + 2]};
  long long c[3];
  for (int d = 0; d < 3; ++d) {
    const double f = frac[3 * a + d];
    const long long nb = static_cast<long long>(g[kGeoNb + d]);
    long long m = 0;
    double u;
    if (g[kGeoPeriodic + d] != 0.0) {
      if (!(fabs(f) < kMaxFrac)) {
        *too_far = 1;
        u = 0.0;
      } else {
        const double fl = floor(f);
        m = static_cast<long long>(fl);
        u = (f - fl) * g[kGeoScale + d];
      }
    } else {
      u = (f - g[kGeoLo + d]) * g[kGeoScale + d];
    }
    long long ci = static_cast<long long>(u);
    ci = ci < 0 ? 0 : (ci > nb - 1 ? nb - 1 : ci);
    c[d] = ci;
    vbin[3 * a + d] = u;
    moff[3 * a + d] = static_cast<int32_t>(m);
    if (m != 0) {
      for (int e = 0; e < 3; ++e) w[e] -= static_cast<double>(m) * g[kGeoCell + 3 * d + e];
    }
  }
  for (int d = 0; d < 3; ++d) {
    cbin[3 * a + d] = static_cast<int32_t>(c[d]);
    xw[3 * a + d] = w[d];
  }
  const long long nbx = static_cast<long long>(g[kGeoNb]);
  const long long nby = static_cast<long long>(g[kGeoNb + 1]);
  gbin[a] = static_cast<long long>(g[kGeoBinOffset]) + (c[2] * nby + c[1]) * nbx + c[0];
}

// Pairs of atom orig[t] (thread t walks the atoms in bin order). FILL = false: count only.
template <bool FILL>
__global__ void search_kernel(const int64_t* __restrict__ orig, const int64_t* __restrict__ sidx,
                              const int64_t* __restrict__ batch, const double* __restrict__ table,
                              const int32_t* __restrict__ cbin, const double* __restrict__ vbin,
                              const int32_t* __restrict__ moff, const double* __restrict__ xw,
                              const double* __restrict__ xs, const int32_t* __restrict__ ms,
                              const int64_t* __restrict__ bin_start, double rc2, double rp2,
                              int64_t* __restrict__ counts, const int64_t* __restrict__ offsets,
                              int64_t* __restrict__ out_i, int64_t* __restrict__ out_j,
                              int64_t* __restrict__ out_s, int64_t n) {
  const int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (t >= n) return;
  const int64_t a = orig[t];
  const double* g = table + batch[a] * kGeoFields;
  const long long self = sidx[a];
  const double xi0 = xw[3 * a], xi1 = xw[3 * a + 1], xi2 = xw[3 * a + 2];
  const long long cx = cbin[3 * a], cy = cbin[3 * a + 1], cz = cbin[3 * a + 2];
  const double vx = vbin[3 * a], vy = vbin[3 * a + 1], vz = vbin[3 * a + 2];
  const long long mi0 = moff[3 * a], mi1 = moff[3 * a + 1], mi2 = moff[3 * a + 2];
  const long long nbx = static_cast<long long>(g[kGeoNb]);
  const long long nby = static_cast<long long>(g[kGeoNb + 1]);
  const long long nbz = static_cast<long long>(g[kGeoNb + 2]);
  const long long kx = static_cast<long long>(g[kGeoK]);
  const long long ky = static_cast<long long>(g[kGeoK + 1]);
  const long long kz = static_cast<long long>(g[kGeoK + 2]);
  const bool px = g[kGeoPeriodic] != 0.0, py = g[kGeoPeriodic + 1] != 0.0,
             pz = g[kGeoPeriodic + 2] != 0.0;
  const bool ortho = g[kGeoOrthogonal] != 0.0;
  const double bwx = g[kGeoBinWidth], bwy = g[kGeoBinWidth + 1], bwz = g[kGeoBinWidth + 2];
  const long long bin_offset = static_cast<long long>(g[kGeoBinOffset]);
  const double* cell = g + kGeoCell;

  long long z_lo = cz - kz, z_hi = cz + kz;
  if (!pz) {
    z_lo = z_lo < 0 ? 0 : z_lo;
    z_hi = z_hi > nbz - 1 ? nbz - 1 : z_hi;
  }
  long long y_lo = cy - ky, y_hi = cy + ky;
  if (!py) {
    y_lo = y_lo < 0 ? 0 : y_lo;
    y_hi = y_hi > nby - 1 ? nby - 1 : y_hi;
  }
  long long x_lo0 = cx - kx, x_hi0 = cx + kx;
  if (!px) {
    x_lo0 = x_lo0 < 0 ? 0 : x_lo0;
    x_hi0 = x_hi0 > nbx - 1 ? nbx - 1 : x_hi0;
  }
  int64_t p = FILL ? offsets[a] : 0;
  int64_t count = 0;
  for (long long z = z_lo; z <= z_hi; ++z) {
    double gz2 = 0.0;
    if (ortho) {
      const double gap = fmax(0.0, fmax(static_cast<double>(z) - vz, vz - static_cast<double>(z + 1))) * bwz;
      gz2 = gap * gap;
      if (gz2 >= rp2) continue;
    }
    long long tz = 0, bz = z;
    if (pz) {
      tz = floor_div(z, nbz);
      bz = z - tz * nbz;
    }
    for (long long y = y_lo; y <= y_hi; ++y) {
      long long x_lo = x_lo0, x_hi = x_hi0;
      if (ortho) {
        const double gap = fmax(0.0, fmax(static_cast<double>(y) - vy, vy - static_cast<double>(y + 1))) * bwy;
        const double rem = rp2 - gz2 - gap * gap;
        if (rem <= 0.0) continue;
        const double r = sqrt(rem) / bwx;
        const long long lo = static_cast<long long>(floor(vx - r));
        const long long hi = static_cast<long long>(floor(vx + r));
        x_lo = lo > x_lo ? lo : x_lo;
        x_hi = hi < x_hi ? hi : x_hi;
      }
      long long ty = 0, by = y;
      if (py) {
        ty = floor_div(y, nby);
        by = y - ty * nby;
      }
      const long long row = bin_offset + (bz * nby + by) * nbx;
      const double sy0 = ty * cell[3] + tz * cell[6];
      const double sy1 = ty * cell[4] + tz * cell[7];
      const double sy2 = ty * cell[5] + tz * cell[8];
      long long xc = x_lo;
      while (xc <= x_hi) {
        long long tx = 0, bx0 = xc, seg_end = x_hi;
        if (px) {
          tx = floor_div(xc, nbx);
          bx0 = xc - tx * nbx;
          const long long run_end = (tx + 1) * nbx - 1;
          seg_end = x_hi < run_end ? x_hi : run_end;
        }
        const long long bx1 = seg_end - tx * nbx;
        xc = seg_end + 1;
        const int64_t j_begin = bin_start[row + bx0], j_end = bin_start[row + bx1 + 1];
        const double q0 = xi0 - (tx * cell[0] + sy0);
        const double q1 = xi1 - (tx * cell[1] + sy1);
        const double q2 = xi2 - (tx * cell[2] + sy2);
        const long long excluded = (tx == 0 && ty == 0 && tz == 0) ? self : -1;
        for (int64_t jj = j_begin; jj < j_end; ++jj) {
          const double d0 = xs[3 * jj] - q0;
          const double d1 = xs[3 * jj + 1] - q1;
          const double d2 = xs[3 * jj + 2] - q2;
          const double r2 = d0 * d0 + d1 * d1 + d2 * d2;
          if (r2 < rc2 && jj != excluded) {
            if (FILL) {
              out_i[p] = a;
              out_j[p] = orig[jj];
              out_s[3 * p] = tx + mi0 - ms[3 * jj];
              out_s[3 * p + 1] = ty + mi1 - ms[3 * jj + 1];
              out_s[3 * p + 2] = tz + mi2 - ms[3 * jj + 2];
              ++p;
            } else {
              ++count;
            }
          }
        }
      }
    }
  }
  if (!FILL) counts[a] = count;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> neighbor_list_cuda(const at::Tensor& positions_in,
                                                                   const at::Tensor& cells_in,
                                                                   const at::Tensor& pbc_in,
                                                                   const at::Tensor& ptr_in,
                                                                   double cutoff) {
  check_inputs(positions_in, cells_in, pbc_in, ptr_in, cutoff);
  TORCH_CHECK(positions_in.is_cuda(), "mlpot::neighbor_list: the CUDA kernel got tensors on ",
              positions_in.device());
  const c10::cuda::CUDAGuard guard(positions_in.device());
  const auto dev = positions_in.device();
  auto long_opts = at::TensorOptions().dtype(at::kLong).device(dev);
  auto dbl_opts = at::TensorOptions().dtype(at::kDouble).device(dev);

  const at::Tensor positions = positions_in.to(at::kDouble).contiguous();
  // The small per-structure tensors are handled on the host.
  const at::Tensor cells_h = cells_in.to(at::kCPU, at::kDouble).contiguous();
  const at::Tensor pbc_h = pbc_in.to(at::kCPU).contiguous();
  const at::Tensor ptr_h = ptr_in.to(at::kCPU).contiguous();
  const int64_t N = positions.size(0);
  const int64_t B = cells_h.size(0);
  check_ptr(ptr_h.data_ptr<int64_t>(), B, N);
  if (N == 0) {
    return {at::empty({0}, long_opts), at::empty({0}, long_opts), at::empty({0, 3}, long_opts)};
  }
  TORCH_CHECK(at::isfinite(positions).all().item<bool>(),
              "mlpot::neighbor_list: positions contain NaN or infinite values");

  const at::Tensor natoms_h = (ptr_h.slice(0, 1) - ptr_h.slice(0, 0, B)).contiguous();
  const at::Tensor batch = at::repeat_interleave(natoms_h.to(dev), /*output_size=*/N);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  // Basis of every structure, fractional coordinates, extent along non-periodic directions.
  const at::Tensor undefined;
  const at::Tensor basis =
      geometry_table(cells_h, pbc_h, undefined, undefined, natoms_h, cutoff, true).to(dev);
  at::Tensor frac = at::empty({N, 3}, dbl_opts);
  fractional_kernel<<<n_blocks(N), kThreads, 0, stream>>>(
      positions.data_ptr<double>(), batch.data_ptr<int64_t>(), basis.data_ptr<double>(),
      frac.data_ptr<double>(), N);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const at::Tensor index = batch.unsqueeze(1).expand({N, 3});
  const double inf = std::numeric_limits<double>::infinity();
  const at::Tensor lo_h = at::full({B, 3}, inf, dbl_opts)
                              .scatter_reduce(0, index, frac, "amin", /*include_self=*/true)
                              .to(at::kCPU)
                              .contiguous();
  const at::Tensor hi_h = at::full({B, 3}, -inf, dbl_opts)
                              .scatter_reduce(0, index, frac, "amax", /*include_self=*/true)
                              .to(at::kCPU)
                              .contiguous();
  const at::Tensor table_h = geometry_table(cells_h, pbc_h, lo_h, hi_h, natoms_h, cutoff, false);
  int64_t total_bins = 0;
  {
    const double* last = table_h.data_ptr<double>() + (B - 1) * kGeoFields;
    total_bins = static_cast<int64_t>(last[kGeoBinOffset]) +
                 static_cast<int64_t>(last[kGeoNb]) * static_cast<int64_t>(last[kGeoNb + 1]) *
                     static_cast<int64_t>(last[kGeoNb + 2]);
  }
  const at::Tensor table = table_h.to(dev);

  // Bins.
  at::Tensor cbin = at::empty({N, 3}, long_opts.dtype(at::kInt));
  at::Tensor vbin = at::empty({N, 3}, dbl_opts);
  at::Tensor moff = at::empty({N, 3}, long_opts.dtype(at::kInt));
  at::Tensor xw = at::empty({N, 3}, dbl_opts);
  at::Tensor gbin = at::empty({N}, long_opts);
  at::Tensor too_far = at::zeros({1}, long_opts.dtype(at::kInt));
  bin_kernel<<<n_blocks(N), kThreads, 0, stream>>>(
      positions.data_ptr<double>(), frac.data_ptr<double>(), batch.data_ptr<int64_t>(),
      table.data_ptr<double>(), cbin.data_ptr<int32_t>(), vbin.data_ptr<double>(),
      moff.data_ptr<int32_t>(), xw.data_ptr<double>(), gbin.data_ptr<int64_t>(),
      too_far.data_ptr<int>(), N);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  TORCH_CHECK(too_far.item<int>() == 0,
              "mlpot::neighbor_list: some positions lie more than 2^30 cell lengths outside the "
              "cell");

  // Counting sort by bin (stable: atoms of a bin stay in index order, as on the CPU).
  auto sorted = at::sort(gbin, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor orig = std::get<1>(sorted).contiguous();
  at::Tensor sidx = at::empty({N}, long_opts);
  sidx.scatter_(0, orig, at::arange(N, long_opts));
  const at::Tensor xs = xw.index_select(0, orig).contiguous();
  const at::Tensor ms = moff.index_select(0, orig).contiguous();
  at::Tensor bin_start = at::zeros({total_bins + 1}, long_opts);
  bin_start.slice(0, 1).copy_(at::bincount(gbin, {}, total_bins).cumsum(0));

  // Count, prefix sum, fill.
  const double rc2 = cutoff * cutoff;
  const double rp2 = (cutoff * kPruneMargin) * (cutoff * kPruneMargin);
  at::Tensor counts = at::empty({N}, long_opts);
  search_kernel<false><<<n_blocks(N), kThreads, 0, stream>>>(
      orig.data_ptr<int64_t>(), sidx.data_ptr<int64_t>(), batch.data_ptr<int64_t>(),
      table.data_ptr<double>(), cbin.data_ptr<int32_t>(), vbin.data_ptr<double>(),
      moff.data_ptr<int32_t>(), xw.data_ptr<double>(), xs.data_ptr<double>(),
      ms.data_ptr<int32_t>(), bin_start.data_ptr<int64_t>(), rc2, rp2, counts.data_ptr<int64_t>(),
      nullptr, nullptr, nullptr, nullptr, N);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const at::Tensor ends = counts.cumsum(0);
  const int64_t P = ends[N - 1].item<int64_t>();
  const at::Tensor offsets = (ends - counts).contiguous();
  at::Tensor out_i = at::empty({P}, long_opts);
  at::Tensor out_j = at::empty({P}, long_opts);
  at::Tensor out_s = at::empty({P, 3}, long_opts);
  if (P > 0) {
    search_kernel<true><<<n_blocks(N), kThreads, 0, stream>>>(
        orig.data_ptr<int64_t>(), sidx.data_ptr<int64_t>(), batch.data_ptr<int64_t>(),
        table.data_ptr<double>(), cbin.data_ptr<int32_t>(), vbin.data_ptr<double>(),
        moff.data_ptr<int32_t>(), xw.data_ptr<double>(), xs.data_ptr<double>(),
        ms.data_ptr<int32_t>(), bin_start.data_ptr<int64_t>(), rc2, rp2, counts.data_ptr<int64_t>(),
        offsets.data_ptr<int64_t>(), out_i.data_ptr<int64_t>(), out_j.data_ptr<int64_t>(),
        out_s.data_ptr<int64_t>(), N);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {out_i, out_j, out_s};
}

}  // namespace mlpot_nl

TORCH_LIBRARY_IMPL(mlpot, CUDA, m) { m.impl("neighbor_list", &mlpot_nl::neighbor_list_cuda); }
