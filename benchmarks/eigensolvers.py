#!/usr/bin/env python
"""Micro-benchmark of the eigen-solve behind the fast scan (meant for a GPU).

The fast route's time is almost all ``eigvalsh`` of a ``k x k`` Gram matrix, so this
measures what torch (and cupy, where installed) offers for that solve on the machine at
hand, per matrix, in one run:

* linear-algebra backend: ``torch.backends.cuda.preferred_linalg_library`` "cusolver"
  vs "magma" (CUDA only);
* precision: fp32 vs fp64;
* one call per matrix vs one batched call;
* with ``cupy`` importable: cuSOLVER's Jacobi solver ``syevj`` (``cupyx.cusolver.syevj``,
  eigenvalues only).  cuSOLVER's *batched* Jacobi (``syevjBatched``, which torch uses for
  batches of matrices of size <= 32) is limited to matrices of size 32 or less, so for the
  1024-wide Gram matrices of k/v projections the non-batched ``syevj`` is the candidate.

``--k`` takes several sizes (``4096,1024``: Llama-3-8B q/o/gate/up/down and k/v).

Writes JSON (``--json``) with ms per matrix for every combination and the largest
relative eigenvalue difference from the fp64 cusolver (or CPU) result, so that a faster
variant can be judged on accuracy too.  Smoke test on CPU:
``python benchmarks/eigensolvers.py --device cpu --k 256 --batch 4``.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, device, repeat):
    fn()  # warm-up (library handles, workspace)
    _sync(device)
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def bench_size(k, args, device):
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(args.batch, k + k // 2, k, generator=gen, device=device) / k ** 0.5
    grams = {torch.float32: x.mT @ x}
    grams[torch.float64] = grams[torch.float32].double()
    del x
    backends = ["cusolver", "magma"] if device.type == "cuda" else ["default"]
    ref = None
    rows = []
    for backend in backends:
        if device.type == "cuda":
            torch.backends.cuda.preferred_linalg_library(backend)
        for dtype in (torch.float64, torch.float32):
            g = grams[dtype]
            for mode in ("loop", "batched"):
                if mode == "loop":
                    def fn():
                        return [torch.linalg.eigvalsh(g[i]) for i in range(g.shape[0])]
                else:
                    def fn():
                        return torch.linalg.eigvalsh(g)
                try:
                    seconds = _time(fn, device, args.repeat)
                    out = fn()
                    lam = (torch.stack(out) if isinstance(out, list) else out).double().cpu()
                    if ref is None:
                        ref = lam  # fp64, first backend
                    err = float(((lam - ref).abs().amax(-1) / ref.abs().amax(-1)).max())
                    row = dict(k=k, backend=backend, dtype=str(dtype).replace("torch.", ""), mode=mode,
                               ms_per_matrix=1e3 * seconds / g.shape[0], max_rel_diff_vs_first_fp64=err)
                except Exception as exc:  # a backend missing from this build
                    row = dict(k=k, backend=backend, dtype=str(dtype).replace("torch.", ""), mode=mode,
                               error=f"{type(exc).__name__}: {exc}"[:300])
                rows.append(row)
                print(json.dumps(row), flush=True)
    rows += bench_cupy_syevj(k, grams[torch.float32], ref, device, args.repeat)
    return rows


def bench_cupy_syevj(k, g, ref, device, repeat):
    """cuSOLVER syevj through cupy (eigenvalues only), fp32; [] where cupy is missing."""
    if device.type != "cuda":
        return []
    try:
        import cupy
        from cupyx import cusolver
    except Exception as exc:  # not installed
        return [dict(k=k, backend="cupy-syevj", dtype="float32", mode="loop",
                     error=f"{type(exc).__name__}: {exc}"[:200])]
    rows = []
    for dtype in (torch.float32, torch.float64):
        x = g.to(dtype)
        try:
            mats = [cupy.asarray(x[i]) for i in range(min(2, x.shape[0]))]  # Jacobi can be slow at 4096

            def fn():
                return [cusolver.syevj(a, with_eigen_vector=False) for a in mats]

            t = time.perf_counter()
            fn()  # warm-up; skip the rest when one pass is already slow
            cupy.cuda.Device().synchronize()
            first = time.perf_counter() - t
            seconds = first if first > 5 else _time(fn, device, repeat)
            lam = torch.stack([torch.as_tensor(cupy.asnumpy(w)) for w in fn()]).double()
            lam = lam.sort(-1).values
            r = ref[: lam.shape[0]]
            err = float(((lam - r).abs().amax(-1) / r.abs().amax(-1)).max())
            rows.append(dict(k=k, backend="cupy-syevj", dtype=str(dtype).replace("torch.", ""), mode="loop",
                             ms_per_matrix=1e3 * seconds / len(mats), max_rel_diff_vs_first_fp64=err))
        except Exception as exc:
            rows.append(dict(k=k, backend="cupy-syevj", dtype=str(dtype).replace("torch.", ""), mode="loop",
                             error=f"{type(exc).__name__}: {exc}"[:300]))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    ap.add_argument("--k", default="4096", help="Gram matrix sizes, comma-separated (4096: Llama-3-8B "
                                                 "q/o/gate/up/down; 1024: its k/v)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    rows = []
    for k in [int(x) for x in str(args.k).split(",")]:
        rows += bench_size(k, args, device)
        _write(args, device, rows)  # after each size: a run cut short keeps what it measured


def _write(args, device, rows):
    out = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", torch=torch.__version__,
               cuda=torch.version.cuda, k=args.k, batch=args.batch, repeat=args.repeat, results=rows)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
