"""Soak run for tests/distributed/deepspeed/test_soak.py: dynamic Spectrum under DeepSpeed ZeRO-3 for many switches.

usage: torchrun --nproc_per_node=2 tests/distributed/deepspeed/soak.py OUT [STEPS] [UPDATE_EVERY]

A tiny Llama (4 layers) trains STEPS steps (default 200) with
``SpectrumCallback(top_pct=0.5, update_every=UPDATE_EVERY)`` (default 5).  The scan is
forced: every scan moves the two best layers of each matrix type by one layer, so each
switch drops 7 matrices, adds 7 and keeps 7 (whose Adam state moves to the new
optimizer).  Each rank writes OUT/soak.rank<R>.json with, per step:

* the selection and whether the optimizer was rebuilt;
* optimizer state elements of this rank (``backend.state_numel()``);
* process RSS (``/proc/self/statm``, right after the rebuild, which ends with ``gc.collect()``);
* hooks on the model: forward / forward-pre / backward / backward-pre hooks of every
  module plus the post-accumulate-grad and tensor hooks of every parameter, and the
  global module hooks;
* torch param groups and ZeRO-3 sub-groups of the optimizer, and process groups;
* live ZeRO optimizer and ZeRO-3 parameter-offload objects (weak references to every one
  the backend had), and the length of DeepSpeed's global ``FWD_MODULE_STACK``;
* bitwise check: every parameter gathered (``deepspeed.zero.GatheredParameters``) before
  and after the step; frozen ones must be bit-identical, trainable ones should move.

Imports tests/helpers (tiny.py): launched by hand, set ``PYTHONPATH=tests/helpers`` first.
"""
from __future__ import annotations

import gc
import json
import os
import sys
import time
import weakref

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))  # the repository
torch.set_num_threads(1)

import transformers  # noqa: E402
from transformers import Trainer, TrainerCallback  # noqa: E402

from spectrum_callback import SpectrumCallback  # noqa: E402
from spectrum_callback.analyzer import SpectrumAnalyzer  # noqa: E402
from tiny import RandomTokens, ds_config, init_deepspeed_gloo, rotating_scan, tiny_model, training_args  # noqa: E402

transformers.logging.set_verbosity_error()
PAGE = os.sysconf("SC_PAGE_SIZE")


def rank():
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * PAGE


def install_rotating_scan():
    """Every scan shifts the ranking of the layers by one (same on every rank)."""
    scan, calls = rotating_scan()
    SpectrumAnalyzer.scan = scan
    return calls


def count_hooks(model) -> dict:
    """Hooks registered on the model's modules and parameters, and torch's global module hooks."""
    mod = 0
    for m in model.modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
                     "_state_dict_hooks", "_load_state_dict_pre_hooks"):
            mod += len(getattr(m, attr, None) or {})
    par = 0
    for p in model.parameters():
        par += len(getattr(p, "_post_accumulate_grad_hooks", None) or {})
        par += len(getattr(p, "_backward_hooks", None) or {})
    import torch.nn.modules.module as mm

    glob = sum(len(getattr(mm, a, {}) or {}) for a in (
        "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
        "_global_backward_pre_hooks", "_global_module_registration_hooks", "_global_parameter_registration_hooks",
        "_global_buffer_registration_hooks"))
    return {"module": mod, "param": par, "global": glob}


def process_groups() -> int:
    from torch.distributed import distributed_c10d as c10d

    return len(c10d._world.pg_map)


def fwd_module_stack() -> int:
    """Length of DeepSpeed's global ZeRO-3 module stack (one entry per built optimizer
    unless the destroyed ones' entries are removed)."""
    from deepspeed.runtime.zero import parameter_offload as po

    return len(po.FWD_MODULE_STACK)


