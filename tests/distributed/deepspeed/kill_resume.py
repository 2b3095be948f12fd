"""SIGKILL + resume under DeepSpeed ZeRO-3, for tests/distributed/deepspeed/test_ds_kill_resume.py.

usage: torchrun --nproc_per_node=2 tests/distributed/deepspeed/kill_resume.py OUT MODE[,MODE...]
  full:   8 steps of dynamic Spectrum (update_every=2, real scans), checkpoint at step 4
          and 8, in OUT/full; writes OUT/full.rank<R>.json
  kill:   the same run in OUT/broken, but every rank SIGKILLs itself right after the
          step-4 checkpoint is on disk (all ranks past on_save, then a barrier); writes
          nothing else
  resume: trainer.train(resume_from_checkpoint=OUT/broken/checkpoint-4) up to step 8;
          writes OUT/resume.rank<R>.json
Modes run one after the other in the same process group ("full,kill" saves a start-up).

Imports tests/helpers (tiny.py): launched by hand, set ``PYTHONPATH=tests/helpers`` first.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))  # the repository
torch.set_num_threads(1)

import transformers  # noqa: E402
from transformers import Trainer, TrainerCallback  # noqa: E402

from spectrum_callback import SpectrumCallback  # noqa: E402
from tiny import RandomTokens, ds_config, init_deepspeed_gloo, reset_accelerate, tiny_model, training_args  # noqa: E402

transformers.logging.set_verbosity_error()
KILL_AT, MAX_STEPS = 4, 8


def rank():
    return torch.distributed.get_rank()


class KillAfterSave(TrainerCallback):
    """Added after SpectrumCallback, so its on_save (spectrum_state.json) has run."""

    def on_save(self, args, state, control, **kw):
        if state.global_step == KILL_AT:
            folder = os.path.join(args.output_dir, f"checkpoint-{KILL_AT}")
            # Every rank past the Trainer's save and its own callbacks' on_save first: rank 0
            # writes spectrum_state.json through a temporary file and a rename, which another
            # rank walking the folder could otherwise catch half-way (a FileNotFoundError).
            torch.distributed.barrier()
            for dirpath, _, files in os.walk(folder):  # make sure what was written is on disk
                for f in files:
                    with open(os.path.join(dirpath, f), "rb") as fh:
                        os.fsync(fh.fileno())
            torch.distributed.barrier()  # every rank has synced its part
            os.kill(os.getpid(), signal.SIGKILL)


class LossLog(TrainerCallback):
    """Losses this run logged itself (a resumed Trainer's log_history also holds the restored ones)."""

    def __init__(self):
        self.losses = {}

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "loss" in logs:
            self.losses[str(int(state.global_step))] = float(logs["loss"])


def weights_digest(model):
    import deepspeed

    params = list(model.named_parameters())
    h = hashlib.sha256()
    with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
        for n, p in params:
            h.update(n.encode())
            h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def run(mode, out):
    reset_accelerate()
    folder = os.path.join(out, "full" if mode == "full" else "broken")
    model = tiny_model("llama", seed=0)
    args = training_args(folder, max_steps=MAX_STEPS, learning_rate=2e-2, save_strategy="steps",
                         save_steps=KILL_AT, save_only_model=False, deepspeed=ds_config(3, out))
    spectrum = SpectrumCallback(top_pct=0.25, update_every=2, verbose=False)
    trainer = Trainer(model=model, args=args, train_dataset=RandomTokens(n=256, length=16, seed=1))
    trainer.add_callback(spectrum)
    log = LossLog()
    trainer.add_callback(log)
    if mode == "kill":
        trainer.add_callback(KillAfterSave())
    resume = os.path.join(folder, f"checkpoint-{KILL_AT}") if mode == "resume" else None
    trainer.train(resume_from_checkpoint=resume)
    result = {
        "mode": mode,
        "losses": log.losses,
        "history": [{"step": h["step"], "selected": h["selected"], "snr": h["snr"], "source": h["source"]}
                    for h in spectrum.history],
        "selected": list(spectrum.selected),
        "last_scan_step": spectrum.last_scan_step,
        "rebuilds": spectrum.backend.rebuilds,
        "weights": weights_digest(model),
    }
    with open(os.path.join(out, f"{mode}.rank{rank()}.json"), "w") as fh:
        json.dump(result, fh)
    eng = getattr(trainer, "deepspeed", None)
    if eng is not None:
        eng.destroy()
    torch.distributed.barrier()


def main():
    argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    out, modes = argv[0], argv[1].split(",")
    init_deepspeed_gloo()
    os.makedirs(out, exist_ok=True)
    for mode in modes:
        run(mode, out)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
