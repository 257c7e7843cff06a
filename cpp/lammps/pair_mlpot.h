/* pair_style mlpot: LAMMPS runs an mlpot exported TorchScript model (mlpot.export).

   Loaded with `plugin load` from the library `python -m mlpot.lammps --plugin-path` builds.
   Usage:
       units metal
       pair_style mlpot model.pt
       pair_coeff * * O H          (the element of each LAMMPS atom type, from the model's map)

   Each MPI rank hands the model its local atoms and its ghost atoms as one non-periodic cluster
   (ghosts are separate atoms, periodic images included) with every pair of it closer than the
   cutoff (mlpot's neighbor-list op), and `local_atoms` = nlocal: the model's energy is that of
   the local atoms, and its forces on ghosts go back to their owners (newton on). The ghost
   region is set to the model's receptive field (interaction layers x cutoff, from the file's
   metadata) plus the skin, so message-passing models see every atom their local energies depend
   on. The virial is sum_k x_k F_k over local and ghost atoms (virial_fdotr_compute). A model
   of one interaction layer (a Deep Potential) needs only the pairs of local centres: those come
   from LAMMPS's full neighbor list instead (rebuilt at reneighboring only, filtered to the
   cutoff each step), so ghost-centred pairs are never searched.

   On one MPI rank the model gets the local atoms with the periodic cell instead and finds its
   own periodic neighbors (no ghost cluster to evaluate; the virial from the model's strain
   derivative).

   compute pe/atom and compute stress/atom (virial part) work in both modes: the per-atom virial
   is the model's (mlpot.keys.ATOMIC_VIRIAL: each pair vector's share -1/2 v (x) dE/dv on both of
   its atoms; ghosts' shares are reverse-communicated by the compute), so it sums to the virial. `pair_style mlpot model.pt ghosts always` uses the ghost cluster there too, as
   does pair_style hybrid (whose virial is sum x F over local and ghost atoms).

   Model deviation (DP-GEN's model_devi.out, as DeePMD-kit's pair_style deepmd writes it), for
   models with an uncertainty (a committee or a variance network, metadata `uncertainty`):
       pair_style mlpot model.pt out_file model_devi.out out_freq 10
   Rank 0 writes `step max_devi_v min_devi_v avg_devi_v max_devi_f min_devi_f avg_devi_f devi_e`
   every out_freq steps (default 100), the header and format of mlpot's ModelDeviFile
   (integrators/reporters.py). In the ghost cluster the committee members' forces on ghosts are
   reverse-communicated to their owners before the deviations of the local atoms are taken, the
   members' energies of the local atoms are summed over ranks, and max/min/sum over ranks.
   The *_devi_v columns are computed for a committee in the periodic mode (one rank) and are 0 in
   the ghost cluster (as ModelDeviFile writes them without a virial).
*/
#ifndef MLPOT_PAIR_MLPOT_H
#define MLPOT_PAIR_MLPOT_H

#include "pair.h"

#include <torch/script.h>

#include <cstdio>
#include <string>
#include <vector>

namespace LAMMPS_NS {

class PairMLPot : public Pair {
 public:
  PairMLPot(class LAMMPS *);
  ~PairMLPot() override;
  void compute(int, int) override;
  void settings(int, char **) override;
  void coeff(int, char **) override;
  void init_style() override;
  double init_one(int, int) override;
  int pack_reverse_comm(int, int, double *) override;
  void unpack_reverse_comm(int, int *, double *) override;

 private:
  void allocate();
  void load_model(const std::string &path);
  void compute_periodic();
  void atoms_as_tensors(int n, torch::Tensor &positions, torch::Tensor &types);
  void compute_ghosts();
  void pairs_of_local_centres(int nlocal, torch::Tensor &ei, torch::Tensor &ej);
  torch::Tensor add_forces_and_energies(const c10::impl::GenericDict &out, int n);
  void add_atomic_virial(const c10::impl::GenericDict &out, int n);
  torch::jit::IValue run_model(c10::Dict<std::string, torch::Tensor> &input, bool stress);
  bool deviation_step() const;
  void deviation_periodic(const c10::impl::GenericDict &out);
  void deviation_ghosts(const c10::impl::GenericDict &out, const torch::Tensor &types);
  void write_deviation(const double *values);
  void close_out_file();

  torch::jit::Module model;
  bool model_loaded = false;
  std::string model_path;
  std::vector<std::string> type_map;    // the model's elements, by type index
  std::vector<long> model_type;         // LAMMPS type (1..ntypes) -> model type index
  double cutoff = 0.0;                  // Angstrom
  double receptive_field = 0.0;         // Angstrom: interaction layers x cutoff
  int interaction_layers = 1;
  torch::Dtype model_dtype = torch::kFloat32;
  bool ghosts_always = false;           // `ghosts always`: the ghost cluster on one rank too
  bool periodic_mode = false;           // this run: one rank, the model's own periodic list
  bool local_pairs_only = false;        // this run: ghost cluster of a one-layer model, whose
                                        // pairs come from LAMMPS's full list of local centres

  // model deviation (out_file)
  std::string uncertainty;              // "committee", "mve" or "" (none), from the metadata
  int num_members = 0;                  // committee members
  std::string out_file;                 // "" : no model_devi file
  int out_freq = 100;
  FILE *out_fp = nullptr;               // rank 0 only
  bigint last_out_step = -1;            // a step written once (a second run's setup repeats it)
  std::vector<double> member_forces;    // [nall][K][3] committee members' forces (reverse comm)
  torch::Tensor mve_lengths;            // [types] A: a variance network's energy lengths a_t
  bool mve_energy_ok = true;            // the lengths reproduce the model's energy_dev
  bool mve_warned = false;
};

}    // namespace LAMMPS_NS

#endif
