"""ML/MM in OpenMM: ethanol treated by an mlpot model, solvated in MM (TIP3P) water.

    python examples/openmm_mlmm.py [--model model.pt] [--backend auto|torch|python] [--steps 200]

Without --model, a small untrained EGNN for H, C, O is built and exported first (its physics is
meaningless; it only shows the workflow). The MM force field is written below in OpenMM's XML
format with illustrative ethanol parameters (not a validated force field: use GAFF/OpenFF through
openmmforcefields for real work) and TIP3P water. ``create_mixed_system`` removes the ethanol's
internal MM terms and adds the ML force (mechanical embedding: ethanol-water interactions stay
MM). The ML force sits in force group 1, so its energy can be read separately.
"""
import argparse
import io
import os
import sys
import tempfile
import time

import torch  # noqa: F401 - first: openmm-torch needs the CUDA libraries torch loads

import openmm
from ase.build import molecule
from openmm import app, unit

from mlpot import units
from mlpot.openmm import create_mixed_system, select_backend, topology_from_ase

from demo_model import demo_model  # examples/demo_model.py, beside this script

# type: (element, charge e, sigma nm, epsilon kJ/mol). The hydroxyl H gets a small LJ sphere
# (AMBER gives it none): with an untrained demo model nothing else keeps it off water oxygens.
TYPES = {"C3": ("C", -0.18, 0.34, 0.457), "C2": ("C", 0.145, 0.34, 0.457),
         "OH": ("O", -0.683, 0.307, 0.88), "HO": ("H", 0.418, 0.1, 0.1),
         "HC": ("H", 0.06, 0.265, 0.0657), "OW": ("O", -0.834, 0.315061, 0.636386),
         "HW": ("H", 0.417, 1.0, 0.0)}
BONDS = [("C3", "C2", 0.1526, 259408), ("C3", "HC", 0.109, 284512), ("C2", "HC", 0.109, 284512),
         ("C2", "OH", 0.141, 267776), ("OH", "HO", 0.0945, 462750),
         ("OW", "HW", 0.09572, 462750)]
ANGLES = [("HC", "C3", "HC", 1.88, 276), ("HC", "C3", "C2", 1.91, 418),
          ("HC", "C2", "HC", 1.88, 276), ("C3", "C2", "HC", 1.91, 418),
          ("C3", "C2", "OH", 1.91, 418), ("HC", "C2", "OH", 1.91, 418),
          ("C2", "OH", "HO", 1.89, 460), ("HW", "OW", "HW", 1.82421813418, 836.8)]
MASS = {"C": 12.011, "O": 15.999, "H": 1.008}


def ethanol_types(topology):
    """Atom type of each ethanol atom from its bonded neighbours."""
    nbrs = {a.index: [] for a in topology.atoms()}
    for a, b in topology.bonds():
        nbrs[a.index].append(b)
        nbrs[b.index].append(a)
    out = []
    for atom in topology.atoms():
        sym = atom.element.symbol
        if sym == "C":
            out.append("C2" if any(n.element.symbol == "O" for n in nbrs[atom.index]) else "C3")
        elif sym == "O":
            out.append("OH")
        else:
            out.append("HO" if nbrs[atom.index][0].element.symbol == "O" else "HC")
    return out


