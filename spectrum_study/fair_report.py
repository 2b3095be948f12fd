"""The fair study's reports: one row per method at its best rate (mean ± sd over seeds),
``table.md``, ``summary.json`` and ``study.png``, rebuilt from the run files."""
from __future__ import annotations

import json
import math
import os
import statistics
from dataclasses import asdict
from typing import Dict, List, Optional, Sequence, Tuple

from .fair_plan import MAX_EXTEND, PLAN, SEEDS, best_heldout, by_config, method_grid, next_configs, remaining
from .methods import COLORS, LORA, MARKERS
from .runner import HELD, OTHER, StudySettings, atomic_json, load_runs

__all__ = ["PAIRS", "summarize_fair", "trade_off", "frontier", "frontier_reading", "readings", "fair_table",
           "far_points", "plot_fair", "write_fair_reports"]


def _mean_sd(xs: Sequence[float]) -> Tuple[float, float]:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return float("nan"), float("nan")
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else float("nan"))


def _held_forget(runs: Sequence[dict], baseline: Dict[str, float]) -> Tuple[List[float], List[float]]:
    """Each run's best held-out loss, and its forgetting (pydoc loss change) at that point."""
    held, forget = [], []
    for r in runs:
        h, i = best_heldout(r)
        held.append(h)
        forget.append(r[OTHER][i] - baseline[OTHER])
    return held, forget


def summarize_fair(records: Sequence[dict], baseline: Dict[str, float], plan: Dict[str, Tuple[float, ...]] = PLAN,
                   max_extend: int = MAX_EXTEND) -> List[dict]:
    """One row per method that has run: its grid, best rate, and the seeds at that rate."""
    done = by_config(records)
    rows = []
    for m in plan:
        lrs, best = method_grid(m, done, plan, max_extend)
        grid = {lr: best_heldout(done[(m, lr, 0)])[0] for lr in lrs if (m, lr, 0) in done}
        if not grid:
            continue
        lr = best if best is not None else min(grid, key=grid.get)
        runs = [done[(m, lr, s)] for s in sorted({k[2] for k in done if k[:2] == (m, lr)})]
        held, forget = _held_forget(runs, baseline)
        r0 = runs[0]
        rows.append({
            "method": m, "grid": {f"{k:g}": v for k, v in sorted(grid.items())}, "best_lr": lr,
            "settled": best is not None, "seeds": [int(r["seed"]) for r in runs],
            "heldout": held, "forgetting": forget,
            "heldout_mean": _mean_sd(held)[0], "heldout_sd": _mean_sd(held)[1],
            "forgetting_mean": _mean_sd(forget)[0], "forgetting_sd": _mean_sd(forget)[1],
            "trainable_params": int(r0["trainable_params"]), "total_params": int(r0["total_params"]),
            "grad_bytes": r0.get("grad_bytes"), "optimizer_state_bytes": r0.get("optimizer_state_bytes_end"),
            "train_seconds_mean": _mean_sd([r["train_seconds"] for r in runs])[0],
            "_runs": runs,
        })
    full = next((r for r in rows if r["method"] == "full"), None)
    target = full["heldout_mean"] if full else None
    full_runs = list(full["_runs"]) if full else []
    for row in rows:
        runs = row.pop("_runs")
        reach = [_reach(r, target) for r in runs]
        row["target"] = target
        row["reached"] = sum(1 for s, _ in reach if s is not None)
        row["steps_to_target"] = [s for s, _ in reach]
        row["seconds_to_target"] = [t for _, t in reach]
        # training CPU seconds to this method's own best point, and full fine-tuning's to the same loss
        row["seconds_to_own_best"] = _mean_sd([_reach(r, best_heldout(r)[0])[1] for r in runs])[0]
        full_to = [_reach(r, row["heldout_mean"]) for r in full_runs]
        row["full_steps_to_this"] = [s for s, _ in full_to]
        row["full_seconds_to_this"] = [t for _, t in full_to]
    return rows


def trade_off(records: Sequence[dict], baseline: Dict[str, float]) -> List[dict]:
    """Every (method, lr) that has run, with its best held-out loss and the forgetting at that
    point, each a mean over the seeds run there: the trade-off a learning rate buys."""
    done = by_config(records)
    points = []
    for m, lr in sorted({k[:2] for k in done}):
        held, forget = _held_forget([done[k] for k in sorted(done) if k[:2] == (m, lr)], baseline)
        points.append({"method": m, "lr": lr, "seeds": len(held), "heldout": statistics.fmean(held),
                       "forgetting": statistics.fmean(forget)})
    return points


