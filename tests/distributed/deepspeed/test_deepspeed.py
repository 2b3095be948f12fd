"""SpectrumCallback under DeepSpeed ZeRO-1, ZeRO-2 and ZeRO-3 (2 processes, gloo, CPU).

All DeepSpeed scenarios run in ONE ``torchrun --nproc_per_node=2`` process group
(tests/distributed/deepspeed/scenarios.py), started once per test session, so that DeepSpeed's
start-up (and the first-time JIT build of its shm comm op, cached in
TORCH_EXTENSIONS_DIR) is paid once.  The plain-PyTorch references run in one
single-process subprocess with the same global batch.
"""
from __future__ import annotations

import os

import pytest
import torch
from dsrun import CORE_ONLY, run_scenarios, scenario_result

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "scenarios.py")

pytest.importorskip("deepspeed", reason="deepspeed is a test dependency of the DeepSpeed backend")

# The DeepSpeed cells of the optimizer matrix: static Spectrum with any optimizer, DeepSpeed's
# own blocks and offload (nothing is ever rebuilt); dynamic with DeepSpeed's Adam block and
# with offload (rebuilt like the Trainer's AdamW); what dynamic runs refuse.
# The class each static scenario's Trainer builds (DeepSpeed wraps it; the blocks build torch's AdamW)
STATIC_OPTIMIZER = {
    "z2_bnb8_static": "bitsandbytes.optim.adamw.AdamW", "z3_bnb8_static": "bitsandbytes.optim.adamw.AdamW",
    "z2_paged8_static": "bitsandbytes.optim.adamw.AdamW", "z3_offload_static": "bitsandbytes.optim.adamw.AdamW",
    "z2_lion8_static": "bitsandbytes.optim.lion.Lion", "z3_lion8_static": "bitsandbytes.optim.lion.Lion",
    "z2_torchao8_static": "torchao.optim.adam.AdamW8bit", "z3_torchao8_static": "torchao.optim.adam.AdamW8bit",
    "z2_torchao4_static": "torchao.optim.adam.AdamW4bit", "z3_torchao4_static": "torchao.optim.adam.AdamW4bit",
    "z2_adafactor_static": "transformers.optimization.Adafactor",
    "z3_adafactor_static": "transformers.optimization.Adafactor",
    "z2_schedfree_static": "schedulefree.adamw_schedulefree.AdamWScheduleFree",
    "z3_schedfree_static": "schedulefree.adamw_schedulefree.AdamWScheduleFree",
    "z2_offload_static": "torch.optim.adamw.AdamW", "z2_block_static": "torch.optim.adamw.AdamW",
    "z3_block_static": "torch.optim.adamw.AdamW",
}
OPTIM_STATIC = list(STATIC_OPTIMIZER)
OPTIM_DYNAMIC = ["z2_block_dynamic", "z3_block_dynamic", "z2_offload_dynamic", "z3_offload_dynamic"]
OPTIM_REFUSED = ["z2_bnb8_dynamic", "z2_sched_dynamic", "z2_galore_static", "z2_bnb8_late_static"]
DS_SCENARIOS = [
    "z2_dynamic", "z3_dynamic", "z2_static", "z3_static", "z3_dynamic_ga", "z2_dynamic_gc_bf16",
    "z3_dynamic_gc_reentrant", "z3_dynamic_gc_nonreentrant", "z3_switch10", "z2_resume", "z3_resume",
    "z1_dynamic", "z2_resume_bf16", "z2_moe_dynamic", "z3_moe_dynamic", "z2_late_bf16",
    "z2_resume_untagged",
] + ["z2_rotate_park", "z3_rotate_park", "z2_random", "z3_random", "z2_cyclic_park", "z3_cyclic",
     "z2_offload_rotate_park", "z3_block_rotate_park"] + \
    OPTIM_STATIC + OPTIM_DYNAMIC + OPTIM_REFUSED + ["z2_bnb8_resume"]
REF_SCENARIOS = ["z2_dynamic", "z2_static", "z3_dynamic_ga", "z3_dynamic_gc_nonreentrant", "z2_moe_dynamic",
                 "z2_rotate_park", "z2_random", "z2_cyclic_park", "z3_cyclic"]
