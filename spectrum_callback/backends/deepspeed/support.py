"""What the DeepSpeed backend supports: every other configuration refused in one place.

Supported: a DeepSpeed version the fenced internals were checked with, ZeRO stages 1, 2
and 3, the Trainer's torch Adam/AdamW and lr scheduler, no optimizer offload.  DeepSpeed's
own optimizer or scheduler (an 'optimizer' or 'scheduler' block in its config) would stay
bound to the ZeRO optimizer that the backend replaces at a switch: refused, as everything
else is, with the setting that fixes it.
"""
from __future__ import annotations

import torch

from ..._fence import deepspeed_internals as ds


def refuse_unsupported(wrapper, zero, stage: int, engine) -> None:
    """Every configuration this backend does not support, refused in one place."""
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
    opt_block = ds.config_optimizer(engine)
    if opt_block is not None:
        raise ValueError(
            f"the DeepSpeed config has an 'optimizer' block ({opt_block}): SpectrumCallback "
            "rebuilds the ZeRO optimizer when the selection changes and supports the Trainer's torch optimizer "
            "only. Remove the 'optimizer' block from the DeepSpeed config (set the optimizer with "
            "TrainingArguments(optim=..., learning_rate=..., weight_decay=...)) and add "
            '"zero_allow_untested_optimizer": true'
        )
    if getattr(engine, "lr_scheduler", None) is not None:
        raise ValueError(
            "the DeepSpeed config has a 'scheduler' block: DeepSpeed's scheduler stays bound to the optimizer "
            "that SpectrumCallback replaces at a switch. Remove the 'scheduler' block and set the schedule with "
            "TrainingArguments(lr_scheduler_type=..., warmup_steps=...)"
        )
    if ds.offload_enabled(engine):
        raise ValueError(
            "zero_optimization.offload_optimizer is not supported by SpectrumCallback's DeepSpeed backend "
            "(untested); remove offload_optimizer from the DeepSpeed config"
        )
    base = ds.torch_optimizer(zero)
    if not isinstance(base, (torch.optim.Adam, torch.optim.AdamW)):
        raise ValueError(
            f"SpectrumCallback under DeepSpeed supports torch Adam/AdamW (the Trainer's default adamw_torch); "
            f"got {type(base).__name__}. Use TrainingArguments(optim='adamw_torch')"
        )
