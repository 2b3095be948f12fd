"""Run under `torchrun --nproc_per_node=2`: DDP (gloo, CPU) scenarios for SpectrumCallback.

Writes <out>/rank<R>.json with what the test asserts.
"""
import json
import os
import sys

import torch
import torch.distributed as dist

torch.set_num_threads(1)


def _cpu_rank_location(obj, location):
    """Restore a storage to "cpu:<rank>" as to "cpu". transformers 5.16.1 (axolotl 0.19's pin)
    loads the optimizer with map_location=args.device under several processes, which on CPU is
    "cpu:0", a location torch.load cannot restore to; newer releases pass "cpu" there."""
    return obj if location.startswith("cpu:") else None


torch.serialization.register_package(5, lambda obj: None, _cpu_rank_location)

import transformers  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

import spectrum_callback.analyzer as analyzer_mod  # noqa: E402
from spectrum_callback import SpectrumAnalyzer, SpectrumCallback  # noqa: E402
from spectrum_callback.state import optimizer_state_types  # noqa: E402
from optim_matrix import extra_args, other_optims  # noqa: E402
from tiny import RandomTokens, rotating_scan, snapshot, tiny_model, training_args  # noqa: E402


class FrozenWatch(TrainerCallback):
    def __init__(self):
        self.violations = []

    def on_step_begin(self, args, state, control, model=None, **kw):
        self.before = snapshot(model)
        self.trainable = {n for n, p in model.named_parameters() if p.requires_grad}

    def on_step_end(self, args, state, control, model=None, **kw):
        for n, p in model.named_parameters():
            if n not in self.trainable and not torch.equal(self.before[n], p.detach()):
                self.violations.append([state.global_step, n])


def main(out):
    rank = int(os.environ["RANK"])
    result = {}

    # A: forced rotation (every scan swaps the whole selection) -> DDP must sync joiners' grads
    real_scan = SpectrumAnalyzer.scan
    rotating, _ = rotating_scan()
    SpectrumAnalyzer.scan = rotating
    model = tiny_model("llama", layers=4)
    cb = SpectrumCallback(top_pct=0.25, update_every=2)
    watch = FrozenWatch()
    args = training_args(os.path.join(out, "a"), max_steps=6, per_device_train_batch_size=2, ddp_backend="gloo")
    tr = transformers.Trainer(model=model, args=args, train_dataset=RandomTokens(n=64, seed=rank))
    tr.add_callback(cb)
    tr.add_callback(watch)
    tr.train()
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    result["a_params_equal_across_ranks"] = all(torch.equal(gathered[0], g) for g in gathered)
    result["a_history_steps"] = [h["step"] for h in cb.history]
    result["a_selected"] = cb.selected
    result["a_frozen_violations"] = watch.violations
    SpectrumAnalyzer.scan = real_scan

    # B: rank 1 computes different SNR values; the selection still comes from one source
    if rank == 1:
        orig = analyzer_mod.snr_batched

        def perturbed(*a, **k):
            v = orig(*a, **k)
            return v * torch.linspace(0.01, 100.0, v.numel(), dtype=v.dtype)

        analyzer_mod.snr_batched = perturbed
    model = tiny_model("llama", layers=8, seed=3)
    cb = SpectrumCallback(top_pct=0.25, update_every=2)
    args = training_args(os.path.join(out, "b"), max_steps=4, per_device_train_batch_size=2, ddp_backend="gloo",
                         learning_rate=2e-2)
    tr = transformers.Trainer(model=model, args=args, train_dataset=RandomTokens(n=64, seed=rank))
    tr.add_callback(cb)
    tr.train()
    result["b_history"] = [[h["step"], h["selected"], h["snr"]] for h in cb.history]
    if rank == 1:
        analyzer_mod.snr_batched = orig

    # C: resume. A dynamic run with checkpoints, then a fresh model and Trainer resumed from
    # checkpoint-4 of it: same scans, selections, losses and final weights as the run itself.
    for mode in ("full", "resume"):
        model = tiny_model("llama", layers=8, seed=0)
        cb = SpectrumCallback(top_pct=0.25, update_every=2)
        args = training_args(os.path.join(out, "c"), max_steps=8, per_device_train_batch_size=2, ddp_backend="gloo",
                             learning_rate=3e-2, save_strategy="steps", save_steps=2)
        tr = transformers.Trainer(model=model, args=args, train_dataset=RandomTokens(n=64, seed=rank))
        tr.add_callback(cb)
        tr.train(resume_from_checkpoint=os.path.join(out, "c", "checkpoint-4") if mode == "resume" else None)
        result[f"c_{mode}_history"] = [[h["step"], h["selected"]] for h in cb.history]
        result[f"c_{mode}_losses"] = {h["step"]: h["loss"] for h in tr.state.log_history if "loss" in h}
        result[f"c_{mode}_weights"] = [float(p.double().sum()) for p in model.parameters()]
        result[f"c_{mode}_trainable"] = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    # D: the other optimizers the Trainer builds (the DDP cells of the optimizer matrix): static,
    # then rotate with parked state, saved at step 3 and resumed from there
    # The Trainer loads optimizer.pt with weights_only=True: GaLore's and APOLLO's projectors
    # must be allowed, with or without Spectrum (torch's own message says so)
    torch.serialization.add_safe_globals(optimizer_state_types())
    for optim in other_optims(core=os.environ.get("SPECTRUM_TESTS_CORE") == "1"):
        for mode, kw in (("static", dict(max_steps=3)),
                         ("full", dict(max_steps=6, save_strategy="steps", save_steps=3)),
                         ("resume", dict(max_steps=6))):
            model = tiny_model("llama", layers=4, seed=0)
            moving = {} if mode == "static" else dict(update_every=2, policy="rotate", park_state=True)
            cb = SpectrumCallback(top_pct=0.25, verbose=False, **moving)
            watch = FrozenWatch()
            args = training_args(os.path.join(out, f"d_{optim}"), per_device_train_batch_size=2, ddp_backend="gloo",
                                 optim=optim, **extra_args(optim), **kw)
            tr = transformers.Trainer(model=model, args=args, train_dataset=RandomTokens(n=64, seed=rank),
                                      callbacks=[cb, watch])
            ckpt = os.path.join(out, f"d_{optim}", "checkpoint-3")
            tr.train(resume_from_checkpoint=ckpt if mode == "resume" else None)
            key = f"d_{optim}_{mode}"
            result[f"{key}_violations"] = watch.violations
            result[f"{key}_losses"] = {h["step"]: h["loss"] for h in tr.state.log_history if "loss" in h}
            result[f"{key}_history"] = [[h["step"], h["selected"]] for h in cb.history]
            result[f"{key}_weights"] = [float(p.double().sum()) for p in model.parameters()]
            opt = tr.optimizer.optimizer if hasattr(tr.optimizer, "optimizer") else tr.optimizer
            result[f"{key}_optimizer"] = f"{type(opt).__module__}.{type(opt).__name__}"
            result[f"{key}_frozen_state"] = sum(1 for p, st in opt.state.items() if not p.requires_grad and st)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as fh:
        json.dump(result, fh)
    # Tear gloo down before the interpreter exits: left to exit, a gloo thread was once still
    # joinable and the process aborted ("terminate called without an active exception").
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
