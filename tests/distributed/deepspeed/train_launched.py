"""A user's training script as the README's launch paths run it (tests/distributed/deepspeed/test_launchers.py).

    scripts/launch_single_node.sh 2 tests/distributed/deepspeed/train_launched.py OUT MODEL_DIR
    (LAUNCHER=torchrun | deepspeed | accelerate)

As a user writes it: ``TrainingArguments`` first (with ``deepspeed=$DS_CONFIG``, or
nothing when accelerate's config names the DeepSpeed config), then ``from_pretrained``, so
that under ZeRO-3 the model is partitioned as it loads (``zero.Init``); then
``trainer.add_callback(SpectrumCallback(...))``.  Each rank writes OUT/launched.rank<r>.json
with what the test checks.
"""
from __future__ import annotations

import json
import math
import os
import sys

import torch

torch.set_num_threads(1)

import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback  # noqa: E402

from tiny import RandomTokens, frozen_changes, init_deepspeed_gloo, snapshot_frozen  # noqa: E402

from spectrum_callback import SpectrumCallback  # noqa: E402

transformers.logging.set_verbosity_error()


class Check(TrainerCallback):
    """Frozen bits per step and optimizer state per rank, after SpectrumCallback's own events."""

    def __init__(self, spectrum):
        self.spectrum = spectrum
        self.snap = {}
        self.violations = []
        self.state = []
        self.trainable = []
        self.losses = []

    def on_step_begin(self, args, state, control, model=None, **kw):
        self.snap = snapshot_frozen(model)
        self.trainable.append(sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad))

    def on_step_end(self, args, state, control, model=None, **kw):
        self.violations += [[state.global_step, n] for n, _ in frozen_changes(model, self.snap)]
        self.state.append(self.spectrum.backend.state_numel())

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))


def main():
    argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the deepspeed launcher adds it
    out, model_dir = argv[0], argv[1]
    via_accelerate = os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
    kw = dict(output_dir=os.path.join(out, "run"), per_device_train_batch_size=4, learning_rate=5e-3,
              weight_decay=0.1, max_steps=6, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
              seed=0, data_seed=0, disable_tqdm=True, dataloader_num_workers=0)
    if not via_accelerate:
        kw["deepspeed"] = os.environ["DS_CONFIG"]
    # CPU only: with use_cpu=True the TrainingArguments set up gloo through accelerate but not
    # DeepSpeed's own comm, and zero.Init would then see a world of 1. On GPUs the
    # TrainingArguments call deepspeed.init_distributed themselves.
    init_deepspeed_gloo()
    args = transformers.TrainingArguments(**kw)  # before from_pretrained: ZeRO-3 partitions at load
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    partitioned_at_load = all(hasattr(p, "ds_id") and p.numel() == 0 for p in model.parameters())
    spectrum = SpectrumCallback(top_pct=0.25, update_every=2, verbose=False)
    trainer = Trainer(model=model, args=args, train_dataset=RandomTokens(n=64, length=16, seed=1))
    trainer.add_callback(spectrum)
    check = Check(spectrum)
    trainer.add_callback(check)
    trainer.train()
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    engine = trainer.model_wrapped
    result = {
        "rank": rank,
        "world": world,
        "via_accelerate": via_accelerate,
        "zero_stage": engine.zero_optimization_stage() if hasattr(engine, "zero_optimization_stage") else None,
        "partitioned_at_load": partitioned_at_load,
        "selected": spectrum.selected,
        "first_scan": spectrum.history[0]["selected"],
        "scans": len(spectrum.history),
        "violations": check.violations,
        "state_numel": check.state,
        "trainable_numel": check.trainable,
        "losses": check.losses,
        "losses_finite": all(math.isfinite(x) for x in check.losses),
    }
    with open(os.path.join(out, f"launched.rank{rank}.json"), "w") as fh:
        json.dump(result, fh)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