POLICY_RUNS = [("z2_rotate_park", "z2_rotate_park"), ("z3_rotate_park", "z2_rotate_park"),
               ("z2_offload_rotate_park", "z2_rotate_park"), ("z3_block_rotate_park", "z2_rotate_park"),
               ("z2_random", "z2_random"), ("z3_random", "z2_random"), ("z2_cyclic_park", "z2_cyclic_park"),
               ("z3_cyclic", "z3_cyclic")]

# Tolerance vs plain PyTorch, fp32 (measured: losses agree to ~1e-6 relative, final weights to
# ~1.5e-6 absolute; the differences come from the order of the gradient all-reduce sums).
LOSS_RTOL = 1e-5
WEIGHT_ATOL = 2e-5
# Fused MoE experts (tiny Mixtral): each rank routes a different half of the batch through each
# expert, so an expert's gradient is summed in a different order than in one process; measured
# 2.6e-5 after 6 steps at lr 5e-3 (losses still within 1e-5 relative).
MOE_WEIGHT_ATOL = 5e-5
# The moving policies bring a fresh matrix in at every switch, whose first Adam steps (moments
# near zero) amplify the reassociation differences: measured 3.3e-5 (random, ZeRO-2). A joiner
# whose state or gradient went wrong is off by the order of the lr (5e-3).
POLICY_WEIGHT_ATOL = 1e-4


# What every CI stack runs (tests/conftest.py marks the cases over these `stack`): ZeRO-2 and
# ZeRO-3 dynamic, a resume, a low-bit optimizer static (the start-up selection) and refused
# dynamic, DeepSpeed's Adam block, offload with ZeRO-3.
CORE = {"z2_dynamic", "z3_dynamic", "z2_resume", "z2_bnb8_static", "z2_block_dynamic", "z3_offload_dynamic",
        "z2_bnb8_dynamic"}


@pytest.fixture(scope="session")
def ds_results(tmp_path_factory):
    names, refs = DS_SCENARIOS, REF_SCENARIOS
    if CORE_ONLY:
        names, refs = [n for n in names if n in CORE], [n for n in refs if n in CORE]
    return run_scenarios(SCRIPT, str(tmp_path_factory.mktemp("ds")), names, refs, what="DeepSpeed scenarios")


_get = scenario_result


def _weights(results, name, ref=False):
    return torch.load(os.path.join(results["_out"], f"{name}{'.ref' if ref else ''}.weights.pt"))


# ---------------------------------------------------------------- 1. frozen means frozen
@pytest.mark.parametrize("name", ["z2_dynamic", "z3_dynamic", "z2_static", "z3_static", "z3_dynamic_ga",
                                  "z2_dynamic_gc_bf16", "z3_dynamic_gc_reentrant", "z3_dynamic_gc_nonreentrant",
                                  "z3_switch10", "z1_dynamic", "z2_moe_dynamic", "z3_moe_dynamic",
                                  *[n for n, _ in POLICY_RUNS], *OPTIM_STATIC, *OPTIM_DYNAMIC])
def test_frozen_parameters_do_not_change_a_bit(ds_results, name):
    r = _get(ds_results, name)
    assert r["violations"] == [], r["violations"][:5]
    assert len(r["losses"]) >= 4  # it trained
    # Weight decay is on (tiny.training_args: 0.1): without the rebuild ZeRO would move them.


# ---------------------------------------------------------------- 2. same numbers as plain PyTorch
@pytest.mark.parametrize("name,ref", [("z2_dynamic", "z2_dynamic"), ("z3_dynamic", "z2_dynamic"),
                                      ("z1_dynamic", "z2_dynamic"),
                                      ("z2_static", "z2_static"), ("z3_static", "z2_static"),
                                      ("z3_dynamic_ga", "z3_dynamic_ga"),
                                      ("z3_dynamic_gc_nonreentrant", "z3_dynamic_gc_nonreentrant"),
                                      ("z2_moe_dynamic", "z2_moe_dynamic"), ("z3_moe_dynamic", "z2_moe_dynamic"),
                                      *POLICY_RUNS, *[(n, "z2_dynamic") for n in OPTIM_DYNAMIC]])
