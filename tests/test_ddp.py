import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(__file__)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), env_pp()]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
           os.path.join(HERE, "ddp_scripts", "train_ddp.py"), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return [json.load(open(out / f"rank{r}.json")) for r in range(2)]


def env_pp():
    return os.environ.get("PYTHONPATH", "")


def test_ddp_dynamic_switches_keep_ranks_in_sync(ddp_run):
    r0, r1 = ddp_run
    assert r0["a_history_steps"] == [0, 2, 4] == r1["a_history_steps"]
    assert r0["a_selected"] == r1["a_selected"]
    # joiners' gradients are all-reduced (ranks saw different data), so weights stay identical
    assert r0["a_params_equal_across_ranks"] and r1["a_params_equal_across_ranks"]
    assert r0["a_frozen_violations"] == [] and r1["a_frozen_violations"] == []


def test_ddp_one_selection_even_when_a_rank_computes_other_snr(ddp_run):
    r0, r1 = ddp_run
    assert len(r0["b_history"]) == 2
    assert r0["b_history"] == r1["b_history"]
