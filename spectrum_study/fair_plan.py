"""The fair study's plan: each method's own learning-rate grid, grown at an edge, then seeds.

For each method of :data:`PLAN`, seed 0 runs over the method's own 3-point grid; while the
best point sits on an edge of the grid, the grid grows by a factor :data:`STEP` on that side
(at most :data:`MAX_EXTEND` times a side).  Then the other :data:`SEEDS` run at the best rate.
:func:`next_configs` says what is left, :func:`remaining` how much CPU time it needs.
"""
from __future__ import annotations

import math
import statistics
from typing import Dict, List, Optional, Sequence, Tuple

from .runner import HELD, Config

__all__ = ["PLAN", "SEEDS", "STEP", "MAX_EXTEND", "round_lr", "best_heldout", "by_config", "method_grid",
           "next_configs", "remaining"]

_SELECTIONS = (5e-5, 1.5e-4, 4.5e-4)
_LORA = (2e-4, 5e-4, 1.5e-3)
# method -> its starting learning-rate grid
PLAN: Dict[str, Tuple[float, ...]] = {
    "full": (2e-5, 5e-5, 1.5e-4),
    "spectrum": _SELECTIONS,
    "spectrum-rotate-park": _SELECTIONS,
    "random": _SELECTIONS,
    "lora": _LORA,
    "lora-spectrum": _LORA,
    "lora-random": _LORA,
}
SEEDS = (0, 1, 2)
STEP = 3.0
MAX_EXTEND = 2


def round_lr(x: float) -> float:
    return float(f"{x:.3g}")


def best_heldout(rec: dict) -> Tuple[float, int]:
    """``(best held-out loss after step 0, its index)``."""
    pts = [(h, i) for i, h in enumerate(rec[HELD]) if rec["steps"][i] > 0 and math.isfinite(h)]
    return min(pts) if pts else (float("inf"), -1)


def by_config(records: Sequence[dict]) -> Dict[Tuple[str, float, int], dict]:
    return {(r["method"], round_lr(r["lr"]), int(r["seed"])): r for r in records}


def method_grid(method: str, done: Dict[Tuple[str, float, int], dict], plan: Dict[str, Tuple[float, ...]] = PLAN,
                max_extend: int = MAX_EXTEND) -> Tuple[List[float], Optional[float]]:
    """``(grid, best lr)`` of ``method`` so far: the starting grid with its extensions, and
    the best rate once every seed-0 point of the grid has run and none sits on an edge that
    may still grow (``None`` before)."""
    lrs = sorted(round_lr(x) for x in plan[method])
    down = up = 0
    while True:
        if any((method, lr, 0) not in done for lr in lrs):
            return lrs, None
        best = min(lrs, key=lambda lr: best_heldout(done[(method, lr, 0)])[0])
        if best == lrs[0] and down < max_extend:
            lrs.insert(0, round_lr(lrs[0] / STEP))
            down += 1
        elif best == lrs[-1] and up < max_extend:
            lrs.append(round_lr(lrs[-1] * STEP))
            up += 1
        else:
            return lrs, best


def next_configs(records: Sequence[dict], plan: Dict[str, Tuple[float, ...]] = PLAN,
                 seeds: Sequence[int] = SEEDS, max_extend: int = MAX_EXTEND) -> List[Config]:
    """What is left to run, in order: every method's missing grid points (seed 0) first, then
    the other seeds at each settled best rate."""
    done = by_config(records)
    grid_runs, seed_runs = [], []
    for m in plan:
        lrs, best = method_grid(m, done, plan, max_extend)
        if best is None:
            grid_runs += [Config(m, lr, 0) for lr in lrs if (m, lr, 0) not in done]
        else:
            seed_runs += [Config(m, best, s) for s in seeds if (m, best, s) not in done]
    return grid_runs + seed_runs


def remaining(records: Sequence[dict], plan: Dict[str, Tuple[float, ...]] = PLAN, seeds: Sequence[int] = SEEDS,
              max_extend: int = MAX_EXTEND) -> Tuple[int, float]:
    """``(configurations, CPU seconds)`` still to run, at least: what :func:`next_configs` plans,
    plus the other seeds of every method whose grid has not settled (a grid that grows adds
    more).  A configuration's cost is its method's mean CPU time (training and evaluation) in
    ``records``, else the mean over every method."""
    done = by_config(records)

    def cost(r: dict) -> float:
        cpu = r.get("train_cpu_elapsed") or [r.get("train_seconds", 0.0)]
        return float(cpu[-1]) + float(r.get("eval_seconds", 0.0))

    per: Dict[str, List[float]] = {}
    for r in records:
        per.setdefault(r["method"], []).append(cost(r))
    every = [c for cs in per.values() for c in cs]
    overall = statistics.fmean(every) if every else float("nan")
    left = [c.method for c in next_configs(records, plan, seeds, max_extend)]
    left += [m for m in plan if method_grid(m, done, plan, max_extend)[1] is None for _ in seeds[1:]]
    return len(left), sum(statistics.fmean(per[m]) if m in per else overall for m in left)