def test_same_losses_and_weights_as_plain_pytorch(ds_results, name, ref):
    r = _get(ds_results, name)
    want = _get(ds_results, "ref:" + ref)
    assert [h["selected"] for h in r["history"]] == [h["selected"] for h in want["history"]]
    if r["history"][-1]["step"] > 0:
        assert len(r["history"]) >= 2 and r["history"][0]["selected"] != r["history"][-1]["selected"], \
            "the dynamic schedule never changed the selection: the test would not exercise state transfer"
    assert r["losses"].keys() == want["losses"].keys()
    for step, loss in want["losses"].items():
        assert r["losses"][step] == pytest.approx(loss, rel=LOSS_RTOL), (step, r["losses"], want["losses"])
    got, exp = _weights(ds_results, name), _weights(ds_results, ref, ref=True)
    worst = max(float((got[n] - exp[n]).abs().max()) for n in exp)
    policy_run = name in dict(POLICY_RUNS)
    assert worst <= (MOE_WEIGHT_ATOL if "moe" in name else POLICY_WEIGHT_ATOL if policy_run else WEIGHT_ATOL), worst


def test_scenarios_ran_at_the_zero_stage_they_name(ds_results):
    for name in ("z1_dynamic", "z2_dynamic", "z3_dynamic"):
        r = _get(ds_results, name)
        assert r["zero_stage"] == r["backend_stage"] == int(name[1]), name  # the engine and the rebuilt optimizer


@pytest.mark.stack
def test_lr_schedule_reaches_every_group_after_rebuilds(ds_results):
    r = _get(ds_results, "z2_dynamic")
    # linear decay from 5e-3 over 6 steps; several param groups (per-step cohorts) after switches
    for i, lrs in enumerate(r["lrs"]):
        assert all(lr == pytest.approx(5e-3 * (6 - i) / 6) for lr in lrs), (i, lrs)
    assert max(len(x) for x in r["lrs"]) > 1


# ---------------------------------------------------------------- 3. memory follows the selection
@pytest.mark.parametrize("name", ["z2_dynamic", "z3_dynamic", "z2_static", "z3_static", "z3_switch10", "z1_dynamic",
                                  "z2_moe_dynamic", "z3_moe_dynamic", *[n for n, _ in POLICY_RUNS], *OPTIM_DYNAMIC])
def test_optimizer_state_only_for_selected(ds_results, name):
    r = _get(ds_results, name)
    world = r["world"]
    for entry, trainable in zip(r["numel"], r["trainable_numel"]):
        for n in entry["per_rank"]:
            # fp32 master + exp_avg + exp_avg_sq of this rank's partition (+ alignment padding)
            assert 3 * trainable / world <= n <= 3 * (trainable / world + 64), (entry, trainable)
    full = r["total_numel"]  # every parameter (tiny Llama: 160,320)
    share = 0.6 if "moe" in name else 0.5  # top 50 % of a tiny Mixtral's matrices, top 25 % of a Llama's
    assert max(n for e in r["numel"] for n in e["per_rank"]) < 3 * full / world * share


@pytest.mark.parametrize("name", ["z2_dynamic", "z3_dynamic"])
def test_logged_trainable_params_count_whole_parameters(ds_results, name):
    # ZeRO-3 leaves 0-element placeholders between gathers: the metric must count the whole
    # parameters, as the trainable_numel recorded beside it does (it read 0 before).
    r = _get(ds_results, name)
    assert r["trainable_logged"], "no spectrum/trainable_params metric was logged"
    assert all(v > 0 for v in r["trainable_logged"])
    assert set(r["trainable_logged"]) <= {float(n) for n in r["trainable_numel"]}


