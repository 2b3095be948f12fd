#!/usr/bin/env python
"""What a Spectrum switch and the start-up cost under DeepSpeed ZeRO, per rank.

One configuration per call (engine, hidden size), three runs of ``torchrun`` with
``--nproc`` processes each (2 by default; gloo on CPU, NCCL on GPUs):

* ``callback``: ``trainer.add_callback(SpectrumCallback(top_pct=0.5, update_every=2))``,
  4 optimizer steps; at step 2 the selection moves by one layer per matrix type, so 3/4
  of the selected matrices stay (top 4 of 8 layers: layers 0-3 -> 1-4);
* ``static``: ``spectrum_freeze`` before ``Trainer(...)`` (same first selection), 4 steps;
* ``full``: full fine-tuning, 1 step.

The SNRs are synthetic (a fixed ranking of the layers, rotated at the second scan), so
that no SVD time or memory enters the numbers; everything else is the real code path.
The model is a random Llama (8 layers, ``--hidden``, intermediate 2.75x hidden, head dim
64, 4 query heads per KV head, vocab 1024), fp32, built after ``TrainingArguments`` (so
ZeRO-3 partitions it at construction with ``zero.Init``, as ``from_pretrained`` does).

Reported per rank (rank order), and the worst rank at the top level:

* ``switch_seconds``: wall time of the backend's ``switch`` at step 2 (one rebuild);
* ``peak_extra_bytes``: peak resident memory during that switch minus the resident
  memory just before it (``VmHWM`` after resetting it with ``/proc/self/clear_refs``;
  CPU runs set ``MALLOC_MMAP_THRESHOLD_=131072`` so that freed tensors go back to the
  system and RSS follows the tensors); on a GPU also ``peak_extra_device_bytes``
  (``torch.cuda.max_memory_allocated`` minus the allocated bytes before);
* ``stayers_state_bytes_per_rank``: this rank's share of the stayers' optimizer state
  before the switch (fp32 master + ``exp_avg`` + ``exp_avg_sq`` of the slices it holds);
* ``startup_peak_bytes`` / ``static_startup_peak_bytes`` / ``full_startup_peak_bytes``:
  peak resident memory (GPU: peak allocated device memory) from the start of the process
  to the end of the first optimizer step, for the three runs;
* ``largest_matrix_state_bytes``: fp32 master + ``exp_avg`` + ``exp_avg_sq`` of the largest
  candidate matrix, whole (the bound asked of a ZeRO-1/2 switch), and
  ``peak_extra_over_largest_matrix``;
* ``kept_in_place_bytes``: stayers' state that went into the new optimizer as it was;
* ``first_step_after_switch_seconds`` (step 3), ``step_seconds`` (step 4) and
  ``step_seconds_vs_static`` (step 4 against step 4 of the ``static`` run: same selection
  size, the Trainer's own param groups there).

``--bf16`` trains with ``TrainingArguments(bf16=True)`` (bf16 weights, fp32 master).

    python benchmarks/switch.py --engine zero3 --hidden 1024 --json docs/results/bench_switch_cpu.json
    python benchmarks/switch.py --engine zero2 --hidden 512 --json docs/results/bench_switch_cpu.json

``--json`` accumulates: an existing file's list keeps its other configurations.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS = 8
TOP_PCT = 0.5
MODES = ("callback", "static", "full")


# ------------------------------------------------------------------ memory readings
def _status(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return -1


def rss() -> int:
    return _status("VmRSS")


def reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak() -> int:
    return _status("VmHWM")


# ------------------------------------------------------------------ worker (one rank)
def synthetic_snr(names, types, shift: int):
    """A ranking by layer index, shifted by ``shift`` layers (the same on every rank)."""
    from collections import OrderedDict

    out = OrderedDict()
    for n in names:
        layer = int(n.split(".")[2])
        out[n] = {"snr": float((-(layer - shift)) % LAYERS), "type": types[n]}
    return out


def worker(args) -> None:
    import torch
    import transformers

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    import torch.distributed as dist

    from spectrum_callback import SpectrumCallback, spectrum_freeze
    from spectrum_callback._fence import deepspeed_internals as ds
    from spectrum_callback.analyzer import SpectrumAnalyzer
    from spectrum_callback.backends.deepspeed import DeepSpeedBackend

    transformers.logging.set_verbosity_error()
    rank, world = dist.get_rank(), dist.get_world_size()
    stage = int(args.engine[-1])
    with open(os.path.join(ROOT, "configs", f"ds_zero{max(stage, 2)}.json")) as fh:
        cfg = json.load(fh)
    cfg["zero_optimization"]["stage"] = stage
    if stage == 3:
        cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    out_dir = tempfile.mkdtemp(prefix="bench_switch_")
    ta = transformers.TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=1, max_steps=4 if args.mode != "full" else 1, bf16=args.bf16,
        learning_rate=1e-4, weight_decay=0.01, logging_steps=1, save_strategy="no", report_to=[],
        use_cpu=not cuda, seed=0, disable_tqdm=True, lr_scheduler_type="constant", dataloader_num_workers=0,
        deepspeed=cfg)
    h = args.hidden
    mcfg = transformers.LlamaConfig(
        hidden_size=h, intermediate_size=int(round(2.75 * h / 64)) * 64, num_attention_heads=max(1, h // 64),
        num_key_value_heads=max(1, h // 256), num_hidden_layers=LAYERS, vocab_size=1024, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(mcfg)  # zero.Init under ZeRO-3 (after TrainingArguments)
    n_params = sum(ds.full_numel(p) for p in model.parameters())

    probe = SpectrumAnalyzer(model)  # names and types only: nothing is scanned
    snr0 = synthetic_snr(probe.names, probe.types, 0)
    largest = max(ds.full_numel(p) for u in probe.modules.values() for p in getattr(u, "params", [u.weight]))
    del probe

    class Tokens(torch.utils.data.Dataset):
        def __len__(self):
            return 64

        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            x = torch.randint(0, 1024, (32,), generator=g)
            return {"input_ids": x, "labels": x.clone(), "attention_mask": torch.ones_like(x)}

    result = {"rank": rank, "params": n_params, "largest_matrix_state_bytes": 3 * 4 * largest}
    if args.mode == "static":
        spectrum_freeze(model, TOP_PCT, snr_json=dict(snr0))

    def device_peak():
        return torch.cuda.max_memory_allocated() if cuda else peak()

    class StartUp(transformers.TrainerCallback):
        t0 = None

        def on_step_begin(self, a, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            if state.global_step == 1:
                result["startup_peak_bytes"] = device_peak()
                result["rss_after_step1"] = rss()
            if state.global_step == 3:  # the first step after the switch at step 2
                result["first_step_after_switch_seconds"] = time.perf_counter() - self.t0
            if state.global_step == 4:  # the next one (ZeRO-3 traces its prefetch schedule again first)
                result["step_seconds"] = time.perf_counter() - self.t0

    trainer = transformers.Trainer(model=model, args=ta, train_dataset=Tokens())
    if args.mode == "callback":
        calls = {"n": 0}

        def scan(self, names=None):
            calls["n"] += 1
            self.last_scan_stats = {"scan_seconds": 0.0, "scanned": float(len(self.names)), "reused": 0.0}
            return synthetic_snr(self.names, self.types, calls["n"])

        SpectrumAnalyzer.scan = scan
        switch = DeepSpeedBackend.switch

        def measured_switch(self_, leaving, joining):
            held = {id(p) for ps, _, _ in ds.param_groups(self_.zero) for p in ps} - {id(p) for p in joining}
            stayers = [p for p in self_.model.parameters() if p.requires_grad and id(p) in held]
            if self_.stage == 3:
                local = sum(ds.local_tensor(p).numel() for p in stayers)
            else:
                local = sum(f[1].numel() for f in (ds.owned_fragment(p) for p in stayers) if f is not None)
            gc.collect()
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                dev0 = torch.cuda.memory_allocated()
            before = rss()
            reset_peak()
            t0 = time.perf_counter()
            res = switch(self_, leaving, joining)
            if cuda:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
            entry = {"switch_seconds": seconds, "peak_extra_bytes": peak() - before, "rss_delta_bytes": rss() - before,
                     "stayers": len(stayers), "leaving": len(leaving), "joining": len(joining),
                     "stayers_state_bytes_per_rank": 3 * 4 * local,
                     "staged_bytes": self_.last_switch.get("staged_bytes"),
                     "kept_in_place_bytes": self_.last_switch.get("kept_in_place_bytes")}
            if cuda:
                entry["peak_extra_device_bytes"] = torch.cuda.max_memory_allocated() - dev0
            result.setdefault("switches", []).append(entry)
            return res

        DeepSpeedBackend.switch = measured_switch
        trainer.add_callback(SpectrumCallback(top_pct=TOP_PCT, update_every=2, snr_json=dict(snr0), verbose=False))
    trainer.add_callback(StartUp())
    trainer.train()
    if args.mode == "callback":
        # the switch at step 2: the first one that moves state (the one at step 0 selects)
        moved = [s for s in result.get("switches", []) if s["joining"]]
        result.update(moved[-1] if moved else {})
        result["switches_measured"] = len(result.pop("switches", []))
    gathered = [None] * world
    dist.all_gather_object(gathered, result)
    if rank == 0:
        with open(args.out, "w") as fh:
            json.dump(gathered, fh)
    dist.barrier()
    dist.destroy_process_group()
    # Leave without C++ static destructors: gloo/DeepSpeed threads at interpreter exit sometimes
    # abort the process ("terminate called without an active exception") after the results are out.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ------------------------------------------------------------------ driver
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args, mode: str) -> list:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "ranks.json")
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", "1")
        env.setdefault("HF_HUB_OFFLINE", "1")
        env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
        if args.device == "cpu":
            env.setdefault("DS_ACCELERATOR", "cpu")
            env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}",
               f"--master_port={free_port()}", os.path.abspath(__file__), "--worker", "--mode", mode,
               "--engine", args.engine, "--hidden", str(args.hidden), "--device", args.device, "--out", out]
        if args.bf16:
            cmd.append("--bf16")
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
        if proc.returncode != 0 or not os.path.isfile(out):
            sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
            raise SystemExit(f"{mode} run failed (exit {proc.returncode})")
        with open(out) as fh:
            return json.load(fh)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine", choices=["zero1", "zero2", "zero3"], default="zero3")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--device", choices=["cpu", "cuda"], default=None)
    ap.add_argument("--modes", default=",".join(MODES), help="comma list of callback,static,full")
    ap.add_argument("--json", default=None, help="file to add this configuration's record to")
    ap.add_argument("--timeout", type=int, default=1200)
    ap.add_argument("--bf16", action="store_true", help="TrainingArguments(bf16=True): bf16 weights, fp32 master")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="callback", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.worker:
        worker(args)
        return
    modes = [m for m in args.modes.split(",") if m]
    runs = {m: launch(args, m) for m in modes}
    rec = {"engine": args.engine, "world_size": args.nproc, "hidden": args.hidden, "layers": LAYERS,
           "device": args.device, "dtype": "bf16" if args.bf16 else "fp32", "top_pct": TOP_PCT,
           "command": "python benchmarks/switch.py " + " ".join(a for a in sys.argv[1:])}
    cb = runs.get("callback")
    if cb:
        rec["params"] = cb[0]["params"]
        rec["largest_matrix_state_bytes"] = cb[0]["largest_matrix_state_bytes"]
        keys = ["switch_seconds", "peak_extra_bytes", "rss_delta_bytes", "stayers_state_bytes_per_rank",
                "staged_bytes", "kept_in_place_bytes", "startup_peak_bytes", "peak_extra_device_bytes", "step_seconds",
                "first_step_after_switch_seconds"]
        rec["per_rank"] = [{k: r.get(k) for k in keys + ["stayers", "leaving", "joining"] if k in r} for r in cb]
        for k in keys:
            vals = [r[k] for r in cb if r.get(k) is not None]
            if vals:
                rec[k] = max(vals)
        rec["peak_extra_over_share"] = max(r["peak_extra_bytes"] / r["stayers_state_bytes_per_rank"] for r in cb)
        rec["peak_extra_over_largest_matrix"] = rec["peak_extra_bytes"] / rec["largest_matrix_state_bytes"]
        if rec.get("peak_extra_device_bytes") is not None:
            rec["peak_extra_device_over_largest_matrix"] = (rec["peak_extra_device_bytes"]
                                                            / rec["largest_matrix_state_bytes"])
    for m, key in (("static", "static_startup_peak_bytes"), ("full", "full_startup_peak_bytes")):
        if m in runs:
            rec[key] = max(r["startup_peak_bytes"] for r in runs[m])
            rec.setdefault("params", runs[m][0]["params"])
    if cb and "static" in runs and all("step_seconds" in r for r in cb + runs["static"]):
        # the second step after the switch against spectrum_freeze's fourth (same selection size; the
        # Trainer's two param groups there, one group per parameter under the callback at ZeRO-1/2)
        rec["step_seconds_vs_static"] = (max(r["step_seconds"] for r in cb)
                                         / max(r["step_seconds"] for r in runs["static"]))
    import platform

    import torch

    rec["conditions"] = {"torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
                         "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_", "131072")
                         if args.device == "cpu" else None}
    try:
        import deepspeed
        import transformers

        rec["conditions"].update(deepspeed=deepspeed.__version__, transformers=transformers.__version__)
    except Exception:  # pragma: no cover
        pass
    print(json.dumps(rec, indent=1))
    if args.json:
        data = []
        if os.path.isfile(args.json):
            with open(args.json) as fh:
                data = json.load(fh)
            data = data if isinstance(data, list) else [data]
        def ident(d):
            return d.get("engine"), d.get("world_size"), d.get("hidden"), d.get("device"), d.get("dtype", "fp32")

        data = [d for d in data if ident(d) != ident(rec)]
        data.append(rec)
        data.sort(key=lambda d: (d["device"], d.get("dtype", "fp32"), d["engine"], d["hidden"]))
        with open(args.json, "w") as fh:
            json.dump(data, fh, indent=1)


if __name__ == "__main__":
    main()
