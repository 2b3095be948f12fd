"""SpectrumCallback under FSDP2 (torch ``fully_shard``), 2 processes, gloo, CPU.

All scenarios run in ONE ``torchrun --nproc_per_node=2`` process group
(tests/distributed/fsdp/scenarios.py), the plain-PyTorch references in one single-process
subprocess with the same global batch.  What CPU covers, and what only a GPU does:

* ``accel_*``: the Trainer's own FSDP2 path, accelerate's ``fully_shard`` wrapping, its
  optimizer remap and its DCP checkpoints.  accelerate enables FSDP only on GPUs, so the
  scenario script sets the accelerator state that ``fsdp_config={"fsdp_version": 2}`` sets
  there (three attributes, after ``Trainer(...)``); on CPU that is the one difference.  The
  unforced path, with NCCL, ran on an H100 (docs/gpu/trainer_wide_fsdp2_h100.json).
* ``tload_*``: a model sharded at load time by transformers
  (``from_pretrained(distributed_config=...)``), which the Trainer trains as it is.
"""
from __future__ import annotations

import os

import pytest
import torch
from dsrun import CORE_ONLY, run_scenarios, scenario_result
from transformers import PreTrainedModel

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "scenarios.py")

POLICIES = ["accel_rotate_park", "accel_random", "accel_cyclic_park"]
# What every CI stack runs (tests/conftest.py marks the cases over these `stack`): dynamic
# through the Trainer, its resume, a model sharded at load, a parked policy with torchao.
CORE = {"accel_dynamic", "accel_resume", "tload_dynamic", "accel_torchao8_rotate_park"}
# torchao's 8-bit AdamW and schedule-free AdamW over DTensor shards (FSDP2 cells of the optimizer matrix)
OPTIMS = {"accel_torchao8_static": "torchao", "accel_torchao8_rotate_park": "torchao",
          "accel_schedfree_static": "schedulefree", "accel_schedfree_rotate_park": "schedulefree"}
SCENARIOS = ["accel_dynamic", "accel_static", "accel_dynamic_ga", "accel_dynamic_bf16_gc", "accel_switch20",
             "accel_resume", "accel_moe_dynamic", "tload_dynamic", "accel_prefrozen_dynamic", *POLICIES, *OPTIMS,
             "accel_torchao8_resume"]
REFS = ["accel_dynamic", "accel_static", "accel_dynamic_ga", "accel_moe_dynamic", "tload_dynamic", *POLICIES]

# The Trainer leaves a model sharded at load by transformers alone only where transformers has
# that notion (PreTrainedModel.is_distributed_loading_by_transformers: in 5.24, not in 5.16.1,
# axolotl 0.19's pin, whose Trainer wraps such a model in DDP and fails on its DTensor parameters
# in accelerate's prepare, before any Spectrum code runs). There the tload_* scenarios do not run.
TLOAD = hasattr(PreTrainedModel, "is_distributed_loading_by_transformers")
_NO_TLOAD = pytest.mark.skipif(not TLOAD, reason="this transformers' Trainer cannot train a model sharded at load "
                               "by from_pretrained(distributed_config=...) (it wraps it in DDP); 5.24 can")


def _runnable(names):
    return [n for n in names if TLOAD or not n.startswith("tload")]


def _cases(names, pair=False):
    return [pytest.param(*([n, n] if pair else [n]), marks=_NO_TLOAD) if n.startswith("tload") else
            ((n, n) if pair else n) for n in names]


# Tolerance vs plain PyTorch, fp32: float reassociation only (FSDP2's reduce-scatter sums the
# two ranks' gradients in another order).  Measured: losses 1.1e-7 relative, weights 8e-7
# absolute after 6 steps at lr 5e-3; the MoE experts, whose gradients each rank sums over a
# different half of the batch, 2.3e-5 (as under DeepSpeed, docs/results/deepspeed.md).
LOSS_RTOL = 1e-5
WEIGHT_ATOL = 2e-5
MOE_WEIGHT_ATOL = 5e-5


@pytest.fixture(scope="session")
def fsdp_results(tmp_path_factory):
    names, refs = _runnable(SCENARIOS), _runnable(REFS)
    if CORE_ONLY:
        names, refs = [n for n in names if n in CORE], [n for n in refs if n in CORE]
    # one after the other: 2 cores
    return run_scenarios(SCRIPT, str(tmp_path_factory.mktemp("fsdp2")), names, refs, parallel=False,
                         what="FSDP2 scenarios")


_get = scenario_result


def _weights(results, name, ref=False):
    return torch.load(os.path.join(results["_out"], f"{name}{'.ref' if ref else ''}.weights.pt"))


