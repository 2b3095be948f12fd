"""Setting ``requires_grad`` for a selection, and static Spectrum before any optimizer exists.

* :func:`apply_selection`: the one place where Spectrum freezes and unfreezes parameters
  (and records which ones it froze, so that the user's own frozen parameters stay theirs);
* :func:`snr_from_json`: an SNR file or mapping checked against a model's candidates;
* :func:`spectrum_freeze`: scan (or read the file), select and freeze, in one call.
"""
from __future__ import annotations

import os
from typing import List, Optional, Sequence

from torch import nn

from . import _frozen
from .analyzer import SpectrumAnalyzer
from .config import SpectrumConfig, compile_patterns
from .selection import load_snr_json, parse_snr_mapping, select_top

__all__ = ["apply_selection", "snr_from_json", "spectrum_freeze"]


def apply_selection(
    model: nn.Module,
    analyzer: SpectrumAnalyzer,
    selected: Sequence[str],
    always_train: Sequence[str] = (),
    train_names: Sequence[str] = (),
) -> List[nn.Parameter]:
    """Set ``requires_grad``: the selected modules' parameters and ``always_train`` matches
    train, everything else freezes (and loses its gradient).

    Args:
        model: the model.
        analyzer: the analyzer that knows each candidate's parameters.
        selected: module names to train.
        always_train: regexes of parameter names that train regardless.
        train_names: parameter names that train regardless (the task heads).

    Returns:
        The trainable parameters, each once.
    """
    always = compile_patterns(always_train, "always_train")
    named = set(train_names)
    keep = {id(p) for n in selected for p in analyzer.params_of(n)}
    for name, p in model.named_parameters(remove_duplicate=False):
        if name in named or any(r.search(name) for r in always):
            keep.add(id(p))
    trainable, frozen_names = [], []
    seen = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        on = id(p) in keep
        if not on:
            frozen_names.append(name)  # every alias of a tied parameter
        if id(p) in seen:
            continue
        seen.add(id(p))
        p.requires_grad_(on)
        if on:
            trainable.append(p)
            _frozen.unmark([p])
        else:
            p.grad = None
            _frozen.mark([p])  # frozen by Spectrum, not by the user
    _frozen.record(model, frozen_names)
    return trainable


def snr_from_json(snr_json, analyzer: SpectrumAnalyzer):
    """The SNRs of ``analyzer``'s candidates from an SNR file (path) or mapping, in candidate
    order; a clear error when the file was made for another model or lacks candidates."""
    data = load_snr_json(snr_json) if isinstance(snr_json, (str, os.PathLike)) else parse_snr_mapping(snr_json)
    known = set(analyzer.names)
    snr = {n: info for n, info in data.items() if n in known}
    missing = [n for n in analyzer.names if n not in data]
    if not snr:
        raise ValueError(
            f"snr_json: none of its {len(data)} module names (e.g. {next(iter(data))}) is a candidate of this model "
            f"(e.g. {analyzer.names[0]}); was it made for another model?"
        )
    if missing:
        raise ValueError(
            f"snr_json lacks {len(missing)} candidate modules of this model (e.g. {missing[0]}); rescan the model or "
            "pass exclude=[...] for them"
        )
    return {n: snr[n] for n in analyzer.names}


def spectrum_freeze(
    model: nn.Module,
    top_pct: float = 0.25,
    *,
    include=None,
    exclude=None,
    always_train: Sequence[str] = (),
    never_train: Sequence[str] = (),
    min_per_type: int = 1,
    snr_json: Optional[str] = None,
    method: str = "auto",
) -> List[str]:
    """Scan and freeze ``model`` before any optimizer or Trainer exists (static Spectrum).

    Use this when you build the optimizer yourself, or want DDP, DeepSpeed or FSDP never to
    see the frozen weights.  The settings mean what they mean for
    :class:`~spectrum_callback.SpectrumCallback` (validated by
    :class:`~spectrum_callback.config.SpectrumConfig`).

    Args:
        model: the model (unwrapped).
        top_pct: fraction of each matrix type kept trainable, in (0, 1].
        include / exclude / always_train / never_train / min_per_type / snr_json / method:
            as for :class:`~spectrum_callback.SpectrumCallback`.

    Returns:
        The selected module names.
    """
    cfg = SpectrumConfig(top_pct=top_pct, include=include, exclude=exclude, always_train=list(always_train or []),
                         never_train=list(never_train or []), min_per_type=min_per_type, snr_json=snr_json,
                         method=method)
    analyzer = SpectrumAnalyzer(model, include=cfg.include, exclude=cfg.exclude, method=cfg.method)
    snr = snr_from_json(cfg.snr_json, analyzer) if cfg.snr_json else analyzer.scan()
    selected = select_top(snr, cfg.top_pct, min_per_type=cfg.min_per_type, never=cfg.never_train)
    apply_selection(model, analyzer, selected, cfg.always_train)
    return selected
