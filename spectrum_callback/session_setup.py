"""What a session settles about a model before its first selection: the analyzer with the
candidates that may be selected, the task heads that train anyway, the checked patterns, and
the inputs that gradient checkpointing needs."""
from __future__ import annotations

from typing import List, Tuple

from torch import nn

from . import _dist, _frozen
from ._logging import get_logger
from .analyzer import SpectrumAnalyzer
from .candidates import task_head_params
from .config import SpectrumConfig, compile_patterns

logger = get_logger(__name__)

__all__ = ["build_analyzer", "gradient_checkpointing_inputs"]


def build_analyzer(model: nn.Module, cfg: SpectrumConfig, gather, device=None,
                   progress: bool = True) -> Tuple[SpectrumAnalyzer, List[str]]:
    """``(analyzer, heads)``: the analyzer of ``model`` with the candidates the user froze, or
    ``always_train`` keeps trainable, left out; the task-head parameter names that train with
    every selection; the patterns checked."""
    user_frozen = _frozen.user_frozen_names(model)
    analyzer = SpectrumAnalyzer(model, include=cfg.include, exclude=cfg.exclude, method=cfg.method,
                                dtype=cfg.torch_dtype, chunk_mb=cfg.chunk_mb, device=device, progress=progress,
                                gather=gather)
    _leave_out_candidates(model, analyzer, cfg, user_frozen)
    heads = [n for n in task_head_params(model) if n not in user_frozen]
    if heads and _dist.is_main():
        if cfg.train_heads:
            logger.warning("Spectrum: training the task head parameters the base model lacks: %s "
                           "(train_heads=False keeps them frozen)", ", ".join(heads))
        else:
            logger.warning("Spectrum: train_heads=False: the task head %s stays frozen at its initial values",
                           ", ".join(heads))
    _validate_patterns(model, analyzer, cfg)
    return analyzer, (heads if cfg.train_heads else [])


def _leave_out_candidates(model, analyzer, cfg, user_frozen) -> None:
    """Candidates whose matrix the user froze before, and those ``always_train`` keeps
    trainable anyway, are never scanned or selected (the first parameter of a candidate is
    its matrix; a bias alone does not count)."""
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    always = compile_patterns(cfg.always_train, "always_train")
    frozen, kept = [], []
    for cand in analyzer.names:
        pnames = [names.get(id(p), "") for p in analyzer.params_of(cand)]
        if pnames and pnames[0] in user_frozen:
            frozen.append(cand)
        elif pnames and any(r.search(pnames[0]) for r in always):  # its weight (a bias alone does not count)
            kept.append(cand)
    if len(frozen) + len(kept) == len(analyzer.names):
        raise ValueError(
            "every candidate matrix is frozen by you or kept trainable by always_train: Spectrum has nothing "
            "to select. Unfreeze the model before Trainer(...) (SpectrumCallback freezes at train begin)")
    analyzer.drop(frozen + kept)
    if frozen and _dist.is_main():
        logger.warning("Spectrum: %d candidate matrices were frozen before the Trainer (e.g. %s); they stay "
                       "frozen and are never selected", len(frozen), frozen[0])


def _validate_patterns(model, analyzer, cfg) -> None:
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    for p in compile_patterns(cfg.always_train, "always_train"):
        if not any(p.search(n) for n in names):
            raise ValueError(f"always_train pattern {p.pattern!r} matches no parameter of the model "
                             f"(parameter names look like {names[0]!r}); fix or drop it")
    for p in compile_patterns(cfg.never_train, "never_train"):
        if not any(p.search(n) for n in analyzer.names):
            raise ValueError(f"never_train pattern {p.pattern!r} matches no candidate module "
                             f"(candidates look like {analyzer.names[0]!r}); fix or drop it")


def gradient_checkpointing_inputs(model: nn.Module, cfg: SpectrumConfig) -> None:
    """Reentrant checkpointing gives no gradients when the block inputs don't require grad
    (frozen embeddings); make the inputs require grad, as PEFT does."""
    checkpointing = getattr(model, "is_activation_checkpointing", None)  # transformers >= 5
    if checkpointing is None:
        checkpointing = getattr(model, "is_gradient_checkpointing", False)
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if not checkpointing or emb is None or not hasattr(model, "enable_input_require_grads"):
        return
    always = compile_patterns(cfg.always_train, "always_train")
    if not any(p is emb.weight and any(r.search(n) for r in always)
               for n, p in model.named_parameters(remove_duplicate=False)):
        model.enable_input_require_grads()
        logger.info("Spectrum: gradient checkpointing with frozen embeddings -> enable_input_require_grads()")
