"""Statistical checks: the thermostats and the barostat sample the ensembles they claim.

Each test runs many replicas at once (the integrators advance them together) on a system whose
answer is known exactly, and compares averages with the exact values within 4 standard errors
(estimated from 20 blocks of the time series, replicas averaged) plus a stated allowance for the
O(dt^2) discretization error. Seeds are fixed, so the tests are deterministic.

- NVT, Lennard-Jones liquid: mean temperature, the canonical variance of the kinetic energy
  Var(K) = N_f (k_B T)^2 / 2, and Maxwell-Boltzmann velocities (moments and Kolmogorov-Smirnov).
- NVT, anharmonic lattice: configurational equipartition <sum_i x_i . dU/dx_i> = 3N k_B T.
- NPT, ideal gas: V P0 / k_B T follows Gamma(N + 1) exactly (mean, variance, distribution).
- NPT, ideal gas in a box with an equation of state U(V) or U(L_x, L_y, L_z): mean volume,
  volume fluctuations and box lengths against numerical quadrature of the exact distribution.
"""
import numpy as np
import pytest
import torch
from ase.build import bulk
from scipy import integrate, stats

import integrators as I
from mlpot import units

T0 = 100.0  # K, for the Lennard-Jones liquid


pytestmark = [pytest.mark.usefixtures("one_thread"),  # tests/conftest.py
              pytest.mark.slow]  # every test here samples a distribution: 7-25 s each


