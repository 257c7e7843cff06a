"""Units and physical constants: the only place in mlpot that holds them.

Internal units are ASE's: length in Angstrom, energy in eV, time in fs, mass in amu, temperature
in K, stress in eV/Angstrom^3. Conversions to other engines (OpenMM: nm, kJ/mol, ps) use the
named factors below, whose names say the direction: ``x_in_A * ANGSTROM_TO_NM`` is in nm.
"""
from ase import units as _ase

# Lengths
ANGSTROM_TO_NM = 0.1
NM_TO_ANGSTROM = 10.0

# Energies
EV_TO_KJ_PER_MOL = _ase.eV / (_ase.kJ / _ase.mol)  # 96.485...
KJ_PER_MOL_TO_EV = 1.0 / EV_TO_KJ_PER_MOL
EV_TO_KCAL_PER_MOL = _ase.eV / (_ase.kcal / _ase.mol)
HARTREE_TO_EV = _ase.Hartree

# Forces
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