def test_no_growth_over_10_switches(ds_results):
    r = _get(ds_results, "z3_switch10")
    # 10 real re-scans (lr 2e-2): a re-scan that leaves the selection as it was rebuilds
    # nothing, so the rebuilds are exactly the changes (nearly all of them change it, by the
    # last bits of the SVDs); the 80-step soak (test_soak.py) forces 39 switches
    changed = sum(1 for a, b in zip(r["selected"], r["selected"][1:]) if a != b)
    assert r["rebuilds"] == changed >= 7, (r["rebuilds"], changed)
    per_rank = [tuple(e["per_rank"]) for e in r["numel"]]
    assert len(set(per_rank)) == 1, per_rank  # same-size selections, same state: nothing accumulates
    assert r["live_old_optimizers"] == 0  # old ZeRO optimizers are garbage


# ---------------------------------------------------------------- 4/5. analyzer, GA, checkpointing
def test_zero3_scan_matches_zero2(ds_results):
    z2, z3 = _get(ds_results, "z2_dynamic"), _get(ds_results, "z3_dynamic")
    assert [h["selected"] for h in z2["history"]] == [h["selected"] for h in z3["history"]]
    # Under ZeRO-3 the analyzer gathers the partitioned weights (28 candidates scanned at the
    # start) and its cache (keyed by ds_tensor) reuses the 21 matrices that stayed frozen.
    for r in (z2, z3):
        stats = r["scan_stats"]
        assert stats[0]["scanned"] == 28
        later = [stats[2], stats[4]]  # update_every=2: re-scans at steps 2 and 4
        assert all(s["scanned"] == 7 and s["reused"] == 21 for s in later), (r["name"], later)


def test_zero3_nonreentrant_checkpointing_after_rebuilds(ds_results):
    # Non-reentrant checkpointing (the transformers default) recomputes inside backward; without
    # spectrum_callback._fence.deepspeed_internals.forget_stage3_module_state it gets empty weights
    # after a rebuild (stale pre_bwd_fn/post_bwd_fn).  The start-up selection happens before the
    # engine is built, so the rebuilds are the switches at steps 2 and 4; the same numbers as
    # plain PyTorch are checked in test_same_losses_and_weights_as_plain_pytorch.
    r = _get(ds_results, "z3_dynamic_gc_nonreentrant")
    assert r["rebuilds"] >= 2 and sorted(r["losses"], key=int) == ["1", "2", "3", "4", "5", "6"]
    assert len({tuple(h["selected"]) for h in r["history"]}) > 1


# ---------------------------------------------------------------- 6. checkpoints
@pytest.mark.parametrize("name", ["z2_resume", "z3_resume", "z2_resume_bf16"])
def test_resume_continues_with_same_losses(ds_results, name):
    r = _get(ds_results, name)
    assert "spectrum_state.json" in r["ckpt_files"]
    full, resumed = r["full_losses"], r["resumed_losses"]
    assert sorted(resumed) == ["4", "5", "6"]
    for step, loss in resumed.items():
        assert loss == full[step], (step, loss, full[step])
    assert r["resume_max_weight_diff"] == 0.0
    # scans 0 and 2 come from spectrum_state.json, 4 is rescanned: same steps and selections
    assert [h[0] for h in r["full_history"]] == [0, 2, 4]
    assert r["resumed_history"] == r["full_history"]
    assert r["violations"] == []


# ---------------------------------------------------------------- 7. the configurations users run
@pytest.mark.parametrize("name,optimizer", [
    *STATIC_OPTIMIZER.items(),
    ("z2_block_dynamic", "torch.optim.adamw.AdamW"), ("z2_offload_dynamic", "torch.optim.adamw.AdamW")])
def test_any_optimizer_trains_the_selection_only(ds_results, name, optimizer):
    """Static: the ZeRO optimizer is built over the selection before the engine exists, whatever
    the optimizer, DeepSpeed's blocks or offload; its state lives on the selection's flat
    partitions only (this rank's share of the trainable elements, plus alignment)."""
    r = _get(ds_results, name)
    assert r["optimizer_class"] == optimizer
    assert r["violations"] == [] and len(r["losses"]) >= 4
    for step_flats, trainable in zip(zip(*r["flat_numel"]), r["trainable_numel"]):
        assert all(trainable / r["world"] <= n <= trainable / r["world"] + 64 for n in step_flats)
    assert set(r["stray_state"]) == {0}
    if "static" in name:
        assert r["rebuilds"] == 0  # nothing was rebuilt: the optimizer and its blocks are DeepSpeed's own
    losses = [r["losses"][k] for k in sorted(r["losses"], key=int)]
    assert losses[-1] < losses[0]


