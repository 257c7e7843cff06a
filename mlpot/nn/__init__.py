"""Building blocks shared by the models: cutoff envelopes, radial bases, MLPs, scatter."""
from .cutoffs import cosine_cutoff, polynomial_cutoff, smooth_inverse_switch
from .mlp import MLP, activation
from .radial import BesselBasis, GaussianBasis
from .scatter import scatter_add_, scatter_sum

__all__ = ["cosine_cutoff", "polynomial_cutoff", "smooth_inverse_switch", "MLP", "activation",
           "BesselBasis", "GaussianBasis", "scatter_add_", "scatter_sum"]
