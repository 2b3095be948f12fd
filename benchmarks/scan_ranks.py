#!/usr/bin/env python
"""Scan split across ranks: one process vs N processes (gloo, CPU, one thread each).

The analyzer splits the SVD work of a scan across the ranks of an initialised
``torch.distributed`` group (largest matrices first, balanced by estimated cost) and
all-gathers the results. This measures the wall time of one full scan of the same
model in one process and in N processes, and checks both give the same SNRs.

    python benchmarks/scan_ranks.py --shapes tiny --nproc 2 --json docs/results/bench_scan_ranks_cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # analyzer.py beside this file, also in the torchrun workers


def scan_once(shapes, layers, repeat):
    import torch

    from analyzer import FakeModel
    from spectrum_callback.analyzer import SpectrumAnalyzer

    torch.set_num_threads(1)
    model = FakeModel(shapes, layers, torch.device("cpu"), torch.float32)
    best, snr = None, None
    for _ in range(repeat):
        an = SpectrumAnalyzer(model, progress=False, skip_unchanged=False)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        t0 = time.perf_counter()
        snr = an.scan()
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        dt = time.perf_counter() - t0
        best = dt if best is None else min(best, dt)
    return best, {n: v["snr"] for n, v in snr.items()}


def worker(args):
    import torch.distributed as dist

    dist.init_process_group("gloo")
    best, snr = scan_once(args.shapes, args.layers, args.repeat)
    if dist.get_rank() == 0:
        with open(args.worker_out, "w") as fh:
            json.dump({"seconds": best, "snr": snr, "world": dist.get_world_size()}, fh)
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="tiny", choices=["toy", "tiny", "8b", "70b"])
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--json", default=None)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker_out:
        return worker(args)
    single_s, single = scan_once(args.shapes, args.layers, args.repeat)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "r.json")
        env = dict(os.environ, OMP_NUM_THREADS="1")
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}", "--master_port=29631",
               os.path.abspath(__file__), "--shapes", args.shapes, "--repeat", str(args.repeat), "--worker-out", out]
        if args.layers:
            cmd += ["--layers", str(args.layers)]
        subprocess.run(cmd, env=env, check=True)
        multi = json.load(open(out))
    same = multi["snr"] == single
    result = {
        "shapes": args.shapes,
        "matrices": len(single),
        "nproc": args.nproc,
        "threads_per_process": 1,
        "cpu_count": os.cpu_count(),
        "single_process_s": single_s,
        "multi_process_s": multi["seconds"],
        "speedup": single_s / multi["seconds"],
        "identical_snr": same,
    }
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
