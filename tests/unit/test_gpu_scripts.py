"""The GPU scripts, run on the CPU with tiny settings: the next session with a GPU relies
on them working first time (scripts/gpu_checks.sh, docs/gpu.md)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from dsrun import ROOT, ds_env

SCRIPTS = os.path.join(ROOT, "scripts")


def _run(args, timeout=240):
    env = ds_env()
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return proc


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["torch", "zero3", "fsdp2"])
def test_trainer_check_script_on_cpu(tmp_path, engine):
    out = tmp_path / f"{engine}.json"
    extra = ["--force-fsdp2-on-cpu", "--gradient-checkpointing"] if engine == "fsdp2" else []
    proc = _run([os.path.join(SCRIPTS, "gpu_trainer_check.py"), "--device", "cpu", "--model", "tiny",
                 "--engine", engine, "--modes", "full,static,dynamic", "--steps", "8", "--full-steps", "4",
                 "--update-every", "2", "--batch", "4", "--seq", "32", "--lr", "3e-3", "--json", str(out), *extra])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = json.loads(out.read_text())["runs"]
    if engine == "fsdp2":  # the same checks ran on FSDP2's shards, with the FSDP2 backend
        assert {r["backend"] for r in runs.values()} == {"fsdp2"}
    assert all(r["ok"] for r in runs.values()), {m: (r["error"], r["n_violations"]) for m, r in runs.items()}
    for mode in ("static", "dynamic"):
        assert runs[mode]["state_ratio_to_full"] < 0.35  # a quarter of the linear layers, no embeddings
    assert runs["dynamic"]["scans"] == 4
    # Each mode starts from a clean process state: nothing of an earlier engine stays alive
    # (DeepSpeed's ZeRO-3 kept every engine's model and optimizer state before the cleanup).
    assert runs["full"]["live_tensor_mib_after"] < 0.5, runs["full"]["live_tensor_mib_after"]
    assert runs["dynamic"]["live_tensor_mib_after"] < 0.5


def test_bench_analyzer_extrapolates_the_baseline_per_type(tmp_path):
    out = tmp_path / "a.json"
    proc = _run([os.path.join(SCRIPTS, "bench_analyzer.py"), "--device", "cpu", "--shapes", "toy", "--repeat", "1",
                 "--reference", "gram64", "--baseline-layers", "2", "--json", str(out)], timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["baseline_matrices"] == 14 and r["matrices"] == 56
    assert r["baseline_same_selection"] is None  # not comparable on 2 of 8 layers
    for d in r["per_type"].values():
        assert d["baseline_count"] == 2 and d["count"] == 8
        assert d["baseline_s"] == pytest.approx(d["baseline_measured_s"] * 4)
    assert r["baseline_s"] == pytest.approx(sum(d["baseline_s"] for d in r["per_type"].values()))


def test_gpu_summary_reads_the_committed_results(tmp_path):
    out = tmp_path / "s.json"
    proc = _run([os.path.join(SCRIPTS, "gpu_summary.py"), "--card", "h200", "--out", str(out)], timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads(out.read_text())
    assert s["device"] == "NVIDIA H200"
    assert s["scan_8b_shapes"]["same_top25_selection_as_fp64"] is True
    steps = s["training_step_2b"]["methods"]
    assert steps["full"]["step_ratio_to_full"] == 1.0
    assert 0 < steps["spectrum_static"]["step_ratio_to_full"] < 1
    assert all(r["ok"] for e in s["trainer_smollm2"].values() for r in e["runs"].values())
