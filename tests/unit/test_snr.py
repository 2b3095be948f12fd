import math

import numpy as np
import pytest
import torch

from spectrum_callback import compute_snr
from spectrum_callback.snr import singular_values, snr_from_singular_values_batched


def original_snr(w: np.ndarray) -> float:
    """The formula as the reference README states it, written independently in numpy."""
    w = np.asarray(w, dtype=np.float64)
    if w.ndim == 1:
        w = w[None, :]
    s = np.linalg.svd(w, compute_uv=False)
    s = np.sort(s)[::-1]
    q75, q25 = np.quantile(s, 0.75), np.quantile(s, 0.25)  # linear interpolation, like torch.quantile
    sigma = (q75 - q25) / 1.349
    n, m = w.shape
    beta = min(n, m) / max(n, m)
    thr = sigma * (1 + math.sqrt(beta))
    signal = s[s > thr].sum()
    noise = s[s <= thr].sum()
    if noise == 0:
        return math.inf
    return (signal / noise) / s[0]


def structured(n, m, rank=4, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, m, generator=g) / math.sqrt(max(n, m))
    u = torch.randn(n, rank, generator=g)
    v = torch.randn(rank, m, generator=g)
    return noise + scale * (u @ v) / math.sqrt(n * m) * 4


@pytest.mark.parametrize("shape", [(32, 32), (48, 16), (16, 80), (1, 40), (100, 3)])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_original_formula(shape, seed):
    w = structured(*shape, seed=seed)
    ref = original_snr(w.numpy())
    got = compute_snr(w, dtype=torch.float64)
    if math.isinf(ref):
        assert math.isinf(got)
    else:
        assert got == pytest.approx(ref, rel=1e-9)
    got32 = compute_snr(w)
    if not math.isinf(ref):
        assert got32 == pytest.approx(ref, rel=1e-4)


def test_one_dimensional_weight_is_infinite_like_published_norms():
    # The published files give Infinity for 1-D norms: one singular value, IQR 0, no noise.
    assert compute_snr(torch.ones(64)) == math.inf


def test_zero_noise_gives_inf():
    assert compute_snr(torch.eye(16)) == math.inf


def test_nan_weight_gives_nan_and_warns_with_name():
    w = torch.randn(8, 8)
    w[1, 2] = float("nan")
    with pytest.warns(RuntimeWarning, match="model.layers.3.mlp.up_proj"):
        assert math.isnan(compute_snr(w, name="model.layers.3.mlp.up_proj"))
    w[1, 2] = float("inf")
    with pytest.warns(RuntimeWarning):
        assert math.isnan(compute_snr(w, name="x"))


def test_any_input_dtype_computes_in_fp32_or_more():
    w = structured(40, 24)
    ref = compute_snr(w, dtype=torch.float64)
    for dt in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        got = compute_snr(w.to(dt))
        tol = 1e-4 if dt in (torch.float32, torch.float64) else 0.05
        assert got == pytest.approx(ref, rel=tol), dt


def test_gram_route_agrees_with_svd():
    for shape in [(64, 32), (32, 64), (50, 50)]:
        w = structured(*shape, seed=3)
        a = compute_snr(w, dtype=torch.float64)
        b = compute_snr(w, method="gram", dtype=torch.float64)
        assert b == pytest.approx(a, rel=1e-8)


def test_batched_equals_per_matrix():
    ws = torch.stack([structured(24, 40, seed=s) for s in range(5)]).double()
    s = singular_values(ws, method="svd", dtype=torch.float64)
    batched = snr_from_singular_values_batched(s, 24, 40)
    single = [compute_snr(w, dtype=torch.float64) for w in ws]
    assert batched.tolist() == pytest.approx(single, rel=1e-12)


def test_bad_inputs():
    with pytest.raises(ValueError, match="3-D"):
        compute_snr(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="float32 or float64"):
        compute_snr(torch.randn(4, 4), dtype=torch.float16)
    with pytest.raises(ValueError, match="unknown SVD method"):
        compute_snr(torch.randn(4, 4), method="qr")
