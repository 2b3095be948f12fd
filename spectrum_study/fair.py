"""The fair study: every method over a learning-rate grid of its own, then 3 seeds at its best rate.

    python -m spectrum_study.fair --out docs/results/study_cpu     # resumable; start it twice for two streams

For each method of :data:`PLAN`, seed 0 runs over the method's own 3-point grid; while the
best point sits on an edge of the grid, the grid grows by a factor :data:`STEP` on that side
(at most :data:`MAX_EXTEND` times a side).  Then seeds 1 and 2 run at the best rate.  A seed
changes the data order and the LoRA initialisation, and for the random methods the
selection.  Every finished configuration is one JSON file under ``OUT/runs/`` (as
:mod:`spectrum_study.runner` writes them), so the study resumes where it stopped.  Several
processes may work on one folder at once: each claims a configuration before it trains it
(``OUT/work/claims``), and a claim of a process that died is taken over.  A file
``OUT/work/stop`` (:data:`STOP_FILE`) makes every process stop once its configuration in
progress is written, so a sitting can end without losing training.

:func:`summarize_fair` turns the runs into one row per method (mean ± sd over the seeds at
the best rate, forgetting, steps and training time to reach full fine-tuning's best held-out
loss, trainable parameters, gradient and optimizer-state bytes); :func:`write_fair_reports`
writes ``table.md``, ``summary.json`` and ``study.png``.
"""
from __future__ import annotations

import argparse
import errno
import json
import logging
import math
import os
import statistics
import sys
import time
from dataclasses import asdict
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .methods import COLORS, MARKERS
from .runner import (HELD, OTHER, Config, StudySettings, as_dataset, atomic_json, evaluate_baseline, load_runs,
                     load_study_data, run_config)

logger = logging.getLogger(__name__)

__all__ = ["PLAN", "SEEDS", "STEP", "STOP_FILE", "MAX_EXTEND", "next_configs", "remaining", "run_fair",
           "summarize_fair", "fair_table", "write_fair_reports", "main"]

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
STOP_FILE = "stop"  # under OUT/work: finish the configuration in progress, then stop
STEP = 3.0
MAX_EXTEND = 2


def _lr(x: float) -> float:
    return float(f"{x:.3g}")


def _best_heldout(rec: dict) -> Tuple[float, int]:
    """``(best held-out loss after step 0, its index)``."""
    pts = [(h, i) for i, h in enumerate(rec[HELD]) if rec["steps"][i] > 0 and math.isfinite(h)]
    return min(pts) if pts else (float("inf"), -1)


def _by_config(records: Sequence[dict]) -> Dict[Tuple[str, float, int], dict]:
    return {(r["method"], _lr(r["lr"]), int(r["seed"])): r for r in records}


def method_grid(method: str, done: Dict[Tuple[str, float, int], dict], plan: Dict[str, Tuple[float, ...]] = PLAN,
                max_extend: int = MAX_EXTEND) -> Tuple[List[float], Optional[float]]:
    """``(grid, best lr)`` of ``method`` so far: the starting grid with its extensions, and
    the best rate once every seed-0 point of the grid has run and none sits on an edge that
    may still grow (``None`` before)."""
    lrs = sorted(_lr(x) for x in plan[method])
    down = up = 0
    while True:
        if any((method, lr, 0) not in done for lr in lrs):
            return lrs, None
        best = min(lrs, key=lambda lr: _best_heldout(done[(method, lr, 0)])[0])
        if best == lrs[0] and down < max_extend:
            lrs.insert(0, _lr(lrs[0] / STEP))
            down += 1
        elif best == lrs[-1] and up < max_extend:
            lrs.append(_lr(lrs[-1] * STEP))
            up += 1
        else:
            return lrs, best


def next_configs(records: Sequence[dict], plan: Dict[str, Tuple[float, ...]] = PLAN,
                 seeds: Sequence[int] = SEEDS, max_extend: int = MAX_EXTEND) -> List[Config]:
    """What is left to run, in order: every method's missing grid points (seed 0) first, then
    the other seeds at each settled best rate."""
    done = _by_config(records)
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
    done = _by_config(records)

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


# ---------------------------------------------------------------------------- claims
def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as exc:
        return exc.errno == errno.EPERM
    return True