def _params_of(module, names):
    return [n for n in names if n == module or n.startswith(module + ".")]


RUNS = ["accel_dynamic", "accel_static", "accel_dynamic_ga", "accel_dynamic_bf16_gc", "accel_switch20",
        "accel_moe_dynamic", "tload_dynamic", "accel_prefrozen_dynamic", *POLICIES, *OPTIMS]


@pytest.mark.parametrize("name", _cases(RUNS))
def test_runs_on_fsdp2_with_the_fsdp2_backend(fsdp_results, name):
    r = _get(fsdp_results, name)
    assert r["backend"] == "fsdp2"
    assert r["fsdp_modules"] >= 2 and r["dtensor_params"] > 0  # sharded per layer, parameters are DTensors


@pytest.mark.parametrize("name", _cases(RUNS))
def test_frozen_parameters_do_not_change_a_bit(fsdp_results, name):
    r = _get(fsdp_results, name)
    assert r["violations"] == [[], []], r["violations"]  # each rank checked its own shards, weight decay 0.1
    assert len(r["losses"]) >= 4


@pytest.mark.parametrize("name", _cases(RUNS))
def test_one_selection_on_every_rank(fsdp_results, name):
    r = _get(fsdp_results, name)
    assert r["selected"][0] == r["selected"][1]


@pytest.mark.parametrize("name", _cases(RUNS))
def test_optimizer_state_only_for_the_selection_per_rank(fsdp_results, name):
    """Adam's two moments of this rank's shards of the trainable parameters, nothing more; at a
    switch step the joiners have no state yet (created at their first step)."""
    r = _get(fsdp_results, name)
    switches = {h["step"] for h in r["history"]}
    for rank in range(2):
        numel, needed = r["numel"][rank], r["needed"][rank]
        for step, (have, need) in enumerate(zip(numel, needed)):
            assert have <= need, (rank, step, have, need)
            if step > 0 and step not in switches:
                assert have == need, (rank, step, have, need)
        assert max(numel) < 0.6 * 2 * r["local_numel"][rank]  # full fine-tuning's moments: 2x every element


@pytest.mark.parametrize("name", _cases(["accel_dynamic", "accel_switch20", "accel_moe_dynamic", "tload_dynamic",
                                          "accel_prefrozen_dynamic"]))
def test_state_kept_for_stayers_fresh_for_joiners_dropped_for_leavers(fsdp_results, name):
    r = _get(fsdp_results, name)
    hist = r["history"]
    assert any(h["joined"] for h in hist[1:]), "the selection never changed: the test would not exercise state transfer"
    stayed = 0
    for rank in range(2):
        steps = r["steps"][rank]  # per step, after the switch and before the optimizer step: param -> Adam step
        for prev, h in zip(hist, hist[1:]):
            if not h["joined"]:
                continue
            s = h["step"]
            now, before = steps[s], steps[s - 1]
            for m in h["joined"] + h["left"]:
                for p in _params_of(m, set(now) | set(before)):
                    assert p not in now, (rank, s, p, "a joiner starts fresh, a leaver's state is freed")
            stay = sorted(set(prev["selected"]) & set(h["selected"]))
            stayed += len(stay)
            for m in stay:
                for p in _params_of(m, set(now)) or [m]:
                    # kept: one optimizer step further than at the step before (0 if it joined then)
                    assert now.get(p) == before.get(p, 0) + 1, (rank, s, p, before.get(p), now.get(p))
    assert stayed, "no matrix stayed across a switch: the test would not exercise kept state"


@pytest.mark.parametrize("name,ref", _cases(REFS, pair=True))
def test_same_losses_and_weights_as_plain_pytorch(fsdp_results, name, ref):
    r = _get(fsdp_results, name)
    want = _get(fsdp_results, "ref:" + ref)
    assert [h["selected"] for h in r["history"]] == [h["selected"] for h in want["history"]]
    assert r["losses"].keys() == want["losses"].keys()
    for step, loss in want["losses"].items():
        assert r["losses"][step] == pytest.approx(loss, rel=LOSS_RTOL), (step, r["losses"], want["losses"])
    got, exp = _weights(fsdp_results, name), _weights(fsdp_results, ref, ref=True)
    worst = max(float((got[n] - exp[n]).abs().max()) for n in exp)
    # a moving policy brings fresh matrices in at every switch (see test_deepspeed.POLICY_WEIGHT_ATOL)
    assert worst <= (MOE_WEIGHT_ATOL if "moe" in name else 1e-4 if name in POLICIES else WEIGHT_ATOL), worst
    if name in POLICIES:
        picks = [h["selected"] for h in r["history"]]
        assert len(picks) >= 3 and all(a != b for a, b in zip(picks, picks[1:]))


