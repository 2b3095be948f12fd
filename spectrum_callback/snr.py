"""The Spectrum SNR formula as pure tensor functions.

This module matches the original Spectrum scanner (cognitivecomputations/spectrum):

* sigma  = IQR(S) / 1.349, quantiles with linear interpolation (``torch.quantile``)
* beta   = min(n, m) / max(n, m); threshold = sigma * (1 + sqrt(beta))
* signal = sum(S[S > threshold]); noise = sum(S[S <= threshold])
* snr    = (signal / noise) / S[0]; noise == 0 gives +inf (as in the published files)

:func:`compute_snr` is the exact reference (``torch.linalg.svdvals``).  The faster
paths used by the analyzer (:func:`singular_values` with ``method="gram"``) are
tested against it.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional

import torch

__all__ = [
    "compute_snr",
    "snr_from_singular_values",
    "snr_from_singular_values_batched",
    "singular_values",
    "as_matrix",
]

IQR_TO_SIGMA = 1.349  # interquartile range of a standard normal: sigma = IQR / 1.349


def as_matrix(weight: torch.Tensor) -> torch.Tensor:
    """Return ``weight`` as a 2-D matrix the way the original tool does (1-D -> 1 x d)."""
    w = weight.detach()
    if w.ndim == 1:
        return w.unsqueeze(0)
    if w.ndim != 2:
        raise ValueError(
            f"SNR is defined for 1-D or 2-D weights, got shape {tuple(w.shape)}; "
            "fused 3-D expert tensors must be split per expert first"
        )
    return w


def snr_from_singular_values(s: torch.Tensor, n: int, m: int) -> float:
    """SNR of an ``n x m`` matrix from its singular values ``s`` (any order)."""
    return float(snr_from_singular_values_batched(s.unsqueeze(0), n, m)[0])


def snr_from_singular_values_batched(s: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """SNR for a batch ``(B, k)`` of singular-value vectors of ``n x m`` matrices.

    Returns a float64 CPU tensor of shape ``(B,)``.  Rows are sorted descending here,
    so callers may pass eigenvalue-derived values in ascending order.
    """
    if s.ndim != 2:
        raise ValueError(f"expected a (batch, k) tensor of singular values, got {tuple(s.shape)}")
    s = torch.sort(s, dim=-1, descending=True).values
    q = torch.quantile(s, torch.tensor([0.25, 0.75], dtype=s.dtype, device=s.device), dim=-1)
    sigma = (q[1] - q[0]) / IQR_TO_SIGMA
    beta = min(n, m) / max(n, m)
    threshold = (sigma * (1.0 + math.sqrt(beta))).unsqueeze(-1)
    above = s > threshold
    signal = torch.where(above, s, torch.zeros_like(s)).sum(-1)
    noise = torch.where(above, torch.zeros_like(s), s).sum(-1)
    top = s[:, 0]
    ratio = (signal / noise) / top
    ratio = torch.where(noise == 0, torch.full_like(ratio, math.inf), ratio)
    return ratio.detach().to("cpu", torch.float64)


def singular_values(
    w: torch.Tensor, method: str = "svd", dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Singular values of a matrix or a batch ``(..., n, m)`` of same-shape matrices.

    ``method="svd"``: ``torch.linalg.svdvals`` (the original tool's route).
    ``method="gram"``: square roots of the eigenvalues of the smaller Gram matrix
    (``W^T W`` or ``W W^T``); same values up to rounding, cheaper on GPU.
    Values come back in descending order, in ``dtype``.
    """
    x = w.to(dtype)
    if method == "svd":
        return torch.linalg.svdvals(x)
    if method == "gram":
        n, m = x.shape[-2], x.shape[-1]
        g = x.mT @ x if n >= m else x @ x.mT
        ev = torch.linalg.eigvalsh(g)
        return ev.clamp_min(0).sqrt().flip(-1)
    raise ValueError(f"unknown SVD method {method!r}; use 'svd' or 'gram'")


def compute_snr(
    weight: torch.Tensor,
    name: Optional[str] = None,
    *,
    method: str = "svd",
    dtype: torch.dtype = torch.float32,
) -> float:
    """SNR of one weight matrix, as the original Spectrum tool computes it.

    Args:
        weight: a 2-D weight (1-D counts as ``1 x d``), any dtype or device.
        name: named in the warning for a matrix with NaN or Inf entries.
        method: ``"svd"`` (``torch.linalg.svdvals``, the original's) or ``"gram"``.
        dtype: computation precision, float32 (as the original) or float64.

    Returns:
        The SNR; ``nan`` (and a warning) for NaN/Inf entries, ``inf`` when the noise part
        sums to zero.
    """
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"compute_snr computes in float32 or float64, got dtype={dtype}")
    w = as_matrix(weight)
    if not torch.isfinite(w).all():
        warnings.warn(
            f"weight of {name or 'a matrix'} contains NaN or Inf values: its SNR is NaN and "
            "it will never be selected; check the checkpoint or the training run that produced it",
            RuntimeWarning,
            stacklevel=2,
        )
        return math.nan
    s = singular_values(w, method=method, dtype=dtype)
    return snr_from_singular_values(s, w.shape[0], w.shape[1])
