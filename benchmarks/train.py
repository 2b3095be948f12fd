#!/usr/bin/env python
"""Training benchmark: full fine-tuning vs Spectrum static vs Spectrum dynamic vs LoRA.

Same model (same random init), same batches, transformers.Trainer, one method per
subprocess (so that peak memory is per method), in one run:

* ``full``: every parameter trains;
* ``spectrum_static``: ``SpectrumCallback(top_pct=0.25)`` (one scan at train begin);
* ``spectrum_dynamic``: ``SpectrumCallback(top_pct=0.25, update_every=N)``; the re-scan
  time (only matrices marked dirty are re-scanned) is reported as a fraction of the
  training time of the N steps before it;
* ``lora``: peft LoRA r=16 on all linear layers.

Reported per method: median step time, tokens/s, peak memory (CPU: peak RSS of the
process and an estimate of parameter + gradient + optimizer-state bytes; CUDA:
``torch.cuda.max_memory_allocated``), trainable parameters, ratios to full fine-tuning.

    nice -n 5 python benchmarks/train.py --device cpu \
        --json docs/results/bench_train_cpu.json --plot docs/results/bench_train_cpu.png
    python benchmarks/train.py --device cuda --json runs/bench_train_cuda.json --plot runs/bench_train_cuda.png
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

BENCH_METHODS = ["full", "spectrum_static", "spectrum_dynamic", "lora"]
# this benchmark's labels -> spectrum_study.methods names
BUILDER_NAMES = {"full": "full", "spectrum_static": "spectrum", "spectrum_dynamic": "spectrum-dynamic", "lora": "lora"}

PRESETS = {
    # small Llama for a 2-core CPU
    "cpu": dict(hidden_size=256, intermediate_size=688, num_attention_heads=8, num_key_value_heads=4,
                num_hidden_layers=4, vocab_size=2048, batch=4, seq=128),
    # Llama-3-8B widths, 8 layers (2.0 B parameters, random init)
    "cuda": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                 num_hidden_layers=8, vocab_size=32000, batch=4, seq=2048),
}


def run_one(args) -> dict:
    import torch
    import transformers
    from torch.utils.data import Dataset

    torch.set_num_threads(args.threads)
    device = args.device
    p = dict(PRESETS[args.preset])
    batch, seq = p.pop("batch"), p.pop("seq")
    if args.layers:
        p["num_hidden_layers"] = args.layers
    cfg = transformers.LlamaConfig(**p, max_position_embeddings=max(seq, 128))
    torch.manual_seed(0)
    # Built where it trains: a 2 B-parameter random init takes minutes on CPU, a second on a GPU.
    with torch.device(device):
        model = transformers.LlamaForCausalLM(cfg)
    vocab = cfg.vocab_size

    class Tokens(Dataset):
        def __init__(self, n):
            g = torch.Generator().manual_seed(0)
            self.x = torch.randint(0, vocab, (n, seq), generator=g)

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            x = self.x[i]
            return {"input_ids": x, "labels": x.clone(), "attention_mask": torch.ones_like(x)}

    from spectrum_study.methods import PeakMemory, build_method

    model, callbacks, spectrum_cb = build_method(BUILDER_NAMES[args.method], model, top_pct=0.25,
                                                 update_every=args.update_every)

    # Time every scan of the analyzer (initial and re-scans).
    from spectrum_callback import analyzer as analyzer_mod

    scans = []
    real_scan = analyzer_mod.SpectrumAnalyzer.scan

    def timed_scan(self, *a, **kw):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = real_scan(self, *a, **kw)
        if device == "cuda":
            torch.cuda.synchronize()
        scans.append({"seconds": time.perf_counter() - t, **self.last_scan_stats})
        return out

    analyzer_mod.SpectrumAnalyzer.scan = timed_scan

    step_times = []
    cpu_times = []  # process CPU time per step: robust to other processes on a shared CPU
    mem = {}

    class Timer(transformers.TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            if device == "cuda":
                torch.cuda.synchronize()
            self.t = time.perf_counter()
            self.c = time.process_time()

        def on_step_end(self, a, state, control, model=None, optimizer=None, **kw):
            if device == "cuda":
                torch.cuda.synchronize()
            step_times.append(time.perf_counter() - self.t)
            cpu_times.append(time.process_time() - self.c)
            if state.global_step == 2:  # optimizer state exists by now
                m = model
                params = {id(q): q for q in m.parameters()}.values()
                mem["param_bytes"] = sum(q.numel() * q.element_size() for q in params)
                mem["grad_bytes"] = sum(q.numel() * q.element_size() for q in params if q.requires_grad)
                opt = getattr(optimizer, "optimizer", optimizer)
                mem["optimizer_state_bytes"] = sum(v.numel() * v.element_size() for st in opt.state.values()
                                                   for v in st.values() if torch.is_tensor(v))

    callbacks.append(Timer())
    out_dir = tempfile.mkdtemp(prefix="bench_train_")
    targs = transformers.TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=batch, learning_rate=1e-4, max_steps=args.steps,
        logging_steps=10**6, save_strategy="no", report_to=[], use_cpu=device == "cpu", seed=0, data_seed=0,
        disable_tqdm=True, dataloader_num_workers=0, bf16=device == "cuda", optim=args.optim,
        lr_scheduler_type="constant",
    )
    trainer = transformers.Trainer(model=model, args=targs, train_dataset=Tokens(batch * args.steps),
                                   callbacks=callbacks)
    t0 = time.perf_counter()
    with PeakMemory(cuda=device == "cuda", sample_rss=False) as probe:  # no sampling thread in the timing
        trainer.train()
    train_s = time.perf_counter() - t0
    n_total = sum(q.numel() for q in {id(q): q for q in model.parameters()}.values())
    n_train = sum(q.numel() for q in {id(q): q for q in model.parameters()}.values() if q.requires_grad)
    warm = step_times[args.warmup:]
    # The dynamic re-scan happens inside on_step_begin, i.e. inside the timed step: report the
    # median over steps (robust) and the re-scans separately.
    res = {
        "method": args.method,
        "steps": args.steps,
        "step_s_median": statistics.median(warm),
        "step_s_mean": statistics.fmean(warm),
        "cpu_step_s_median": statistics.median(cpu_times[args.warmup:]),
        "tokens_per_s": batch * seq / statistics.median(warm),
        "train_s": train_s,
        "trainable_params": n_train,
        "total_params": n_total,
        "peak_rss_bytes": PeakMemory.process_peak_rss(),  # whole process
        **mem,
    }
    res["state_bytes_estimate"] = sum(mem.get(k, 0) for k in ("param_bytes", "grad_bytes", "optimizer_state_bytes"))
    if device == "cuda":
        res["peak_cuda_bytes"] = probe.cuda_peak_bytes
    if scans:
        res["scans"] = scans
        res["initial_scan_s"] = scans[0]["seconds"]
    if args.method == "spectrum_dynamic" and len(scans) > 1:
        rescan = sum(s["seconds"] for s in scans[1:])
        n_rescans = len(scans) - 1
        # training time of the steps between scans, without the re-scans themselves
        train_between = statistics.median(warm) * args.update_every * n_rescans
        res["rescan_s_total"] = rescan
        res["rescans"] = n_rescans
        res["rescan_fraction_of_training"] = rescan / train_between
        res["rescanned_matrices"] = [s.get("scanned") for s in scans[1:]]
    if spectrum_cb is not None:
        res["selected_modules"] = len(spectrum_cb.selected)
    return res


def plot(results, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["method"] for r in results]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    axes[0].bar(names, [r.get("cpu_step_s_median", r["step_s_median"]) * 1e3 for r in results], color="tab:blue",
                label="process CPU time")
    axes[0].bar(names, [r["step_s_median"] * 1e3 for r in results], color="none", edgecolor="k", label="wall time")
    axes[0].set_ylabel("median step time (ms)")
    axes[0].legend(fontsize=8)
    mem_key = "peak_cuda_bytes" if "peak_cuda_bytes" in results[0] else "state_bytes_estimate"
    axes[1].bar(names, [r[mem_key] / 2**20 for r in results], color="tab:orange", label=mem_key)
    if mem_key != "peak_cuda_bytes":
        axes[1].bar(names, [r["peak_rss_bytes"] / 2**20 for r in results], color="none", edgecolor="k",
                    label="peak RSS (process)")
    axes[1].set_ylabel("MiB")
    axes[1].legend(fontsize=8)
    for ax in axes:
        ax.tick_params(axis="x", labelrotation=20)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--preset", default=None, choices=sorted(PRESETS), help="model size (default: --device)")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--update-every", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--methods", default=",".join(BENCH_METHODS))
    ap.add_argument("--optim", default=None,
                    help="TrainingArguments.optim (default: adamw_torch_fused on cuda, adamw_torch on cpu)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None)
    ap.add_argument("--method", default=None, help=argparse.SUPPRESS)  # child process
    args = ap.parse_args(argv)
    args.preset = args.preset or args.device
    args.optim = args.optim or ("adamw_torch_fused" if args.device == "cuda" else "adamw_torch")
    unknown = sorted(set(args.methods.split(",")) - set(BENCH_METHODS))
    if unknown:
        ap.error(f"unknown --methods {unknown}; choose from {BENCH_METHODS}")
    if args.method:
        print("RESULT " + json.dumps(run_one(args)), flush=True)
        return
    results, failed = [], []
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=str(args.threads))
    for method in args.methods.split(","):
        cmd = [sys.executable, os.path.abspath(__file__), "--method", method, "--device", args.device,
               "--preset", args.preset, "--steps", str(args.steps), "--update-every", str(args.update_every),
               "--warmup", str(args.warmup), "--threads", str(args.threads), "--optim", args.optim]
        if args.layers:
            cmd += ["--layers", str(args.layers)]
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode != 0 or not line:
            # Keep going: the other methods' numbers are still worth having (the run ends non-zero).
            sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-5000:])
            print(f"{method} FAILED (rc={proc.returncode})", flush=True)
            failed.append({"method": method, "returncode": proc.returncode, "stderr_tail": proc.stderr[-2000:]})
            continue
        r = json.loads(line[-1][len("RESULT "):])
        results.append(r)
        print(f"{method:17s} step {r['step_s_median'] * 1e3:8.1f} ms (cpu {r['cpu_step_s_median'] * 1e3:6.1f} ms)  "
              f"{r['tokens_per_s']:8.0f} tok/s  "
              f"trainable {r['trainable_params']:>11,d}  state {r['state_bytes_estimate'] / 2**20:7.1f} MiB  "
              f"RSS {r['peak_rss_bytes'] / 2**20:7.1f} MiB  ({time.perf_counter() - t:.0f} s)", flush=True)
    full = next((r for r in results if r["method"] == "full"), None)
    if full:
        for r in results:
            r["step_time_ratio_to_full"] = r["step_s_median"] / full["step_s_median"]
            r["cpu_step_time_ratio_to_full"] = r["cpu_step_s_median"] / full["cpu_step_s_median"]
            r["state_bytes_ratio_to_full"] = r["state_bytes_estimate"] / full["state_bytes_estimate"]
            r["trainable_ratio_to_full"] = r["trainable_params"] / full["trainable_params"]
            if "peak_cuda_bytes" in r:
                r["peak_cuda_ratio_to_full"] = r["peak_cuda_bytes"] / full["peak_cuda_bytes"]
    import torch

    out = {
        "device": args.device,
        "preset": args.preset,
        "model": dict(PRESETS[args.preset]) | ({"num_hidden_layers": args.layers} if args.layers else {}),
        "steps": args.steps,
        "update_every": args.update_every,
        "threads": args.threads,
        "optim": args.optim,
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else None,
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "results": results,
        "failed": failed,
        "command": "python " + " ".join([os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:])),
    }
    dyn = next((r for r in results if r["method"] == "spectrum_dynamic"), None)
    if dyn and "rescan_fraction_of_training" in dyn:
        print(f"dynamic re-scan: {dyn['rescan_s_total']:.3f} s for {dyn['rescans']} re-scan(s) of "
              f"{dyn['rescanned_matrices']} matrices = "
              f"{100 * dyn['rescan_fraction_of_training']:.2f} % of training time "
              f"(update_every={args.update_every}); initial scan {dyn['initial_scan_s']:.3f} s")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)
    if args.plot and results:
        plot(results, args.plot,
             f"{args.preset} preset on {args.device}, {args.steps} steps, torch {torch.__version__}")
    if failed:
        raise SystemExit(f"failed: {', '.join(f['method'] for f in failed)}")


if __name__ == "__main__":
    main()
