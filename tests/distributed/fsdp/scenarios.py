"""FSDP2 scenarios for tests/distributed/fsdp/test_fsdp2.py, run under
``torchrun --nproc_per_node=2 tests/distributed/fsdp/scenarios.py OUT NAME [NAME ...]`` (gloo, CPU)
or, for the plain-PyTorch reference, ``python tests/distributed/fsdp/scenarios.py OUT ref:NAME``
(one process, the same global batch and schedule).

Two routes bring an FSDP2 model to the Trainer, and both are run here:

* ``accel``: the Trainer's own FSDP2 path (accelerate's ``fsdp2_prepare_model``,
  ``fsdp2_switch_optimizer_parameters``, DCP checkpoints through ``save_fsdp_optimizer`` /
  ``load_fsdp_optimizer``).  accelerate only enables FSDP on GPUs (on CPU it silently runs
  DDP), so this script sets on the accelerator state, after ``Trainer(...)``, what
  ``TrainingArguments(fsdp=..., fsdp_config={"fsdp_version": 2})`` sets on a GPU node:
  ``distributed_type=FSDP``, the FSDP2 plugin (built from configs/accelerate_fsdp2.yaml by
  accelerate's launch parsing), ``trainer.is_fsdp_enabled``.  Everything after
  that is accelerate's and the Trainer's own code.
* ``tload``: a model sharded at load time by transformers
  (``from_pretrained(distributed_config=DistributedConfig(fsdp_size=2))``), which the Trainer
  trains as it is; this runs on CPU unchanged.

Each scenario writes OUT/NAME.json (rank 0; per-rank facts gathered) and the full final
weights OUT/NAME[.ref].weights.pt.

Imports tests/helpers (tiny.py): launched by hand, set ``PYTHONPATH=tests/helpers`` first.
"""
from __future__ import annotations

import gc
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))  # the repository
torch.set_num_threads(1)

import transformers  # noqa: E402
from transformers import Trainer, TrainerCallback  # noqa: E402

from spectrum_callback import SpectrumCallback  # noqa: E402
from spectrum_callback._sharded import is_dtensor, local_part  # noqa: E402
from tiny import (  # noqa: E402
    LossLog, RandomTokens, all_ranks, frozen_changes, reset_accelerate, run_scenario_specs, snapshot_frozen,
    tiny_model, training_args)

transformers.logging.set_verbosity_error()

SCENARIOS = {
    "accel_dynamic": dict(update_every=2, max_steps=6),
    "accel_static": dict(update_every=None, max_steps=4),
    "accel_dynamic_ga": dict(update_every=2, max_steps=4, gradient_accumulation_steps=2, per_device=2),
    "accel_dynamic_bf16_gc": dict(update_every=2, max_steps=4, bf16=True, gradient_checkpointing=True),
    "accel_switch20": dict(update_every=1, max_steps=21, top_pct=0.5, lr=2e-2),
    "accel_resume": dict(update_every=2, max_steps=6, resume_at=3),
    "accel_moe_dynamic": dict(update_every=2, max_steps=6, arch="mixtral", top_pct=0.5),
    "tload_dynamic": dict(update_every=2, max_steps=6, route="tload"),
    # spectrum_freeze before Trainer(...), then the callback (dynamic): the optimizer is built
    # without the frozen candidates, which must be able to join later
    "accel_prefrozen_dynamic": dict(update_every=2, max_steps=6, prefreeze=True, top_pct=0.5, lr=2e-2),
    # the selection policies; park: a leaver's DTensor moments wait in host memory
    "accel_rotate_park": dict(update_every=2, max_steps=7, policy="rotate", park_state=True),
    "accel_random": dict(update_every=2, max_steps=6, policy="random"),
    "accel_cyclic_park": dict(update_every=2, max_steps=7, policy="cyclic", park_state=True),
    # low-bit optimizers over DTensor shards
    "accel_torchao8_static": dict(update_every=None, max_steps=4, optim="adamw_torch_8bit"),
    "accel_torchao8_rotate_park": dict(update_every=2, max_steps=7, policy="rotate", park_state=True,
                                       optim="adamw_torch_8bit"),
    "accel_torchao8_resume": dict(update_every=2, max_steps=6, resume_at=3, policy="rotate", park_state=True,
                                  optim="adamw_torch_8bit"),
    # schedule-free AdamW over DTensor shards (its resume fails in torch's DCP without Spectrum too:
    # the state is initialised by a step before the Trainer puts the optimizer in train mode)
    "accel_schedfree_static": dict(update_every=None, max_steps=4, optim="schedule_free_adamw"),
    "accel_schedfree_rotate_park": dict(update_every=2, max_steps=7, policy="rotate", park_state=True,
                                        optim="schedule_free_adamw"),
}