def test_static_low_bit_resume_is_exact(ds_results):
    r = _get(ds_results, "z2_bnb8_resume")
    assert "spectrum_state.json" in r["ckpt_files"]
    assert sorted(r["resumed_losses"], key=int) == ["4", "5", "6"]
    for step, loss in r["resumed_losses"].items():
        assert loss == r["full_losses"][step], (step, loss, r["full_losses"][step])
    assert r["resume_max_weight_diff"] == 0.0 and r["violations"] == []


@pytest.mark.parametrize("name,words", [
    ("z2_bnb8_dynamic", ["dynamic Spectrum", "bitsandbytes.optim.adamw.AdamW", "static Spectrum (update_every=None)",
                         "on plain PyTorch or DDP;", "optim='adamw_torch'"]),
    ("z2_sched_dynamic", ["dynamic Spectrum", "'scheduler' block (WarmupDecayLR)", "lr_scheduler_type"]),
    ("z2_galore_static", ["optim='galore_adamw'", "flat 1-D partitions", "plain PyTorch and DDP"]),
    ("z2_bnb8_late_static", ["built over", "cannot be rebuilt over the selection", "bitsandbytes.optim.adamw.AdamW",
                             "Attach SpectrumCallback before trainer.train()"]),
])
def test_what_cannot_follow_is_refused_at_train_begin_with_what_works(ds_results, name, words):
    r = _get(ds_results, name)
    assert r["error"], "the run was not refused"
    for w in words:
        assert w in r["error"], (w, r["error"])


# ---------------------------------------------------------------- 8. what a switch moves between ranks
@pytest.mark.parametrize("name", ["z3_dynamic", "z3_switch10", "z3_moe_dynamic"])
def test_zero3_switch_moves_local_slices_only(ds_results, name):
    # ZeRO-3 partitions each parameter on its own: a stayer's fp32 master and moments stay on
    # the rank that holds them.  During a switch nothing of the optimizer state may be gathered:
    # no full-parameter read (get_full_hp_param, behind safe_get_full_*) and no all-gather beyond
    # the one DeepSpeed's stage-3 constructor makes itself (each trainable low-precision weight
    # once, to register its gradient hook).  Gathering the stayers' master and both moments, as
    # the backend did before, adds 3x each stayer's size and fails this.
    r = _get(ds_results, name)
    moved = [e for e in r["switch_comm"] if e["rebuilt"] and e["stayers"]]
    assert len(moved) >= (2 if "dynamic" in name else 10), r["switch_comm"]
    for e in moved:
        assert e["stage"] == 3 and e["full_reads"] == 0, e
        gathered = sum(n for op, (_, n) in e["ops"].items() if op.startswith("all_gather"))
        assert gathered <= e["trainable_numel"], e
        assert "all_reduce" not in e["ops"], e


@pytest.mark.parametrize("name", ["z2_dynamic", "z1_dynamic", "z2_dynamic_gc_bf16", "z2_moe_dynamic"])
def test_zero12_switch_keeps_stayers_state_in_place(ds_results, name):
    # ZeRO-1/2: the Trainer's optimizer is split at start-up into one param group per parameter,
    # and every rebuild keeps that layout, so a stayer's slice on each rank is the same before and
    # after a switch: its Adam tensors go into the new optimizer as they are, and (bf16) its fp32
    # master is copied into the new partition while DeepSpeed's constructor builds that group.
    # Nothing is staged and nothing is sent between ranks.  A backend that moved stayers through
    # flat multi-parameter groups staged their fragments and all-reduced each of them.
    r = _get(ds_results, name)
    switches = r["switch_comm"]
    # step 0: the optimizer was built over the start-up selection (no rebuild)
    assert switches and not switches[0]["rebuilt"] and switches[0]["ops"] == {}, switches
    moved = [e for e in switches[1:] if e["rebuilt"] and e["stayers"]]
    assert len(moved) == len(switches) - 1 >= 1, switches
    for e in moved:
        assert e["stage"] in (1, 2) and e["ops"] == {}, e
        ls = e["last_switch"]
        assert ls["kept_in_place"] == e["stayers"] and ls["staged_bytes"] == 0, ls
        assert ls["kept_in_place_bytes"] > 0 and ls["masters_after_build"] == 0, ls


