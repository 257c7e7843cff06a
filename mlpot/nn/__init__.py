"""Building blocks shared by the models: cutoff envelopes, radial bases, MLPs, scatter."""
from .cutoffs import polynomial_cutoff, smooth_inverse_switch
from .mlp import MLP, activation
from .radial import BesselBasis
from .scatter import scatter_add_, scatter_sum

__all__ = ["polynomial_cutoff", "smooth_inverse_switch", "MLP", "activation", "BesselBasis",
           "scatter_add_", "scatter_sum"]
