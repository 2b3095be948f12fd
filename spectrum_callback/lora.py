"""Spectrum's selection as LoRA placement: the target modules of ``peft.LoraConfig``.

    from peft import LoraConfig, get_peft_model
    targets = spectrum_lora_targets(model, top_pct=0.25)
    model = get_peft_model(model, LoraConfig(r=64, target_modules=targets))

The targets are the modules the callback would train: the same scan and the same per-type
top-k (:meth:`~spectrum_callback.SpectrumSession.preselect`, without freezing anything).
"""
from __future__ import annotations

from typing import List

from torch import nn

from .config import SpectrumConfig
from .session import SpectrumSession

__all__ = ["spectrum_lora_targets", "lora_rank_for_budget", "lora_params"]


def spectrum_lora_targets(model: nn.Module, top_pct: float = 0.25, *, progress: bool = False,
                          **settings) -> List[str]:
    """The full names of the modules Spectrum selects in ``model``, sorted, as
    ``peft.LoraConfig(target_modules=...)`` (and axolotl's ``lora_target_modules``) take them.

    Args:
        model: the base model, before PEFT wraps it.
        top_pct: fraction of each matrix type selected, in (0, 1].
        progress: show the scan's progress bar.
        **settings: the selection settings of :class:`~spectrum_callback.SpectrumConfig`
            (``include``, ``exclude``, ``never_train``, ``min_per_type``, ``snr_json``,
            ``method``, ``dtype``, ``chunk_mb``).

    Raises:
        ValueError: a setting that does not choose a static selection (``update_every``,
            ``policy``, ``park_state``, ``always_train``...), or a selected unit LoRA cannot
            adapt as a module (a fused 3-D expert bank: exclude it, or adapt it through
            ``LoraConfig(target_parameters=...)``).
    """
    allowed = {"include", "exclude", "never_train", "min_per_type", "snr_json", "method", "dtype", "chunk_mb"}
    other = sorted(set(settings) - allowed)
    if other:
        raise ValueError(f"spectrum_lora_targets takes the selection settings {sorted(allowed)}; "
                         f"{', '.join(other)} do(es) not apply to placing LoRA adapters")
    cfg = SpectrumConfig(top_pct=top_pct, verbose=False, train_heads=False, **settings)
    session = SpectrumSession(model, None, cfg, progress=progress)
    try:
        selected = session.preselect(freeze=False)
    finally:
        session.close()
    fused = [n for n in selected if session.analyzer.modules[n].kind == "fused"]
    if fused:
        raise ValueError(
            f"Spectrum selected {len(fused)} fused 3-D expert bank(s) (e.g. {fused[0]}), which are parameters, not "
            "modules LoRA can target: pass exclude=[r'experts'] to place LoRA on the other matrices, and adapt the "
            "experts through peft.LoraConfig(target_parameters=[...]) if you want them")
    return sorted(selected)


def lora_rank_for_budget(model: nn.Module, targets: List[str], params: int) -> int:
    """The LoRA rank at which adapters on ``targets`` hold about ``params`` trainable
    parameters (``r * (in + out)`` per matrix), at least 1."""
    mods = dict(model.named_modules())
    missing = [t for t in targets if t not in mods]
    if missing:
        raise ValueError(f"{missing[0]!r} is no module of the model")
    per_rank = sum(_in_out(mods[t]) for t in targets)
    return max(1, round(params / per_rank))


def lora_params(model: nn.Module, targets: List[str], rank: int) -> int:
    """Trainable parameters of rank-``rank`` LoRA adapters on ``targets``."""
    mods = dict(model.named_modules())
    return rank * sum(_in_out(mods[t]) for t in targets)


def _in_out(module: nn.Module) -> int:
    w = module.weight
    if w.ndim != 2:
        raise ValueError(f"{type(module).__name__} has a {w.ndim}-D weight; LoRA adapts 2-D matrices")
    return int(w.shape[0] + w.shape[1])
