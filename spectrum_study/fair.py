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

The long horizon: ``--at-best STUDY --steps 600`` runs each of :data:`LONG` once (seed 0) at
its best rate in the finished study ``STUDY`` (:func:`best_rates`), with no grid, into its own
``--out`` folder; it asks whether a moving selection pays off when training runs longer.

:func:`summarize_fair` turns the runs into one row per method (mean ± sd over the seeds at
the best rate, forgetting, steps and training time to reach full fine-tuning's best held-out
loss, trainable parameters, gradient and optimizer-state bytes); :func:`write_fair_reports`
writes ``table.md``, ``summary.json`` and ``study.png``.  The plan is
:mod:`spectrum_study.fair_plan`, the reports :mod:`spectrum_study.fair_report`; this module
claims and runs configurations and is the command line.
"""
from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys
import time
from dataclasses import asdict
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .fair_plan import MAX_EXTEND, PLAN, SEEDS, STEP, next_configs, remaining
from .fair_report import fair_table, readings, summarize_fair, write_fair_reports
from .runner import StudySettings, as_dataset, atomic_json, evaluate_baseline, load_runs, load_study_data, run_config

logger = logging.getLogger(__name__)

__all__ = ["PLAN", "SEEDS", "STEP", "STOP_FILE", "MAX_EXTEND", "LONG", "best_rates", "next_configs", "remaining",
           "run_fair", "summarize_fair", "readings", "fair_table", "write_fair_reports", "main"]

STOP_FILE = "stop"  # under OUT/work: finish the configuration in progress, then stop
# the methods of the long-horizon run: static and moving Spectrum first (the question it asks),
# then the two a user weighs them against
LONG = ("spectrum", "spectrum-rotate-park", "full", "lora")


def best_rates(study_dir: str, methods: Sequence[str]) -> Dict[str, float]:
    """Each method's best learning rate in the study in ``study_dir`` (its ``summary.json``);
    a method whose grid has not settled there is an error."""
    path = os.path.join(study_dir, "summary.json")
    if not os.path.isfile(path):
        raise ValueError(f"{path} does not exist; run the study there first (python -m spectrum_study.fair "
                         f"--out {study_dir})")
    with open(path) as fh:
        rows = {r["method"]: r for r in json.load(fh)["methods"]}
    missing = [m for m in methods if not rows.get(m, {}).get("settled")]
    if missing:
        raise ValueError(f"{', '.join(missing)} has no settled best rate in {path}; let the study there finish "
                         "its grid first")
    return {m: float(rows[m]["best_lr"]) for m in methods}


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
            write_fair_reports(out_dir, settings, plan, max_extend=max_extend, seeds=seeds)
        finally:
            _release(claims, pick.key)
    report = write_fair_reports(out_dir, settings, plan, max_extend=max_extend, seeds=seeds)
    report["trained"] = trained
    return report


def _release(claims: str, key: str) -> None:
    try:
        os.remove(os.path.join(claims, key))
    except FileNotFoundError:
        pass

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
    p.add_argument("--methods", default=None,
                   help=f"comma list, a subset of {','.join(PLAN)} (default: all; with --at-best, {','.join(LONG)})")
    p.add_argument("--at-best", metavar="STUDY", default=None,
                   help="no grid and one seed: each method at its best rate in the finished study in STUDY "
                        "(the long horizon: --steps 600 --at-best docs/results/study_cpu "
                        "--out docs/results/study_cpu_600)")
    p.add_argument("--max-configs", type=int, default=None, help="stop after training this many")
    p.add_argument("--report-only", action="store_true", help="rebuild the reports from the runs and exit")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    methods = args.methods.split(",") if args.methods else list(LONG if args.at_best else PLAN)
    unknown = [m for m in methods if m not in PLAN]
    if unknown:
        print(f"spectrum_study.fair: error: unknown method {unknown[0]!r}; choose from {', '.join(PLAN)}",
              file=sys.stderr)
        return 2
    plan, seeds, max_extend = {m: PLAN[m] for m in methods}, SEEDS, MAX_EXTEND
    if args.at_best:
        if os.path.abspath(args.at_best) == os.path.abspath(args.out):
            print("spectrum_study.fair: error: --at-best needs its own --out folder (the study it reads from is "
                  f"{args.at_best})", file=sys.stderr)
            return 2
        try:
            plan = {m: (lr,) for m, lr in best_rates(args.at_best, methods).items()}
        except ValueError as exc:
            print(f"spectrum_study.fair: error: {exc}", file=sys.stderr)
            return 2
        seeds, max_extend = (0,), 0
    settings = StudySettings(max_steps=args.steps, batch_size=args.batch_size, block_size=args.block_size,
                             eval_every=args.eval_every, eval_batch_size=8, update_every=args.update_every)
    settings.tag = (f"model=smollm2-135m-instruct data=kjv other=pydoc eval_blocks={args.eval_blocks} "
                    f"top_pct={settings.top_pct}")
    if args.report_only:
        if not os.path.isfile(os.path.join(args.out, "runs", "baseline.json")):
            print(f"spectrum_study.fair: error: {args.out} holds no runs yet; leave out --report-only to start the "
                  "study there", file=sys.stderr)
            return 2
        print(write_fair_reports(args.out, settings, plan, max_extend=max_extend, seeds=seeds)["table"])
        return 0
    factory, train, evals = load_study_data(None, None, "pydoc", "text", settings, args.eval_blocks)
    report = run_fair(factory, train, evals, settings, args.out, plan, seeds=seeds, max_configs=args.max_configs,
                      max_extend=max_extend)
    print(report["table"])
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