def _claim(claims: str, key: str) -> bool:
    """Claim ``key`` for this process; a claim whose process is gone is taken over."""
    os.makedirs(claims, exist_ok=True)
    path = os.path.join(claims, key)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(open(path).read().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and _alive(pid):
                return False
            try:
                os.remove(path)  # its process died: take it over
            except FileNotFoundError:
                pass
            continue
        with os.fdopen(fd, "w") as fh:
            fh.write(str(os.getpid()))
        return True
    return False


def _live_claims(claims: str) -> List[str]:
    out = []
    for key in os.listdir(claims) if os.path.isdir(claims) else []:
        try:
            pid = int(open(os.path.join(claims, key)).read().strip() or 0)
        except (OSError, ValueError):
            continue
        if pid and pid != os.getpid() and _alive(pid):
            out.append(key)
    return out


# ---------------------------------------------------------------------------- the run
def run_fair(model_factory: Callable[[], torch.nn.Module], train_ds, eval_sets: Dict[str, object],
             settings: StudySettings, out_dir: str, plan: Dict[str, Tuple[float, ...]] = PLAN,
             seeds: Sequence[int] = SEEDS, poll_s: float = 60.0, max_configs: Optional[int] = None,
             max_extend: int = MAX_EXTEND) -> dict:
    """Run :func:`next_configs` until nothing is left (waiting while another process trains a
    configuration whose result decides what comes next) or ``OUT/work/stop`` exists, then
    write the reports.  Returns
    ``{"trained": [keys], "summary": ...}``."""
    train_ds = as_dataset(train_ds)
    eval_sets = {k: as_dataset(v) for k, v in eval_sets.items()}
    runs_dir, work = os.path.join(out_dir, "runs"), os.path.join(out_dir, "work")
    claims = os.path.join(work, "claims")
    os.makedirs(runs_dir, exist_ok=True)
    sig = settings.signature()
    base_path = os.path.join(runs_dir, "baseline.json")
    if not os.path.isfile(base_path):  # two streams may both compute it: the same numbers, written atomically
        baseline = evaluate_baseline(model_factory, eval_sets, settings, work)
        atomic_json(base_path, {"signature": sig, "settings": asdict(settings), "losses": baseline})
    with open(base_path) as fh:
        saved = json.load(fh)
    if saved.get("signature") != sig:
        raise ValueError(f"{base_path} was produced with other settings ({saved.get('settings')}); use another "
                         "--out folder")
    baseline = saved["losses"]
    trained: List[str] = []
    stop = os.path.join(work, STOP_FILE)
    while max_configs is None or len(trained) < max_configs:
        if os.path.exists(stop):
            print(f"=== {stop} exists: stopping (remove it to go on)", file=sys.stderr, flush=True)
            break
        records = load_runs(out_dir, signature=sig)
        todo = next_configs(records, plan, seeds, max_extend)
        pick = next((c for c in todo if _claim(claims, c.key)), None)
        if pick is None:
            if todo or _live_claims(claims):
                time.sleep(poll_s)  # another process holds what is left, or decides it
                continue
            break
        try:
            if os.path.isfile(os.path.join(runs_dir, f"{pick.key}.json")):
                continue  # finished by another process since the records were read
            print(f"=== {pick.key} ({time.strftime('%H:%M:%S')}; {len(todo)} left to plan)", file=sys.stderr,
                  flush=True)
            record = run_config(pick, model_factory, train_ds, eval_sets, settings, work, baseline)
            atomic_json(os.path.join(runs_dir, f"{pick.key}.json"), record)
            trained.append(pick.key)
            write_fair_reports(out_dir, settings, plan, max_extend=max_extend)
        finally:
            _release(claims, pick.key)
    report = write_fair_reports(out_dir, settings, plan, max_extend=max_extend)
    report["trained"] = trained
    return report


def _release(claims: str, key: str) -> None:
    try:
        os.remove(os.path.join(claims, key))
    except FileNotFoundError:
        pass


# ---------------------------------------------------------------------------- reports
def _mean_sd(xs: Sequence[float]) -> Tuple[float, float]:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return float("nan"), float("nan")
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else float("nan"))


def summarize_fair(records: Sequence[dict], baseline: Dict[str, float], plan: Dict[str, Tuple[float, ...]] = PLAN,
                   max_extend: int = MAX_EXTEND) -> List[dict]:
    """One row per method that has run: its grid, best rate, and the seeds at that rate."""
    done = _by_config(records)
    rows = []
    for m in plan:
        lrs, best = method_grid(m, done, plan, max_extend)
        grid = {lr: _best_heldout(done[(m, lr, 0)])[0] for lr in lrs if (m, lr, 0) in done}
        if not grid:
            continue
        lr = best if best is not None else min(grid, key=grid.get)
        runs = [done[(m, lr, s)] for s in sorted({k[2] for k in done if k[:2] == (m, lr)})]
        held, forget = [], []
        for r in runs:
            h, i = _best_heldout(r)
            held.append(h)
            forget.append(r[OTHER][i] - baseline[OTHER])
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
    for row in rows:
        reach = [_reach(r, target) for r in row.pop("_runs")]
        row["target"] = target
        row["reached"] = sum(1 for s, _ in reach if s is not None)
        row["steps_to_target"] = [s for s, _ in reach]
        row["seconds_to_target"] = [t for _, t in reach]
    return rows


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
    return f"{mean:{f}} ± {sd:.4f}" if math.isfinite(sd) else f"{mean:{f}}"


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