def rank():
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def world():
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def full_state(model):
    out = {}
    for n, p in model.named_parameters():
        t = p.detach()
        out[n] = (t.full_tensor() if is_dtensor(t) else t).float().clone().cpu()
    return out


class ScanCounter:
    """Counts what the scans bring whole to this rank (spectrum_callback._sharded.whole_on) and
    every DTensor.full_tensor() call on a weight matrix (a whole weight on every rank)."""

    def __init__(self):
        import spectrum_callback._sharded as sh
        from torch.distributed.tensor import DTensor

        self.received, self.calls, self.full_tensor_calls = 0, 0, 0
        orig_whole, orig_full = sh.whole_on, DTensor.full_tensor
        counter = self

        def whole_on(t, owner):
            counter.calls += 1
            w = orig_whole(t, owner)
            if w is not None:
                counter.received += w.numel()
            return w

        def full_tensor(self, *a, **k):
            # a weight matrix; accelerate >= 1.16 gathers the (0-d) gradient norm this way every step
            if self.ndim >= 2:
                counter.full_tensor_calls += 1
            return orig_full(self, *a, **k)

        import spectrum_callback.analyzer as an

        an.whole_on = whole_on
        DTensor.full_tensor = full_tensor
        self._undo = lambda: (setattr(an, "whole_on", orig_whole), setattr(DTensor, "full_tensor", orig_full))

    def close(self):
        self._undo()


class Recorder(TrainerCallback):
    """Per step (after Spectrum's on_step_begin): selection, optimizer state per rank (elements,
    and Adam's step per parameter), the state the selection needs, frozen-bit check."""

    def __init__(self, spectrum):
        self.spectrum = spectrum
        self.snap = {}
        self.violations = []
        self.numel = []
        self.needed = []
        self.selected = []
        self.steps = []
        self.opt = None

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kw):
        from spectrum_callback.backends import unwrap_optimizer

        opt = unwrap_optimizer(optimizer)
        names = {id(p): n for n, p in model.named_parameters()}
        b = self.spectrum.backend
        self.numel.append(b.state_numel() if b is not None else None)
        # Adam keeps two moments per trainable element; this rank holds the local shards.
        self.needed.append(2 * sum(local_part(p).numel() for p in model.parameters() if p.requires_grad))
        self.selected.append(list(self.spectrum.selected))
        self.steps.append({names[id(p)]: int(float(st["step"])) for p, st in opt.state.items() if "step" in st})
        self.snap = snapshot_frozen(model)

    def on_step_end(self, args, state, control, model=None, **kw):
        for n, diff in frozen_changes(model, self.snap):
            self.violations.append({"step": state.global_step, "param": n, "max_abs": diff})
        self.snap = {}


