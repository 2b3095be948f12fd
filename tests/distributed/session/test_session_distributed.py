"""SpectrumSession in custom accelerate loops, 2 processes, gloo, CPU: DDP and FSDP2 give the
plain single-process run's losses and weights, keep frozen bits, keep optimizer state to the
selection and select alike on every rank (tests/distributed/session/accelerate_loop.py)."""
from __future__ import annotations

import os

import pytest
import torch
from dsrun import run_scenarios, scenario_result

pytestmark = [pytest.mark.distributed, pytest.mark.slow, pytest.mark.stack]

POLICIES = ["ddp_rotate_park", "ddp_random", "ddp_cyclic"]
SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "accelerate_loop.py")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_scenarios(SCRIPT, str(tmp_path_factory.mktemp("session")), ["ddp", "fsdp2", *POLICIES],
                         ["ddp", *POLICIES], what="accelerate custom loops")


@pytest.mark.parametrize("name, backend, wrapped", [("ddp", "torch", "DistributedDataParallel"),
                                                    ("fsdp2", "fsdp2", "FSDPLlamaForCausalLM"),
                                                    *[(p, "torch", "DistributedDataParallel") for p in POLICIES]])
def test_custom_accelerate_loop_matches_the_plain_run(results, name, backend, wrapped):
    ref_name = name if name in POLICIES else "ddp"
    r, ref = scenario_result(results, name), scenario_result(results, "ref:" + ref_name)
    assert (r["backend"], r["wrapped"]) == (backend, wrapped)
    assert r["history_steps"] == ref["history_steps"] == [0, 2, 4]
    for rank in r["ranks"]:
        assert rank["violations"] == [] and rank["state_outside"] == []
        assert rank["selections"] == r["ranks"][0]["selections"]  # one selection on every rank
        assert rank["weights_sum"] == r["ranks"][0]["weights_sum"]  # the ranks train the same weights
    assert rank["selections"] == ref["ranks"][0]["selections"]
    sel = rank["selections"]
    assert sel[2] != sel[1] and sel[4] != sel[3]  # every switch moved the selection
    assert r["losses"] == pytest.approx(ref["losses"], rel=1e-5)
    got = torch.load(os.path.join(results["_out"], f"{name}.weights.pt"))
    want = torch.load(os.path.join(results["_out"], f"{ref_name}.ref.weights.pt"))
    # Float reassociation only (2 ranks sum the gradients in another order). A matrix that just
    # joined takes its first Adam steps at about lr * sign(gradient), so an element whose gradient
    # is near 0 can flip sign: measured up to 2.9e-3 on single elements (cyclic), while the losses
    # agree to 3e-7. A joiner whose gradient were not averaged would differ almost everywhere.
    for n, w in want.items():
        diff = (got[n] - w).abs()
        assert float((diff > 1e-4).float().mean()) < 0.01 and float(diff.max()) < 2 * 5e-3, n
