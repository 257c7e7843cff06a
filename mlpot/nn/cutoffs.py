"""Smooth cutoff functions: energies and forces stay continuous as an atom crosses the cutoff."""
import torch


def polynomial_cutoff(r: torch.Tensor, cutoff: float, p: float = 6.0) -> torch.Tensor:
    """Polynomial envelope u(x), x = r / cutoff (Klicpera, Gross, Guennemann, ICLR 2020, eq. 8):

    u(x) = 1 - (p+1)(p+2)/2 x^p + p(p+2) x^(p+1) - p(p+1)/2 x^(p+2) for x < 1, else 0.
    u(0) = 1 and u, u', u'' vanish at x = 1.
    """
    x = r / cutoff
    u = (1.0 - 0.5 * (p + 1.0) * (p + 2.0) * x.pow(p) + p * (p + 2.0) * x.pow(p + 1.0)
         - 0.5 * p * (p + 1.0) * x.pow(p + 2.0))
    return u * (x < 1.0).to(r.dtype)


def smooth_inverse_switch(r: torch.Tensor, r_smooth: float, cutoff: float) -> torch.Tensor:
    """The Deep Potential weight s(r) (Zhang et al., NeurIPS 2018, eq. 4 of the DeepPot-SE paper):

    s(r) = 1/r for r < r_smooth; 1/r * [u^3 (-6u^2 + 15u - 10) + 1] with
    u = (r - r_smooth) / (cutoff - r_smooth) for r_smooth <= r < cutoff; 0 beyond.
    s and its first and second derivatives are continuous at the cutoff.
    """
    u = ((r - r_smooth) / (cutoff - r_smooth)).clamp(0.0, 1.0)
    switch = u * u * u * (-6.0 * u * u + 15.0 * u - 10.0) + 1.0
    return switch / r * (r < cutoff).to(r.dtype)