def mean_and_error(series: np.ndarray, n_blocks: int = 20):
    """Mean of a [frames, replicas] series and its standard error from block averages."""
    b = series.mean(axis=1)
    b = b[: len(b) // n_blocks * n_blocks].reshape(n_blocks, -1).mean(axis=1)
    return float(series.mean()), float(b.std(ddof=1) / np.sqrt(n_blocks))


def assert_close(value, error, expected, allowance, what):
    assert abs(value - expected) < 4 * error + allowance, (
        f"{what}: {value:.5g} +- {error:.2g}, expected {expected:.5g} "
        f"(tolerance 4 sigma + {allowance:.2g})")


# ------------------------------------------------------------------------------ NVT
def lj_liquid(replicas: int):
    """32 argon atoms at liquid density (reduced 0.8, T* = 0.83), smooth 6 A cutoff,
    equilibrated."""
    atoms = bulk("Ar", "fcc", a=(4 / 0.02035) ** (1 / 3), cubic=True).repeat(2)
    rng = np.random.default_rng(0)
    pos = atoms.positions + rng.normal(0, 0.05, (replicas, len(atoms), 3))
    st = I.make_state(pos, atoms.get_masses(), atoms.cell.array, True, atoms.numbers, seed=11)
    st = I.initialize_velocities(st, 2 * T0)
    f = I.LennardJones(0.0104, 3.4, 6.0, skin_A=1.0, switch_width_A=1.0)
    eq = I.Langevin(10.0, T0, 0.01)
    st = eq.init(st, f)
    for _ in range(600):  # 6 ps, melts the lattice
        st = eq.step(st, f)
    return st.replace(bath_energy=torch.zeros_like(st.bath_energy)), f


@pytest.mark.parametrize("make", [
    lambda: I.Langevin(10.0, T0, 0.002),
    lambda: I.Bussi(10.0, T0, 200.0),
    lambda: I.NoseHooverChain(10.0, T0, 200.0),
], ids=["langevin", "bussi", "nose-hoover"])
def test_thermostat_gives_canonical_temperature_and_velocities(make):
    integ = make()
    st, f = lj_liquid(replicas=16)
    st = integ.init(st, f)
    temps, vels = [], []
    for n in range(3000):  # 30 ps
        st = integ.step(st, f)
        if n % 5 == 0:
            temps.append(I.temperature_K(st))
        if n % 25 == 0:
            vels.append(st.velocities.clone())
    temps = torch.stack(temps).numpy()  # [F, R]
    t, dt_err = mean_and_error(temps)
    assert_close(t, dt_err, T0, 0.005 * T0, "mean temperature (K)")
    # canonical: Var(K) = N_f (kT)^2 / 2, i.e. Var(T) / T0^2 = 2 / N_f
    var = ((temps - T0) ** 2) / T0**2 * st.dof / 2
    v, v_err = mean_and_error(var)
    assert_close(v, v_err, 1.0, 0.05, "Var(K) / (N_f (kT)^2 / 2)")
    # Maxwell-Boltzmann: v sqrt(m / kT) ~ N(0, 1 - 1/N) with the centre of mass at rest
    kt = T0 * units.BOLTZMANN_EV_PER_K
    scale = torch.sqrt(st.masses / (kt * units.EV_PER_AMU_TO_A2_PER_FS2))[None, None, :, None]
    x = (torch.stack(vels) * scale).numpy().ravel() / np.sqrt(1 - 1 / st.n_atoms)
    assert abs(np.mean(x**2) - 1) < 0.02
    assert abs(np.mean(x**4) - 3) < 0.1
    assert stats.kstest(x, "norm").statistic < 0.01  # about 3 x 10^5 samples, correlated


class AnharmonicLattice:
    """U = sum_i (k_i/2 |x_i|^2 + c/4 |x_i|^4) + kappa/2 sum_bonds |x_j - x_i|^2 (a chaotic
    phi^4 lattice; x are displacements from the sites)."""

    def __init__(self, k, c, kappa, bonds):
        self.k, self.c, self.kappa = torch.as_tensor(k)[None, :, None], c, kappa
        self.i, self.j = torch.as_tensor(bonds[:, 0]), torch.as_tensor(bonds[:, 1])

    def __call__(self, x, cell, compute_stress):
        u2 = (x * x).sum(-1, keepdim=True)
        d = x[:, self.j] - x[:, self.i]
        e = (0.5 * self.k * u2 + 0.25 * self.c * u2 * u2).sum((1, 2)) \
            + 0.5 * self.kappa * (d * d).sum((1, 2))
        f = -(self.k + self.c * u2) * x
        f = f.index_add(1, self.i, self.kappa * d).index_add(1, self.j, -self.kappa * d)
        return {"energy": e.double(), "forces": f}


def test_langevin_samples_configurations_configurational_equipartition():
    """<sum_i x_i . dU/dx_i> = 3N k_B T holds for any canonical system with a confining U."""
    n, r, t0 = 64, 32, 300.0
    rng = np.random.default_rng(42)
    ring = np.stack([np.arange(n), (np.arange(n) + 1) % n], 1)
    extra = np.stack([np.arange(n), (np.arange(n) + 7) % n], 1)
    f = AnharmonicLattice(rng.uniform(0.5, 2.0, n), 10.0, 1.0, np.concatenate([ring, extra]))
    st = I.make_state(np.zeros((n, 3)), rng.uniform(4.0, 16.0, n), replicas=r, seed=7)
    st = I.initialize_velocities(st, t0, remove_com=False)
    integ = I.Langevin(1.0, t0, 0.02)
    st = integ.init(st, f)
    kt = t0 * units.BOLTZMANN_EV_PER_K
    virial, temps = [], []
    for step in range(12000):
        st = integ.step(st, f)
        if step >= 1000 and step % 10 == 0:
            virial.append(-(st.positions * st.forces).sum((1, 2)) / (3 * n * kt))
            temps.append(I.temperature_K(st))
    v, v_err = mean_and_error(torch.stack(virial).numpy())
    assert_close(v, v_err, 1.0, 0.003, "<x . dU/dx> / (3N kT)")
    t, t_err = mean_and_error(torch.stack(temps).numpy())
    assert_close(t, t_err, t0, 0.003 * t0, "mean temperature (K)")


# ------------------------------------------------------------------------------ NPT
KT = 300.0 * units.BOLTZMANN_EV_PER_K
P_BAR = 1000.0
P0 = P_BAR * units.BAR_TO_EV_PER_A3  # eV/A^3
N_GAS = 4


def run_gas(coupling, cell_energy=None, cell=None, replicas=512, steps=4000, dt=4.0, tau_p=400.0,
            thermostat="bussi"):
    """Ideal gas of N_GAS particles per replica under stochastic cell rescaling + Bussi.

    Returns the volumes [F, R] and cells [F, R, 3, 3] sampled every tau_p / 40 after 3 tau_p.
    """
    v_mean = (N_GAS + 1) * KT / P0
    if cell is None:
        cell = np.eye(3) * v_mean ** (1 / 3)
    rng = np.random.default_rng(0)
    frac = rng.uniform(0, 1, (replicas, N_GAS, 3))
    st = I.make_state(frac @ cell, np.full(N_GAS, 40.0), cell, True, seed=3)
    st = I.initialize_velocities(st, 300.0, remove_com=False)
    integ = I.StochasticCellRescaling(dt, 300.0, P_BAR, tau_t_fs=50.0, tau_p_fs=tau_p,
                                      compressibility_per_bar=1.0 / P_BAR, coupling=coupling,
                                      thermostat=thermostat, friction_per_fs=0.02)
    f = I.IdealGas(cell_energy)
    st = integ.init(st, f)
    vols, cells = [], []
    every, burn = max(1, int(tau_p / dt / 40)), int(3 * tau_p / dt)
    for n in range(steps):
        st = integ.step(st, f)
        if n >= burn and n % every == 0:
            vols.append(st.volume())
            cells.append(st.cell.double())
    return torch.stack(vols).numpy(), torch.stack(cells).numpy()


@pytest.mark.parametrize("coupling", ["iso", "tri"])
def test_npt_ideal_gas_volume_distribution_is_exact(coupling):
    """Isothermal-isobaric ideal gas (N_f = 3N): p(V) ~ V^N exp(-P0 V / kT), so V P0 / kT is
    Gamma(N + 1): mean and variance N + 1."""
    vols, cells = run_gas(coupling)
    x = vols * P0 / KT
    m, m_err = mean_and_error(x)
    assert_close(m, m_err, N_GAS + 1, 0.005 * (N_GAS + 1), "<V> P0 / kT")
    var = (x - (N_GAS + 1)) ** 2
    v, v_err = mean_and_error(var)
    assert_close(v, v_err, N_GAS + 1, 0.03 * (N_GAS + 1), "Var(V) (P0 / kT)^2")
    assert stats.kstest(x.ravel(), stats.gamma(N_GAS + 1).cdf).statistic < 0.01
    if coupling == "tri":  # the cell keeps its lower-triangular (ASE) form
        assert np.abs(np.triu(cells[-1], 1)).max() == 0.0


def test_npt_volume_follows_a_known_equation_of_state():
    """Ideal gas in a box with U(V) = B (V - V_ref)^2 / (2 V_ref): p(V) ~ V^N exp(-(P0 V + U) / kT).
    Checks the stress path (sign and size) of the barostat: mean volume and its fluctuations."""
    b, v_ref = 0.004, 150.0  # eV/A^3, A^3

    def u(v):
        return 0.5 * b * (v - v_ref) ** 2 / v_ref

    vols, _ = run_gas("iso", cell_energy=lambda h: u(I.state.det3(h)), replicas=512)
    w = lambda v: v**N_GAS * np.exp(-(P0 * v + u(v)) / KT)  # noqa: E731
    z = integrate.quad(w, 0, 2000, points=[v_ref])[0]
    mean = integrate.quad(lambda v: v * w(v), 0, 2000, points=[v_ref])[0] / z
    var = integrate.quad(lambda v: (v - mean) ** 2 * w(v), 0, 2000, points=[v_ref])[0] / z
    m, m_err = mean_and_error(vols)
    assert_close(m, m_err, mean, 0.003 * mean, "<V> (A^3)")
    s, s_err = mean_and_error((vols - mean) ** 2)
    assert_close(s, s_err, var, 0.03 * var, "Var(V) (A^6)")
    assert abs(mean - (N_GAS + 1) * KT / P0) > 10 * m_err  # the EOS matters


def test_npt_anisotropic_box_lengths_follow_the_exact_distribution():
    """"aniso" coupling, ideal gas in an orthorhombic box with U = sum_a k (L_a - L0_a)^2 / 2:
    p(Lx, Ly, Lz) ~ V^N exp(-(P0 V + U) / kT) dLx dLy dLz (the measure this barostat samples),
    integrated on a grid. The Langevin thermostat keeps the momenta isotropic (a global one would
    not, for an ideal gas)."""
    k, l0 = 0.02, np.array([4.0, 5.0, 7.0])  # eV/A^2, A

    def u(h):
        lengths = h.diagonal(dim1=-2, dim2=-1)
        return 0.5 * k * ((lengths - torch.as_tensor(l0, dtype=h.dtype)) ** 2).sum(-1)

    vols, cells = run_gas("aniso", cell_energy=u, cell=np.diag(l0), thermostat="langevin",
                          replicas=256, steps=7000, tau_p=800.0)  # dt / tau_p = 1/200
    lengths = cells.diagonal(axis1=-2, axis2=-1)  # [F, R, 3]
    assert np.abs(cells - np.apply_along_axis(np.diag, -1, lengths)).max() < 1e-12
    g = [np.linspace(max(0.05, c - 4.5), c + 4.5, 181) for c in l0]
    lx, ly, lz = np.meshgrid(*g, indexing="ij")
    vol = lx * ly * lz
    logw = N_GAS * np.log(vol) - (P0 * vol + 0.5 * k * ((lx - l0[0]) ** 2 + (ly - l0[1]) ** 2
                                                       + (lz - l0[2]) ** 2)) / KT
    w = np.exp(logw - logw.max())
    w /= w.sum()
    for a, grid in enumerate((lx, ly, lz)):
        m, m_err = mean_and_error(lengths[..., a])
        assert_close(m, m_err, float((w * grid).sum()), 0.002 * l0[a], f"<L_{'xyz'[a]}> (A)")
    m, m_err = mean_and_error(vols)
    assert_close(m, m_err, float((w * vol).sum()), 0.005 * float((w * vol).sum()), "<V> (A^3)")
