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
   on. The virial is sum_k x_k F_k over local and ghost atoms (virial_fdotr_compute).

   On one MPI rank the model gets the local atoms with the periodic cell instead and finds its
   own periodic neighbors (no ghost cluster to evaluate; the virial from the model's strain
   derivative). `pair_style mlpot model.pt ghosts always` uses the ghost cluster there too, as
   does pair_style hybrid (whose virial is sum x F over local and ghost atoms).
*/
#ifndef MLPOT_PAIR_MLPOT_H
#define MLPOT_PAIR_MLPOT_H

#include "pair.h"

#include <torch/script.h>

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

 private:
  void allocate();
  void load_model(const std::string &path);
  void compute_periodic();
  void compute_ghosts();
  torch::jit::IValue run_model(c10::Dict<std::string, torch::Tensor> &input, bool stress);

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
};

}    // namespace LAMMPS_NS

#endif
