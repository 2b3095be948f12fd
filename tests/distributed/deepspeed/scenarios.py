"""DeepSpeed scenarios for tests/distributed/deepspeed/test_deepspeed.py, run under
``torchrun --nproc_per_node=2 tests/distributed/deepspeed/scenarios.py OUT NAME [NAME ...]``
(DeepSpeed with gloo on CPU) or, for the plain-PyTorch reference,
``python tests/distributed/deepspeed/scenarios.py OUT ref:NAME`` (single process, global batch 8).

One process group runs several scenarios so that DeepSpeed's one-off start-up (the shm
comm op build) is paid once.  Each scenario writes OUT/NAME.json (rank 0) and
OUT/NAME.weights.pt (full final weights).

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

from spectrum_callback._fence.deepspeed_internals import whole  # noqa: E402
from tiny import (  # noqa: E402
    LossLog, RandomTokens, all_ranks, ds_config, frozen_changes, init_deepspeed_gloo, reset_accelerate,
    run_scenario_specs, snapshot_frozen, tiny_model, training_args)
from spectrum_callback import SpectrumCallback  # noqa: E402

transformers.logging.set_verbosity_error()

# name -> settings.  stage None = plain PyTorch reference (run with ref:NAME).
SCENARIOS = {
    "z2_dynamic": dict(stage=2, update_every=2, max_steps=6),
    "z3_dynamic": dict(stage=3, update_every=2, max_steps=6),
    "z2_static": dict(stage=2, update_every=None, max_steps=4),
    "z3_static": dict(stage=3, update_every=None, max_steps=4),
    "z3_dynamic_ga": dict(stage=3, update_every=2, max_steps=4, gradient_accumulation_steps=2, per_device=2),
    "z2_dynamic_gc_bf16": dict(stage=2, update_every=2, max_steps=4, bf16=True, gradient_checkpointing=True),
    "z3_dynamic_gc_bf16": dict(stage=3, update_every=2, max_steps=4, bf16=True, gradient_checkpointing=True),
    "z3_dynamic_gc_reentrant": dict(stage=3, update_every=2, max_steps=4, gradient_checkpointing=True, reentrant=True,
                                    bf16=True),
    "z3_dynamic_gc_nonreentrant": dict(stage=3, update_every=2, max_steps=6, gradient_checkpointing=True),
    "z3_static_gc": dict(stage=3, update_every=None, max_steps=2, gradient_checkpointing=True),
    "z3_prefrozen_gc": dict(stage=3, update_every=None, max_steps=2, gradient_checkpointing=True, no_spectrum=True,
                            prefreeze=True),
    "z2_full": dict(stage=2, update_every=None, max_steps=2, no_spectrum=True),
    "z3_full": dict(stage=3, update_every=None, max_steps=2, no_spectrum=True),
    "z3_nospectrum_gc": dict(stage=3, update_every=None, max_steps=2, gradient_checkpointing=True, no_spectrum=True),
    "z3_switch10": dict(stage=3, update_every=1, max_steps=11, top_pct=0.5, lr=2e-2),
    "z2_switch20": dict(stage=2, update_every=1, max_steps=21, top_pct=0.5, lr=2e-2),
    "z3_resume": dict(stage=3, update_every=2, max_steps=6, resume_at=3),
    "z2_resume": dict(stage=2, update_every=2, max_steps=6, resume_at=3),
    "z2_resume_bf16": dict(stage=2, update_every=2, max_steps=6, resume_at=3, bf16=True),
    # z2_dynamic_gc_bf16 without the start-up hook (as for a callback the hook never saw): the
    # engine is built over every parameter in the Trainer's two groups, and the first switch
    # rebuilds from that layout (stayers' fragments reassembled) into one group per parameter.
    # A checkpoint in the Trainer's own two groups (a static run keeps them; so did every ZeRO-1/2
    # checkpoint before one group per parameter), resumed by a dynamic run: DeepSpeed loads it into
    # that layout, the switch at step 4 reassembles the stayers' state, the one at 6 keeps it in place.
    "z2_resume_untagged": dict(stage=2, update_every=None, max_steps=7, resume_at=3, resume_update_every=2,
                               top_pct=0.5),
    "z2_late_bf16": dict(stage=2, update_every=2, max_steps=4, bf16=True, gradient_checkpointing=True, late=True),
    "z1_dynamic": dict(stage=1, update_every=2, max_steps=6),
    # the configurations users run (static: any optimizer, DeepSpeed's blocks, offload)
    "z2_bnb8_static": dict(stage=2, update_every=None, max_steps=4, optim="adamw_bnb_8bit"),
    "z3_torchao8_static": dict(stage=3, update_every=None, max_steps=4, optim="adamw_torch_8bit"),
    "z2_torchao8_static": dict(stage=2, update_every=None, max_steps=4, optim="adamw_torch_8bit"),
    "z2_offload_static": dict(stage=2, update_every=None, max_steps=4, offload=True),
    "z2_block_static": dict(stage=2, update_every=None, max_steps=4, optimizer_block=True, scheduler_block=True),
    "z3_offload_static": dict(stage=3, update_every=None, max_steps=4, offload=True, offload_param=True,
                              optim="paged_adamw_8bit"),
    # the other optimizers the Trainer builds, static (ZeRO-2; ZeRO-3 for bitsandbytes and the blocks)
    "z2_paged8_static": dict(stage=2, update_every=None, max_steps=4, optim="paged_adamw_8bit"),
    "z2_lion8_static": dict(stage=2, update_every=None, max_steps=4, optim="lion_8bit"),
    "z2_torchao4_static": dict(stage=2, update_every=None, max_steps=4, optim="adamw_torch_4bit"),
    "z2_adafactor_static": dict(stage=2, update_every=None, max_steps=4, optim="adafactor"),
    "z2_schedfree_static": dict(stage=2, update_every=None, max_steps=4, optim="schedule_free_adamw"),
    "z3_bnb8_static": dict(stage=3, update_every=None, max_steps=4, optim="adamw_bnb_8bit"),
    "z3_lion8_static": dict(stage=3, update_every=None, max_steps=4, optim="lion_8bit"),
    "z3_adafactor_static": dict(stage=3, update_every=None, max_steps=4, optim="adafactor"),
    "z3_schedfree_static": dict(stage=3, update_every=None, max_steps=4, optim="schedule_free_adamw"),
    "z3_torchao4_static": dict(stage=3, update_every=None, max_steps=4, optim="adamw_torch_4bit"),
    "z3_block_static": dict(stage=3, update_every=None, max_steps=4, optimizer_block=True, scheduler_block=True),
    "z2_block_dynamic": dict(stage=2, update_every=2, max_steps=6, optimizer_block=True),
    "z2_offload_dynamic": dict(stage=2, update_every=2, max_steps=6, offload=True),
    "z3_offload_dynamic": dict(stage=3, update_every=2, max_steps=6, offload=True, offload_param=True),
    "z3_block_dynamic": dict(stage=3, update_every=2, max_steps=6, optimizer_block=True),
    "z2_bnb8_dynamic": dict(stage=2, update_every=2, max_steps=1, optim="adamw_bnb_8bit", expect_error=True),
    "z2_sched_dynamic": dict(stage=2, update_every=2, max_steps=1, optimizer_block=True, scheduler_block=True,
                             expect_error=True),
    "z2_galore_static": dict(stage=2, update_every=None, max_steps=1, optim="galore_adamw", expect_error=True),
    # static with bitsandbytes, but the engine built over every parameter (no start-up hook): a
    # switch cannot rebuild that optimizer over the selection, so the run stops
    "z2_bnb8_late_static": dict(stage=2, update_every=None, max_steps=1, optim="adamw_bnb_8bit", late=True,
                                expect_error=True),
    "z2_bnb8_resume": dict(stage=2, update_every=None, max_steps=6, resume_at=3, optim="adamw_bnb_8bit"),
    # DeepSpeed's DeepSpeedCPUAdam (its block with offload_optimizer): run by hand, not in CI,
    # because its C++ op takes minutes to build on a CPU
    "z2_cpuadam_dynamic": dict(stage=2, update_every=2, max_steps=6, optimizer_block="deepspeed_adam", offload=True),
    # fused 3-D MoE expert banks (transformers 5 Mixtral): one unit each, partitioned by ZeRO-3 too
    "z2_moe_dynamic": dict(stage=2, update_every=2, max_steps=6, arch="mixtral", top_pct=0.5),
    "z3_moe_dynamic": dict(stage=3, update_every=2, max_steps=6, arch="mixtral", top_pct=0.5),
    # the selection policies (every switch moves the selection); park: a returning matrix gets
    # this rank's parked slices back, which the plain-PyTorch reference parks whole
    "z2_rotate_park": dict(stage=2, update_every=2, max_steps=7, policy="rotate", park_state=True),
    "z3_rotate_park": dict(stage=3, update_every=2, max_steps=7, policy="rotate", park_state=True),
    "z2_random": dict(stage=2, update_every=2, max_steps=6, policy="random"),
    "z3_random": dict(stage=3, update_every=2, max_steps=6, policy="random"),
    "z2_cyclic_park": dict(stage=2, update_every=2, max_steps=7, policy="cyclic", park_state=True),
    "z3_cyclic": dict(stage=3, update_every=2, max_steps=6, policy="cyclic"),
    # parked state with offload_optimizer and with DeepSpeed's Adam block
    "z2_offload_rotate_park": dict(stage=2, update_every=2, max_steps=7, policy="rotate", park_state=True,
                                   offload=True),
    "z3_block_rotate_park": dict(stage=3, update_every=2, max_steps=7, policy="rotate", park_state=True,
                                 optimizer_block=True),
}


def rank():
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def world():
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


class SwitchComm:
    """What each DeepSpeed switch moved between ranks: per call of the backend's ``switch``,
    the collectives that went through DeepSpeed's comm backend (count and elements per op)
    and the calls of ZeRO-3's full-parameter gather (``get_full_hp_param``, behind
    ``safe_get_full_*``).  Installed once per process (2-process runs only)."""

    OPS = ("all_gather", "all_gather_into_tensor", "all_gather_coalesced", "all_reduce", "all_reduce_coalesced",
           "broadcast", "reduce_scatter_tensor", "reduce_scatter", "all_to_all_single")

    def __init__(self):
        self.active = None
        self.log = []

    def install(self):
        from deepspeed.comm import comm as ds_comm
        from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

        from spectrum_callback.backends.deepspeed import DeepSpeedBackend

        me = self
        cdb = ds_comm.cdb
        for op in self.OPS:
            fn = getattr(cdb, op, None)
            if fn is None:
                continue

            def counted(*a, _fn=fn, _op=op, **kw):
                if me.active is not None:
                    # elements of the result: the gathered output, or the reduced/sent tensor
                    t = kw.get("output_tensor", kw.get("tensor", a[0] if a else None))
                    n = t.numel() if torch.is_tensor(t) else sum(x.numel() for x in (t or []) if torch.is_tensor(x))
                    c = me.active["ops"].setdefault(_op, [0, 0])
                    c[0] += 1
                    c[1] += n
                return _fn(*a, **kw)

            setattr(cdb, op, counted)
        full = DeepSpeedZeroOptimizer_Stage3.get_full_hp_param

        def get_full_hp_param(self_, *a, **kw):
            if me.active is not None:
                me.active["full_reads"] += 1
            return full(self_, *a, **kw)

        DeepSpeedZeroOptimizer_Stage3.get_full_hp_param = get_full_hp_param
        switch = DeepSpeedBackend.switch

        def counted_switch(self_, leaving, joining):
            from spectrum_callback._fence.deepspeed_internals import param_groups

            held = {id(p) for ps, _, _ in param_groups(self_.zero) for p in ps} - {id(p) for p in joining}
            me.active = {"ops": {}, "full_reads": 0, "stage": self_.stage, "rebuilds_before": self_.rebuilds,
                         "stayers": sum(1 for p in self_.model.parameters() if p.requires_grad and id(p) in held)}
            try:
                return switch(self_, leaving, joining)
            finally:
                entry, me.active = me.active, None
                entry["rebuilt"] = self_.rebuilds > entry.pop("rebuilds_before")
                entry["last_switch"] = dict(self_.last_switch) if entry["rebuilt"] else {}
                entry["trainable_numel"] = sum(getattr(p, "ds_numel", p.numel()) for p in self_.model.parameters()
                                               if p.requires_grad)
                me.log.append(entry)

        DeepSpeedBackend.switch = counted_switch


SWITCH_COMM = SwitchComm()


def full_state(model):
    params = list(model.named_parameters())
    with whole([p for _, p in params]):
        return {n: p.detach().float().clone().cpu() for n, p in params}


class Recorder(TrainerCallback):
    """Per step: loss, selection, optimizer state elements per rank, frozen-bit check."""

    def __init__(self, spectrum):
        self.spectrum = spectrum
        self.frozen_snap = {}
        self.violations = []
        self.numel = []
        self.selected = []
        self.trainable_numel = []
        self.lrs = []
        self.dead_refs = []
        self.refs = []
        self.trainer_optimizer = None
        self.scan_stats = []
        self.parked = []
        self.optimizer_class = None
        self.flat_numel = []
        self.stray_state = []

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kw):
        self.trainer_optimizer = optimizer
        # Runs after SpectrumCallback.on_step_begin (added later): the selection for this step is set.
        b = self.spectrum.backend
        if b is None:  # no Spectrum (full fine-tuning): count the same way
            from spectrum_callback._fence.deepspeed_internals import param_groups as _ds_param_groups
            from spectrum_callback.backends.torch_backend import unwrap_optimizer

            if self.trainer_optimizer is None:
                return
            zero = unwrap_optimizer(self.trainer_optimizer)
            local = sum(f.numel() + sum(v.numel() for v in zero.optimizer.state.get(f, {}).values()
                                        if torch.is_tensor(v) and v.ndim > 0)
                        for _, _, f in _ds_param_groups(zero))
        else:
            local = b.state_numel()
        numel = [None] * world()
        if torch.distributed.is_initialized():
            torch.distributed.all_gather_object(numel, local)
        else:
            numel = [local]
        self.numel.append({"step": state.global_step, "per_rank": numel})
        self.selected.append(list(self.spectrum.selected))
        self.scan_stats.append(dict(self.spectrum.analyzer.last_scan_stats))
        self.parked.append(b.parked_bytes() if b is not None else 0)
        self.trainable_numel.append(sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel()
                                        for p in model.parameters() if p.requires_grad))
        zero = getattr(b, "zero", None) if b is not None else None
        if zero is not None:
            import weakref

            from spectrum_callback._fence.deepspeed_internals import param_groups as _ds_param_groups

            self.refs.append(weakref.ref(zero))
            base = zero.optimizer
            self.lrs.append([float(g["lr"]) for g in base.param_groups])
            self.optimizer_class = f"{type(base).__module__}.{type(base).__name__}"
            flats = [f for _, _, f in _ds_param_groups(zero)]
            # the optimizer's state is keyed by the flat partitions of the selection only
            self.flat_numel.append(sum(f.numel() for f in flats))
            self.stray_state.append(sum(1 for k in base.state if not any(k is f for f in flats)))
        self.frozen_snap = snapshot_frozen(model)

    def on_step_end(self, args, state, control, model=None, **kw):
        for n, diff in frozen_changes(model, self.frozen_snap):
            self.violations.append({"step": state.global_step, "param": n, "max_abs": diff})
        self.frozen_snap = {}


def make_trainer(name, s, out, reference, max_steps=None, save=False):
    reset_accelerate()
    # built before TrainingArguments: no zero.Init, same init everywhere
    model = tiny_model(s.get("arch", "llama"), seed=0)
    if s.get("prefreeze"):
        from spectrum_callback import spectrum_freeze

        spectrum_freeze(model, 0.25)
        model.enable_input_require_grads()
    kw = dict(
        max_steps=max_steps or s["max_steps"],
        learning_rate=s.get("lr", 5e-3),
        gradient_accumulation_steps=s.get("gradient_accumulation_steps", 1),
        per_device_train_batch_size=(s.get("per_device", 4) * (2 if reference else 1)),
        bf16=s.get("bf16", False),
        gradient_checkpointing=s.get("gradient_checkpointing", False),
        optim=s.get("optim", "adamw_torch"),
    )
    if s.get("optim") in ("galore_adamw", "apollo_adamw"):
        kw["optim_target_modules"] = [r".*attn.*", r".*mlp.*"]
    if s.get("gradient_checkpointing"):
        kw["gradient_checkpointing_kwargs"] = {"use_reentrant": bool(s.get("reentrant", False))}
    if save:
        kw.update(save_strategy="steps", save_steps=s["resume_at"], save_only_model=False)
    if not reference:
        kw["deepspeed"] = ds_config(s["stage"], out, s.get("optimizer_block", False), s.get("scheduler_block", False),
                                    s.get("offload", False), s.get("offload_param", False))
    args = training_args(os.path.join(out, name), **kw)
    spectrum = SpectrumCallback(top_pct=s.get("top_pct", 0.25), update_every=s["update_every"], verbose=False,
                                policy=s.get("policy", "scan"), park_state=s.get("park_state", False))
    trainer = Trainer(model=model, args=args, train_dataset=RandomTokens(n=256, length=16, seed=1))
    if not s.get("no_spectrum"):
        trainer.add_callback(spectrum)
    rec = Recorder(spectrum)
    losses = LossLog()
    trainer.add_callback(rec)
    trainer.add_callback(losses)
    return trainer, model, spectrum, rec, losses


def finish(trainer):
    eng = getattr(trainer, "deepspeed", None)
    if eng is not None and hasattr(eng, "destroy"):
        eng.destroy()
    trainer.accelerator.free_memory() if hasattr(trainer, "accelerator") else None
    gc.collect()


def _zero_groups(spectrum):
    """Number of flat groups of the ZeRO optimizer the backend holds (None without one)."""
    zero = getattr(spectrum.backend, "zero", None) if spectrum is not None else None
    if zero is None:
        return None
    from spectrum_callback._fence.deepspeed_internals import param_groups

    return len(param_groups(zero))


def _current_zero_stage(spectrum):
    """ZeRO stage of the optimizer the backend rebuilt last (None without DeepSpeed)."""
    zero = getattr(spectrum.backend, "zero", None) if spectrum is not None else None
    if zero is None:
        return None
    from spectrum_callback._fence.deepspeed_internals import stage

    return stage(zero)


def run(name, out, reference=False):
    s = SCENARIOS[name]
    result = {"name": name, "world": world(), "reference": reference}
    if s.get("expect_error"):
        trainer, model, spectrum, rec, losses = make_trainer(name, s, out, reference)
        import transformers.trainer as hf_trainer

        hooked = hf_trainer.deepspeed_init
        if s.get("late"):  # as for a callback the start-up hook never saw
            hf_trainer.deepspeed_init = getattr(hooked, "__wrapped__", hooked)
        try:
            trainer.train()
            result["error"] = None
        except ValueError as exc:
            result["error"] = str(exc)
        finally:
            hf_trainer.deepspeed_init = hooked
        finish(trainer)
        return result
    if s.get("resume_at") and not reference:
        # First run: save at resume_at, stop there; second run: resume and go to max_steps.
        trainer, model, spectrum, rec, losses = make_trainer(name, s, out, reference, save=True)
        trainer.train()
        result["full_losses"] = losses.losses
        result["full_history"] = [[h["step"], h["selected"]] for h in spectrum.history]
        result["full_weights_sha"] = None
        full = full_state(model)
        finish(trainer)
        ckpt = os.path.join(out, name, f"checkpoint-{s['resume_at']}")
        result["ckpt_files"] = sorted(os.listdir(ckpt)) if os.path.isdir(ckpt) else None
        s2 = dict(s, update_every=s.get("resume_update_every", s["update_every"]))
        trainer, model, spectrum, rec, losses = make_trainer(name, s2, out, reference, save=True)
        first_switch = len(SWITCH_COMM.log)
        trainer.train(resume_from_checkpoint=ckpt)
        result["resumed_switch_comm"] = SWITCH_COMM.log[first_switch:]
        result["resumed_losses"] = losses.losses
        result["resumed_history"] = [[h["step"], h["selected"]] for h in spectrum.history]
        resumed = full_state(model)
        result["resume_max_weight_diff"] = max(float((full[n] - resumed[n]).abs().max()) for n in full)
        result["resumed_selected_first"] = rec.selected[0] if rec.selected else None
        result["violations"] = rec.violations
        finish(trainer)
        return result
    trainer, model, spectrum, rec, losses = make_trainer(name, s, out, reference)
    first_switch = len(SWITCH_COMM.log)
    import transformers.trainer as hf_trainer

    hooked = hf_trainer.deepspeed_init
    if s.get("late"):
        hf_trainer.deepspeed_init = getattr(hooked, "__wrapped__", hooked)
    try:
        trainer.train()
    finally:
        hf_trainer.deepspeed_init = hooked
    result["switch_comm"] = SWITCH_COMM.log[first_switch:]
    result.update(
        losses=losses.losses,
        violations=rec.violations,
        numel=rec.numel,
        selected=rec.selected,
        scan_stats=rec.scan_stats,
        parked_bytes=rec.parked,
        trainable_numel=rec.trainable_numel,
        total_numel=sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters()),
        trainable_logged=losses.trainable_logged,
        lrs=rec.lrs,
        history=[{"step": h["step"], "selected": h["selected"]} for h in spectrum.history],
        rebuilds=getattr(spectrum.backend, "rebuilds", None),
        zero_stage=trainer.model_wrapped.zero_optimization_stage() if not reference else None,
        backend_stage=_current_zero_stage(spectrum),
        zero_groups=_zero_groups(spectrum),
        trainable_tensors=sum(1 for p in model.parameters() if p.requires_grad),
        optimizer_class=rec.optimizer_class,
        flat_numel=all_ranks(rec.flat_numel),
        stray_state=rec.stray_state,
    )
    gc.collect()
    current = getattr(spectrum.backend, "zero", None)  # None for the plain-PyTorch reference
    result["live_old_optimizers"] = sum(1 for r in rec.refs[:-1] if r() is not None and r() is not current)
    weights = full_state(model)
    if rank() == 0:
        torch.save(weights, os.path.join(out, f"{name}{'.ref' if reference else ''}.weights.pt"))
    finish(trainer)
    return result


def main():
    argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the deepspeed launcher adds it
    out = argv[0]
    os.makedirs(out, exist_ok=True)
    names = argv[1:]
    dist = "LOCAL_RANK" in os.environ
    if dist:
        init_deepspeed_gloo()
        SWITCH_COMM.install()
    run_scenario_specs(run, out, names)
    if dist and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