def force_field(topology) -> app.ForceField:
    atoms = list(topology.atoms())
    types = ethanol_types(topology)
    x = ["<ForceField><AtomTypes>"]
    x += [f'<Type name="{t}" class="{t}" element="{e}" mass="{MASS[e]}"/>'
          for t, (e, *_) in TYPES.items()]
    x.append('</AtomTypes><Residues><Residue name="ETH">')
    x += [f'<Atom name="A{a.index}" type="{t}" charge="{TYPES[t][1]}"/>'
          for a, t in zip(atoms, types)]
    x += [f'<Bond atomName1="A{a.index}" atomName2="A{b.index}"/>' for a, b in topology.bonds()]
    x.append('</Residue><Residue name="HOH"><Atom name="O" type="OW" charge="-0.834"/>'
             '<Atom name="H1" type="HW" charge="0.417"/><Atom name="H2" type="HW" '
             'charge="0.417"/><Bond atomName1="O" atomName2="H1"/>'
             '<Bond atomName1="O" atomName2="H2"/></Residue></Residues><HarmonicBondForce>')
    x += [f'<Bond class1="{a}" class2="{b}" length="{r}" k="{k}"/>' for a, b, r, k in BONDS]
    x.append("</HarmonicBondForce><HarmonicAngleForce>")
    x += [f'<Angle class1="{a}" class2="{b}" class3="{c}" angle="{t}" k="{k}"/>'
          for a, b, c, t, k in ANGLES]
    x.append('</HarmonicAngleForce><PeriodicTorsionForce>'
             '<Proper class1="" class2="C3" class3="C2" class4="" periodicity1="3" phase1="0" '
             'k1="0.65"/><Proper class1="" class2="C2" class3="OH" class4="" periodicity1="3" '
             'phase1="0" k1="0.7"/></PeriodicTorsionForce>'
             '<NonbondedForce coulomb14scale="0.8333333333" lj14scale="0.5">'
             '<UseAttributeFromResidue name="charge"/>')
    x += [f'<Atom type="{t}" sigma="{s}" epsilon="{e}"/>' for t, (_, _, s, e) in TYPES.items()]
    x.append("</NonbondedForce></ForceField>")
    for atom in atoms:
        atom.name = f"A{atom.index}"
    return app.ForceField(io.StringIO("".join(x)))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="exported model knowing H, C, O (default: a demo model)")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "python"])
    p.add_argument("--platform", default="CPU")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--out", default=tempfile.mkdtemp(prefix="mlpot-openmm-mlmm-"))
    args = p.parse_args()
    path = args.model or demo_model(args.out, ("H", "C", "O"))

    ethanol = molecule("CH3CH2OH")
    topology = topology_from_ase(ethanol, residue_name="ETH")
    ff = force_field(topology)
    modeller = app.Modeller(topology, ethanol.positions * units.ANGSTROM_TO_NM * unit.nanometer)
    modeller.addSolvent(ff, model="tip3p", boxSize=openmm.Vec3(1.6, 1.6, 1.6) * unit.nanometer)
    ml_atoms = [a.index for a in modeller.topology.atoms() if a.residue.name == "ETH"]
    mm_system = ff.createSystem(modeller.topology, nonbondedMethod=app.PME,
                                nonbondedCutoff=0.7 * unit.nanometer, constraints=app.HBonds,
                                rigidWater=True)
    backend = select_backend(args.backend)
    system = create_mixed_system(path, modeller.topology, mm_system, ml_atoms, backend=backend,
                                 force_group=1)
    print(f"{modeller.topology.getNumAtoms()} atoms ({len(ml_atoms)} ML), {backend} backend")

    integrator = openmm.LangevinMiddleIntegrator(300 * unit.kelvin, 1 / unit.picosecond,
                                                 0.5 * unit.femtosecond)
    sim = app.Simulation(modeller.topology, system, integrator,
                         openmm.Platform.getPlatformByName(args.platform))
    sim.context.setPositions(modeller.positions)
    sim.minimizeEnergy(maxIterations=100)
    sim.context.setVelocitiesToTemperature(300 * unit.kelvin, 1)
    sim.reporters += [app.StateDataReporter(sys.stdout, 50, step=True, potentialEnergy=True,
                                            temperature=True),
                      app.DCDReporter(os.path.join(args.out, "mlmm.dcd"), 50)]
    t0 = time.perf_counter()
    sim.step(args.steps)
    elapsed = time.perf_counter() - t0

    def energy(groups):
        state = sim.context.getState(getEnergy=True, groups=groups)
        return state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)

    total, ml, mm = energy(-1), energy({1}), energy({0})
    print(f"E_total = {total:.2f} kJ/mol = E_MM {mm:.2f} + E_ML {ml:.2f} "
          f"(difference {total - mm - ml:.1e})")
    print(f"{args.steps} steps in {elapsed:.1f} s; trajectory in {args.out}/mlmm.dcd")


if __name__ == "__main__":
    main()
