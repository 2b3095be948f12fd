"""benchmarks/switch.py runs end to end on CPU (2 processes, a tiny width) and writes the
record the switch tables of docs/results/deepspeed.md are built from.  Memory and seconds are not asserted here
(they are measured, not tested); what is asserted is what the numbers mean: the fields exist
per rank, and a ZeRO-2 switch keeps the stayers' state in place (nothing staged)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from dsrun import ROOT, ds_env

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
pytest.importorskip("deepspeed")

REQUIRED = ("engine", "world_size", "hidden", "switch_seconds", "peak_extra_bytes", "stayers_state_bytes_per_rank",
            "startup_peak_bytes", "static_startup_peak_bytes", "largest_matrix_state_bytes", "step_seconds")


def test_bench_switch_writes_its_record(tmp_path):
    out = tmp_path / "bench.json"
    env = ds_env()
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "switch.py"), "--engine", "zero2", "--hidden", "64",
           "--modes", "callback,static", "--json", str(out), "--timeout", "400"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=500, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    (rec,) = json.loads(out.read_text())
    assert all(k in rec for k in REQUIRED), sorted(rec)
    assert rec["engine"] == "zero2" and rec["world_size"] == 2 and rec["hidden"] == 64 and rec["dtype"] == "fp32"
    assert len(rec["per_rank"]) == 2
    for r in rec["per_rank"]:
        # 8 layers, top half selected, the ranking shifted by one layer: 7 matrices leave, 7 join
        assert (r["stayers"], r["leaving"], r["joining"]) == (21, 7, 7), r
        assert r["staged_bytes"] == 0 and r["kept_in_place_bytes"] > 0, r
        assert r["stayers_state_bytes_per_rank"] > 0, r