def fsdp2_plugin_from_config(path):
    """The FSDP plugin ``accelerate launch --config_file <path>`` gives each process: the launch
    command's own parsing turns the config into FSDP_* environment variables, which the plugin
    reads."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", path, "--num_processes", str(world()), "x.py"])
    args, _, _ = _validate_launch_command(args)
    env = {k: v for k, v in prepare_multi_gpu_env(args).items() if k.startswith("FSDP_")}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return FullyShardedDataParallelPlugin()
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def force_accelerate_fsdp2(trainer, model, bf16):
    """What accelerate does with configs/accelerate_fsdp2.yaml on a GPU node, set on CPU (see
    the module doc)."""
    from accelerate.utils import DistributedType

    plugin = fsdp2_plugin_from_config(os.path.join(ROOT, "configs", "accelerate_fsdp2.yaml"))
    assert plugin.fsdp_version == 2
    if bf16:
        plugin.set_mixed_precision("bf16")
    st = trainer.accelerator.state
    st.distributed_type = DistributedType.FSDP
    st.fsdp_plugin = plugin
    trainer.is_fsdp_enabled = True


def make_model(s, out, reference):
    arch = s.get("arch", "llama")
    if s.get("route") != "tload" or reference:
        return tiny_model(arch, seed=0)
    from transformers import AutoModelForCausalLM
    from transformers.distributed.configuration_utils import DistributedConfig

    path = os.path.join(out, f"{arch}_init")
    if rank() == 0 and not os.path.isdir(path):
        tiny_model(arch, seed=0).save_pretrained(path)
    torch.distributed.barrier()
    return AutoModelForCausalLM.from_pretrained(path, distributed_config=DistributedConfig(fsdp_size=world()))


def make_trainer(name, s, out, reference, save=False):
    reset_accelerate()
    model = make_model(s, out, reference)
    if s.get("prefreeze"):
        from spectrum_callback import spectrum_freeze

        spectrum_freeze(model, 0.25)
    kw = dict(
        max_steps=s["max_steps"],
        learning_rate=s.get("lr", 5e-3),
        gradient_accumulation_steps=s.get("gradient_accumulation_steps", 1),
        per_device_train_batch_size=s.get("per_device", 4) * (2 if reference else 1),
        bf16=s.get("bf16", False),
        gradient_checkpointing=s.get("gradient_checkpointing", False),
        optim=s.get("optim", "adamw_torch"),
    )
    if s.get("gradient_checkpointing"):
        kw["gradient_checkpointing_kwargs"] = {"use_reentrant": False}
    if save:
        kw.update(save_strategy="steps", save_steps=s["resume_at"], save_only_model=False)
    args = training_args(os.path.join(out, name), **kw)
    spectrum = SpectrumCallback(top_pct=s.get("top_pct", 0.25), update_every=s["update_every"], verbose=False,
                                policy=s.get("policy", "scan"), park_state=s.get("park_state", False))
    trainer = Trainer(model=model, args=args, train_dataset=RandomTokens(n=256, length=16, seed=1))
    if not reference and s.get("route", "accel") == "accel":
        force_accelerate_fsdp2(trainer, model, s.get("bf16", False))
    if not s.get("no_spectrum"):
        trainer.add_callback(spectrum)
    rec, losses = Recorder(spectrum), LossLog()
    trainer.add_callback(rec)
    trainer.add_callback(losses)
    return trainer, spectrum, rec, losses


def finish(trainer):
    trainer.accelerator.free_memory()
    gc.collect()


def run(name, out, reference=False):
    s = SCENARIOS[name]
    result = {"name": name, "world": world(), "reference": reference}
    if s.get("resume_at") and not reference:
        trainer, spectrum, rec, losses = make_trainer(name, s, out, reference, save=True)
        trainer.train()
        result["full_losses"] = losses.losses
        result["full_history"] = [[h["step"], h["selected"]] for h in spectrum.history]
        full = full_state(trainer.model)
        finish(trainer)
        ckpt = os.path.join(out, name, f"checkpoint-{s['resume_at']}")
        result["ckpt_files"] = sorted(os.listdir(ckpt)) if os.path.isdir(ckpt) else None
        trainer, spectrum, rec, losses = make_trainer(name, s, out, reference, save=True)
        trainer.train(resume_from_checkpoint=ckpt)
        result["resumed_losses"] = losses.losses
        result["resumed_history"] = [[h["step"], h["selected"]] for h in spectrum.history]
        result["resumed_steps_first"] = all_ranks(rec.steps[0] if rec.steps else None)
        resumed = full_state(trainer.model)
        result["resume_max_weight_diff"] = max(float((full[n] - resumed[n]).abs().max()) for n in full)
        result["violations"] = all_ranks(rec.violations)
        finish(trainer)
        return result
    trainer, spectrum, rec, losses = make_trainer(name, s, out, reference)
    counter = ScanCounter() if not reference else None
    try:
        trainer.train()
    finally:
        if counter is not None:
            counter.close()
    model = trainer.model
    result.update(
        losses=losses.losses,
        violations=all_ranks(rec.violations),
        numel=all_ranks(rec.numel),
        needed=all_ranks(rec.needed),
        selected=all_ranks(rec.selected),
        steps=all_ranks(rec.steps),
        history=[{"step": h["step"], "selected": h["selected"], "joined": h["joined"], "left": h["left"]}
                 for h in spectrum.history],
        backend=getattr(spectrum.backend, "name", None),
        optimizer_class=type(getattr(trainer.optimizer, "optimizer", trainer.optimizer)).__module__.split(".")[0],
        fsdp_modules=sum(type(m).__name__.startswith("FSDP") for m in model.modules()),
        dtensor_params=sum(is_dtensor(p) for p in model.parameters()),
        local_numel=all_ranks(sum(local_part(p).numel() for p in model.parameters())),
        candidate_numel=sum(spectrum.analyzer.modules[n].weight.numel() for n in spectrum.analyzer.names),
        scans=len(spectrum.history),
    )
    if counter is not None:
        result.update(scan_received=all_ranks(counter.received), scan_calls=all_ranks(counter.calls),
                      full_tensor_calls=all_ranks(counter.full_tensor_calls))
    weights = full_state(model)
    if rank() == 0:
        torch.save(weights, os.path.join(out, f"{name}{'.ref' if reference else ''}.weights.pt"))
    finish(trainer)
    return result


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    if "LOCAL_RANK" in os.environ:
        torch.distributed.init_process_group("gloo")
    run_scenario_specs(run, out, sys.argv[2:])
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
