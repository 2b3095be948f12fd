"""Does Spectrum pay off?  Fine-tune one model on one dataset with several methods and the
same budget, and compare held-out loss (training domain) against forgetting (loss on a
second domain).

    python -m spectrum_study.compare --quick
    spectrum-compare --model HF_ID_OR_PATH --dataset DATA --other-dataset DATA2 --out runs/compare

Methods (each over a learning-rate grid, all with ``transformers.Trainer``):

* ``full``              every parameter trains
* ``spectrum``          ``SpectrumCallback(top_pct)``: top 25 % by SNR per matrix type, static
* ``spectrum-dynamic``  ``SpectrumCallback(top_pct, update_every=N)``
* ``spectrum-rotate``   ``policy="rotate"``: the active 25 % moves through the top 50 % by SNR
* ``lisa``              ``policy="random"``: a fresh random 25 % per type every N steps (per seed)
* ``cyclic``            ``policy="cyclic"``: the next window of layers per type every N steps
* ``*-park``            the three above with ``park_state=True`` (leavers' state kept on the host)
* ``random``            25 % per type chosen at random (one configuration per seed), via
                        ``SpectrumCallback(snr_json=<random values>)``
* ``bottom``            the lowest 25 % by SNR per type (``snr_json=<negated SNR>``)
* ``lora``              PEFT LoRA, r=16, all linear layers (its own lr grid, ``--lora-lrs``)

Every configuration writes one JSON file under ``<out>/runs/`` (atomically) when it
finishes; a restarted study skips the configurations whose file exists, so a stopped
study resumes where it stopped.  At the end (and on every run) ``results.json`` (every
curve), ``table.md`` and ``compare.png`` are rebuilt from the run files.

The core (:func:`run_study`) takes a model factory and token-block datasets, so it runs
on any model, including tiny random ones in tests.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import sys
from dataclasses import asdict
from typing import Callable, Dict, List, Optional, Sequence

import torch

from .methods import COLORS, LORA, MARKERS, METHODS, SEEDED
from .runner import (HELD, OTHER, Config, StudySettings, as_dataset, atomic_json, evaluate_baseline, load_runs,
                     load_study_data, run_config)

logger = logging.getLogger(__name__)

__all__ = [
    "StudySettings",
    "Config",
    "expand_configs",
    "run_config",
    "run_study",
    "load_runs",
    "summarize",
    "markdown_table",
    "plot_study",
    "write_reports",
    "main",
]


# ---------------------------------------------------------------------------- configurations
def expand_configs(
    methods: Sequence[str], lrs: Sequence[float], lora_lrs: Optional[Sequence[float]] = None,
    random_seeds: Sequence[int] = (0,),
) -> List[Config]:
    out: List[Config] = []
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
        grid = list(lora_lrs) if (m in LORA and lora_lrs) else list(lrs)
        if not grid:
            raise ValueError(f"empty learning-rate grid for {m}")
        seeds = list(random_seeds) if m in SEEDED else [0]
        for s in seeds:
            for lr in grid:
                out.append(Config(m, float(lr), int(s)))
    return out


# ---------------------------------------------------------------------------- study
def run_study(
    model_factory: Callable[[], torch.nn.Module],
    train_ds,
    eval_sets: Dict[str, object],
    configs: Sequence[Config],
    settings: StudySettings,
    out_dir: str,
    progress: bool = True,
) -> dict:
    """Run every configuration not yet finished under ``out_dir/runs``; rebuild the reports.

    ``train_ds`` and the two ``eval_sets`` (keys ``"heldout"`` and ``"other"``) are
    datasets of causal-LM examples or ``(N, L)`` token tensors.  Returns
    ``{"trained": [keys], "skipped": [keys], "results": [...], "table": str, ...}``.
    """
    from tqdm.auto import tqdm

    missing = {HELD, OTHER} - set(eval_sets)
    if missing:
        raise ValueError(f"eval_sets needs the keys {HELD!r} and {OTHER!r}; missing {sorted(missing)}")
    train_ds = as_dataset(train_ds)
    eval_sets = {k: as_dataset(v) for k, v in eval_sets.items()}
    runs_dir = os.path.join(out_dir, "runs")
    work_dir = os.path.join(out_dir, "work")
    os.makedirs(runs_dir, exist_ok=True)
    sig = settings.signature()

    def load(path):
        with open(path) as fh:
            data = json.load(fh)
        if data.get("signature") != sig:
            raise ValueError(
                f"{path} was produced with other settings (signature {data.get('signature')} != {sig}: "
                f"{data.get('settings')} vs {asdict(settings)}); use another --out folder or delete it"
            )
        return data

    base_path = os.path.join(runs_dir, "baseline.json")
    if os.path.isfile(base_path):
        baseline = load(base_path)["losses"]
    else:
        baseline = evaluate_baseline(model_factory, eval_sets, settings, work_dir)
        atomic_json(base_path, {"signature": sig, "settings": asdict(settings), "losses": baseline})

    trained, skipped = [], []
    scan_cache: Dict[str, dict] = {}
    bar = tqdm(total=len(configs), desc="configurations", unit="cfg", position=0, disable=not progress,
               dynamic_ncols=True)
    try:
        for cfg in configs:
            path = os.path.join(runs_dir, f"{cfg.key}.json")
            if os.path.isfile(path):
                load(path)  # checks the signature
                skipped.append(cfg.key)
                bar.update(1)
                continue
            bar.set_postfix_str(cfg.key)
            record = run_config(cfg, model_factory, train_ds, eval_sets, settings, work_dir, baseline, scan_cache)
            atomic_json(path, record)
            trained.append(cfg.key)
            write_reports(out_dir, None, baseline, settings)  # partial reports stay current
            bar.update(1)
    finally:
        bar.close()
    # the reports cover every finished configuration of these settings in the folder, so a
    # study can be run in stages (core grid first, extra lrs / seeds later)
    report = write_reports(out_dir, None, baseline, settings)
    report.update(trained=trained, skipped=skipped, baseline=baseline)
    return report


# ---------------------------------------------------------------------------- reporting
def _fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e5 else f"{n / 1e3:.1f} k"


def _fmt_s(x: float) -> str:
    return f"{x:.1f}" if x < 10 else f"{x:.0f}"


def _best_point(rec: dict):
    pts = [(h, i) for i, h in enumerate(rec[HELD]) if rec["steps"][i] > 0 and math.isfinite(h)]
    if not pts:
        return None
    h, i = min(pts)
    return i


def default_target(records: Sequence[dict], baseline: Dict[str, float], fraction: float = 0.8) -> Optional[float]:
    """``baseline - fraction * (baseline - best held-out loss of any run)``."""
    bests = [r[HELD][i] for r in records for i in [_best_point(r)] if i is not None]
    if not bests:
        return None
    b = baseline.get(HELD, max(bests))
    return b - fraction * (b - min(bests))


def summarize(records: Sequence[dict], baseline: Dict[str, float], target: Optional[float] = None) -> List[dict]:
    """One row per configuration: its best held-out point and the metrics there."""
    if target is None:
        target = default_target(records, baseline)
    rows = []
    for r in records:
        i = _best_point(r)
        if i is None:
            continue
        reach = next((s for s, h in zip(r["steps"], r[HELD]) if s > 0 and target is not None and h <= target), None)
        other = r[OTHER][i]
        rows.append({
            "key": r["key"],
            "method": r["method"],
            "label": r["label"],
            "lr": r["lr"],
            "best_heldout": r[HELD][i],
            "best_step": r["steps"][i],
            "other_at_best": other,
            "forgetting": other - baseline.get(OTHER, float("nan")),
            "final_heldout": r[HELD][-1],
            "final_other": r[OTHER][-1],
            "steps_to_target": reach,
            "trainable_params": r["trainable_params"],
            "trainable_frac": r["trainable_params"] / max(1, r["total_params"]),
            # fp32 gradient + AdamW exp_avg + exp_avg_sq of the trainable parameters
            "grad_adam_mb": r["trainable_params"] * 12 / 2**20,
            "train_seconds": r["train_seconds"],
            "peak_mem_mb": r["peak_mem_mb"],
            "mem_kind": r.get("mem_kind", ""),
        })
    return rows


def best_per_method(rows: Sequence[dict]) -> List[dict]:
    """Per label (method, seed), the learning rate with the lowest best held-out loss."""
    best: Dict[str, dict] = {}
    for row in rows:
        cur = best.get(row["label"])
        if cur is None or row["best_heldout"] < cur["best_heldout"]:
            best[row["label"]] = row
    order = {m: i for i, m in enumerate(METHODS)}
    return sorted(best.values(), key=lambda r: (order.get(r["method"], 99), r["label"]))


def markdown_table(rows: Sequence[dict], baseline: Dict[str, float], target: Optional[float],
                   settings: StudySettings) -> str:
    per = best_per_method(rows)
    lines = [
        f"Baseline (untouched model): held-out loss {baseline.get(HELD, float('nan')):.4f}, "
        f"second-domain loss {baseline.get(OTHER, float('nan')):.4f}. "
        f"Budget: {settings.max_steps} steps of {settings.batch_size} x {settings.block_size} tokens, "
        f"evaluated every {settings.eval_every} steps. "
        + (f"Target held-out loss: {target:.4f}." if target is not None else ""),
        "",
        "### Best learning rate per method",
        "",
        "| method | lr | best held-out loss (step) | 2nd-domain loss there | forgetting (Δ vs base) | steps to target | trainable params | grad+Adam state (MB) | train time (s) | peak mem (MB) |",  # noqa: E501  (a Markdown table header)
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def line(r):
        reach = "—" if r["steps_to_target"] is None else str(r["steps_to_target"])
        return (
            f"| {r['label']} | {r['lr']:g} | {r['best_heldout']:.4f} ({r['best_step']}) | {r['other_at_best']:.4f} | "
            f"{r['forgetting']:+.4f} | {reach} | "
            f"{_fmt_params(r['trainable_params'])} ({100 * r['trainable_frac']:.1f} %) | "
            f"{r['grad_adam_mb']:.1f} | "
            f"{_fmt_s(r['train_seconds'])} | {r['peak_mem_mb']:.0f} |"
        )

    lines += [line(r) for r in per]
    seeded: Dict[tuple, List[dict]] = {}
    for r in rows:
        if r["method"] in SEEDED:
            seeded.setdefault((r["method"], r["lr"]), []).append(r)
    for (method, lr), runs in sorted(seeded.items()):
        if len(runs) < 2:
            continue
        hs = [r["best_heldout"] for r in runs]
        fs = [r["forgetting"] for r in runs]
        lines += [
            "",
            f"{method} at lr {lr:g} over {len(runs)} seeds: best held-out loss "
            f"{statistics.fmean(hs):.4f} ± {statistics.stdev(hs):.4f} (min {min(hs):.4f}, max {max(hs):.4f}); "
            f"forgetting {statistics.fmean(fs):+.4f} ± {statistics.stdev(fs):.4f} (mean ± sd).",
        ]
    lines += [
        "",
        "### Every configuration",
        "",
        "| method | lr | best held-out (step) | 2nd-domain there | final held-out | final 2nd-domain | steps to target | train time (s) |",  # noqa: E501  (a Markdown table header)
        "|---|---|---|---|---|---|---|---|",
    ]
    order = {m: i for i, m in enumerate(METHODS)}
    for r in sorted(rows, key=lambda r: (order.get(r["method"], 99), r["label"], r["lr"])):
        reach = "—" if r["steps_to_target"] is None else str(r["steps_to_target"])
        lines.append(
            f"| {r['label']} | {r['lr']:g} | {r['best_heldout']:.4f} ({r['best_step']}) | {r['other_at_best']:.4f} | "
            f"{r['final_heldout']:.4f} | {r['final_other']:.4f} | {reach} | {_fmt_s(r['train_seconds'])} |"
        )
    kinds = sorted({r["mem_kind"] for r in rows})
    lines += [
        "",
        "Forgetting = second-domain loss at the best held-out point minus its value before training "
        "(positive = the model got worse on the other domain). Train time excludes evaluation. "
        f"Peak memory: {', '.join(kinds)} (on CPU: peak resident memory above the level at the start of the "
        "configuration, sampled every 20 ms, which undercounts when the allocator reuses memory kept from the previous "
        "configuration; on CUDA: torch.cuda.max_memory_allocated). Grad+Adam state: 12 bytes per trainable parameter "
        "(fp32 gradient and the two AdamW moments), the part of training memory that the method controls.",
    ]
    return "\n".join(lines) + "\n"


def plot_study(records: Sequence[dict], baseline: Dict[str, float], path: str, title: str = "") -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summarize(records, baseline)
    best = {r["key"] for r in best_per_method(rows)}
    fig, axes = plt.subplots(1, 3, figsize=(18, 5.2))
    ax = axes[0]
    seen = set()
    for r in rows:
        m = r["method"]
        lab = m if m not in seen else None
        seen.add(m)
        ax.scatter(r["forgetting"], r["best_heldout"], c=COLORS.get(m, "k"), marker=MARKERS.get(m, "o"), s=60,
                   label=lab)
        ax.annotate(f"{r['lr']:g}", (r["forgetting"], r["best_heldout"]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    ax.axvline(0.0, color="k", lw=0.6, ls=":")
    ax.set_xlabel("forgetting: 2nd-domain loss at best point − before training")
    ax.set_ylabel("best held-out loss (training domain)")
    ax.set_title("held-out loss vs forgetting (one point per method and lr; lower-left is better)")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=8)
    panels = ((axes[1], HELD, "held-out loss (training domain)"), (axes[2], OTHER, "2nd-domain loss (forgetting)"))
    for ax, metric, name in panels:
        for rec in records:
            if rec["key"] not in best:
                continue
            m = rec["method"]
            ax.plot(rec["steps"], rec[metric], color=COLORS.get(m, "k"), marker=MARKERS.get(m, "o"), ms=4,
                    alpha=0.6 if m in SEEDED else 1.0, label=f"{rec['label']} lr={rec['lr']:g}")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(name)
        ax.set_title(f"{name}, best lr per method")
        ax.title.set_fontsize(9)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_reports(out_dir: str, keys: Optional[Sequence[str]], baseline: Dict[str, float], settings: StudySettings,
                  target: Optional[float] = None, plot: bool = True) -> dict:
    records = load_runs(out_dir, keys, settings.signature())
    if target is None:
        target = default_target(records, baseline)
    rows = summarize(records, baseline, target)
    table = markdown_table(rows, baseline, target, settings) if rows else "(no finished configuration yet)\n"
    atomic_json(os.path.join(out_dir, "results.json"), {
        "settings": asdict(settings), "baseline": baseline, "target": target, "summary": rows, "runs": records,
    })
    tmp = os.path.join(out_dir, "table.md.tmp")
    with open(tmp, "w") as fh:
        fh.write(table)
    os.replace(tmp, os.path.join(out_dir, "table.md"))
    png = None
    if plot and rows:
        title = (f"{settings.tag}  |  {settings.max_steps} steps of {settings.batch_size} x {settings.block_size} "
                 f"tokens")
        png = plot_study(records, baseline, os.path.join(out_dir, "compare.png"), title)
    return {"results": records, "rows": rows, "table": table, "target": target, "png": png}


# ---------------------------------------------------------------------------- CLI
QUICK = dict(max_steps=8, batch_size=2, block_size=64, eval_every=4, eval_blocks=8, lrs="1e-4", lora_lrs="1e-3",
             methods="full,spectrum,spectrum-dynamic,random,bottom,lora", random_seeds="0", update_every=4)


def _floats(s: str) -> List[float]:
    return [float(x) for x in s.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="spectrum-compare",
        description="Fine-tune one model on one dataset with full FT, Spectrum (static, dynamic, rotating), "
        "LISA-like and cyclic schedules, random and bottom-SNR 25%% selections and LoRA at the same budget; "
        "report held-out loss vs forgetting.",
    )
    p.add_argument("--model", default=None, help="hub id or local path (default: offline SmolLM2-135M-Instruct)")
    p.add_argument("--dataset", default=None, help="training domain: hub id, .txt/.json/.jsonl file (default: KJV, "
                   "John and Acts held out)")
    p.add_argument("--other-dataset", default="pydoc", help="second domain for forgetting (default: pydoc topics)")
    p.add_argument("--text-field", default="text")
    p.add_argument("--out", default="spectrum_compare", help="output folder (resumable)")
    p.add_argument("--quick", action="store_true",
                   help="tiny budget: 8 steps of 2x64 tokens, one lr per method, dynamic re-scan every 4 steps "
                        "(under 20 minutes on 2 CPU cores)")
    p.add_argument("--methods", default=None, help=f"comma list of {','.join(METHODS)} (default: all)")
    p.add_argument("--lrs", default=None, help="lr grid (default 1e-5,3e-5,1e-4)")
    p.add_argument("--lora-lrs", default=None, help="lr grid for LoRA (default 1e-4,3e-4,1e-3)")
    p.add_argument("--random-seeds", default=None,
                   help=f"seeds of the seeded methods ({', '.join(SEEDED)}; default 0,1,2)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per configuration (default 300)")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per step (default 16)")
    p.add_argument("--block-size", type=int, default=None, help="tokens per sequence (default 256)")
    p.add_argument("--eval-every", type=int, default=None, help="evaluate every N steps (default 25)")
    p.add_argument("--eval-blocks", type=int, default=None, help="blocks per eval set (default 64)")
    p.add_argument("--eval-batch-size", type=int, default=8)
    p.add_argument("--update-every", type=int, default=None,
                   help="steps between selections of the moving methods (spectrum-dynamic, -rotate, lisa, "
                        "cyclic; default steps//5)")
    p.add_argument("--top-pct", type=float, default=0.25)
    p.add_argument("--target-loss", type=float, default=None,
                   help="held-out loss for 'steps to target' (default: 80%% of the best improvement of any run)")
    p.add_argument("--max-train-blocks", type=int, default=None,
                   help="cap on training blocks (default: enough for the budget)")
    p.add_argument("--bf16", action="store_true", help="bf16 mixed precision on CUDA")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--dry-run", action="store_true", help="list the configurations and exit")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.threads:
        torch.set_num_threads(args.threads)
    q = QUICK if args.quick else {}

    def pick(value, key, default):
        return value if value is not None else q.get(key, default)

    methods = [m.strip() for m in pick(args.methods, "methods", ",".join(METHODS)).split(",") if m.strip()]
    lrs = _floats(pick(args.lrs, "lrs", "1e-5,3e-5,1e-4"))
    lora_lrs = _floats(pick(args.lora_lrs, "lora_lrs", "1e-4,3e-4,1e-3"))
    seeds = [int(s) for s in pick(args.random_seeds, "random_seeds", "0,1,2").split(",") if s.strip()]
    try:
        configs = expand_configs(methods, lrs, lora_lrs, seeds)
    except ValueError as e:
        print(f"spectrum-compare: error: {e}", file=sys.stderr)
        return 2
    steps = pick(args.steps, "max_steps", 300)
    settings = StudySettings(
        max_steps=steps,
        batch_size=pick(args.batch_size, "batch_size", 16),
        block_size=pick(args.block_size, "block_size", 256),
        eval_every=pick(args.eval_every, "eval_every", 25),
        eval_batch_size=args.eval_batch_size,
        top_pct=args.top_pct,
        update_every=pick(args.update_every, "update_every", None),
        bf16=args.bf16,
    )
    eval_blocks = pick(args.eval_blocks, "eval_blocks", 64)
    settings.tag = (f"model={args.model or 'smollm2-135m-instruct'} data={args.dataset or 'kjv'} "
                    f"other={args.other_dataset} eval_blocks={eval_blocks} top_pct={settings.top_pct}")
    if args.dry_run:
        for c in configs:
            print(c.key)
        print(f"{len(configs)} configurations; settings {asdict(settings)}")
        return 0

    factory, train, evals = load_study_data(args.model, args.dataset, args.other_dataset, args.text_field, settings,
                                            eval_blocks, args.max_train_blocks)
    print(f"train {tuple(train.shape)} (epochs over it: {settings.max_steps * settings.batch_size / len(train):.2f}), "
          f"held-out {tuple(evals[HELD].shape)}, second domain {tuple(evals[OTHER].shape)}; {len(configs)} "
          f"configurations -> {args.out}", file=sys.stderr)
    report = run_study(factory, train, evals, configs, settings, args.out)
    if args.target_loss is not None:
        report.update(write_reports(args.out, None, report["baseline"], settings, args.target_loss))
    print(report["table"])
    print(f"trained {len(report.get('trained', []))}, skipped (already done) {len(report.get('skipped', []))}; "
          f"results in {args.out}/results.json, table.md, compare.png", file=sys.stderr)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
