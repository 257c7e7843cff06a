"""Units and physical constants: the only place in mlpot that holds them.

Internal units are ASE's: length in Angstrom, energy in eV, time in fs, mass in amu, temperature
in K, stress in eV/Angstrom^3. Conversions to other engines (OpenMM: nm, kJ/mol, ps) use the
named factors below, whose names say the direction: ``x_in_A * ANGSTROM_TO_NM`` is in nm.
"""
from ase import units as _ase

# Lengths
ANGSTROM_TO_NM = 0.1
NM_TO_ANGSTROM = 10.0
BOHR_TO_ANGSTROM = 0.529177210903  # CODATA 2018 (ASE's Bohr: CODATA 2014)

# Energies
EV_TO_KJ_PER_MOL = _ase.eV / (_ase.kJ / _ase.mol)  # 96.485...
KJ_PER_MOL_TO_EV = 1.0 / EV_TO_KJ_PER_MOL
EV_TO_KCAL_PER_MOL = _ase.eV / (_ase.kcal / _ase.mol)
HARTREE_TO_EV = _ase.Hartree

# Forces
# Hartree/Bohr -> eV/A (e.g. PySCF gradients): the Hartree above (ASE's, CODATA 2014:
# 27.211386 eV) over the Bohr above (CODATA 2018: 0.529177210903 A); ~51.422 eV/A
HARTREE_PER_BOHR_TO_EV_PER_A = HARTREE_TO_EV / BOHR_TO_ANGSTROM
EV_PER_A_TO_KJ_PER_MOL_NM = EV_TO_KJ_PER_MOL / ANGSTROM_TO_NM

# Time
FS_TO_PS = 1e-3
PS_TO_FS = 1e3
FS_TO_ASE_TIME = _ase.fs  # ASE's internal time unit is Angstrom*sqrt(amu/eV)

# Thermodynamics
BOLTZMANN_EV_PER_K = _ase.kB
BAR_TO_EV_PER_A3 = _ase.bar
GPA_TO_EV_PER_A3 = _ase.GPa
EV_PER_A3_TO_GPA = 1.0 / _ase.GPa

# Molecular dynamics (mlpot's integrators: velocities in A/fs, masses in amu, energies in eV).
# ASE's time unit is A*sqrt(amu/eV) and 1 fs = _ase.fs of it, so amu*A^2/fs^2 = eV / _ase.fs^2.
AMU_A2_PER_FS2_TO_EV = 1.0 / _ase.fs**2  # kinetic energy: 0.5 * m[amu] * v[A/fs]^2 * this -> eV
EV_PER_AMU_TO_A2_PER_FS2 = _ase.fs**2  # kT/m [eV/amu] -> (A/fs)^2; F/m [eV/(A amu)] -> A/fs^2
A_PER_FS_TO_ASE_VELOCITY = 1.0 / _ase.fs  # v[A/fs] * this -> ASE velocity (A per ASE time unit)
EV_PER_A3_TO_BAR = 1.0 / _ase.bar  # pressure/stress eV/A^3 -> bar