def test_zero2_switch_from_the_trainers_layout(ds_results):
    # Without the start-up hook the engine holds every parameter in the Trainer's two groups.  The
    # first switch reassembles each stayer's bf16-run fp32 master from the fragments the ranks own
    # (one all-reduce per stayer: Adam has no state yet) and lays the optimizer out one group per
    # parameter; the later switches keep the stayers in place.  Same numbers as the run that was
    # laid out at start-up.
    late, hooked = _get(ds_results, "z2_late_bf16"), _get(ds_results, "z2_dynamic_gc_bf16")
    first, later = late["switch_comm"][0], late["switch_comm"][1:]
    assert first["rebuilt"] and first["ops"].get("all_reduce", [0])[0] == first["stayers"] > 0, first
    assert first["last_switch"]["kept_in_place"] == 0, first
    assert later and all(e["ops"] == {} and e["last_switch"]["kept_in_place"] == e["stayers"] for e in later), later
    assert late["violations"] == []
    assert [h["selected"] for h in late["history"]] == [h["selected"] for h in hooked["history"]]
    assert late["losses"] == hooked["losses"]
    a, b = _weights(ds_results, "z2_late_bf16"), _weights(ds_results, "z2_dynamic_gc_bf16")
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_zero2_resume_from_the_trainers_layout(ds_results):
    # A ZeRO-2 checkpoint in the Trainer's two groups (a static run; every ZeRO-1/2 checkpoint
    # written before one group per parameter) resumed by a dynamic run: it must load into that
    # layout (splitting the optimizer first made DeepSpeed refuse the checkpoint), continue with
    # the same numbers until the first switch, then move to one group per parameter.
    r = _get(ds_results, "z2_resume_untagged")
    assert r["violations"] == [], r["violations"][:5]
    assert sorted(r["resumed_losses"], key=int) == ["4", "5", "6", "7"]
    # step 4 runs before any switch of the resumed run (the scan at step 4 precedes step 5): same loss
    assert r["resumed_losses"]["4"] == r["full_losses"]["4"]
    first, *later = [e for e in r["resumed_switch_comm"] if e["rebuilt"]]
    assert first["stayers"] > 0 and first["last_switch"]["kept_in_place"] == 0, first
    assert first["ops"].get("all_reduce", [0])[0] == 2 * first["stayers"], first  # exp_avg, exp_avg_sq
    assert later and all(e["ops"] == {} and e["last_switch"]["kept_in_place"] == e["stayers"] for e in later), later


def test_zero12_layout_follows_the_schedule(ds_results):
    # One group per parameter only where switches come (dynamic); a static run keeps the
    # Trainer's groups (decay / no decay), whose collectives are fewer.
    static, dynamic = _get(ds_results, "z2_static"), _get(ds_results, "z2_dynamic")
    assert static["zero_groups"] <= 2 < static["trainable_tensors"], static["zero_groups"]
    assert dynamic["zero_groups"] == dynamic["trainable_tensors"], dynamic["zero_groups"]


@pytest.mark.parametrize("name", [n for n, _ in POLICY_RUNS])
def test_moving_policies_switch_every_time_and_park_on_the_host(ds_results, name):
    r = _get(ds_results, name)
    picks = [h["selected"] for h in r["history"]]
    assert len(picks) >= 3 and all(a != b for a, b in zip(picks, picks[1:]))
    if "park" in name:  # leavers' slices wait in host memory; the device keeps one active set
        assert max(r["parked_bytes"]) > 0
        assert len({tuple(e["per_rank"]) for e in r["numel"][1:]}) == 1
    else:
        assert set(r["parked_bytes"]) == {0}
