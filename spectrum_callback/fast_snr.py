"""Fast batched SNR: fp32 Gram eigenvalues with an error check and an exact fallback.

The Spectrum formula needs the sorted singular values of each matrix ``W`` (``n x m``,
``k = min(n, m)``).  For a batch of matrices:

1. ``G = W^T W`` (or ``W W^T``, the smaller side) in fp32, without TF32 on CUDA;
2. ``eigvalsh(G)`` in fp32: a tridiagonal reduction of ``k x k`` instead of the
   bidiagonal reduction of ``n x m`` that ``svdvals`` does;
3. every result is checked against an error model of steps 1-2 (each Gram eigenvalue off
   by at most ``eta = C * eps * (lambda_max + sqrt(max(n, m)) * lambda_mean)``, with more
   margin for ``k < 512``); it fails when a singular value could lie on the other side of
   the threshold or when the SNR's error bound exceeds ``rtol``;
4. failed matrices are solved again in float64 (Gram + eigvalsh, checked the same way)
   and, if still not certified, with float64 ``svdvals``.

The error model is empirical, not a proof; the exact reference remains
:func:`spectrum_callback.snr.compute_snr`.  Where the model's constants come from, what
was measured and why the route does no less eigen-work: docs/results/fast_snr.md.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
import torch

from .snr import IQR_TO_SIGMA, as_matrix, singular_values, snr_from_singular_values_batched

__all__ = [
    "FastSNRResult",
    "fast_snr",
    "fast_snr_batched",
    "snr_batched",
    "gram_eigvalsh",
    "singular_value_bounds",
    "ERROR_MODEL_C",
    "DEFAULT_RTOL",
    "SOLVERS",
    "ROUTE_COUNTS",
]

ERROR_MODEL_C = 2.0
SMALL_K = 512
DEFAULT_RTOL = 5e-4
# What snr_batched() computes with (the analyzer's "auto" resolves to "fast").
SOLVERS = ("svd", "gram", "fast")

# How many matrices took each route since the last reset (read by scripts/bench_analyzer.py).
ROUTE_COUNTS = {"gram32": 0, "gram64": 0, "svd64": 0}
_ROUTE_NAMES = ("gram32", "gram64", "svd64")


@contextlib.contextmanager
def _no_tf32(device: torch.device):
    """Full fp32 products on CUDA (TF32 would cost ~3 decimal digits of the Gram matrix)."""
    if device.type != "cuda":
        yield
        return
    mm = torch.backends.cuda.matmul
    old = mm.allow_tf32
    mm.allow_tf32 = False
    try:
        yield
    finally:
        mm.allow_tf32 = old


def gram_eigvalsh(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Ascending eigenvalues ``(B, k)`` of the smaller Gram matrix of each ``(B, n, m)`` matrix."""
    x = w.to(dtype)
    n, m = x.shape[-2], x.shape[-1]
    with _no_tf32(x.device):
        g = x.mT @ x if n >= m else x @ x.mT
    del x
    return torch.linalg.eigvalsh(g)


@dataclass
class FastSNRResult:
    """``snr``: float64 CPU ``(B,)``; ``route``: per matrix, 0 = fp32 Gram, 1 = fp64 Gram,
    2 = fp64 svdvals; ``bound``: the certified (under the error model) relative SNR error
    of the route that was used (0 for svdvals fp64, the exact route)."""

    snr: torch.Tensor
    route: torch.Tensor
    bound: torch.Tensor


def singular_value_bounds(lam: torch.Tensor, n: int, m: int, eps: float, c: float = ERROR_MODEL_C):
    """``(s, ds, eta)`` in float64: descending singular values from ascending Gram
    eigenvalues ``lam`` (``(B, k)`` of ``n x m`` matrices computed with unit roundoff
    ``eps``), the error model's bound on each, and the per-eigenvalue bound ``(B, 1)``."""
    lam = lam.to(torch.float64)
    k = lam.shape[-1]
    # Small matrices get more margin, sqrt(512 / k): their measured errors are larger
    # relative to the model (docs/results/fast_snr.md).
    c = c * max(1.0, math.sqrt(SMALL_K / k))
    lam_max = lam[:, -1:].clamp_min(0)
    lam_mean = lam.clamp_min(0).mean(-1, keepdim=True)
    # Error model per eigenvalue: the eigensolver's backward error (relative to lambda_max)
    # plus the rounding of the Gram product (random-walk over the inner dimension).
    eta = c * eps * (lam_max + math.sqrt(max(n, m)) * lam_mean)  # (B, 1)
    s = lam.clamp_min(0).sqrt().flip(-1)  # descending, as snr.py sorts them
    # |s_true - s| <= eta / (s + sqrt(max(s^2 - eta, 0))) and <= sqrt(eta)
    ds = torch.minimum(eta / (s + (s * s - eta).clamp_min(0).sqrt()).clamp_min(1e-300), eta.sqrt())
    return s, ds, eta


