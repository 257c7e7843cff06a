// mlpot::neighbor_list — full neighbor list (ASE 'ijS' convention) with a linear-scaling cell list.
//
// Schema:
//   mlpot::neighbor_list(Tensor positions, Tensor cells, Tensor pbc, Tensor ptr, float cutoff)
//       -> (Tensor i, Tensor j, Tensor S)
//
// positions [N, 3] float32/float64; cells [B, 3, 3] (rows are lattice vectors, same dtype);
// pbc [B, 3] bool; ptr [B + 1] int64 (structure b holds atoms ptr[b] .. ptr[b+1]-1).
// Returns every (i, j, S) with i, j in the same structure, S integer (zero along non-periodic
// directions) and |x_j - x_i + S @ cell| < cutoff, except i == j with S == 0. Sorted by i.
// All arithmetic is in float64 whatever the input dtype.
//
// Algorithm (per structure): a binning basis (periodic rows = cell rows, non-periodic rows =
// orthonormal completion), fractional coordinates, wrap along periodic directions (integer
// offsets m recorded), bins about cutoff/2 wide (perpendicular width; total capped at ~2 per
// atom), atoms counting-sorted by bin. Every atom i then scans the bins within reach (several
// images of the cell when it is thinner than the cutoff; for orthogonal bases, only bins that
// intersect the cutoff sphere) with a branch-free inner loop that appends (sorted index of j,
// image code T) records to per-worker buffers; a final parallel pass expands the records into the
// int64 outputs (S = T + m_i - m_j). Chunks of consecutive atoms are handed out dynamically to
// torch's intra-op threads and expanded in chunk order, so the list is sorted by i and does not
// depend on the number of threads.
//
// Shared with neighbor_list_cuda.cu (external linkage): check_inputs, check_ptr, geometry_table.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <unordered_map>
#include <vector>

namespace mlpot_nl {
namespace {

constexpr int kCodeBits = 10;                      // bits per image-shift component in a record
constexpr int kCodeBias = 1 << (kCodeBits - 1);    // 512
constexpr int64_t kMaxImage = kCodeBias - 2;       // |T_d| allowed (510)
constexpr double kMaxFrac = 1073741824.0;          // 2^30: |fractional coordinate| allowed
constexpr double kBinsPerCutoff = 2.0;             // bins are ~cutoff/2 wide: fewer candidates
constexpr double kPruneMargin = 1.0 + 1e-6;        // bin pruning radius / cutoff (conservative)

// Geometry of one structure's cell list.
struct Geometry {
  double cell[3][3];   // binning basis rows used for image shifts (periodic rows = cell rows)
  double recip[3][3];  // inverse of the basis: f_d = sum_k x_k * recip[k][d]
  double lo[3];        // non-periodic: min fractional coordinate; periodic: 0
  double scale[3];     // bin index = floor((f - lo) * scale)
  int64_t nb[3];       // bins per direction
  int64_t k[3];        // search reach in bins
  double basis[3][3];  // the full binning basis (periodic rows + orthonormal completion)
  double bin_width[3]; // width of one bin (Angstrom) along each direction (orthogonal bases)
  bool periodic[3];
  bool orthogonal;     // basis vectors mutually orthogonal: bins are rectangular boxes
  int64_t bin_offset;  // first global bin of this structure
};

struct Record {  // one candidate pair, 8 bytes
  int32_t jj;    // index of j in bin-sorted order
  uint32_t code; // image shift T, 3 x 10-bit biased components
};

inline uint32_t pack_code(int64_t tx, int64_t ty, int64_t tz) {
  return static_cast<uint32_t>(tx + kCodeBias) |
         (static_cast<uint32_t>(ty + kCodeBias) << kCodeBits) |
         (static_cast<uint32_t>(tz + kCodeBias) << (2 * kCodeBits));
}

inline int64_t unpack_code(uint32_t code, int d) {
  return static_cast<int64_t>((code >> (d * kCodeBits)) & ((1u << kCodeBits) - 1)) - kCodeBias;
}

inline int64_t floor_div(int64_t a, int64_t b) {  // b > 0
  return a >= 0 ? a / b : -((-a + b - 1) / b);
}

// Growable, uninitialised record buffer (std::vector would zero-fill on resize).
class RecordBuffer {
 public:
  RecordBuffer() = default;
  RecordBuffer(const RecordBuffer&) = delete;
  RecordBuffer& operator=(const RecordBuffer&) = delete;
  ~RecordBuffer() { std::free(data_); }
  void reserve(int64_t cap, int64_t keep) {  // keep: records to preserve
    if (cap <= cap_) return;
    const int64_t new_cap = std::max<int64_t>(cap, cap_ + cap_ / 2 + 1024);
    Record* p = static_cast<Record*>(std::malloc(static_cast<size_t>(new_cap) * sizeof(Record)));
    if (p == nullptr) throw std::bad_alloc();
    if (keep > 0) std::memcpy(p, data_, static_cast<size_t>(keep) * sizeof(Record));
    std::free(data_);
    data_ = p;
    cap_ = new_cap;
  }
  Record* data() { return data_; }
  const Record* data() const { return data_; }
  int64_t capacity() const { return cap_; }

