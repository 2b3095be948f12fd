#!/usr/bin/env python
"""Benchmark the SNR scan: per-matrix fp32 svdvals (the original tool) vs SpectrumAnalyzer.

Random matrices of real model shapes, each a low-rank signal of random strength plus
heavy-ish noise, so that SNRs differ across layers.  In one run, on the same matrices:

* baseline: ``compute_snr(w)`` per matrix (fp32 ``torch.linalg.svdvals``, one host sync
  per matrix, as the original Spectrum scanner);
* project: ``SpectrumAnalyzer(model, method=...).scan()`` (default ``auto``);
* reference: float64 ``svdvals`` per matrix (``--reference svd64``, the default) or
  float64 Gram eigenvalues (``--reference gram64``, much faster on a GPU), not timed
  against anything, for the errors.

On CPU both sides use ``--threads`` threads (the analyzer's automatic choice is
switched off for a like-for-like comparison).  Writes JSON with baseline_s, project_s,
speedup, max_rel_err (both vs the reference), same_selection (top 25 % per type,
project and baseline vs reference), per-type timings and the fast path's route
counts; the file is first written after the analyzer's scan and completed at the end,
so a run stopped by a time limit keeps what it measured.  (``reference_s`` is called
``reference_float64_svdvals_s`` in some older result files.)

    nice -n 5 python benchmarks/analyzer.py --device cpu --shapes tiny --json docs/results/bench_analyzer_cpu_tiny.json
    python benchmarks/analyzer.py --device cuda --shapes 8b --json runs/bench_analyzer_cuda_8b.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

import torch
from torch import nn

from spectrum_callback import fast_snr
from spectrum_callback.analyzer import SpectrumAnalyzer
from spectrum_callback.selection import select_top
from spectrum_callback.snr import compute_snr, snr_from_singular_values_batched

# (hidden, intermediate, kv_dim, layers)
SHAPES = {
    "toy": (64, 128, 32, 8),  # the tests' tiny Llama
    "tiny": (576, 1536, 192, 30),  # SmolLM2-135M
    "8b": (4096, 14336, 1024, 32),  # Llama-3-8B
    "70b": (8192, 28672, 1024, 80),  # Llama-3-70B
}
TYPES = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def layer_shapes(hidden, inter, kv):
    # nn.Linear weight shapes (out_features, in_features)
    return {
        "self_attn.q_proj": (hidden, hidden),
        "self_attn.k_proj": (kv, hidden),
        "self_attn.v_proj": (kv, hidden),
        "self_attn.o_proj": (hidden, hidden),
        "mlp.gate_proj": (inter, hidden),
        "mlp.up_proj": (inter, hidden),
        "mlp.down_proj": (hidden, inter),
    }


@torch.no_grad()
def structured_matrix(n, m, gen, device, dtype):
    """Low-rank signal of random rank and strength plus noise with a random column scaling."""
    # Generated where it will live (``gen`` is a generator of ``device``): an 8B model's worth
    # of random numbers takes minutes on one CPU thread, a second on a GPU.
    r = int(torch.randint(2, 33, (1,), generator=gen, device=device))
    strength = float(torch.rand(1, generator=gen, device=device)) * 4.0
    noise = torch.randn(n, m, generator=gen, device=device) / math.sqrt(max(n, m))
    colscale = torch.exp(0.3 * torch.randn(1, m, generator=gen, device=device))
    u = torch.randn(n, r, generator=gen, device=device) / math.sqrt(n)
    v = torch.randn(r, m, generator=gen, device=device) / math.sqrt(m)
    decay = torch.arange(1, r + 1, dtype=torch.float32, device=device).pow(-0.5).unsqueeze(1)
    with fast_snr._no_tf32(torch.device(device)):
        w = noise * colscale + strength * (u @ (decay * v)) * 3.0
    return w.to(dtype=dtype)


class Layer(nn.Module):
    def __init__(self, shapes, gen, device, dtype):
        super().__init__()
        self.self_attn = nn.Module()
        self.mlp = nn.Module()
        for typ in TYPES:
            parent, name = typ.split(".")
            n, m = shapes[typ]
            lin = nn.Linear(m, n, bias=False, device="meta")
            lin.weight = nn.Parameter(structured_matrix(n, m, gen, device, dtype), requires_grad=False)
            setattr(getattr(self, parent), name, lin)


class FakeModel(nn.Module):
    def __init__(self, shape_key, layers, device, dtype, seed=0):
        super().__init__()
        hidden, inter, kv, n_layers = SHAPES[shape_key]
        n_layers = n_layers if layers is None else min(layers, n_layers)
        gen = torch.Generator(device=device).manual_seed(seed)
        self.model = nn.Module()
        self.model.layers = nn.ModuleList(
            [Layer(layer_shapes(hidden, inter, kv), gen, device, dtype) for _ in range(n_layers)])


def layer_index(name):
    """``model.layers.<i>.…`` -> i."""
    return int(name.split(".")[2])


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def rel_err(a, b):
    if math.isinf(a) and math.isinf(b):
        return 0.0
    return abs(a - b) / abs(b)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--shapes", default="tiny", choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, default=None, help="use only the first N layers (CPU runs of 8b/70b)")
    ap.add_argument("--method", default="auto", help="analyzer method (auto, fast, gram, svd)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 = fair single-core timings)")
    ap.add_argument("--chunk-mb", type=float, default=512)
    ap.add_argument("--top-pct", type=float, default=0.25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=2,
                    help="best of R timings for both sides (shared machines are noisy); 1 for big shapes")
    ap.add_argument("--reference", default="svd64", choices=["svd64", "gram64"],
                    help="what the errors and the selection are checked against: float64 svdvals (default) "
                         "or float64 Gram eigenvalues (much faster on a GPU; accurate to ~1e-8 relative "
                         "for the singular values the formula uses)")
    ap.add_argument("--baseline-layers", type=int, default=None,
                    help="time the per-matrix svdvals baseline on the first N layers only and extrapolate per "
                         "type to all layers (every layer has the same shapes); the reference and the analyzer "
                         "still cover every layer")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device visible")
    t0 = time.perf_counter()
    model = FakeModel(args.shapes, args.layers, device, torch.float32, seed=args.seed)
    gen_s = time.perf_counter() - t0
    analyzer = SpectrumAnalyzer(model, method=args.method, chunk_mb=args.chunk_mb, progress=False,
                                cpu_threads=args.threads)
    names = analyzer.names
    mods = analyzer.modules
    print(f"{len(names)} matrices of {args.shapes} shapes on {device} (generated in {gen_s:.1f} s)", flush=True)

    # Warm-up (library init, allocator): one small matrix per route.
    w0 = mods[names[0]].weight
    compute_snr(w0[:64, :64])
    fast_snr.fast_snr_batched(w0[:64, :64].unsqueeze(0))
    sync(device)

    # Project: the analyzer, cold cache.
    for k in fast_snr.ROUTE_COUNTS:
        fast_snr.ROUTE_COUNTS[k] = 0
    project_runs = []
    for _ in range(args.repeat):
        analyzer.invalidate()
        sync(device)
        t = time.perf_counter()
        proj = analyzer.scan()
        sync(device)
        project_runs.append(time.perf_counter() - t)
    project_s = min(project_runs)
    routes = {k: v // args.repeat for k, v in fast_snr.ROUTE_COUNTS.items()}
    print(f"project ({args.method}): {project_s:.2f} s  routes {routes}", flush=True)
    partial = {"shapes": args.shapes, "matrices": len(names), "device": str(device), "threads": args.threads,
               "project_s": project_s, "project_runs_s": project_runs, "routes": routes, "complete": False,
               "command": _command(argv)}
    _write(args.json, partial)

    # Baseline: per-matrix fp32 svdvals, and the float64 reference (timed separately).
    base, ref = {}, {}
    per_type = {}
    baseline_s = 0.0
    ref_s = 0.0
    for n in names:
        w = mods[n].weight
        typ = analyzer.types[n]
        per_type.setdefault(typ, {"shape": list(w.shape), "count": 0, "baseline_count": 0, "baseline_s": 0.0})
        per_type[typ]["count"] += 1
        if args.baseline_layers is None or layer_index(n) < args.baseline_layers:
            dt = math.inf
            for _ in range(args.repeat):
                sync(device)
                t = time.perf_counter()
                base[n] = compute_snr(w)
                sync(device)
                dt = min(dt, time.perf_counter() - t)
            baseline_s += dt
            per_type[typ]["baseline_count"] += 1
            per_type[typ]["baseline_s"] += dt
        t = time.perf_counter()
        w64 = w.detach().to(torch.float64)
        # same singular values either way; LAPACK is several times faster on the tall side
        tall = w64 if w64.shape[0] >= w64.shape[1] else w64.T
        if args.reference == "svd64":
            s64 = torch.linalg.svdvals(tall)
        else:  # gram64: float64 Gram eigenvalues, descending
            s64 = torch.linalg.eigvalsh(tall.T @ tall).clamp_min(0).sqrt().flip(-1)
        ref[n] = float(snr_from_singular_values_batched(s64.unsqueeze(0), *w.shape)[0])
        sync(device)
        ref_s += time.perf_counter() - t
    baseline_measured_s = baseline_s
    if args.baseline_layers is not None:
        # Every layer has the same shapes: scale each type's measured time to all its matrices.
        for d in per_type.values():
            d["baseline_measured_s"] = d["baseline_s"]
            d["baseline_s"] = d["baseline_s"] * d["count"] / max(d["baseline_count"], 1)
        baseline_s = sum(d["baseline_s"] for d in per_type.values())
    print(f"baseline (svdvals fp32 per matrix): {baseline_s:.2f} s"
          + (f" (extrapolated from {baseline_measured_s:.2f} s on the first {args.baseline_layers} layers)"
             if args.baseline_layers is not None else "")
          + f"; float64 reference ({args.reference}) {ref_s:.2f} s", flush=True)
    partial.update(baseline_s=baseline_s, baseline_measured_s=baseline_measured_s,
                   baseline_layers=args.baseline_layers, baseline_matrices=len(base),
                   speedup=baseline_s / project_s, reference=args.reference, reference_s=ref_s)
    _write(args.json, partial)

    # Per-type project timings (same analyzer, fresh cache, one type at a time).
    for typ in per_type:
        group = [n for n in names if analyzer.types[n] == typ]
        best = math.inf
        for _ in range(args.repeat):
            analyzer.invalidate()
            sync(device)
            t = time.perf_counter()
            analyzer.scan(group)
            sync(device)
            best = min(best, time.perf_counter() - t)
        per_type[typ]["project_s"] = best
        per_type[typ]["speedup"] = per_type[typ]["baseline_s"] / per_type[typ]["project_s"]

    ref_map = {n: {"snr": ref[n], "type": analyzer.types[n]} for n in names}
    base_map = {n: {"snr": base[n], "type": analyzer.types[n]} for n in names if n in base}
    proj_map = {n: {"snr": proj[n]["snr"], "type": analyzer.types[n]} for n in names}
    sel_ref = select_top(ref_map, args.top_pct)
    sel_proj = select_top(proj_map, args.top_pct)
    # The baseline's selection is comparable only when it covered every matrix.
    sel_base = select_top(base_map, args.top_pct) if len(base) == len(names) else None
    max_rel = max(rel_err(proj[n]["snr"], ref[n]) for n in names)
    max_rel_base = max(rel_err(base[n], ref[n]) for n in base)
    snrs = [ref[n] for n in names if math.isfinite(ref[n])]
    partial.update(
        layers=len(model.model.layers),
        device_name=(torch.cuda.get_device_name() if device.type == "cuda"
                     else platform.processor() or platform.machine()),
        cpu_count=os.cpu_count(),
        torch=torch.__version__,
        method=args.method,
        chunk_mb=args.chunk_mb,
        baseline="compute_snr per matrix (torch.linalg.svdvals fp32)",
        repeat=args.repeat,
        max_rel_err=max_rel,
        baseline_max_rel_err=max_rel_base,
        same_selection=sel_proj == sel_ref,
        baseline_same_selection=None if sel_base is None else sel_base == sel_ref,
        selected=len(sel_ref),
        top_pct=args.top_pct,
        snr_range=[min(snrs), max(snrs)] if snrs else None,
        per_type=per_type,
        complete=True,
    )
    out = partial
    print(json.dumps({k: v for k, v in out.items() if k != "per_type"}, indent=1))
    for typ, d in per_type.items():
        print(f"  {typ:18s} {str(tuple(d['shape'])):14s} x{d['count']:3d}  svdvals {d['baseline_s']:8.2f} s  "
              f"project {d['project_s']:7.2f} s  {d['speedup']:5.1f}x")
    _write(args.json, out)
    return out


def _command(argv):
    return "python " + " ".join([os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:]))


def _write(path, obj):
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as fh:
            json.dump(obj, fh, indent=1)


if __name__ == "__main__":
    main()