class Probe(TrainerCallback):
    def __init__(self, spectrum):
        self.spectrum = spectrum
        self.rows = []
        self.violations = []
        self.unmoved = []  # (step, param) of trainable parameters that did not change at a step
        self.refs = []
        self.offload_refs = []
        self.before = None
        self.last_rebuilds = None

    def _gather(self, model):
        import deepspeed

        params = list(model.named_parameters())
        with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
            return {n: (p.requires_grad, p.detach().clone()) for n, p in params}

    def on_step_begin(self, args, state, control, model=None, **kw):
        # Runs after SpectrumCallback.on_step_begin (added later): this step's selection is set.
        b = self.spectrum.backend
        rebuilt = b.rebuilds != self.last_rebuilds
        self.last_rebuilds = b.rebuilds
        zero = b.zero
        if not self.refs or self.refs[-1]() is not zero:
            self.refs.append(weakref.ref(zero))
            self.offload_refs.append(weakref.ref(zero.parameter_offload))
        row = {"step": int(state.global_step), "rebuilt": bool(rebuilt), "rebuilds": int(b.rebuilds),
               "selected": list(self.spectrum.selected), "state_numel": int(b.state_numel()),
               "hooks": count_hooks(model), "param_groups": len(zero.optimizer.param_groups),
               "sub_groups": len(zero.fp16_groups), "process_groups": process_groups(),
               "fwd_module_stack": fwd_module_stack()}
        if rebuilt:
            # The backend has just run gc.collect() at the end of the rebuild.
            row["rss"] = rss_bytes()
            row["live_optimizers"] = sum(1 for r in self.refs if r() is not None)
            row["live_offloads"] = sum(1 for r in self.offload_refs if r() is not None)
        self.rows.append(row)
        self.before = self._gather(model)

    def on_step_end(self, args, state, control, model=None, **kw):
        after = self._gather(model)
        for n, (trainable, was) in self.before.items():
            now = after[n][1]
            same = now.shape == was.shape and torch.equal(now, was)
            if not trainable and not same:
                self.violations.append({"step": int(state.global_step), "param": n,
                                        "max_abs": float((now.float() - was.float()).abs().max())})
            elif trainable and same:
                self.unmoved.append([int(state.global_step), n])
        self.before = None


def main():
    argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    out = argv[0]
    steps = int(argv[1]) if len(argv) > 1 else 200
    every = int(argv[2]) if len(argv) > 2 else 5
    init_deepspeed_gloo()
    os.makedirs(out, exist_ok=True)
    install_rotating_scan()
    cfg_path = ds_config(3, out)

    model = tiny_model("llama", seed=0)
    args = training_args(os.path.join(out, "run"), max_steps=steps, learning_rate=2e-3, logging_steps=50,
                         deepspeed=cfg_path)
    spectrum = SpectrumCallback(top_pct=0.5, update_every=every, verbose=False)
    trainer = Trainer(model=model, args=args, train_dataset=RandomTokens(n=256, length=16, seed=1))
    trainer.add_callback(spectrum)
    probe = Probe(spectrum)
    trainer.add_callback(probe)
    # Objects alive now (modules, imports) never become garbage: keep them out of the
    # collections that every rebuild runs (0.4 s each otherwise, on a loaded 2-core box).
    gc.collect()
    gc.freeze()
    t0 = time.time()
    trainer.train()
    wall = time.time() - t0
    losses = {int(h["step"]): float(h["loss"]) for h in trainer.state.log_history if "loss" in h}
    result = {
        "rank": rank(),
        "wall_s": wall,
        "rows": probe.rows,
        "violations": probe.violations,
        "unmoved": probe.unmoved,
        "history_steps": [int(h["step"]) for h in spectrum.history],
        "history_changes": [len(h["joined"]) for h in spectrum.history],
        "losses": losses,
        "rebuilds": spectrum.backend.rebuilds,
    }
    with open(os.path.join(out, f"soak.rank{rank()}.json"), "w") as fh:
        json.dump(result, fh)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