def _stats_with_bound(lam: torch.Tensor, n: int, m: int, eps: float, c: float):
    """SNR from ascending Gram eigenvalues ``lam``, an estimate of its relative error and an
    "ambiguous" flag (a singular value may lie on the other side of the threshold).
    Everything in float64."""
    k = lam.shape[-1]
    s, ds, eta = singular_value_bounds(lam, n, m, eps, c)
    q = torch.quantile(s, torch.tensor([0.25, 0.75], dtype=s.dtype, device=s.device), dim=-1)
    # A quantile interpolates two adjacent sorted values: its error is at most the larger
    # ds of the two (sorted eigenvalues move by at most their own perturbation each).
    asc = ds.flip(-1)  # ds in ascending order of s, matching torch.quantile's positions
    dq = []
    for p in (0.25 * (k - 1), 0.75 * (k - 1)):
        lo, hi = int(math.floor(p)), int(math.ceil(p))
        dq.append(torch.maximum(asc[:, lo], asc[:, hi]))
    sigma = (q[1] - q[0]) / IQR_TO_SIGMA
    beta = min(n, m) / max(n, m)
    scale = 1.0 + math.sqrt(beta)
    t = (sigma * scale).unsqueeze(-1)
    dt = ((dq[0] + dq[1]) / IQR_TO_SIGMA * scale).unsqueeze(-1)
    above = s > t
    zero = torch.zeros_like(s)
    signal = torch.where(above, s, zero).sum(-1)
    noise = torch.where(above, zero, s).sum(-1)
    # Sums of many independently rounded values: errors add in quadrature.
    dsig = torch.where(above, ds * ds, zero).sum(-1).sqrt()
    dnoise = torch.where(above, zero, ds * ds).sum(-1).sqrt()
    top = s[:, 0]
    snr = (signal / noise) / top
    snr = torch.where(noise == 0, torch.full_like(snr, math.inf), snr)
    ambiguous = ((s - t).abs() <= ds + dt).any(-1)
    tiny = 1e-300
    rel = dsig / signal.clamp_min(tiny) + dnoise / noise.clamp_min(tiny) + ds[:, 0] / top.clamp_min(tiny)
    # A zero noise part (snr = inf), a zero top value, or a noise part made of values the
    # route cannot resolve (rank deficiency) is never accepted from a Gram route.
    unresolved = torch.where(above, zero, torch.where(s <= 2 * eta.sqrt(), s + ds, zero)).sum(-1)
    bad = (noise <= 4 * unresolved) | (top <= ds[:, 0]) | torch.isnan(snr)
    rel = torch.where(bad, torch.full_like(rel, math.inf), rel)
    # No value at or below the threshold, and none within reach of it: SNR = inf for sure.
    rel = torch.where((noise == 0) & (top > ds[:, 0]), torch.zeros_like(rel), rel)
    return snr, rel, ambiguous


def fast_snr_batched(
    w: torch.Tensor,
    *,
    dtype: torch.dtype = torch.float32,
    rtol: float = DEFAULT_RTOL,
    c: float = ERROR_MODEL_C,
) -> FastSNRResult:
    """SNR of a batch ``(B, n, m)`` (or one ``(n, m)``) of finite matrices.

    ``dtype``: first-stage precision (float32; float64 skips straight to the second stage).
    ``rtol``: largest relative SNR error accepted from a Gram route before falling back.
    Returns a :class:`FastSNRResult` (float64 CPU tensors).
    """
    if w.ndim == 2:
        w = w.unsqueeze(0)
    if w.ndim != 3:
        raise ValueError(f"expected (B, n, m) matrices, got shape {tuple(w.shape)}")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    B, n, m = w.shape
    snr = torch.empty(B, dtype=torch.float64)
    route = torch.zeros(B, dtype=torch.int8)
    bound = torch.zeros(B, dtype=torch.float64)
    todo = torch.arange(B)
    stages = [torch.float32, torch.float64] if dtype == torch.float32 else [torch.float64]
    for stage, dt in enumerate(stages):
        if len(todo) == 0:
            break
        if stage == 0:
            lam = gram_eigvalsh(w if len(todo) == B else w[todo], dt)
        else:
            # Fallback matrices one at a time: the float64 copies stay within the caller's
            # memory bound (which was sized for the first stage's batch).
            lam = torch.cat([gram_eigvalsh(w[int(i)].unsqueeze(0), dt) for i in todo])
        val, rel, amb = _stats_with_bound(lam, n, m, torch.finfo(dt).eps, c)
        ok = (~amb & (rel <= rtol)).cpu()
        val, rel = val.cpu(), rel.cpu()
        idx = todo[ok]
        snr[idx] = val[ok]
        bound[idx] = rel[ok]
        route[idx] = 0 if dt == torch.float32 else 1
        todo = todo[~ok]
        del lam
    for i in todo.tolist():
        s = torch.linalg.svdvals(w[i].to(torch.float64))
        snr[i] = snr_from_singular_values_batched(s.unsqueeze(0), n, m)[0]
        route[i] = 2
        bound[i] = 0.0
    for r, name in enumerate(_ROUTE_NAMES):
        ROUTE_COUNTS[name] += int((route == r).sum())
    return FastSNRResult(snr=snr, route=route, bound=bound)


def snr_batched(w: torch.Tensor, method: str, dtype: torch.dtype) -> torch.Tensor:
    """The analyzer's solver call: SNR (float64 CPU ``(B,)``) of a batch of finite matrices.

    ``method``: ``"fast"`` (:func:`fast_snr_batched`, first stage in ``dtype``), ``"svd"``
    or ``"gram"`` (:func:`spectrum_callback.snr.singular_values` in ``dtype``).
    """
    n, m = w.shape[-2], w.shape[-1]
    if method == "fast":
        return fast_snr_batched(w, dtype=dtype).snr
    if method in ("svd", "gram"):
        return snr_from_singular_values_batched(singular_values(w, method=method, dtype=dtype), n, m)
    raise ValueError(f"unknown SNR method {method!r}; use one of {SOLVERS}")


def fast_snr(weight: torch.Tensor, *, rtol: float = DEFAULT_RTOL) -> float:
    """SNR of one matrix through the fast path (1-D weights as ``1 x d``)."""

    w = as_matrix(weight)
    if not torch.isfinite(w).all():
        return math.nan
    return float(fast_snr_batched(w, rtol=rtol).snr[0])
