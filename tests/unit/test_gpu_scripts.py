"""The GPU runner's pieces, run on the CPU with tiny settings, so that a run on a GPU
(benchmarks/gpu/run.sh, docs/results/gpu.md) works the first time: the analyzer benchmark, the
summary of a card's raw files, and the runner's commands.  The Trainer check
(benchmarks/gpu/trainer_check.py) runs the engines the distributed tests cover; CI only starts
it (tests/unit/test_benchmarks.py)."""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys

import pytest

from dsrun import ROOT, ds_env

BENCH = os.path.join(ROOT, "benchmarks")
GPU = os.path.join(BENCH, "gpu")


def _run(args, timeout=240):
    env = ds_env()
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return proc


def test_bench_analyzer_extrapolates_the_baseline_per_type(tmp_path):
    out = tmp_path / "a.json"
    proc = _run([os.path.join(BENCH, "analyzer.py"), "--device", "cpu", "--shapes", "toy", "--repeat", "1",
                 "--reference", "gram64", "--baseline-layers", "2", "--json", str(out)], timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["baseline_matrices"] == 14 and r["matrices"] == 56
    assert r["baseline_same_selection"] is None  # not comparable on 2 of 8 layers
    for d in r["per_type"].values():
        assert d["baseline_count"] == 2 and d["count"] == 8
        assert d["baseline_s"] == pytest.approx(d["baseline_measured_s"] * 4)
    assert r["baseline_s"] == pytest.approx(sum(d["baseline_s"] for d in r["per_type"].values()))


def test_gpu_summary_reads_a_cards_raw_files(tmp_path):
    """The summary of one card's raw files: values carried over, ratios as the files give them,
    a part without a file null."""
    raw = tmp_path / "raw"
    raw.mkdir()
    per_type = {"q_proj": {"shape": [64, 64], "count": 8, "baseline_s": 2.0, "project_s": 0.5}}
    (raw / "bench_analyzer_8b_cpu.json").write_text(json.dumps({
        "matrices": 8, "layers": 8, "shapes": "toy", "baseline_s": 2.0, "project_s": 0.5, "routes": {"fast": 8},
        "speedup": 4.0, "max_rel_err": 1e-6, "baseline_max_rel_err": 1e-3, "same_selection": True,
        "reference_s": 0.6, "per_type": per_type, "command": "analyzer.py", "device_name": "a test card"}))
    run = {"ok": True, "error": None, "steps": 8, "n_violations": 0, "never_selected_changed": [],
           "selected_unchanged": [], "losses_finite": True, "loss_first5": [4.0], "loss_last5": [3.0],
           "state_numel_max": 10, "state_ratio_to_full": 0.25, "window_peak_bytes": {"0": 2**20},
           "peak_ratio_to_full": 0.6, "scans": 1, "selections": [["a"]]}
    (raw / "trainer_smollm2_torch_cpu.json").write_text(json.dumps({
        "settings": {"model": "tiny"}, "runs": {"static": run, "dynamic": dict(run, ok=False, error="boom")},
        "command": "trainer_check.py"}))
    out = tmp_path / "s.json"
    proc = _run([os.path.join(GPU, "summary.py"), "--card", "cpu", "--folder", str(raw), "--out", str(out)],
                timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads(out.read_text())
    assert s["device"] == "a test card" and s["scan_8b_shapes"]["speedup"] == 4.0
    assert s["scan_8b_shapes"]["per_type"]["q_proj"] == {"shape": [64, 64], "count": 8, "original_s": 2.0,
                                                         "analyzer_s": 0.5}
    runs = s["trainer_smollm2"]["torch"]["runs"]
    assert runs["static"]["ok"] and runs["static"]["state_ratio_to_full"] == 0.25
    assert runs["dynamic"]["error"] == "boom" and runs["static"]["window_peak_mib"] == {"0": 1.0}
    assert s["training_step_2b"] is None and "zero3" not in s["trainer_smollm2"]
    assert s["raw_files"] == ["bench_analyzer_8b_cpu.json", "trainer_smollm2_torch_cpu.json"]


def _dry_run(*parts):
    proc = subprocess.run(["bash", os.path.join(GPU, "run.sh"), "--dry-run", *parts], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [shlex.split(line) for line in proc.stdout.splitlines() if line.strip()]


@pytest.mark.slow
def test_the_gpu_runner_passes_only_options_its_scripts_take():
    """Every command of benchmarks/gpu/run.sh names a script that exists and options that
    script's parser knows (its --help lists them), so a run on a GPU does not die on a typo."""
    commands = _dry_run()
    scripts = {}
    for cmd in commands:
        script = next(a for a in cmd if a.endswith(".py"))
        assert os.path.isfile(os.path.join(ROOT, script)), script
        scripts.setdefault(script, set()).update(a for a in cmd if a.startswith("--"))
    assert {os.path.basename(s) for s in scripts} == {"eigensolvers.py", "analyzer.py", "train.py",
                                                      "trainer_check.py", "switch.py", "summary.py"}
    for script, options in scripts.items():
        proc = _run([os.path.join(ROOT, script), "--help"], timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        known = set(re.findall(r"--[a-z0-9][a-z0-9-]*", proc.stdout))
        assert options <= known, (script, sorted(options - known))


def test_the_gpu_runner_runs_the_parts_asked_for():
    engines = [cmd[cmd.index("--engine") + 1] for cmd in _dry_run("trainer") if "--engine" in cmd]
    assert engines == ["torch", "zero2", "zero3"] * 2  # the tiny rehearsal, then SmolLM2
    assert [os.path.basename(c[1]) for c in _dry_run("fsdp2")] == ["trainer_check.py", "summary.py"]
    proc = subprocess.run(["bash", os.path.join(GPU, "run.sh"), "--dry-run", "nonsense"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown part" in proc.stderr