def frontier(points: Sequence[dict]) -> List[dict]:
    """The points no other point beats on both held-out loss and forgetting (lower is better on
    each; a tie on one and a win on the other beats), by forgetting, least first."""
    def beaten(p: dict) -> bool:
        return any(q["heldout"] <= p["heldout"] and q["forgetting"] <= p["forgetting"]
                   and (q["heldout"] < p["heldout"] or q["forgetting"] < p["forgetting"]) for q in points)
    return sorted((p for p in points if not beaten(p)), key=lambda p: p["forgetting"])


def frontier_reading(points: Sequence[dict]) -> Optional[str]:
    """One statement: which runs, over every method and rate, no other run beats on both counts."""
    front = frontier(points)
    if not front:
        return None
    items = "; ".join(f"{p['method']} at {p['lr']:g} ({p['heldout']:.4f}, {p['forgetting']:+.4f})" for p in front)
    methods = sorted({p["method"] for p in points} - {p["method"] for p in front})
    text = (f"Held-out loss against forgetting over every method and rate ({len(points)} points, seed means): "
            f"none beats these on both, from least forgetting to lowest held-out: {items}")
    if methods:
        text += f". Every rate of {', '.join(methods)} is beaten on both by one of them"
    return text + "."


# (a, b, what the pair asks)
PAIRS = (("spectrum", "random", "SNR against random selection, full-rank"),
         ("lora-spectrum", "lora-random", "SNR-placed against random-placed LoRA"),
         ("lora-spectrum", "lora", "SNR-placed LoRA against LoRA on every linear layer"))


def _state_bytes(row: dict) -> Optional[float]:
    """Weights, gradients and optimizer state (bytes; activations not counted)."""
    if row["grad_bytes"] is None or row["optimizer_state_bytes"] is None or not row["trainable_params"]:
        return None
    width = row["grad_bytes"] / row["trainable_params"]  # bytes per parameter
    adapters = row["trainable_params"] if row["method"] in LORA else 0  # added on top of the base model
    return (row["total_params"] + adapters) * width + row["grad_bytes"] + row["optimizer_state_bytes"]


def readings(rows: Sequence[dict]) -> List[str]:
    """Plain statements computed from :func:`summarize_fair`'s rows: SNR against random (a gap
    is beyond the spread when it exceeds the sum of the two seed deviations), each method
    against full fine-tuning at its best rate, the time to a method's best loss against full
    fine-tuning's time to the same loss, and memory (weights, gradients, optimizer state)."""
    by = {r["method"]: r for r in rows}
    out = []
    for a, b, what in PAIRS:
        if a not in by or b not in by:
            continue
        ra, rb = by[a], by[b]
        gap = ra["heldout_mean"] - rb["heldout_mean"]
        spread = ra["heldout_sd"] + rb["heldout_sd"]
        if not math.isfinite(spread):
            verdict = "not yet seeded (needs 2 seeds or more of each)"
        elif abs(gap) > spread:
            verdict = f"{a if gap < 0 else b} lower, beyond both spreads (sum of deviations {spread:.4f})"
        else:
            verdict = f"within the spread (sum of deviations {spread:.4f})"
        what += "" if ra["settled"] and rb["settled"] else " (a grid still running)"
        out.append(f"{what}: held-out {ra['heldout_mean']:.4f} against {rb['heldout_mean']:.4f}, gap {gap:+.4f}; "
                   f"{verdict}.")
    full = by.get("full")
    if full is None:
        return out
    for r in rows:
        if r is full:
            continue
        running = "" if r["settled"] and full["settled"] else " (a grid still running)"
        line = (f"{r['method']} against full fine-tuning at each one's best rate{running}: held-out "
                f"{r['heldout_mean'] - full['heldout_mean']:+.4f}, forgetting "
                f"{r['forgetting_mean'] - full['forgetting_mean']:+.4f}")
        full_t = [t for t in r["full_seconds_to_this"] if t is not None]
        own = r["seconds_to_own_best"]
        if full_t and math.isfinite(own) and own > 0:
            ft = statistics.fmean(full_t)
            line += (f"; it took {own:.0f} CPU s to its best loss, full fine-tuning {ft:.0f} s to the same loss "
                     f"({own / ft:.2f}x full's time)")
        elif not full_t:
            line += "; full fine-tuning never got to its best loss"
        mine, theirs = _state_bytes(r), _state_bytes(full)
        if mine is not None and theirs:
            line += f"; weights + gradients + optimizer state {100 * (1 - mine / theirs):.0f} % less than full's"
        out.append(line + ".")
    return out


