"""accelerate internals (checked with accelerate 1.15)."""
from __future__ import annotations


def prepared_models(accelerator) -> list:
    """The models an ``Accelerator`` prepared (``Accelerator._models``): under DeepSpeed the
    engines, one of which owns the ZeRO optimizer."""
    return list(getattr(accelerator, "_models", []) or [])


def reset_state() -> None:
    """Forget accelerate's and transformers' process-wide (DeepSpeed) state, so that a second
    Trainer can be built in the same process (benchmarks and tests run several in turn)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    try:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
    except Exception:
        pass
