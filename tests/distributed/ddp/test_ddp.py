import json
import os
import subprocess
import sys

import pytest

from dsrun import CORE_ONLY, ds_env, free_port
from optim_matrix import module_of, other_optims

pytestmark = [pytest.mark.distributed, pytest.mark.slow, pytest.mark.stack]

HERE = os.path.dirname(__file__)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    env = ds_env()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           os.path.join(HERE, "train_ddp.py"), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return [json.load(open(out / f"rank{r}.json")) for r in range(2)]


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


def test_ddp_resume_continues_the_same_run(ddp_run):
    for r in ddp_run:
        full, resumed = r["c_full_history"], r["c_resume_history"]
        assert [h[0] for h in full] == [0, 2, 4, 6]
        assert len({tuple(h[1]) for h in full[2:]} | {tuple(full[1][1])}) > 1, \
            "the selection never changed after the checkpoint: the test would not exercise the restore"
        assert resumed == full  # history restored from spectrum_state.json, later scans identical
        assert r["c_resume_trainable"] == r["c_full_trainable"]
        # the resumed Trainer's log history starts with the checkpoint's entries (steps 1-4)
        assert sorted(r["c_resume_losses"], key=int) == ["1", "2", "3", "4", "5", "6", "7", "8"]
        for step in ("5", "6", "7", "8"):
            assert r["c_resume_losses"][step] == pytest.approx(r["c_full_losses"][step], rel=1e-5), step
        assert r["c_resume_weights"] == pytest.approx(r["c_full_weights"], rel=1e-6, abs=1e-6)
    assert ddp_run[0]["c_resume_weights"] == ddp_run[1]["c_resume_weights"]


@pytest.mark.parametrize("optim", other_optims(CORE_ONLY))
def test_ddp_optimizers_static_rotate_parked_and_resumed(ddp_run, optim):
    for r in ddp_run:
        key = f"d_{optim}"
        for mode in ("static", "full", "resume"):
            assert r[f"{key}_{mode}_optimizer"].startswith(module_of(optim) + ".")
            assert r[f"{key}_{mode}_violations"] == [] and r[f"{key}_{mode}_frozen_state"] == 0, mode
        picks = [h[1] for h in r[f"{key}_full_history"]]
        assert len(picks) == 3 and picks[0] != picks[1] != picks[2]
        assert r[f"{key}_resume_history"] == r[f"{key}_full_history"]
        for step in (4, 5, 6):  # the resumed steps: exactly the uninterrupted run's
            assert r[f"{key}_resume_losses"][str(step)] == r[f"{key}_full_losses"][str(step)], step
        assert r[f"{key}_resume_weights"] == r[f"{key}_full_weights"]
    assert ddp_run[0][f"d_{optim}_resume_weights"] == ddp_run[1][f"d_{optim}_resume_weights"]
