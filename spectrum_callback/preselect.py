"""Spectrum before any optimizer exists: the session's first selection (:meth:`SpectrumSession.preselect
<spectrum_callback.SpectrumSession.preselect>`), on its own.

* :func:`spectrum_freeze`: static Spectrum by freezing the model, for an optimizer you build
  yourself or an engine that should never see the frozen weights;
* :func:`spectrum_lora_targets`: where LoRA goes, as ``peft.LoraConfig(target_modules=...)``
  takes it; :func:`lora_rank_for_budget` gives the rank that matches another placement's
  parameter count.

Both select exactly as :class:`~spectrum_callback.SpectrumCallback` does with the same
settings: the same candidates, scan, per-type top-k, and (``spectrum_freeze``) task heads,
``always_train`` and the parameters you froze yourself.

    targets = spectrum_lora_targets(model, top_pct=0.25)
    model = peft.get_peft_model(model, peft.LoraConfig(r=64, target_modules=targets))
"""
from __future__ import annotations

from typing import List

from torch import nn

from .config import SpectrumConfig
from .session import SpectrumSession

__all__ = ["spectrum_freeze", "spectrum_lora_targets", "lora_rank_for_budget", "lora_params", "LORA_SETTINGS"]

# the settings that choose where LoRA goes, beside top_pct
LORA_SETTINGS = frozenset({"include", "exclude", "never_train", "min_per_type", "snr_json", "method", "dtype",
                           "chunk_mb"})


def spectrum_freeze(model: nn.Module, top_pct: float = 0.25, **settings) -> List[str]:
    """Scan (or read ``snr_json``), select and freeze ``model`` before any optimizer or Trainer
    exists (static Spectrum): the trainable set is the one ``SpectrumCallback`` with the same
    settings trains, task heads included.

    Args:
        model: the model (unwrapped).
        top_pct: fraction of each matrix type kept trainable, in (0, 1].
        **settings: the other settings of :class:`~spectrum_callback.SpectrumConfig`
            (``include``, ``exclude``, ``always_train``, ``never_train``, ``min_per_type``,
            ``snr_json``, ``method``, ``train_heads``, ...); a moving selection
            (``update_every``, a policy other than ``"scan"``) is refused: nothing would move it.

    Returns:
        The selected module names, sorted.
    """
    cfg = _static_config("spectrum_freeze", top_pct, settings)
    session = SpectrumSession(model, None, cfg, progress=False)
    try:
        return sorted(session.preselect())
    finally:
        session.close()


def spectrum_lora_targets(model: nn.Module, top_pct: float = 0.25, *, progress: bool = False,
                          **settings) -> List[str]:
    """The full names of the modules Spectrum selects in ``model``, sorted, as
    ``peft.LoraConfig(target_modules=...)`` (and axolotl's ``lora_target_modules``) take them.
    Nothing is frozen.

    Args:
        model: the base model, before PEFT wraps it.
        top_pct: fraction of each matrix type selected, in (0, 1].
        progress: show the scan's progress bar.
        **settings: the selection settings of :class:`~spectrum_callback.SpectrumConfig`
            (``include``, ``exclude``, ``never_train``, ``min_per_type``, ``snr_json``,
            ``method``, ``dtype``, ``chunk_mb``).

    Raises:
        ValueError: a setting that does not choose where adapters go (``update_every``,
            ``policy``, ``always_train``, ...), or a selected unit LoRA cannot adapt as a
            module (a fused 3-D expert bank: exclude it, or adapt it through
            ``LoraConfig(target_parameters=...)``).
    """
    other = sorted(set(settings) - LORA_SETTINGS)
    if other:
        raise ValueError(f"spectrum_lora_targets takes the selection settings {sorted(LORA_SETTINGS)}; "
                         f"{', '.join(other)} do(es) not apply to placing LoRA adapters")
    cfg = SpectrumConfig.from_settings(top_pct=top_pct, verbose=False, train_heads=False, **settings)
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


def _static_config(caller: str, top_pct, settings: dict) -> SpectrumConfig:
    cfg = SpectrumConfig.from_settings(top_pct=top_pct, **settings)
    if cfg.dynamic or cfg.policy != "scan":
        raise ValueError(f"{caller} selects once, before training (static Spectrum): update_every and moving "
                         "policies need SpectrumCallback or SpectrumSession, which can move the selection")
    return cfg


def lora_rank_for_budget(model: nn.Module, targets: List[str], params: int) -> int:
    """The LoRA rank at which adapters on ``targets`` hold about ``params`` trainable
    parameters (``r * (in + out)`` per matrix), at least 1."""
    mods = dict(model.named_modules())
    missing = [t for t in targets if t not in mods]
    if missing:
        raise ValueError(f"{missing[0]!r} is no module of the model")
    return max(1, round(params / sum(_in_out(mods[t]) for t in targets)))


def lora_params(model: nn.Module, targets: List[str], rank: int) -> int:
    """Trainable parameters of rank-``rank`` LoRA adapters on ``targets``."""
    mods = dict(model.named_modules())
    return rank * sum(_in_out(mods[t]) for t in targets)


def _in_out(module: nn.Module) -> int:
    w = module.weight
    if w.ndim != 2:
        raise ValueError(f"{type(module).__name__} has a {w.ndim}-D weight; LoRA adapts 2-D matrices")
    return int(w.shape[0] + w.shape[1])