def _reach(rec: dict, target: Optional[float]) -> Tuple[Optional[int], Optional[float]]:
    """The first evaluated step at or below ``target``, and the training CPU seconds to it."""
    if target is None:
        return None, None
    elapsed = rec.get("train_cpu_elapsed") or []
    for i, (s, h) in enumerate(zip(rec["steps"], rec[HELD])):
        if s > 0 and h <= target:
            return s, (elapsed[i] if i < len(elapsed) else None)
    return None, None


def _pm(mean: float, sd: float, fmt: str = ".4f", sign: bool = False) -> str:
    f = ("+" if sign else "") + fmt
    return f"{mean:{f}} ± {sd:{fmt}}" if math.isfinite(sd) else f"{mean:{f}}"


def fair_table(rows: Sequence[dict], baseline: Dict[str, float], settings: StudySettings) -> str:
    lines = [
        f"Untouched model: held-out loss {baseline[HELD]:.4f}, pydoc loss {baseline[OTHER]:.4f}. "
        f"{settings.max_steps} steps of {settings.batch_size} x {settings.block_size} tokens, evaluated every "
        f"{settings.eval_every} steps; moving selections every {settings.dynamic_every()} steps.",
        "",
        "| method | lr grid (seed 0: best held-out) | best lr | seeds | held-out, mean ± sd | forgetting, mean ± sd "
        "| reached full's best (steps; CPU s) | trainable params | grad + optimizer state (MB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        grid = ", ".join(f"{lr}: {h:.4f}" for lr, h in r["grid"].items())
        reach = "—"
        if r["target"] is not None and r["reached"]:
            steps = [s for s in r["steps_to_target"] if s is not None]
            secs = [t for t in r["seconds_to_target"] if t is not None]
            reach = f"{r['reached']}/{len(r['seeds'])}: {_pm(*_mean_sd(steps), fmt='.0f')}"
            if secs:
                reach += f"; {statistics.fmean(secs):.0f} s"
        mem = "—"
        if r["grad_bytes"] is not None and r["optimizer_state_bytes"] is not None:
            mem = f"{r['grad_bytes'] / 2**20:.1f} + {r['optimizer_state_bytes'] / 2**20:.1f}"
        lines.append(
            f"| {r['method']} | {grid} | {r['best_lr']:g}{'' if r['settled'] else ' (grid running)'} | "
            f"{len(r['seeds'])} | {_pm(r['heldout_mean'], r['heldout_sd'])} | "
            f"{_pm(r['forgetting_mean'], r['forgetting_sd'], sign=True)} | {reach} | "
            f"{r['trainable_params'] / 1e6:.2f} M ({100 * r['trainable_params'] / r['total_params']:.1f} %) | "
            f"{mem} |")
    lines += ["", "Held-out: the best evaluated held-out loss of a run; forgetting: the pydoc loss at that point "
              "minus the untouched model's. 'Reached full's best': evaluated steps until the held-out loss first "
              "fell to full fine-tuning's mean best (seeds that got there), and the CPU seconds of training to it "
              "(one thread; evaluations excluded; CPU time, so other jobs on the machine do not inflate it). "
              "Memory: fp32 gradients of the trainable parameters and the optimizer's state tensors after the "
              "last step, counted from the tensors (not sampled RSS)."]
    return "\n".join(lines) + "\n"


def far_points(points: Sequence[dict], reach: float = 0.15) -> List[dict]:
    """The points whose held-out loss lies more than ``reach`` above the best one: a rate that
    diverged.  The plot leaves them off its axes (and names them) so the rest stays readable."""
    if not points:
        return []
    best = min(p["heldout"] for p in points)
    return [p for p in points if p["heldout"] > best + reach]


def plot_fair(rows: Sequence[dict], records: Sequence[dict], path: str, title: str = "",
              points: Sequence[dict] = ()) -> str:
    """``points``: :func:`trade_off`'s (method, lr) points, drawn hollow beside the best rates."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(14, 5.5))
    for m in sorted({p["method"] for p in points}):
        mine = sorted((p for p in points if p["method"] == m), key=lambda p: p["lr"])
        ax.plot([p["forgetting"] for p in mine], [p["heldout"] for p in mine], color=COLORS.get(m, "k"), lw=0.7,
                alpha=0.5, marker=MARKERS.get(m, "o"), ms=4, mfc="none")
        for p in mine:
            ax.annotate(f"{p['lr']:g}", (p["forgetting"], p["heldout"]), fontsize=6, alpha=0.7,
                        xytext=(3, 3), textcoords="offset points")
    front = frontier(points)
    if len(front) > 1:
        ax.step([p["forgetting"] for p in front], [p["heldout"] for p in front], where="post", color="k", lw=0.8,
                ls="--", label="no run beats these on both")
    for r in rows:
        m = r["method"]
        ax.errorbar(r["forgetting_mean"], r["heldout_mean"],
                    xerr=r["forgetting_sd"] if math.isfinite(r["forgetting_sd"]) else None,
                    yerr=r["heldout_sd"] if math.isfinite(r["heldout_sd"]) else None,
                    fmt=MARKERS.get(m, "o"), color=COLORS.get(m, "k"), capsize=4, ms=8,
                    label=f"{m} (lr {r['best_lr']:g}, {len(r['seeds'])} seed{'' if len(r['seeds']) == 1 else 's'})")
    ax.axvline(0.0, color="k", lw=0.6, ls=":")
    far = far_points(points)
    if far:
        near = [p for p in points if p not in far] + [{"heldout": r["heldout_mean"], "forgetting": r["forgetting_mean"]}
                                                      for r in rows]
        xs, ys = [p["forgetting"] for p in near], [p["heldout"] for p in near]
        pad_x, pad_y = 0.05 * (max(xs) - min(xs) or 0.1), 0.05 * (max(ys) - min(ys) or 0.1)
        ax.set_xlim(min(xs) - pad_x, max(xs) + 3 * pad_x)
        ax.set_ylim(min(ys) - 2 * pad_y, max(ys) + 2 * pad_y)
        ax.text(0.01, 0.99, "off the axes: " + "; ".join(
            f"{p['method']} at {p['lr']:g} ({p['heldout']:.3f}, {p['forgetting']:+.3f})" for p in far),
            transform=ax.transAxes, fontsize=7, va="top")
    ax.set_xlabel("forgetting: pydoc loss at the best point − before training (lower is better)")
    ax.set_ylabel("best held-out loss (lower is better)")
    ax.set_title("filled: each method at its best lr, mean ± sd over seeds; hollow: every lr tried", fontsize=10)
    ax.legend(fontsize=8)
    by = by_config(records)
    for r in rows:
        curves = [by[(r["method"], r["best_lr"], s)] for s in r["seeds"]]
        steps = curves[0]["steps"]
        mean = [statistics.fmean(c[HELD][i] for c in curves) for i in range(len(steps))]
        ax2.plot(steps, mean, color=COLORS.get(r["method"], "k"), marker=MARKERS.get(r["method"], "o"), ms=4,
                 label=r["method"])
    if not rows:
        ax.set_title("no configuration has finished yet", fontsize=10)
    if rows and rows[0]["target"] is not None:
        ax2.axhline(rows[0]["target"], color="tab:red", lw=0.7, ls="--", label="full fine-tuning's best (mean)")
    ax2.set_xlabel("optimizer step")
    ax2.set_ylabel("held-out loss, mean over seeds")
    ax2.set_title("held-out loss over training, best lr", fontsize=10)
    ax2.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_fair_reports(out_dir: str, settings: StudySettings, plan: Dict[str, Tuple[float, ...]] = PLAN,
                       plot: bool = True, max_extend: int = MAX_EXTEND, seeds: Sequence[int] = SEEDS) -> dict:
    with open(os.path.join(out_dir, "runs", "baseline.json")) as fh:
        baseline = json.load(fh)["losses"]
    records = load_runs(out_dir, signature=settings.signature())
    rows = summarize_fair(records, baseline, plan, max_extend)
    table = fair_table(rows, baseline, settings)
    points = trade_off(records, baseline)
    read = readings(rows)
    front = frontier_reading(points)
    if front:
        read.append(front)
    if read:
        table += ("\nReadings, computed from the rows above (a gap is beyond the spread when it exceeds the sum "
                  "of the two methods' seed deviations):\n\n" + "".join(f"- {x}\n" for x in read))
    n_left, cpu_left = remaining(records, plan, seeds, max_extend)
    if n_left:
        table += (f"\nStill to run: at least {n_left} configurations, about {cpu_left / 3600:.1f} CPU-hours at one "
                  "thread (each method's mean CPU time so far, training and evaluation).\n")
    atomic_json(os.path.join(out_dir, "summary.json"),
                {"settings": asdict(settings), "baseline": baseline, "methods": rows,
                 "left": [c.key for c in next_configs(records, plan, seeds, max_extend)],
                 "trade_off": points, "left_at_least": n_left, "cpu_hours_left": round(cpu_left / 3600, 2),
                 "readings": read})
    with open(os.path.join(out_dir, "table.md"), "w") as fh:
        fh.write(table)
    png = plot_fair(rows, records, os.path.join(out_dir, "study.png"), settings.tag, points) if plot else None
    return {"rows": rows, "table": table, "png": png}
