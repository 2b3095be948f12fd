"""The ``spectrum/...`` metrics of a selection, and how close a re-scan came to changing it."""
from __future__ import annotations

import math
import statistics
from typing import Dict, List, Mapping, Optional, Sequence


def selection_margin(snr: Mapping[str, float], types: Mapping[str, str], selected: Sequence[str],
                     eligible: Mapping[str, bool]) -> Optional[float]:
    """The smallest per-type margin of a scan's selection: how far, relative to the last
    selected SNR of a type, its best unselected SNR lies below it (``None`` when no type has
    both).  Near 0 a re-scan could change the selection; a large margin means it will not."""
    chosen = set(selected)
    worst: Optional[float] = None
    by_type: Dict[str, List[str]] = {}
    for n in types:
        if eligible.get(n, True) and math.isfinite(snr.get(n, math.nan)):
            by_type.setdefault(types[n], []).append(n)
    for members in by_type.values():
        inside = [snr[n] for n in members if n in chosen]
        outside = [snr[n] for n in members if n not in chosen]
        if not inside or not outside:
            continue
        last, best = min(inside), max(outside)
        margin = (last - best) / abs(last) if last else math.inf
        worst = margin if worst is None else min(worst, margin)
    return worst


def selection_metrics(selected: Sequence[str], changes: int, n_train: int, n_total: int, state_numel: int,
                      snr: Optional[Mapping[str, float]], types: Mapping[str, str],
                      scan_stats: Optional[Mapping[str, float]] = None, margin: Optional[float] = None,
                      parked_bytes: Optional[int] = None) -> Dict[str, float]:
    """What a selection reports through ``trainer.log`` or the session's ``log``."""
    metrics = {
        "spectrum/selected_modules": float(len(selected)),
        "spectrum/changes": float(changes),
        "spectrum/trainable_params": float(n_train),
        "spectrum/trainable_fraction": n_train / max(n_total, 1),
        "spectrum/optimizer_state_numel": float(state_numel),
    }
    if scan_stats:
        metrics.update({f"spectrum/{k}": float(v) for k, v in scan_stats.items()})
    if parked_bytes is not None:
        metrics["spectrum/parked_state_bytes"] = float(parked_bytes)
    if margin is not None and math.isfinite(margin):
        metrics["spectrum/selection_margin"] = float(margin)
    if snr:
        by_type: Dict[str, List[float]] = {}
        for n, v in snr.items():
            if math.isfinite(v):
                by_type.setdefault(str(types[n]), []).append(float(v))
        for typ, vals in by_type.items():
            metrics[f"spectrum/snr_mean/{typ}"] = statistics.fmean(vals)
    return metrics
