#!/usr/bin/env python
"""Streaming scan vs in-memory scan of a safetensors checkpoint: peak RSS, time, same SNRs.

Writes a random Llama (about 1.1 B parameters, TinyLlama's widths: hidden 2048, MLP 5632,
22 layers, vocab 32000) as bf16 safetensors in shards of 1 GB, then scans it in separate
subprocesses, so each peak RSS is its own:

* ``stream``: ``scan_checkpoint(dir, stream=True)`` (one matrix at a time from the files);
* ``memory``: ``scan_checkpoint(dir, stream=False)`` (fp32 ``from_pretrained``, then the scan);
* ``stream`` under ``torchrun --nproc_per_node=N`` (gloo), when ``--nproc`` is 2 or more.

Each worker reports its baseline RSS (after the imports, before the scan), its peak RSS
(``VmHWM``), the scan's wall time and the SNRs; the parent compares the SNRs (relative
difference, top 25 % per type) and writes everything, with the machine's load, to ``--json``.

    python benchmarks/stream_scan.py --json docs/results/bench_stream_scan_cpu.json
    python benchmarks/stream_scan.py --small --nproc 0 --json /tmp/b.json   # seconds (the test)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

SIZES = {
    # name: (hidden, intermediate, layers, heads, kv heads, vocab, shard size)
    "1b": (2048, 5632, 22, 32, 4, 32000, "1GB"),
    "small": (128, 256, 4, 4, 2, 512, "200KB"),
}


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mb() -> float:
    """This process's peak RSS: VmHWM, the high-water mark of its own address space.

    ``ru_maxrss`` would not do: Linux carries it across ``execve``, and a child started
    with vfork (Python's subprocess) inherits the parent's peak (here: writing the model).
    """
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def make_checkpoint(size: str, folder: str) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, layers, heads, kv, vocab, shard = SIZES[size]
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(folder, max_shard_size=shard)
    return {"parameters": sum(p.numel() for p in model.parameters())}


def describe_checkpoint(folder: str) -> dict:
    shards = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    sizes = [os.path.getsize(os.path.join(folder, f)) for f in shards]
    return {"shards": len(shards), "bytes": sum(sizes), "largest_shard_bytes": max(sizes), "dtype": "bfloat16"}


def worker(args) -> None:
    import torch

    from spectrum_callback import scan_checkpoint
    from spectrum_callback import _dist

    # the process's own baseline: everything a scan imports is imported before it is measured
    import transformers  # noqa: F401
    from transformers import LlamaForCausalLM  # noqa: F401
    from tqdm.auto import tqdm  # noqa: F401

    from spectrum_callback import analyzer, checkpoint_scan  # noqa: F401

    torch.set_num_threads(args.threads)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        torch.distributed.init_process_group("gloo")
    baseline = _rss_mb()
    info: dict = {}
    t0 = time.perf_counter()
    snr = scan_checkpoint(args.ckpt, stream=args.worker == "stream", progress=False, cpu_threads=args.threads,
                          device="cpu", info=info)
    wall = time.perf_counter() - t0
    mine = {"baseline_rss_mb": round(baseline, 1), "peak_rss_mb": round(_peak_mb(), 1)}
    per_rank = [mine]
    if _dist.world() > 1:
        per_rank = [None] * _dist.world()
        torch.distributed.all_gather_object(per_rank, mine)
    if _dist.rank() == 0:
        out = dict(info, wall_seconds=round(wall, 2), threads=args.threads, ranks_rss=per_rank,
                   baseline_rss_mb=per_rank[0]["baseline_rss_mb"],
                   peak_rss_mb=max(r["peak_rss_mb"] for r in per_rank),
                   snr={n: v["snr"] for n, v in snr.items()}, types={n: v["type"] for n, v in snr.items()})
        with open(args.worker_out, "w") as fh:
            json.dump(out, fh)
    if _dist.world() > 1:
        torch.distributed.destroy_process_group()


def _run_worker(route: str, ckpt: str, out: str, threads: int, nproc: int = 1) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS=str(threads))
    me = [os.path.abspath(__file__), "--worker", route, "--ckpt", ckpt, "--worker-out", out, "--threads", str(threads)]
    if nproc > 1:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}", *me]
    else:
        cmd = [sys.executable, *me]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"{route} worker failed:\n{r.stderr[-4000:]}")
    res = json.load(open(out))
    res["process_seconds"] = round(time.perf_counter() - t0, 2)
    return res


def _compare(a: dict, b: dict) -> dict:
    from spectrum_callback import select_top

    assert list(a["snr"]) == list(b["snr"]), "the two routes scanned different matrices"
    rel = max(abs(a["snr"][n] - b["snr"][n]) / max(abs(b["snr"][n]), 1e-300) for n in a["snr"])
    top = [select_top({n: {"snr": r["snr"][n], "type": r["types"][n]} for n in r["snr"]}, 0.25) for r in (a, b)]
    return {"max_rel_snr_diff": rel, "same_top25": sorted(top[0]) == sorted(top[1])}


def _machine() -> dict:
    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as fh:
            model = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), model)
    except OSError:
        pass
    import torch
    import transformers

    return {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="a tiny checkpoint (seconds; the smoke test)")
    p.add_argument("--nproc", type=int, default=2, help="also stream with this many processes (0/1: skip)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    p.add_argument("--workdir", default=None, help="where the checkpoint is written (kept and reused)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--worker", choices=["stream", "memory"], help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    size = "small" if args.small else "1b"
    work = args.workdir or os.path.join(tempfile.gettempdir(), f"spectrum_bench_stream_{size}")
    ckpt = os.path.join(work, "ckpt")
    made = {}
    if not os.path.isfile(os.path.join(ckpt, "config.json")):
        os.makedirs(work, exist_ok=True)
        t0 = time.perf_counter()
        made = make_checkpoint(size, ckpt)
        made["write_seconds"] = round(time.perf_counter() - t0, 1)
    load_before = os.getloadavg()
    routes = {}
    for route in ("stream", "memory"):
        routes[route] = _run_worker(route, ckpt, os.path.join(work, f"{route}.json"), args.threads)
        print(f"{route}: peak RSS {routes[route]['peak_rss_mb']:.0f} MB (baseline "
              f"{routes[route]['baseline_rss_mb']:.0f} MB), scan {routes[route]['seconds']:.1f} s, "
              f"process {routes[route]['process_seconds']:.1f} s", flush=True)
    ck = dict(describe_checkpoint(ckpt), **made)
    s, m = routes["stream"], routes["memory"]
    res = {
        "command": "python benchmarks/stream_scan.py" + (" --small" if args.small else "")
                   + f" --nproc {args.nproc} --threads {args.threads}",
        "size": size, "machine": _machine(), "checkpoint": ck, "threads": args.threads,
        **_compare(s, m),
        "peak_rss_ratio_memory_over_stream": round(m["peak_rss_mb"] / s["peak_rss_mb"], 2),
        "wall_ratio_memory_over_stream": round(m["wall_seconds"] / s["wall_seconds"], 2),
        "stream_peak_above_baseline_mb": round(s["peak_rss_mb"] - s["baseline_rss_mb"], 1),
        "target_peak_below_shard_plus_baseline": s["peak_rss_mb"] < s["baseline_rss_mb"]
        + ck["largest_shard_bytes"] / 2**20,
    }
    if args.nproc > 1:
        d = _run_worker("stream", ckpt, os.path.join(work, f"stream{args.nproc}.json"), args.threads, args.nproc)
        cmp = _compare(d, s)
        res["distributed"] = {"nproc": args.nproc, "peak_rss_mb_per_rank": [r["peak_rss_mb"] for r in d["ranks_rss"]],
                              "seconds": d["seconds"], "wall_seconds": d["wall_seconds"],
                              "speedup_over_1_process": round(s["seconds"] / d["seconds"], 2),
                              "max_rel_snr_diff_vs_1_process": cmp["max_rel_snr_diff"],
                              "same_top25_as_1_process": cmp["same_top25"], "ranks": d["ranks"]}
        print(f"stream x{args.nproc}: scan {d['seconds']:.1f} s ({res['distributed']['speedup_over_1_process']}x)")
        d.pop("snr"), d.pop("types")
    res["loadavg_before"] = [round(x, 2) for x in load_before]
    res["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    for r in routes.values():
        r.pop("snr"), r.pop("types")
    res["routes"] = routes
    print(json.dumps({k: v for k, v in res.items() if k != "routes"}, indent=1))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=2)


if __name__ == "__main__":
    main()