def test_scan_brings_each_weight_whole_to_one_rank_only(fsdp_results):
    """Static run: one scan of every candidate; the ranks together receive each weight once
    (gathered to the rank that computes its SNR), neither receives them all, and no
    DTensor.full_tensor() (a whole weight on every rank) is called."""
    r = _get(fsdp_results, "accel_static")
    assert r["scans"] == 1
    assert sum(r["scan_received"]) == r["candidate_numel"]
    assert max(r["scan_received"]) < r["candidate_numel"] and min(r["scan_received"]) > 0
    for name in _runnable(RUNS):
        assert _get(fsdp_results, name)["full_tensor_calls"] == [0, 0], name


def test_no_growth_over_many_switches(fsdp_results):
    r = _get(fsdp_results, "accel_switch20")
    assert len(r["history"]) == 21 and sum(bool(h["joined"]) for h in r["history"][1:]) >= 15
    for rank in range(2):
        assert max(r["numel"][rank]) <= max(r["needed"][rank])
        # entries in the optimizer state never exceed the trainable parameters
        assert max(len(s) for s in r["steps"][rank]) <= len(r["history"][0]["selected"])


def test_mixed_precision_and_activation_checkpointing_train(fsdp_results):
    """bf16 (FSDP2's MixedPrecisionPolicy) with a joiner in a layer that had no trainable
    parameter when FSDP2 initialised: its bf16 gradient must reach its fp32 shard."""
    r = _get(fsdp_results, "accel_dynamic_bf16_gc")
    assert any(h["joined"] for h in r["history"][1:])
    losses = [r["losses"][k] for k in sorted(r["losses"], key=int)]
    assert all(x == x for x in losses) and losses[-1] < losses[0]


@pytest.mark.parametrize("name", list(OPTIMS))
def test_the_optimizer_asked_for_steps_the_shards(fsdp_results, name):
    assert _get(fsdp_results, name)["optimizer_class"] == OPTIMS[name]


@pytest.mark.parametrize("name", ["accel_torchao8_rotate_park", "accel_schedfree_rotate_park"])
def test_other_optimizers_rotation_moves_the_selection(fsdp_results, name):
    r = _get(fsdp_results, name)
    picks = [h["selected"] for h in r["history"]]
    assert len(picks) >= 3 and all(a != b for a, b in zip(picks, picks[1:]))


def test_low_bit_resume_with_parked_state_is_exact(fsdp_results):
    r = _get(fsdp_results, "accel_torchao8_resume")
    assert {"spectrum_parked.rank0.pt", "spectrum_parked.rank1.pt"} <= set(r["ckpt_files"])
    assert sorted(r["resumed_losses"], key=int) == ["4", "5", "6"]
    for step, loss in r["resumed_losses"].items():
        assert loss == r["full_losses"][step], (step, loss, r["full_losses"][step])
    assert r["resume_max_weight_diff"] == 0.0 and r["violations"] == [[], []]


@pytest.mark.stack
def test_resume_through_the_trainers_fsdp2_checkpoint(fsdp_results):
    r = _get(fsdp_results, "accel_resume")
    assert {"optimizer_0", "pytorch_model_fsdp_0", "spectrum_state.json"} <= set(r["ckpt_files"])  # DCP, sharded
    assert sorted(r["resumed_losses"], key=int) == ["4", "5", "6"]
    for step, loss in r["resumed_losses"].items():
        assert loss == r["full_losses"][step], (step, loss, r["full_losses"][step])
    assert r["resume_max_weight_diff"] == 0.0
    assert r["resumed_history"] == r["full_history"]
    assert r["violations"] == [[], []]
    # the stayers' Adam state came back from the checkpoint (3 steps), on every rank
    for steps in r["resumed_steps_first"]:
        assert steps and max(steps.values()) == 3


def test_candidates_frozen_by_spectrum_freeze_before_the_trainer_can_join(fsdp_results):
    """spectrum_freeze(model, 0.25) before Trainer(...), then the callback with top_pct=0.5: the
    optimizer was built over a quarter of the matrices and fully_shard replaced every parameter
    object, yet the matrices Spectrum froze are still its own (not the user's): the first
    selection holds half of them and later ones join."""
    r = _get(fsdp_results, "accel_prefrozen_dynamic")
    assert len(r["history"][0]["selected"]) == 14  # top half of 28 candidates, not the 7 trainable at build
    assert any(h["joined"] for h in r["history"][1:])
