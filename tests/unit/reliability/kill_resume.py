"""Training run for the kill/resume test.

usage: python tests/unit/reliability/kill_resume.py MODE OUT   (MODE: full | kill | resume)
  full:   8 steps, dynamic Spectrum, checkpoints every 2 steps
  kill:   same, but the process SIGKILLs itself right after the step-4 checkpoint
  resume: resumes from OUT/checkpoint-4 (written by `kill`) and finishes
Writes OUT/result_<MODE>.json (not for `kill`, which dies).

Imports tests/helpers (tiny.py): launched by hand, set ``PYTHONPATH=tests/helpers`` first.
"""
import json
import os
import signal
import sys

import torch

torch.set_num_threads(1)
import transformers  # noqa: E402

from spectrum_callback import SpectrumCallback  # noqa: E402
from tiny import RandomTokens, tiny_model, training_args  # noqa: E402


class KillAfterSave(transformers.TrainerCallback):
    def on_save(self, args, state, control, **kw):
        if state.global_step == 4:
            os.kill(os.getpid(), signal.SIGKILL)


def main(mode, out):
    model = tiny_model("llama", layers=8, seed=0)
    cb = SpectrumCallback(top_pct=0.25, update_every=2)
    args = training_args(out, max_steps=8, learning_rate=3e-2, save_strategy="steps", save_steps=2)
    tr = transformers.Trainer(model=model, args=args, train_dataset=RandomTokens(n=64))
    tr.add_callback(cb)
    if mode == "kill":
        tr.add_callback(KillAfterSave())
    tr.train(resume_from_checkpoint=os.path.join(out, "checkpoint-4") if mode == "resume" else None)
    losses = {h["step"]: h["loss"] for h in tr.state.log_history if "loss" in h}
    result = {
        "losses": losses,
        "history": [[h["step"], h["selected"]] for h in cb.history],
        "selected": cb.selected,
        "final_weights_sum": float(sum(p.double().sum() for p in model.parameters())),
    }
    with open(os.path.join(out, f"result_{mode}.json"), "w") as fh:
        json.dump(result, fh)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