 private:
  Record* data_ = nullptr;
  int64_t cap_ = 0;
};

// Record buffers are kept between calls (up to kPoolBytes in all), so that repeated calls (MD)
// do not pay the page faults of fresh memory every time.
constexpr int64_t kPoolBytes = int64_t(256) << 20;
std::mutex g_pool_mutex;
std::vector<std::unique_ptr<RecordBuffer>> g_pool;

std::unique_ptr<RecordBuffer> take_buffer() {
  std::lock_guard<std::mutex> lock(g_pool_mutex);
  if (g_pool.empty()) return std::make_unique<RecordBuffer>();
  std::unique_ptr<RecordBuffer> buf = std::move(g_pool.back());
  g_pool.pop_back();
  return buf;
}

void return_buffers(std::vector<std::unique_ptr<RecordBuffer>>& bufs) {
  std::lock_guard<std::mutex> lock(g_pool_mutex);
  int64_t held = 0;
  for (const auto& q : g_pool) held += q->capacity() * static_cast<int64_t>(sizeof(Record));
  for (auto& q : bufs) {
    const int64_t bytes = q->capacity() * static_cast<int64_t>(sizeof(Record));
    if (held + bytes <= kPoolBytes) {
      held += bytes;
      g_pool.push_back(std::move(q));
    }
  }
  bufs.clear();
}

// Output blocks are recycled as well. A list of 100k atoms is hundreds of MB; fresh memory for it
// costs one page fault (and a zeroed page) per 4 KiB on every call, which made the time per atom
// grow with N once the outputs outgrew glibc's reuse threshold (32 MB). Outputs of 1 MiB or more
// are therefore tensors over blocks from this cache: when torch frees such a tensor its block comes
// back here, and the next call of about the same size (the next MD step) reuses mapped pages.
// At most kOutCacheBytes are kept; mlpot::empty_cache() gives them back to the system.
constexpr size_t kOutMinBytes = size_t(1) << 20;
constexpr size_t kOutCacheBytes = size_t(4) << 30;
constexpr size_t kOutAlign = size_t(2) << 20;
std::mutex g_out_mutex;
std::multimap<size_t, void*> g_out_free;           // capacity -> free block
std::unordered_map<void*, size_t> g_out_capacity;  // every block (live or free) -> capacity
size_t g_out_free_bytes = 0;

void out_free_block_locked(std::multimap<size_t, void*>::iterator it) {
  g_out_free_bytes -= it->first;
  g_out_capacity.erase(it->second);
  std::free(it->second);
  g_out_free.erase(it);
}

void out_release(void* p) {
  std::lock_guard<std::mutex> lock(g_out_mutex);
  const size_t cap = g_out_capacity.at(p);
  auto it = g_out_free.emplace(cap, p);
  g_out_free_bytes += cap;
  if (cap > kOutCacheBytes) {
    out_free_block_locked(it);
    return;
  }
  while (g_out_free_bytes > kOutCacheBytes) out_free_block_locked(g_out_free.begin());
}

void* out_acquire(size_t bytes) {
  // a little headroom, so that the next MD step's slightly longer list fits the same block
  size_t cap = bytes + bytes / 16;
  cap = (cap + kOutAlign - 1) / kOutAlign * kOutAlign;
  {
    std::lock_guard<std::mutex> lock(g_out_mutex);
    auto it = g_out_free.lower_bound(bytes);
    // at most 25 % unused, or no larger than a fresh block would be: blocks are whole multiples
    // of kOutAlign, so a 2.1 MB list gets a 4 MiB block, which the next step must be able to
    // reuse (else every step leaves one more unusable block in the cache, up to kOutCacheBytes)
    if (it != g_out_free.end() && it->first <= std::max(bytes + bytes / 4, cap)) {
      void* p = it->second;
      g_out_free_bytes -= it->first;
      g_out_free.erase(it);
      return p;
    }
  }
  void* p = std::aligned_alloc(kOutAlign, cap);
  if (p == nullptr) throw std::bad_alloc();
  std::lock_guard<std::mutex> lock(g_out_mutex);
  g_out_capacity[p] = cap;
  return p;
}

at::Tensor empty_long(at::IntArrayRef sizes) {
  const auto opts = at::TensorOptions().dtype(at::kLong).device(at::kCPU);
  int64_t n = 1;
  for (int64_t d : sizes) n *= d;
  const size_t bytes = static_cast<size_t>(n) * sizeof(int64_t);
  if (bytes < kOutMinBytes) return at::empty(sizes, opts);
  return at::from_blob(out_acquire(bytes), sizes, [](void* p) { out_release(p); }, opts);
}

void empty_cache() {
  std::lock_guard<std::mutex> lock(g_out_mutex);
  while (!g_out_free.empty()) out_free_block_locked(g_out_free.begin());
  std::lock_guard<std::mutex> lock2(g_pool_mutex);
  g_pool.clear();
}

struct BufferLease {
  std::vector<std::unique_ptr<RecordBuffer>>& buffers;
  ~BufferLease() { return_buffers(buffers); }
};

// Runs worker(w) for w in [0, n_workers) on torch's intra-op threads (workers pull work items
// from shared atomic counters, so a thread slowed down by other processes does not hold up the rest).
template <typename F>
void run_workers(int n_workers, int64_t n_items, const F& worker) {
  if (n_workers <= 1 || n_items <= 1) {
    worker(0);
    return;
  }
  at::parallel_for(0, n_workers, 1, [&](int64_t w0, int64_t) { worker(static_cast<int>(w0)); });
}

inline double det3(const double a[3][3]) {
  return a[0][0] * (a[1][1] * a[2][2] - a[1][2] * a[2][1]) -
         a[0][1] * (a[1][0] * a[2][2] - a[1][2] * a[2][0]) +
         a[0][2] * (a[1][0] * a[2][1] - a[1][1] * a[2][0]);
}

inline void cross(const double a[3], const double b[3], double out[3]) {
  out[0] = a[1] * b[2] - a[2] * b[1];
  out[1] = a[2] * b[0] - a[0] * b[2];
  out[2] = a[0] * b[1] - a[1] * b[0];
}

inline double norm3(const double a[3]) { return std::sqrt(a[0] * a[0] + a[1] * a[1] + a[2] * a[2]); }

// Inverse of a 3x3 matrix (rows of `a` are the basis vectors).
inline void invert3(const double a[3][3], double inv[3][3]) {
  const double det = det3(a);
  inv[0][0] = (a[1][1] * a[2][2] - a[1][2] * a[2][1]) / det;
  inv[0][1] = (a[0][2] * a[2][1] - a[0][1] * a[2][2]) / det;
  inv[0][2] = (a[0][1] * a[1][2] - a[0][2] * a[1][1]) / det;
  inv[1][0] = (a[1][2] * a[2][0] - a[1][0] * a[2][2]) / det;
  inv[1][1] = (a[0][0] * a[2][2] - a[0][2] * a[2][0]) / det;
  inv[1][2] = (a[0][2] * a[1][0] - a[0][0] * a[1][2]) / det;
  inv[2][0] = (a[1][0] * a[2][1] - a[1][1] * a[2][0]) / det;
  inv[2][1] = (a[0][1] * a[2][0] - a[0][0] * a[2][1]) / det;
  inv[2][2] = (a[0][0] * a[1][1] - a[0][1] * a[1][0]) / det;
}

// Binning basis and fractional transform of structure b (no bins yet: they need the atoms).
void make_basis(const double* cell, const bool* pbc, int64_t b, Geometry& g) {
  int periodic_dims[3];
  int n_periodic = 0;
  for (int d = 0; d < 3; ++d) {
    g.periodic[d] = pbc[d];
    for (int e = 0; e < 3; ++e) g.cell[d][e] = 0.0;
    if (pbc[d]) {
      for (int e = 0; e < 3; ++e) {
        g.cell[d][e] = cell[3 * d + e];
        TORCH_CHECK(std::isfinite(g.cell[d][e]), "mlpot::neighbor_list: structure ", b,
                    " has a non-finite value in cell vector ", d, " (a periodic direction)");
      }
      periodic_dims[n_periodic++] = d;
    }
  }
  // Degeneracy of the periodic part of the cell (relative to the vector lengths).
  constexpr double kRelTol = 1e-10;
  const char* degenerate_msg =
      " has a degenerate cell: its periodic vectors span zero length/area/volume "
      "(check the cell and pbc of this structure)";
  if (n_periodic == 1) {
    TORCH_CHECK(norm3(g.cell[periodic_dims[0]]) > 0.0, "mlpot::neighbor_list: structure ", b,
                degenerate_msg, "; cell vector ", periodic_dims[0], " is zero");
  } else if (n_periodic == 2) {
    const double* a = g.cell[periodic_dims[0]];
    const double* c = g.cell[periodic_dims[1]];
    double n[3];
    cross(a, c, n);
    TORCH_CHECK(norm3(n) > kRelTol * norm3(a) * norm3(c) && norm3(n) > 0.0,
                "mlpot::neighbor_list: structure ", b, degenerate_msg);
  } else if (n_periodic == 3) {
    const double vol = std::abs(det3(g.cell));
    TORCH_CHECK(vol > kRelTol * norm3(g.cell[0]) * norm3(g.cell[1]) * norm3(g.cell[2]) && vol > 0.0,
                "mlpot::neighbor_list: structure ", b, degenerate_msg);
  }
  // Complete the basis with orthonormal vectors along the non-periodic directions.
  double basis[3][3];
  std::memcpy(basis, g.cell, sizeof(basis));
  if (n_periodic == 0) {
    for (int d = 0; d < 3; ++d)
      for (int e = 0; e < 3; ++e) basis[d][e] = d == e ? 1.0 : 0.0;
  } else if (n_periodic == 1) {
    const int p = periodic_dims[0];
    const double* a = g.cell[p];
    const double an = norm3(a);
    double ahat[3] = {a[0] / an, a[1] / an, a[2] / an};
    int axis = 0;  // coordinate axis least aligned with a
    for (int e = 1; e < 3; ++e)
      if (std::abs(ahat[e]) < std::abs(ahat[axis])) axis = e;
    double ax[3] = {0.0, 0.0, 0.0};
    ax[axis] = 1.0;
    double u1[3], u2[3];
    cross(ahat, ax, u1);
    const double n1 = norm3(u1);
    for (int e = 0; e < 3; ++e) u1[e] /= n1;
    cross(ahat, u1, u2);
    const double n2 = norm3(u2);
    for (int e = 0; e < 3; ++e) u2[e] /= n2;
    const int q1 = (p + 1) % 3, q2 = (p + 2) % 3;
    for (int e = 0; e < 3; ++e) {
      basis[q1][e] = u1[e];
      basis[q2][e] = u2[e];
    }
  } else if (n_periodic == 2) {
    const int q = 3 - periodic_dims[0] - periodic_dims[1];
    double n[3];
    cross(g.cell[periodic_dims[0]], g.cell[periodic_dims[1]], n);
    const double nn = norm3(n);
    for (int e = 0; e < 3; ++e) basis[q][e] = n[e] / nn;
  }
  std::memcpy(g.basis, basis, sizeof(basis));
  invert3(basis, g.recip);
}

// Number of bins and search reach along each direction; `span` is the extent of the fractional
// coordinates (1 for periodic directions). Bins are about cutoff / kBinsPerCutoff wide.
void make_bins(Geometry& g, const double span[3], double cutoff, int64_t n_atoms, int64_t b) {
  double width[3];  // perpendicular width (Angstrom) of one span
  for (int d = 0; d < 3; ++d) {
    if (g.periodic[d]) {
      const double r = std::sqrt(g.recip[0][d] * g.recip[0][d] + g.recip[1][d] * g.recip[1][d] +
                                 g.recip[2][d] * g.recip[2][d]);
      width[d] = 1.0 / r;
    } else {
      width[d] = span[d];  // non-periodic basis vectors are unit vectors: span is in Angstrom
    }
    const double nbins = std::floor(kBinsPerCutoff * width[d] / cutoff);
    g.nb[d] = nbins >= 1.0 ? static_cast<int64_t>(std::min(nbins, 1.0e6)) : 1;
  }
  // Cap the number of bins (huge empty boxes, tiny cutoffs) at about 2 per atom.
  const double cap = std::max<double>(27.0, 2.0 * static_cast<double>(n_atoms));
  for (int iter = 0; iter < 64; ++iter) {
    const double total = static_cast<double>(g.nb[0]) * g.nb[1] * g.nb[2];
    if (total <= cap) break;
    int free_dims = 0;
    for (int d = 0; d < 3; ++d) free_dims += g.nb[d] > 1;
    const double f = std::pow(cap / total, 1.0 / std::max(free_dims, 1));
    for (int d = 0; d < 3; ++d)
      g.nb[d] = std::max<int64_t>(1, static_cast<int64_t>(std::floor(g.nb[d] * f)));
    if (iter > 8) {  // rounding keeps us above the cap: halve the largest direction
      int dmax = 0;
      for (int d = 1; d < 3; ++d)
        if (g.nb[d] > g.nb[dmax]) dmax = d;
      g.nb[dmax] = std::max<int64_t>(1, g.nb[dmax] / 2);
    }
  }
  for (int d = 0; d < 3; ++d) {
    if (g.periodic[d]) {
      g.scale[d] = static_cast<double>(g.nb[d]);
      const double reach = std::ceil(cutoff * static_cast<double>(g.nb[d]) / width[d]);
      TORCH_CHECK(reach / static_cast<double>(g.nb[d]) < static_cast<double>(kMaxImage) - 1.0,
                  "mlpot::neighbor_list: structure ", b, ": cell vector ", d,
                  " is too short for the cutoff (its perpendicular width ", width[d],
                  " A would need more than ", kMaxImage, " periodic images each way for cutoff ",
                  cutoff, " A)");
      g.k[d] = std::max<int64_t>(1, static_cast<int64_t>(reach));
      g.bin_width[d] = width[d] / static_cast<double>(g.nb[d]);
    } else if (span[d] > 0.0) {
      g.scale[d] = static_cast<double>(g.nb[d]) / span[d];
      const double reach = std::ceil(cutoff * static_cast<double>(g.nb[d]) / span[d]);
      g.k[d] = std::min<int64_t>(g.nb[d] - 1, static_cast<int64_t>(std::min(reach, 1.0e9)));
      g.bin_width[d] = span[d] / static_cast<double>(g.nb[d]);
    } else {
      g.scale[d] = 0.0;
      g.k[d] = 0;
      g.bin_width[d] = 0.0;
    }
  }
  // Bins are boxes (sphere pruning below is exact) when the basis vectors are orthogonal.
  g.orthogonal = true;
  for (int d = 0; d < 3; ++d) {
    for (int e = d + 1; e < 3; ++e) {
      const double* u = g.basis[d];
      const double* v = g.basis[e];
      const double dot = u[0] * v[0] + u[1] * v[1] + u[2] * v[2];
      if (std::abs(dot) > 1e-12 * norm3(u) * norm3(v)) g.orthogonal = false;
    }
  }
  for (int d = 0; d < 3; ++d)
    if (!(g.bin_width[d] > 0.0)) g.orthogonal = false;
}

}  // namespace

// ---- shared with the CUDA kernel (external linkage) ------------------------------------

void check_inputs(const at::Tensor& positions, const at::Tensor& cells, const at::Tensor& pbc,
                  const at::Tensor& ptr, double cutoff) {
  TORCH_CHECK(positions.dim() == 2 && positions.size(1) == 3,
              "mlpot::neighbor_list: positions must have shape [N, 3], got ", positions.sizes());
  TORCH_CHECK(positions.scalar_type() == at::kFloat || positions.scalar_type() == at::kDouble,
              "mlpot::neighbor_list: positions must be float32 or float64, got ",
              positions.scalar_type());
  TORCH_CHECK(cells.dim() == 3 && cells.size(1) == 3 && cells.size(2) == 3,
              "mlpot::neighbor_list: cells must have shape [B, 3, 3], got ", cells.sizes());
  TORCH_CHECK(cells.scalar_type() == positions.scalar_type(),
              "mlpot::neighbor_list: cells must have the dtype of positions (",
              positions.scalar_type(), "), got ", cells.scalar_type());
  const int64_t B = cells.size(0);
  TORCH_CHECK(pbc.dim() == 2 && pbc.size(0) == B && pbc.size(1) == 3,
              "mlpot::neighbor_list: pbc must have shape [B, 3] = [", B, ", 3], got ", pbc.sizes());
  TORCH_CHECK(pbc.scalar_type() == at::kBool, "mlpot::neighbor_list: pbc must be bool, got ",
              pbc.scalar_type());
  TORCH_CHECK(ptr.dim() == 1 && ptr.size(0) == B + 1,
              "mlpot::neighbor_list: ptr must have shape [B + 1] = [", B + 1, "], got ",
              ptr.sizes());
  TORCH_CHECK(ptr.scalar_type() == at::kLong, "mlpot::neighbor_list: ptr must be int64, got ",
              ptr.scalar_type());
  TORCH_CHECK(std::isfinite(cutoff) && cutoff > 0.0,
              "mlpot::neighbor_list: cutoff must be a positive finite number, got ", cutoff);
  TORCH_CHECK(positions.device() == cells.device() && positions.device() == pbc.device() &&
                  positions.device() == ptr.device(),
              "mlpot::neighbor_list: positions, cells, pbc and ptr must be on the same device, got ",
              positions.device(), ", ", cells.device(), ", ", pbc.device(), ", ", ptr.device());
}


void check_ptr(const int64_t* ptr_data, int64_t B, int64_t N) {
  TORCH_CHECK(ptr_data[0] == 0, "mlpot::neighbor_list: ptr[0] must be 0, got ", ptr_data[0]);
  TORCH_CHECK(ptr_data[B] == N, "mlpot::neighbor_list: ptr[-1] must equal the number of atoms (",
              N, "), got ", ptr_data[B]);
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(ptr_data[b + 1] >= ptr_data[b],
                "mlpot::neighbor_list: ptr must be non-decreasing, but ptr[", b + 1, "] = ",
                ptr_data[b + 1], " < ptr[", b, "] = ", ptr_data[b]);
  }
  TORCH_CHECK(N < (int64_t(1) << 31) - 1, "mlpot::neighbor_list: too many atoms (", N,
              "); at most 2^31 - 2 are supported");
}

