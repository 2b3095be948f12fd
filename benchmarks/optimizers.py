#!/usr/bin/env python
"""Memory of Spectrum, full fine-tuning and LoRA with each optimizer, in one run.

    python benchmarks/optimizers.py [--steps 3] [--out docs/results/bench_optimizers_cpu.json]

On the offline SmolLM2-135M-Instruct (KJV text, batch 2 x 128 tokens, the Trainer on CPU):
Spectrum 25 % and full fine-tuning, each with ``adamw_torch``, ``adamw_bnb_8bit``,
``adamw_torch_8bit`` and ``adamw_torch_4bit``, and LoRA r=16 on every linear layer with
``adamw_torch``.  Each configuration runs in a process of its own, so that its peak resident
memory is its own.  Reported, each also as a ratio to full fine-tuning with ``adamw_torch``:

* optimizer-state bytes after the last step, counted from the state tensors (a low-bit
  optimizer's quantized codes and scales, not their dequantized size);
* gradient bytes at the optimizer step (every ``.grad`` the step sees);
* peak RSS of the process during training, above its RSS when training started (the model
  and data are loaded before).

Also writes the arithmetic for a Llama of 8B shapes on one 24 GB GPU (:func:`fit_8b`).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
OPTIMS = ("adamw_torch", "adamw_bnb_8bit", "adamw_torch_8bit", "adamw_torch_4bit")
CONFIGS = [(m, o) for m in ("full", "spectrum") for o in OPTIMS] + [("lora", "adamw_torch")]


def tensor_bytes(t) -> int:
    """Bytes a tensor holds: a wrapper subclass (torchao's quantized state) counts its inner
    tensors, not its logical size."""
    import torch
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size() if torch.is_tensor(t) else 0


def run_one(method: str, optim: str, steps: int, threads: int) -> dict:
    import torch
    import transformers

    from spectrum_study.assets import BlockDataset, load_model_and_tokenizer, load_texts, token_blocks
    from spectrum_study.methods import PeakMemory, build_method

    torch.set_num_threads(threads)
    transformers.logging.set_verbosity_error()
    model, tok = load_model_and_tokenizer(None)
    model.config.use_cache = False
    train, _ = load_texts(None)
    ds = BlockDataset(token_blocks(tok, train, 128, max_blocks=2 * steps))
    model, callbacks, _ = build_method(method, model, top_pct=0.25)
    grads = {}

    class GradBytes(transformers.TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            grads["bytes"] = sum(tensor_bytes(p.grad) for p in model.parameters() if p.grad is not None)

    args = transformers.TrainingArguments(
        output_dir=os.path.join("/tmp", f"bench_optimizers_{os.getpid()}"), per_device_train_batch_size=2,
        max_steps=steps, learning_rate=1e-4, optim=optim, report_to=[], save_strategy="no", use_cpu=True,
        disable_tqdm=True, logging_steps=steps, dataloader_num_workers=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=ds, callbacks=[*callbacks, GradBytes()])
    t0 = time.perf_counter()
    with PeakMemory(cuda=False) as mem:
        trainer.train()
    opt = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    state = sum(tensor_bytes(v) for st in opt.state.values() for v in st.values() if torch.is_tensor(v) and v.ndim)
    return {"method": method, "optim": optim, "optimizer": f"{type(opt).__module__}.{type(opt).__name__}",
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "optimizer_state_bytes": int(state), "grad_bytes": int(grads.get("bytes", 0)),
            "peak_rss_rise_bytes": int(mem.rss_peak_bytes - mem._rss_start), "train_seconds": time.perf_counter() - t0}


def fit_8b(gpu_gb: float = 24.0) -> list:
    """What a Llama of 8B shapes needs on one GPU before activations: bf16 weights (8.03 B
    parameters), bf16 gradients of the trained parameters, and the optimizer's state (torch's
    AdamW keeps its two moments in the parameters' dtype, bf16: 4 bytes per trained parameter;
    an 8-bit AdamW 2 bytes, its block scales aside).  Spectrum trains ``top_pct`` of the 6.98 B
    parameters in the 224 matrices of the 32 layers; LoRA r=16 on every linear layer 42 M.
    Activations (with gradient checkpointing, batch 1 x 2048: a few GB) come on top."""
    total, matrices = 8.03e9, 6.98e9
    lora = 16 * 32 * (2 * (4096 + 4096) + 2 * (4096 + 1024) + 3 * (4096 + 14336))
    budget = gpu_gb * 1e9 / 2**30
    rows = []
    for name, trained in (("full fine-tuning", total), ("Spectrum 25 %", 0.25 * matrices),
                          ("Spectrum 10 %", 0.10 * matrices), ("LoRA r=16", lora)):
        for opt, per in (("adamw_torch", 4), ("8-bit AdamW", 2)):
            w, g, st = 2 * total / 2**30, 2 * trained / 2**30, per * trained / 2**30
            rows.append({"method": name, "optimizer": opt, "trained_params": trained, "weights_gib": round(w, 1),
                         "grads_gib": round(g, 1), "state_gib": round(st, 1), "total_gib": round(w + g + st, 1),
                         "left_for_activations_gib": round(budget - (w + g + st), 1)})
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=os.path.join(ROOT, "docs", "results", "bench_optimizers_cpu.json"))
    p.add_argument("--configs", default=None, help="comma list of method:optim (default: all)")
    p.add_argument("--_one", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._one:
        method, optim = args._one.split(":")
        print("RESULT " + json.dumps(run_one(method, optim, args.steps, args.threads)), flush=True)
        return 0
    configs = [tuple(c.split(":")) for c in args.configs.split(",")] if args.configs else CONFIGS
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    rows = []
    for method, optim in configs:
        proc = subprocess.run([sys.executable, __file__, "--_one", f"{method}:{optim}", "--steps", str(args.steps),
                               "--threads", str(args.threads)], env=env, capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            rows.append({"method": method, "optim": optim, "error": (proc.stderr or proc.stdout)[-800:]})
            print(f"{method:>9} {optim:<18} FAILED: {rows[-1]['error'][-200:]}", file=sys.stderr)
            continue
        rows.append(json.loads(line[len("RESULT "):]))
        print(f"{method:>9} {optim:<18} state {rows[-1]['optimizer_state_bytes'] / 2**20:8.1f} MiB", file=sys.stderr)
    base = next((r for r in rows if r.get("method") == "full" and r.get("optim") == "adamw_torch"), None)
    for r in rows:
        if base and "error" not in r:
            for k in ("optimizer_state_bytes", "grad_bytes", "peak_rss_rise_bytes"):
                r[k.replace("_bytes", "_ratio")] = r[k] / base[k] if base[k] else None
    import torch

    out = {"command": "python benchmarks/optimizers.py " + " ".join(sys.argv[1:]), "steps": args.steps,
           "threads": args.threads, "torch": torch.__version__, "rows": rows, "fit_8b_24gb": fit_8b(),
           "conditions": "CPU, one thread per configuration, each in its own process; batch 2 x 128 tokens"}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(out, fh, indent=1)
    print(markdown(out))
    print()
    print(fit_table(out["fit_8b_24gb"]))
    return 0


def fit_table(rows: list) -> str:
    lines = ["| 8B shapes, one 24 GB GPU | optimizer | weights + grads + state (GiB) | left for activations (GiB) |",
             "| --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['optimizer']} | {r['weights_gib']} + {r['grads_gib']} + {r['state_gib']} "
                     f"= {r['total_gib']} | {r['left_for_activations_gib']} |")
    return "\n".join(lines)


def markdown(out: dict) -> str:
    lines = ["| method | optim | optimizer state (MiB, vs full adamw_torch) | gradients (MiB, vs) | "
             "peak RSS rise (MiB, vs) |", "| --- | --- | --- | --- | --- |"]
    for r in out["rows"]:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['optim']} | failed | | |")
            continue
        cells = [f"{r[k] / 2**20:.1f} ({r[k.replace('_bytes', '_ratio')]:.3f})"
                 for k in ("optimizer_state_bytes", "grad_bytes", "peak_rss_rise_bytes")]
        lines.append(f"| {r['method']} | `{r['optim']}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
