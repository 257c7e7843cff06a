"""Model deviation with DeePMD-kit's definitions (population std over members), checked
against a plain numpy computation, eager and scripted."""
import numpy as np
import pytest
import torch

from mlpot import keys as K
from mlpot.uncertainty import calibrated, model_deviation


@pytest.mark.parametrize("scripted", [False, True])
def test_deviation_equals_numpy(scripted):
    fn = torch.jit.script(model_deviation) if scripted else model_deviation
    g = torch.Generator().manual_seed(0)
    members, sizes = 4, [3, 5]
    n = sum(sizes)
    e = torch.randn(members, 2, dtype=torch.float64, generator=g)
    f = torch.randn(members, n, 3, dtype=torch.float64, generator=g)
    v = torch.randn(members, 2, 3, 3, dtype=torch.float64, generator=g)
    batch = torch.repeat_interleave(torch.arange(2), torch.tensor(sizes))
    out = fn(e, f, batch, torch.tensor(sizes), v)
    fa, ea, va = f.numpy(), e.numpy(), v.numpy()
    per_atom = np.sqrt(((fa - fa.mean(0)) ** 2).sum(-1).mean(0))  # DeePMD's max_devi_f, per atom
    np.testing.assert_allclose(out[K.FORCES_DEV].numpy(), per_atom)
    np.testing.assert_allclose(out[K.MAX_FORCE_DEV].numpy(),
                               [per_atom[:3].max(), per_atom[3:].max()])
    np.testing.assert_allclose(out[K.ENERGY_DEV].numpy(), ea.std(0) / np.array(sizes))
    np.testing.assert_allclose(out[K.VIRIAL_DEV].numpy(),
                               va.reshape(members, 2, 9).std(0).max(1) / np.array(sizes))
    cal = calibrated(out, 2.0)
    np.testing.assert_allclose(cal[K.MAX_FORCE_DEV + K.CALIBRATED_SUFFIX].numpy(),
                               2 * out[K.MAX_FORCE_DEV].numpy())


def test_equal_members_give_zero_deviation():
    f = torch.randn(1, 6, 3, dtype=torch.float64).expand(3, 6, 3)
    e = torch.full((3, 1), -5.0, dtype=torch.float64)
    out = model_deviation(e, f, torch.zeros(6, dtype=torch.long), torch.tensor([6]))
    assert float(out[K.MAX_FORCE_DEV].abs().max()) < 1e-12  # the mean of equal numbers may
    assert float(out[K.ENERGY_DEV].abs().max()) < 1e-12     # differ from them by one ulp
    assert K.VIRIAL_DEV not in out


def test_relative_force_deviation_is_deepmds():
    """DeePMD-kit's relative deviation: per atom forces_dev / (|mean force| + level), the largest
    per structure; a larger level weighs the large forces less; level <= 0 is refused."""
    from mlpot.uncertainty import relative_max_force_dev

    rng = np.random.default_rng(0)
    f = rng.normal(size=(4, 2, 5, 3))  # [members, structures, atoms, xyz]
    dev = np.sqrt(((f - f.mean(0)) ** 2).sum(-1).mean(0))  # [2, 5]
    mean = f.mean(0)
    expect = [max(dev[b, i] / (np.linalg.norm(mean[b, i]) + 0.5) for i in range(5))
              for b in range(2)]
    np.testing.assert_allclose(relative_max_force_dev(dev, mean, 0.5), expect)
    # one structure: an atom with a large force and a large deviation against one with a small
    # force and a smaller deviation: the raw order and the relative order differ
    dev1, f1 = np.array([0.3, 0.1]), np.array([[6.0, 0, 0], [0.1, 0, 0]])
    assert relative_max_force_dev(dev1, f1, 0.1) == pytest.approx(0.1 / 0.2)
    assert relative_max_force_dev(dev1, f1, 100.0) == pytest.approx(0.3 / 106.0)
    with pytest.raises(ValueError, match="level must be > 0"):
        relative_max_force_dev(dev1, f1, 0.0)
