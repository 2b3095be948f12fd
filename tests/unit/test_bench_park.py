"""benchmarks/park.py on a tiny model: it runs both variants and its record holds what the
docs quote (parked host bytes equal one active set's state; the device state does not grow)."""
import json
import os
import subprocess
import sys

from dsrun import ROOT, ds_env


def test_bench_park_writes_its_record(tmp_path):
    out = tmp_path / "park.json"
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "park.py"), "--hidden", "64", "--layers", "4",
           "--switches", "2", "--threads", "1", "--device", "cpu", "--json", str(out)]
    proc = subprocess.run(cmd, env=ds_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (rec,) = json.loads(out.read_text())
    dropped, parked = rec["dropped"], rec["parked"]
    assert dropped["parked_bytes"] == 0 and parked["parked_bytes"] > 0
    # rotate with 4 layers: one of each type active, the other pool member parked
    assert parked["joined_per_switch"] == dropped["joined_per_switch"] == [7, 7]
    assert parked["optimizer_state_bytes_max"] == dropped["optimizer_state_bytes_max"]
    assert abs(rec["parked_bytes_over_state"] - 1) < 0.01
    assert rec["switch_seconds_ratio"] > 0 and rec["step_seconds_ratio"] > 0