def plot_fair(rows: Sequence[dict], records: Sequence[dict], path: str, title: str = "") -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(14, 5.5))
    for r in rows:
        m = r["method"]
        ax.errorbar(r["forgetting_mean"], r["heldout_mean"],
                    xerr=r["forgetting_sd"] if math.isfinite(r["forgetting_sd"]) else None,
                    yerr=r["heldout_sd"] if math.isfinite(r["heldout_sd"]) else None,
                    fmt=MARKERS.get(m, "o"), color=COLORS.get(m, "k"), capsize=4, ms=8,
                    label=f"{m} (lr {r['best_lr']:g}, {len(r['seeds'])} seeds)")
    ax.axvline(0.0, color="k", lw=0.6, ls=":")
    ax.set_xlabel("forgetting: pydoc loss at the best point − before training (lower is better)")
    ax.set_ylabel("best held-out loss (lower is better)")
    ax.set_title("each method at its best lr: mean ± sd over seeds", fontsize=10)
    ax.legend(fontsize=8)
    by = _by_config(records)
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
                       plot: bool = True, max_extend: int = MAX_EXTEND) -> dict:
    with open(os.path.join(out_dir, "runs", "baseline.json")) as fh:
        baseline = json.load(fh)["losses"]
    records = load_runs(out_dir, signature=settings.signature())
    rows = summarize_fair(records, baseline, plan, max_extend)
    table = fair_table(rows, baseline, settings)
    n_left, cpu_left = remaining(records, plan, max_extend=max_extend)
    if n_left:
        table += (f"\nStill to run: at least {n_left} configurations, about {cpu_left / 3600:.1f} CPU-hours at one "
                  "thread (each method's mean CPU time so far, training and evaluation).\n")
    atomic_json(os.path.join(out_dir, "summary.json"),
                {"settings": asdict(settings), "baseline": baseline, "methods": rows,
                 "left": [c.key for c in next_configs(records, plan, max_extend=max_extend)],
                 "left_at_least": n_left, "cpu_hours_left": round(cpu_left / 3600, 2)})
    with open(os.path.join(out_dir, "table.md"), "w") as fh:
        fh.write(table)
    png = plot_fair(rows, records, os.path.join(out_dir, "study.png"), settings.tag) if plot else None
    return {"rows": rows, "table": table, "png": png}


# ---------------------------------------------------------------------------- CLI
def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m spectrum_study.fair", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="docs/results/study_cpu", help="results folder (resumable, shared by streams)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--eval-blocks", type=int, default=16)
    p.add_argument("--update-every", type=int, default=50, help="steps between selections of the moving methods")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--methods", default=",".join(PLAN), help="comma list, a subset of " + ",".join(PLAN))
    p.add_argument("--max-configs", type=int, default=None, help="stop after training this many")
    p.add_argument("--report-only", action="store_true", help="rebuild the reports from the runs and exit")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    unknown = [m for m in args.methods.split(",") if m not in PLAN]
    if unknown:
        print(f"spectrum_study.fair: error: unknown method {unknown[0]!r}; choose from {', '.join(PLAN)}",
              file=sys.stderr)
        return 2
    plan = {m: PLAN[m] for m in args.methods.split(",")}
    settings = StudySettings(max_steps=args.steps, batch_size=args.batch_size, block_size=args.block_size,
                             eval_every=args.eval_every, eval_batch_size=8, update_every=args.update_every)
    settings.tag = (f"model=smollm2-135m-instruct data=kjv other=pydoc eval_blocks={args.eval_blocks} "
                    f"top_pct={settings.top_pct}")
    if args.report_only:
        print(write_fair_reports(args.out, settings, plan)["table"])
        return 0
    factory, train, evals = load_study_data(None, None, "pydoc", "text", settings, args.eval_blocks)
    report = run_fair(factory, train, evals, settings, args.out, plan, max_configs=args.max_configs)
    print(report["table"])
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