// Flat float64 table of the per-structure geometry for the CUDA kernel: one row of
// kGeoFields values per structure, laid out as GeoField says (integers stored exactly as doubles).
// With basis_only, only the cell, recip and periodic fields are filled (lo/hi/natoms unused).
// The same layout is declared in neighbor_list_cuda.cu: keep the two in sync.
enum GeoField : int {
  kGeoCell = 0,        // 9: binning basis rows (periodic rows = cell rows)
  kGeoRecip = 9,       // 9: inverse basis, f_d = sum_k x_k recip[k][d]
  kGeoLo = 18,         // 3
  kGeoScale = 21,      // 3
  kGeoBinWidth = 24,   // 3
  kGeoNb = 27,         // 3
  kGeoK = 30,          // 3
  kGeoPeriodic = 33,   // 3 (0/1)
  kGeoOrthogonal = 36, // 1 (0/1)
  kGeoBinOffset = 37,  // 1
  kGeoFields = 38
};

at::Tensor geometry_table(const at::Tensor& cells, const at::Tensor& pbc, const at::Tensor& lo,
                          const at::Tensor& hi, const at::Tensor& natoms, double cutoff,
                          bool basis_only) {
  const int64_t B = cells.size(0);
  at::Tensor table = at::zeros({B, kGeoFields}, at::TensorOptions().dtype(at::kDouble));
  double* t = table.data_ptr<double>();
  const double* cell_data = cells.data_ptr<double>();
  const bool* pbc_data = pbc.data_ptr<bool>();
  int64_t offset = 0;
  for (int64_t b = 0; b < B; ++b) {
    Geometry g;
    make_basis(cell_data + 9 * b, pbc_data + 3 * b, b, g);
    double* row = t + b * kGeoFields;
    for (int d = 0; d < 3; ++d) {
      for (int e = 0; e < 3; ++e) {
        row[kGeoCell + 3 * d + e] = g.cell[d][e];
        row[kGeoRecip + 3 * d + e] = g.recip[d][e];
      }
      row[kGeoPeriodic + d] = g.periodic[d] ? 1.0 : 0.0;
    }
    if (basis_only) continue;
    const double* lo_b = lo.data_ptr<double>() + 3 * b;
    const double* hi_b = hi.data_ptr<double>() + 3 * b;
    const int64_t n = natoms.data_ptr<int64_t>()[b];
    double span[3];
    for (int d = 0; d < 3; ++d) {
      g.lo[d] = (g.periodic[d] || n == 0) ? 0.0 : lo_b[d];
      span[d] = g.periodic[d] ? 1.0 : (n == 0 ? 0.0 : hi_b[d] - lo_b[d]);
    }
    make_bins(g, span, cutoff, n, b);
    for (int d = 0; d < 3; ++d) {
      row[kGeoLo + d] = g.lo[d];
      row[kGeoScale + d] = g.scale[d];
      row[kGeoBinWidth + d] = g.bin_width[d];
      row[kGeoNb + d] = static_cast<double>(g.nb[d]);
      row[kGeoK + d] = static_cast<double>(g.k[d]);
    }
    row[kGeoOrthogonal] = g.orthogonal ? 1.0 : 0.0;
    row[kGeoBinOffset] = static_cast<double>(offset);
    offset += g.nb[0] * g.nb[1] * g.nb[2];
  }
  return table;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> neighbor_list_cpu(const at::Tensor& positions_in,
                                                                  const at::Tensor& cells_in,
                                                                  const at::Tensor& pbc_in,
                                                                  const at::Tensor& ptr_in,
                                                                  double cutoff) {
  check_inputs(positions_in, cells_in, pbc_in, ptr_in, cutoff);
  TORCH_CHECK(positions_in.device().is_cpu(),
              "mlpot::neighbor_list: the CPU kernel got tensors on ", positions_in.device());
  const at::Tensor positions = positions_in.to(at::kDouble).contiguous();
  const at::Tensor cells = cells_in.to(at::kDouble).contiguous();
  const at::Tensor pbc = pbc_in.contiguous();
  const at::Tensor ptr = ptr_in.contiguous();

  const int64_t N = positions.size(0);
  const int64_t B = cells.size(0);
  const double* x = positions.data_ptr<double>();
  const double* cell_data = cells.data_ptr<double>();
  const bool* pbc_data = pbc.data_ptr<bool>();
  const int64_t* ptr_data = ptr.data_ptr<int64_t>();

  check_ptr(ptr_data, B, N);

  auto long_opts = at::TensorOptions().dtype(at::kLong).device(at::kCPU);
  if (N == 0) {
    return {at::empty({0}, long_opts), at::empty({0}, long_opts), at::empty({0, 3}, long_opts)};
  }
  {
    // Non-finite positions (a NaN would silently fall out of every bin otherwise).
    std::atomic<bool> finite{true};
    at::parallel_for(0, 3 * N, 16384, [&](int64_t begin, int64_t end) {
      bool ok = true;
      for (int64_t q = begin; q < end; ++q) ok &= std::isfinite(x[q]);
      if (!ok) finite.store(false);
    });
    TORCH_CHECK(finite.load(), "mlpot::neighbor_list: positions contain NaN or infinite values");
  }

  // ---- geometry of every structure --------------------------------------------------------
  std::vector<Geometry> geo(static_cast<size_t>(B));
  std::vector<int32_t> batch(static_cast<size_t>(N));
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      Geometry& g = geo[b];
      make_basis(cell_data + 9 * b, pbc_data + 3 * b, b, g);
      const int64_t p0 = ptr_data[b], p1 = ptr_data[b + 1];
      double lo[3] = {0.0, 0.0, 0.0}, hi[3] = {1.0, 1.0, 1.0};
      for (int d = 0; d < 3; ++d) {
        if (!g.periodic[d]) {
          lo[d] = std::numeric_limits<double>::infinity();
          hi[d] = -std::numeric_limits<double>::infinity();
        }
      }
      for (int64_t a = p0; a < p1; ++a) {
        batch[a] = static_cast<int32_t>(b);
        const double* xa = x + 3 * a;
        for (int d = 0; d < 3; ++d) {
          if (g.periodic[d]) continue;
          const double f = xa[0] * g.recip[0][d] + xa[1] * g.recip[1][d] + xa[2] * g.recip[2][d];
          lo[d] = std::min(lo[d], f);
          hi[d] = std::max(hi[d], f);
        }
      }
      double span[3];
      for (int d = 0; d < 3; ++d) {
        if (p1 == p0) {
          lo[d] = 0.0;
          hi[d] = g.periodic[d] ? 1.0 : 0.0;
        }
        g.lo[d] = lo[d];
        span[d] = hi[d] - lo[d];
      }
      make_bins(g, span, cutoff, p1 - p0, b);
    }
  });
  int64_t total_bins = 0;
  for (int64_t b = 0; b < B; ++b) {
    geo[b].bin_offset = total_bins;
    total_bins += geo[b].nb[0] * geo[b].nb[1] * geo[b].nb[2];
  }

  // ---- bin of every atom, wrapped positions, integer offsets --------------------------------
  std::vector<int32_t> cbin(static_cast<size_t>(3 * N));  // bin coordinates (original order)
  std::vector<double> vbin(static_cast<size_t>(3 * N));   // continuous bin coordinates
  std::vector<int64_t> gbin(static_cast<size_t>(N));      // global bin id
  std::vector<double> xw(static_cast<size_t>(3 * N));     // wrapped positions (original order)
  std::vector<int32_t> moff(static_cast<size_t>(3 * N));  // floor of fractional coordinates
  std::atomic<bool> too_far{false};
  at::parallel_for(0, N, 2048, [&](int64_t a0, int64_t a1) {
    for (int64_t a = a0; a < a1; ++a) {
      const Geometry& g = geo[batch[a]];
      const double* xa = x + 3 * a;
      double w[3] = {xa[0], xa[1], xa[2]};
      int64_t c[3];
      for (int d = 0; d < 3; ++d) {
        const double f = xa[0] * g.recip[0][d] + xa[1] * g.recip[1][d] + xa[2] * g.recip[2][d];
        int64_t m = 0;
        double u;
        if (g.periodic[d]) {
          if (!(std::abs(f) < kMaxFrac)) {
            too_far.store(true);
            u = 0.0;
          } else {
            const double fl = std::floor(f);
            m = static_cast<int64_t>(fl);
            u = (f - fl) * g.scale[d];
          }
        } else {
          u = (f - g.lo[d]) * g.scale[d];
        }
        int64_t ci = static_cast<int64_t>(u);  // u >= 0
        ci = std::min<int64_t>(std::max<int64_t>(ci, 0), g.nb[d] - 1);
        c[d] = ci;
        vbin[3 * a + d] = u;
        moff[3 * a + d] = static_cast<int32_t>(m);
        if (m != 0) {
          for (int e = 0; e < 3; ++e) w[e] -= static_cast<double>(m) * g.cell[d][e];
        }
      }
      for (int d = 0; d < 3; ++d) {
        cbin[3 * a + d] = static_cast<int32_t>(c[d]);
        xw[3 * a + d] = w[d];
      }
      gbin[a] = g.bin_offset + (c[2] * g.nb[1] + c[1]) * g.nb[0] + c[0];
    }
  });
  TORCH_CHECK(!too_far.load(),
              "mlpot::neighbor_list: some positions lie more than 2^30 cell lengths outside the "
              "cell");

  // ---- counting sort by bin ----------------------------------------------------------------
  std::vector<int64_t> bin_start(static_cast<size_t>(total_bins + 1), 0);
  for (int64_t a = 0; a < N; ++a) bin_start[gbin[a] + 1]++;
  for (int64_t q = 0; q < total_bins; ++q) bin_start[q + 1] += bin_start[q];
  std::vector<int32_t> sidx(static_cast<size_t>(N));   // sorted position of atom a
  std::vector<int32_t> orig(static_cast<size_t>(N));   // original index of sorted atom
  std::vector<double> xs(static_cast<size_t>(3 * N));  // wrapped positions, sorted
  std::vector<int32_t> ms(static_cast<size_t>(3 * N)); // integer offsets, sorted
  {
    std::vector<int64_t> fill(bin_start.begin(), bin_start.end() - 1);
    for (int64_t a = 0; a < N; ++a) {
      const int64_t s = fill[gbin[a]]++;
      sidx[a] = static_cast<int32_t>(s);
      orig[s] = static_cast<int32_t>(a);
    }
  }
  at::parallel_for(0, N, 4096, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t a = orig[s];
      for (int d = 0; d < 3; ++d) {
        xs[3 * s + d] = xw[3 * a + d];
        ms[3 * s + d] = moff[3 * a + d];
      }
    }
  });

  // ---- pair search ---------------------------------------------------------------------------
  // Chunks of consecutive atoms are handed out dynamically to the workers; a worker appends the
  // records of its chunks to its own buffer.
  const double rc2 = cutoff * cutoff;
  const double rp2 = (cutoff * kPruneMargin) * (cutoff * kPruneMargin);
  const int n_workers = std::max(1, at::get_num_threads());
  const int64_t chunk = std::max<int64_t>(16, std::min<int64_t>(1024, N / (32 * n_workers) + 1));
  const int64_t n_chunks = (N + chunk - 1) / chunk;
  std::vector<std::unique_ptr<RecordBuffer>> buffers;
  const BufferLease lease{buffers};  // gives the buffers back to the pool on every exit
  for (int w = 0; w < n_workers; ++w) buffers.push_back(take_buffer());
  std::vector<int32_t> chunk_worker(static_cast<size_t>(n_chunks), 0);
  std::vector<int64_t> chunk_begin(static_cast<size_t>(n_chunks), 0);  // in the worker's buffer
  std::vector<int64_t> chunk_count(static_cast<size_t>(n_chunks), 0);
  std::vector<int32_t> counts(static_cast<size_t>(N));
  std::atomic<int64_t> next_chunk{0};
  const double* xs_p = xs.data();
  const int64_t* bs = bin_start.data();

  auto run_worker = [&](int worker) {
    RecordBuffer& buf = *buffers[worker];
    Record* out = buf.data();
    int64_t cap = buf.capacity();
    int64_t n = 0;
    for (int64_t ch = next_chunk.fetch_add(1); ch < n_chunks; ch = next_chunk.fetch_add(1)) {
      chunk_worker[ch] = worker;
      chunk_begin[ch] = n;
      const int64_t a_begin = ch * chunk, a_end = std::min(N, a_begin + chunk);
      for (int64_t a = a_begin; a < a_end; ++a) {
        const Geometry& g = geo[batch[a]];
        const int64_t n_before = n;
        const int32_t self = sidx[a];
        const double xi0 = xw[3 * a], xi1 = xw[3 * a + 1], xi2 = xw[3 * a + 2];
        const int64_t cx = cbin[3 * a], cy = cbin[3 * a + 1], cz = cbin[3 * a + 2];
        const double vx = vbin[3 * a], vy = vbin[3 * a + 1], vz = vbin[3 * a + 2];
        const int64_t nbx = g.nb[0], nby = g.nb[1], nbz = g.nb[2];
        const bool ortho = g.orthogonal;
        int64_t z_lo = cz - g.k[2], z_hi = cz + g.k[2];
        if (!g.periodic[2]) {
          z_lo = std::max<int64_t>(z_lo, 0);
          z_hi = std::min<int64_t>(z_hi, nbz - 1);
        }
        int64_t y_lo = cy - g.k[1], y_hi = cy + g.k[1];
        if (!g.periodic[1]) {
          y_lo = std::max<int64_t>(y_lo, 0);
          y_hi = std::min<int64_t>(y_hi, nby - 1);
        }
        int64_t x_lo0 = cx - g.k[0], x_hi0 = cx + g.k[0];
        if (!g.periodic[0]) {
          x_lo0 = std::max<int64_t>(x_lo0, 0);
          x_hi0 = std::min<int64_t>(x_hi0, nbx - 1);
        }
        for (int64_t z = z_lo; z <= z_hi; ++z) {
          double gz2 = 0.0;
          if (ortho) {  // distance from atom i to the slab of bin row z
            const double gap = std::max(0.0, std::max(static_cast<double>(z) - vz,
                                                      vz - static_cast<double>(z + 1))) *
                               g.bin_width[2];
            gz2 = gap * gap;
            if (gz2 >= rp2) continue;
          }
          int64_t tz = 0, bz = z;
          if (g.periodic[2]) {
            tz = floor_div(z, nbz);
            bz = z - tz * nbz;
          }
          for (int64_t y = y_lo; y <= y_hi; ++y) {
            int64_t x_lo = x_lo0, x_hi = x_hi0;
            if (ortho) {
              const double gap = std::max(0.0, std::max(static_cast<double>(y) - vy,
                                                        vy - static_cast<double>(y + 1))) *
                                 g.bin_width[1];
              const double rem = rp2 - gz2 - gap * gap;
              if (rem <= 0.0) continue;
              const double r = std::sqrt(rem) / g.bin_width[0];  // reach along x, in bins
              x_lo = std::max(x_lo, static_cast<int64_t>(std::floor(vx - r)));
              x_hi = std::min(x_hi, static_cast<int64_t>(std::floor(vx + r)));
            }
            int64_t ty = 0, by = y;
            if (g.periodic[1]) {
              ty = floor_div(y, nby);
              by = y - ty * nby;
            }
            const int64_t row = g.bin_offset + (bz * nby + by) * nbx;
            const double sy0 = ty * g.cell[1][0] + tz * g.cell[2][0];
            const double sy1 = ty * g.cell[1][1] + tz * g.cell[2][1];
            const double sy2 = ty * g.cell[1][2] + tz * g.cell[2][2];
            int64_t xc = x_lo;
            while (xc <= x_hi) {
              // a run of consecutive bins along x with the same image shift tx
              int64_t tx = 0, bx0 = xc, seg_end = x_hi;
              if (g.periodic[0]) {
                tx = floor_div(xc, nbx);
                bx0 = xc - tx * nbx;
                seg_end = std::min(x_hi, (tx + 1) * nbx - 1);
              }
              const int64_t bx1 = seg_end - tx * nbx;
              xc = seg_end + 1;
              const int64_t j_begin = bs[row + bx0], j_end = bs[row + bx1 + 1];
              if (j_begin == j_end) continue;
              if (n + (j_end - j_begin) > cap) {
                buf.reserve(std::max(2 * cap, n + (j_end - j_begin)), n);
                out = buf.data();
                cap = buf.capacity();
              }
              // x_j + T @ cell - x_i = x_j - q
              const double q0 = xi0 - (tx * g.cell[0][0] + sy0);
              const double q1 = xi1 - (tx * g.cell[0][1] + sy1);
              const double q2 = xi2 - (tx * g.cell[0][2] + sy2);
              const uint32_t code = pack_code(tx, ty, tz);
              const int32_t excluded = (tx == 0 && ty == 0 && tz == 0) ? self : -1;
              const double* xp = xs_p + 3 * j_begin;
              for (int64_t jj = j_begin; jj < j_end; ++jj, xp += 3) {
                const double d0 = xp[0] - q0;
                const double d1 = xp[1] - q1;
                const double d2 = xp[2] - q2;
                const double r2 = d0 * d0 + d1 * d1 + d2 * d2;
                out[n].jj = static_cast<int32_t>(jj);
                out[n].code = code;
                n += (r2 < rc2) & (static_cast<int32_t>(jj) != excluded);
              }
            }
          }
        }
        counts[a] = static_cast<int32_t>(n - n_before);
      }
      chunk_count[ch] = n - chunk_begin[ch];
    }
  };

  run_workers(n_workers, n_chunks, run_worker);

  // ---- outputs: expand the records (S = T + m_i - m_j), in chunk order ----------------------
  std::vector<int64_t> chunk_offset(static_cast<size_t>(n_chunks + 1), 0);
  for (int64_t ch = 0; ch < n_chunks; ++ch) chunk_offset[ch + 1] = chunk_offset[ch] + chunk_count[ch];
  const int64_t P = chunk_offset[n_chunks];
  at::Tensor out_i = empty_long({P});
  at::Tensor out_j = empty_long({P});
  at::Tensor out_s = empty_long({P, 3});
  int64_t* pi = out_i.data_ptr<int64_t>();
  int64_t* pj = out_j.data_ptr<int64_t>();
  int64_t* ps = out_s.data_ptr<int64_t>();
  std::atomic<int64_t> next_copy{0};
  run_workers(n_workers, n_chunks, [&](int) {
    for (int64_t ch = next_copy.fetch_add(1); ch < n_chunks; ch = next_copy.fetch_add(1)) {
      const Record* rec = buffers[chunk_worker[ch]]->data() + chunk_begin[ch];
      int64_t p = chunk_offset[ch];
      const int64_t a_begin = ch * chunk, a_end = std::min(N, a_begin + chunk);
      for (int64_t a = a_begin; a < a_end; ++a) {
        const int64_t cnt = counts[a];
        const int64_t mi0 = moff[3 * a], mi1 = moff[3 * a + 1], mi2 = moff[3 * a + 2];
        for (int64_t q = 0; q < cnt; ++q, ++rec, ++p) {
          const int32_t jj = rec->jj;
          const uint32_t code = rec->code;
          pi[p] = a;
          pj[p] = orig[jj];
          ps[3 * p] = unpack_code(code, 0) + mi0 - ms[3 * jj];
          ps[3 * p + 1] = unpack_code(code, 1) + mi1 - ms[3 * jj + 1];
          ps[3 * p + 2] = unpack_code(code, 2) + mi2 - ms[3 * jj + 2];
        }
      }
    }
  });
  return {out_i, out_j, out_s};
}

void empty_cache_op() { empty_cache(); }

}  // namespace mlpot_nl

TORCH_LIBRARY(mlpot, m) {
  m.def(
      "neighbor_list(Tensor positions, Tensor cells, Tensor pbc, Tensor ptr, float cutoff) -> "
      "(Tensor, Tensor, Tensor)");
  m.def("empty_cache() -> ()", &mlpot_nl::empty_cache_op);
}

TORCH_LIBRARY_IMPL(mlpot, CPU, m) { m.impl("neighbor_list", &mlpot_nl::neighbor_list_cpu); }
