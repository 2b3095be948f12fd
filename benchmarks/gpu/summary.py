#!/usr/bin/env python
"""Summarize one card's raw GPU results (``<what>_<card>.json``, written by
benchmarks/gpu/run.sh) into one JSON and print the training-step table (Markdown).

    python benchmarks/gpu/summary.py --card h200     # docs/results/gpu/*_h200.json -> docs/results/gpu_results.json
    python benchmarks/gpu/summary.py --card h100 --folder runs/gpu --out runs/gpu/gpu_results.json

A part that did not run (no file) is ``null`` in the summary.
"""
from __future__ import annotations

import argparse
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # benchmarks/gpu/ -> root
GIB = 2**30
ENGINES = ("torch", "zero2", "zero3")


def load(folder, name):
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        return None
    with open(path) as fh:
        return json.load(fh)


def scan_summary(an, eig):
    out = None
    if an:
        out = {
            "matrices": an["matrices"], "layers": an["layers"], "shapes": an["shapes"],
            "original_method_s": an["baseline_s"],
            "original_method_measured_s": an.get("baseline_measured_s", an["baseline_s"]),
            "original_method_measured_layers": an.get("baseline_layers"),
            "analyzer_s": an["project_s"], "analyzer_routes": an["routes"],
            "speedup": an["speedup"],
            "analyzer_max_rel_snr_err_vs_fp64": an["max_rel_err"],
            "original_method_max_rel_snr_err_vs_fp64": an["baseline_max_rel_err"],
            "same_top25_selection_as_fp64": an["same_selection"],
            "fp64_gram_per_matrix_s": an["reference_s"],
            "per_type": {t: {"shape": d["shape"], "count": d["count"], "original_s": d["baseline_s"],
                             "analyzer_s": d["project_s"]} for t, d in an["per_type"].items()},
            "command": an["command"],
        }
    if eig:
        rows = [r for r in eig["results"] if "ms_per_matrix" in r]
        out = (out or {}) | {"eigensolver_ms_per_matrix": [
            {k: r[k] for k in ("k", "backend", "dtype", "mode", "ms_per_matrix", "max_rel_diff_vs_first_fp64")}
            for r in rows]}
    return out


def train_summary(tr):
    if not tr:
        return None
    rows = {}
    for r in tr["results"]:
        rows[r["method"]] = {
            "step_ms": 1e3 * r["step_s_median"], "step_ratio_to_full": r.get("step_time_ratio_to_full"),
            "peak_gib": r["peak_cuda_bytes"] / GIB, "peak_ratio_to_full": r.get("peak_cuda_ratio_to_full"),
            "trainable_params": r["trainable_params"], "total_params": r["total_params"],
        }
        if "rescan_s_total" in r:
            rows[r["method"]] |= {"initial_scan_s": r["initial_scan_s"], "rescan_s": r["rescan_s_total"],
                                  "rescanned_matrices": r["rescanned_matrices"],
                                  "rescan_fraction_of_training": r["rescan_fraction_of_training"]}
    return {"model": tr["model"], "steps": tr["steps"], "update_every": tr["update_every"], "optim": tr.get("optim"),
            "methods": rows, "command": tr["command"]}


def trainer_summary(runs_by_engine):
    out = {}
    for engine, d in runs_by_engine.items():
        if not d:
            continue
        rows = {}
        for mode, r in d["runs"].items():
            rows[mode] = {
                "ok": r["ok"], "error": r["error"], "steps": r["steps"],
                "frozen_bit_violations": r["n_violations"],
                "never_selected_changed": len(r["never_selected_changed"]),
                "selected_unchanged": len(r["selected_unchanged"]),
                "losses_finite": r["losses_finite"], "loss_first5": r["loss_first5"], "loss_last5": r["loss_last5"],
                "optimizer_state_numel_max": r["state_numel_max"],
                "state_ratio_to_full": r.get("state_ratio_to_full"),
                "window_peak_mib": {k: v / 2**20 for k, v in r["window_peak_bytes"].items()},
                "peak_ratio_to_full": r.get("peak_ratio_to_full"),
                "scans": r["scans"],
                "selection_changes": max(0, len(r["selections"]) - 1),
            }
        out[engine] = {"settings": d["settings"], "runs": rows, "command": d["command"]}
    return out


def switch_summary(records):
    if not records:
        return None
    keep = ("engine", "hidden", "params", "world_size", "switch_seconds", "peak_extra_bytes", "peak_extra_device_bytes",
            "stayers_state_bytes_per_rank", "startup_peak_bytes", "static_startup_peak_bytes",
            "full_startup_peak_bytes", "command")
    return [{k: r.get(k) for k in keep} for r in records]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--card", default="h200")
    ap.add_argument("--folder", default=os.path.join(ROOT, "docs", "results", "gpu"))
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "results", "gpu_results.json"))
    args = ap.parse_args(argv)
    f, c = args.folder, args.card
    versions = {}
    vpath = os.path.join(f, f"versions_{c}.txt")
    if os.path.isfile(vpath):
        with open(vpath) as fh:
            for line in fh:
                parts = line.split()
                if parts and parts[0] == "python":
                    versions |= dict(zip(parts[0::2], parts[1::2]))
                elif parts and parts[0] == "gpu":
                    versions["device"] = " ".join(parts[1:-2])
                elif len(parts) >= 2 and not parts[1].startswith("missing"):
                    versions[parts[0]] = parts[1]
    an = load(f, f"bench_analyzer_8b_{c}.json")
    result = {
        "card": c,
        "device": (an or {}).get("device_name") or versions.get("device"),
        "versions": versions,
        "scan_8b_shapes": scan_summary(an, load(f, f"bench_eig_{c}.json")),
        "training_step_2b": train_summary(load(f, f"bench_train_{c}.json")),
        "trainer_smollm2": trainer_summary({e: load(f, f"trainer_smollm2_{e}_{c}.json") for e in ENGINES}),
        "trainer_tiny_rehearsal": trainer_summary({e: load(f, f"trainer_tiny_{e}_{c}.json") for e in ENGINES}),
        "trainer_fsdp2_wide": trainer_summary({"fsdp2": load(f, f"trainer_wide_fsdp2_{c}.json")}) or None,
        "switch": switch_summary(load(f, f"bench_switch_{c}.json")),
        "notes": load(f, f"notes_{c}.json"),
        "raw_files": sorted(x for x in os.listdir(f) if x.endswith(f"_{c}.json") or x.endswith(f"_{c}.txt")),
    }
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)
    tr = result["training_step_2b"]
    if tr:
        print("| method | step (ms) | step vs full | peak (GiB) | peak vs full | trainable |")
        print("| --- | --- | --- | --- | --- | --- |")
        for m, r in tr["methods"].items():
            print(f"| {m} | {r['step_ms']:.1f} | {r['step_ratio_to_full']:.3f} | {r['peak_gib']:.1f} | "
                  f"{r['peak_ratio_to_full']:.3f} | {100 * r['trainable_params'] / r['total_params']:.1f} % |")
    print(f"wrote {os.path.relpath(args.out, ROOT)}")


if __name__ == "__main__":
    main()
