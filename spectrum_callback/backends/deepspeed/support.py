"""What the DeepSpeed backend supports, and every refusal, in one place.

Any ZeRO stage 1, 2 or 3 engine of a checked DeepSpeed version is accepted, with any
optimizer, lr scheduler and offload setting, as long as the ZeRO optimizer never has to be
rebuilt: static Spectrum selects before the engine is built (the Trainer hook), so the
optimizer holds the selection from the start and nothing in it ever changes.

A rebuild (every switch of dynamic Spectrum, and a static run whose engine was built before
the selection) replaces the ZeRO optimizer with one of the same class over the new
selection, moving the stayers' master weights and state.  That is right for optimizers
whose state is one tensor per element of the flat partition plus a step count, the Adam
family: torch's Adam/AdamW (``optim="adamw_torch"``, or DeepSpeed's ``optimizer`` block with
``torch_adam``) and DeepSpeed's FusedAdam and DeepSpeedCPUAdam (the ``optimizer`` block,
with or without ``offload_optimizer``).  Anything else blocks a rebuild
(:func:`rebuild_blockers`) and is refused with what works instead.
"""
from __future__ import annotations

from typing import List

import torch

from ..._fence import deepspeed_internals as ds
from ..optimizers import engine_refusal, optimizer_name


def rebuildable(base) -> bool:
    """Whether the backend can rebuild a ZeRO optimizer around ``base`` (module doc)."""
    if type(base) in (torch.optim.Adam, torch.optim.AdamW):
        return True
    return ds.is_deepspeed_adam(base)


def refuse_unsupported(wrapper, zero, stage: int, engine) -> None:
    """What no Spectrum run under DeepSpeed can use, refused in one place."""
    ds.check_deepspeed_version()
    if wrapper is None:
        raise ValueError("SpectrumCallback got no optimizer at on_train_begin under DeepSpeed")
    if stage == 0:
        raise ValueError(
            f"unsupported DeepSpeed optimizer {type(zero).__name__}: SpectrumCallback supports ZeRO stages "
            "1, 2 and 3 (zero_optimization.stage in the DeepSpeed config); for stage 0 drop DeepSpeed or freeze "
            "before training with spectrum_freeze(model, ...)"
        )
    if engine is None:
        raise ValueError(
            "SpectrumCallback could not find the DeepSpeed engine that owns the optimizer; use it with "
            "transformers.Trainer (trainer.add_callback(...)) so that trainer.model_wrapped is the engine"
        )
    why = engine_refusal(ds.torch_optimizer(zero), "deepspeed")
    if why:
        raise ValueError(why)


def rebuild_blockers(zero, engine) -> List[str]:
    """Why the ZeRO optimizer ``zero`` cannot be rebuilt over another selection (empty: it can)."""
    base = ds.torch_optimizer(zero)
    out = []
    if not rebuildable(base):
        out.append(f"its optimizer {optimizer_name(base)}, whose state the backend cannot move between ZeRO "
                   "partitions (it rebuilds torch Adam/AdamW and DeepSpeed's FusedAdam and DeepSpeedCPUAdam)")
    sched = getattr(engine, "lr_scheduler", None)
    if ds.is_deepspeed_scheduler(sched):
        out.append(f"the DeepSpeed config's 'scheduler' block ({type(sched).__name__}), which stays bound to the "
                   "optimizer a switch replaces (set the schedule with TrainingArguments(lr_scheduler_type=..., "
                   "warmup_steps=...) instead)")
    return out


def dynamic_refusal(blockers: List[str], zero) -> str:
    """The message for dynamic Spectrum on an optimizer that cannot be rebuilt: what blocks it
    and what works."""
    base = ds.torch_optimizer(zero)
    name = optimizer_name(base)
    engines = "plain PyTorch or DDP" if engine_refusal(base, "fsdp2") else "plain PyTorch, DDP or FSDP2"
    return (f"dynamic Spectrum (update_every) under DeepSpeed cannot follow the selection with "
            f"{'; '.join(blockers)}. What works: static Spectrum (update_every=None) with {name} under DeepSpeed; "
            f"dynamic Spectrum with {name} on {engines}; or dynamic Spectrum under DeepSpeed with "
            "optim='adamw_torch' or an 'optimizer' block of type Adam/AdamW")


def late_build_refusal(blockers: List[str], zero, built: int, selected: int) -> str:
    """The message for a static run whose engine was built over more than the selection, on an
    optimizer that cannot be rebuilt."""
    return (f"the DeepSpeed optimizer was built over {built} trainable parameters before Spectrum selected {selected} "
            f"of them, and it cannot be rebuilt over the selection: {'; '.join(blockers)}. Attach SpectrumCallback "
            "before trainer.train() (Trainer(callbacks=[...]) or trainer.add_callback), so that it selects before "
            "DeepSpeed builds the engine; when resuming, resume from a checkpoint that has spectrum_state.json; or "
            "freeze before Trainer(...) with spectrum_freeze(model, ...)")
