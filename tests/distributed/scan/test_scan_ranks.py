"""``torchrun -m spectrum_callback.cli --model DIR``: the streaming scan split across 2 ranks (gloo)."""
import json
import os
import subprocess
import sys

import pytest

from dsrun import ROOT, ds_env, free_port
from spectrum_callback.cli import main
from tiny import tiny_model

pytestmark = [pytest.mark.distributed, pytest.mark.slow, pytest.mark.stack]


def _files(out):
    return {os.path.relpath(os.path.join(d, n), out): open(os.path.join(d, n)).read()
            for d, _, names in os.walk(out) for n in names if not n.endswith(".scan_info.json")}


def test_two_ranks_write_once_what_one_process_writes(tmp_path):
    folder = tmp_path / "moe"
    # fused expert banks (read one expert at a time) in a sharded checkpoint
    tiny_model("gpt_oss", layers=4).save_pretrained(folder, max_shard_size="60KB")
    args = ["--model", str(folder), "--top-percent", "50", "--no-progress"]
    assert main([*args, "--output-dir", str(tmp_path / "one")]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "spectrum_callback.cli", *args, "--output-dir", str(tmp_path / "two")]
    r = subprocess.run(cmd, cwd=ROOT, env=ds_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert r.stdout.count("SNR results saved to") == 1 and r.stdout.count("unfrozenparameters") == 1, r.stdout
    one, two = _files(tmp_path / "one"), _files(tmp_path / "two")
    assert len(two) == 3 and two == one
    (info,) = [os.path.join(d, n) for d, _, ns in os.walk(tmp_path / "two") for n in ns
               if n.endswith(".scan_info.json")]
    info = json.load(open(info))
    assert info["route"] == "stream" and info["ranks"] == 2 and info["device"] == "cpu"
    # each rank read only its share: rank 0 read less than the whole
    whole = json.load(open(next((tmp_path / "one").rglob("*.scan_info.json"))))["bytes_read_rank0"]
    assert 0 < info["bytes_read_rank0"] < whole
