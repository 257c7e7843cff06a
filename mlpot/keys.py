"""Names of the tensors that flow through mlpot, with their shapes and units.

Every model, the trainer and every interface use these keys; no other names for the same data.
N: atoms in the batch, B: structures in the batch, P: neighbor pairs in the batch.
Conventions: cells are rows (``cell[b, k]`` is lattice vector k); the vector of a pair is
``positions[j] - positions[i] + S @ cell`` (ASE's convention); stress = -virial / volume
(ASE's sign, positive under tension).
"""

POSITIONS = "positions"          # [N, 3] float, Angstrom
ATOMIC_NUMBERS = "atomic_numbers"  # [N] int64
ATOM_TYPES = "atom_types"        # [N] int64, index into the type map
CELL = "cell"                    # [B, 3, 3] float, Angstrom, rows are lattice vectors
PBC = "pbc"                      # [B, 3] bool
BATCH = "batch"                  # [N] int64, structure index of each atom
PTR = "ptr"                      # [B + 1] int64, atoms of structure b are ptr[b]:ptr[b+1]
NUM_ATOMS = "num_atoms"          # [B] int64
EDGE_INDEX = "edge_index"        # [2, P] int64: row 0 is i (centre), row 1 is j (neighbor)
EDGE_SHIFTS = "edge_cell_shift"  # [P, 3] int64, integer cell shifts S
# Domain decomposition (LAMMPS): atoms 0..n_local-1 are the local atoms, the rest are ghosts
# (copies of atoms owned elsewhere). Given, the energy sums the atomic energies of local atoms
# only (ghosts' atomic energies are 0) and forces are returned for all atoms, ghosts included.
LOCAL_ATOMS = "local_atoms"      # [] or [1] int64: n_local (one structure only)

# Targets (labels) and model outputs
ENERGY = "energy"                # [B] float64, eV, total energy
ATOMIC_ENERGIES = "atomic_energies"  # [N] float64, eV
FORCES = "forces"                # [N, 3] float, eV/Angstrom
VIRIAL = "virial"                # [B, 3, 3] float, eV
STRESS = "stress"                # [B, 3, 3] float, eV/Angstrom^3, = -virial / volume
# Per-atom virial (LAMMPS's compute stress/atom), computed when the input holds
# COMPUTE_ATOMIC_VIRIAL ([] bool, true): with g_e = dE/dv_e for the pair vector v_e of edge
# (i, j), W_i = -1/2 sum over the edges e of i (as centre or neighbor) of sym(v_e (x) g_e), so
# that the sum over atoms (ghosts included) is the virial; symmetric, as the virial.
ATOMIC_VIRIAL = "atomic_virial"  # [N, 3, 3] float64, eV
COMPUTE_ATOMIC_VIRIAL = "compute_atomic_virial"  # [] bool input flag

# Committees (K members) and their model deviation, with DeePMD-kit's definitions (population
# standard deviation over the members) so that DP-GEN trust levels carry over
ENERGY_MEMBERS = "energy_members"    # [K, B] float64, eV, each member's total energy
FORCES_MEMBERS = "forces_members"    # [K, N, 3] float, eV/Angstrom, each member's forces
VIRIAL_MEMBERS = "virial_members"    # [K, B, 3, 3] float, eV (with compute_stress)
FORCES_DEV = "forces_dev"            # [N] eV/A: |population std over members of F_i| (norm)
MAX_FORCE_DEV = "max_force_dev"      # [B] eV/A: max over atoms of FORCES_DEV (max_devi_f)
ENERGY_DEV = "energy_dev"            # [B] eV/atom: std of the total energy / atoms (devi_e)
VIRIAL_DEV = "virial_dev"            # [B] eV/atom: max over components of std(virial) / atoms
CALIBRATED_SUFFIX = "_calibrated"    # e.g. "max_force_dev_calibrated": the calibrated value
