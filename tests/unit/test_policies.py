"""Selection policies (scan, rotate, random, cyclic), parked state, and their checks."""
from __future__ import annotations

import json
import math

import pytest
import torch

from spectrum_callback import SpectrumAnalyzer, SpectrumCallback, SpectrumConfig, SpectrumSession
from spectrum_callback.policies import (CyclicPolicy, RandomPolicy, RotatePolicy, ScanPolicy, SelectionPolicy,
                                        policy_input)
from tiny import RandomTokens, tiny_model, training_args

TYPES = 7  # a tiny Llama's matrix types (q, k, v, o, gate, up, down)


def _units(layers=8, snr=True, never=()):
    names = [f"model.layers.{i}.{t}" for i in range(layers) for t in ("self_attn.q_proj", "mlp.up_proj")]
    types = {n: n.split(".", 3)[3] for n in names}
    values = {n: float(int(n.split(".")[2]) * 7 % layers) for n in names} if snr else None
    return policy_input(names, types, {n: int(n.split(".")[2]) for n in names}, 0.25, 1, never, snr=values)


def test_rotate_moves_through_the_pool_and_covers_it_every_cycle():
    units = _units(layers=12)  # budget 3 of 12 per type, pool 6 (2 x top_pct)
    policy = RotatePolicy(pool_pct=0.5)
    picks = [set(policy.select(i, units)) for i in range(6)]
    pool = set(policy.pool["self_attn.q_proj"]) | set(policy.pool["mlp.up_proj"])
    assert picks[0] == set(ScanPolicy().select(0, units))  # the first selection is the scan's
    assert all(a != b for a, b in zip(picks, picks[1:]))  # every switch changes the selection
    for i in range(len(picks) - 1):  # ceil(6 / 3) = 2 consecutive selections cover the pool
        assert picks[i] | picks[i + 1] == pool
    assert all(p <= pool for p in picks)
    again = RotatePolicy(pool_pct=0.5)
    again.load_state_dict(json.loads(json.dumps(policy.state_dict())))
    assert set(again.select(6, units)) == set(policy.select(6, units))


def test_random_is_seeded_resumable_and_respects_never_train():
    units = _units(never=[r"layers\.0\."])
    a, b = RandomPolicy(seed=3), RandomPolicy(seed=3)
    seq_a = [a.select(i, units) for i in range(5)]
    assert seq_a == [b.select(i, units) for i in range(5)]
    assert len({tuple(sorted(s)) for s in seq_a}) > 1
    assert not any(".layers.0." in n for s in seq_a for n in s)
    assert all(len(s) == 4 for s in seq_a)  # 2 per type of 8
    state = json.loads(json.dumps(a.state_dict()))
    c = RandomPolicy(seed=99)
    c.load_state_dict(state)
    assert c.select(5, units) == a.select(5, units)
    assert RandomPolicy(seed=4).select(0, _units()) != RandomPolicy(seed=3).select(0, _units())


def test_cyclic_walks_contiguous_windows_in_layer_order_and_wraps():
    units = _units(layers=8, snr=False)
    policy = CyclicPolicy()
    layers = [sorted({int(n.split(".")[2]) for n in policy.select(i, units)}) for i in range(5)]
    assert layers == [[0, 1], [2, 3], [4, 5], [6, 7], [0, 1]]


def _run(policy, steps=9, update_every=2, monkeypatch=None, **kw):
    """A plain loop; returns the session, per-step selections and optimizer state sizes."""
    model = tiny_model("llama", layers=8)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    session = SpectrumSession(model, opt, SpectrumConfig(top_pct=0.25, update_every=update_every, policy=policy,
                                                         **kw))
    session.start()
    data = RandomTokens()
    sizes, picks, moved = [], [], []
    for step in range(steps):
        session.maybe_switch(step)
        frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
        batch = {k: torch.stack([data[i][k] for i in range(4)]) for k in data[0]}
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
        named = dict(model.named_parameters())
        moved += [n for n, w in frozen.items() if not torch.equal(named[n], w)]
        sizes.append(sum(v.numel() for st in opt.state.values() for v in st.values() if v.ndim > 0))
        picks.append(list(session.selected))
    assert moved == []  # frozen bits never change, whatever the policy
    return session, picks, sizes, opt


@pytest.mark.parametrize("policy", ["rotate", "random", "cyclic"])
def test_moving_policies_change_the_selection_at_every_switch_with_one_active_set_of_state(policy, monkeypatch):
    scans = {"n": 0}
    real_scan = SpectrumAnalyzer.scan

    def counting(self, names=None):
        scans["n"] += 1
        return real_scan(self, names)

    monkeypatch.setattr(SpectrumAnalyzer, "scan", counting)
    session, picks, sizes, _ = _run(policy)
    switches = [h for h in session.history[1:]]
    assert [h["step"] for h in session.history] == [0, 2, 4, 6, 8]
    assert all(h["joined"] and h["left"] for h in switches) and all(h["source"] == policy for h in session.history)
    assert len(set(sizes)) == 1  # the state of one active set, across switches
    assert all(len(p) == 2 * TYPES for p in picks)  # 2 of 8 layers per type
    assert scans["n"] == (1 if policy == "rotate" else 0)  # rotate scans once; random and cyclic never
    assert ("snr" in session.history[0]) == (policy == "rotate")


def test_random_resume_continues_the_same_sequence(monkeypatch):
    full, picks, _, _ = _run("random", steps=9, seed=5)
    model = tiny_model("llama", layers=8)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    first = SpectrumSession(model, opt, SpectrumConfig(top_pct=0.25, update_every=2, policy="random", seed=5))
    first.start()
    for step in range(5):
        first.maybe_switch(step)
    state = json.loads(json.dumps(first.state_dict()))
    first.close()
    model2 = tiny_model("llama", layers=8)
    second = SpectrumSession(model2, torch.optim.AdamW(model2.parameters(), lr=1e-3),
                             SpectrumConfig(top_pct=0.25, update_every=2, policy="random", seed=5))
    second.load_state_dict(state)
    for step in range(5, 9):
        second.maybe_switch(step)
    assert [h["selected"] for h in second.history] == [h["selected"] for h in full.history]


def test_parked_state_comes_back_when_a_matrix_rejoins():
    session, picks, sizes, opt = _run("rotate", steps=5, update_every=2, park_state=True)
    # rotate over a pool of 2 windows: the step-0 set left at step 2 and rejoined at step 4
    assert set(picks[0]) == set(picks[4]) and not set(picks[0]) & set(picks[2])
    back = [p for n, p in session.model.named_parameters() if n.rsplit(".", 1)[0] in picks[4]]
    steps = {int(opt.state[p]["step"]) for p in back}
    assert steps == {3}  # two steps before leaving, one after coming back: bias correction goes on
    assert session.metrics["spectrum/parked_state_bytes"] > 0
    assert session.backend.parked_bytes() == session.metrics["spectrum/parked_state_bytes"]
    assert len(set(sizes)) == 1  # device state stays at one active set

    dropped, dpicks, _, dopt = _run("rotate", steps=5, update_every=2)
    assert {int(dopt.state[p]["step"]) for n, p in dropped.model.named_parameters()
            if n.rsplit(".", 1)[0] in dpicks[4]} == {1}  # without parking they start afresh
    assert "spectrum/parked_state_bytes" not in dropped.metrics


class _EveryOther(SelectionPolicy):
    """A user's policy: the even layers, then the odd ones."""
    name = "every_other"

    def __init__(self):
        self.turn = 0

    def needs_snr(self, first):
        return False

    def select(self, step, units):
        self.turn += 1
        return [n for n in units.names if units.eligible[n] and units.layers[n] % 2 == self.turn % 2]

    def state_dict(self):
        return {"turn": self.turn}

    def load_state_dict(self, state):
        self.turn = state["turn"]


def test_a_users_policy_object_plugs_in():
    session, picks, _, _ = _run(_EveryOther(), steps=5, update_every=2)
    assert {int(n.split(".")[2]) % 2 for n in picks[0]} == {1} and {int(n.split(".")[2]) % 2 for n in picks[2]} == {0}
    assert session.state_dict()["policy"] == {"name": "every_other", "state": {"turn": 3}}


def test_scan_reports_its_margin_and_says_when_rescans_stay_idle(spectrum_log):
    spectrum_log.set_level("INFO", logger="spectrum_callback")
    model = tiny_model("llama", layers=8)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-9)  # nothing moves: every re-scan is idle
    session = SpectrumSession(model, opt, SpectrumConfig(top_pct=0.25, update_every=1))
    session.start()
    assert session.metrics["spectrum/selection_margin"] > 0
    for step in range(1, 4):
        session.maybe_switch(step)
    assert "1 re-scan(s) in a row changed nothing" in spectrum_log.text
    assert "2 re-scan(s)" not in spectrum_log.text  # once, then every 10
    assert math.isfinite(session.metrics["spectrum/selection_margin"])


def test_min_per_type_that_trains_far_more_than_top_pct_is_said(spectrum_log):
    model = tiny_model("llama", layers=1)  # one matrix per type: min_per_type=1 trains all
    SpectrumSession(model, torch.optim.AdamW(model.parameters()), SpectrumConfig(top_pct=0.25)).start()
    assert "7 of 7 candidate matrices train (100%), not the 25% of top_pct" in spectrum_log.text


def test_callback_takes_the_policy_and_the_trainers_seed(tmp_path):
    import transformers

    def run(seed):
        cb = SpectrumCallback(top_pct=0.25, update_every=2, policy="random")
        tr = transformers.Trainer(model=tiny_model("llama", layers=8), train_dataset=RandomTokens(),
                                  args=training_args(tmp_path / str(seed), max_steps=6, seed=seed), callbacks=[cb])
        tr.train()
        return [h["selected"] for h in cb.history], cb

    a, cb = run(1)
    assert a == run(1)[0] and a != run(2)[0]
    assert [h["source"] for h in cb.history] == ["random"] * 3 and cb.session.config.seed == 1


@pytest.mark.parametrize("park", [True, False])
def test_trainer_resume_of_a_moving_policy_continues_exactly(tmp_path, park):
    """The policy's place in its sequence (and, with park_state, the parked moments, one file
    per rank) go with the checkpoint: a resumed run gives the uninterrupted run's losses."""
    import transformers

    def trainer(out, model, cb):
        args = training_args(out, max_steps=9, save_strategy="steps", save_steps=5, seed=3)
        return transformers.Trainer(model=model, args=args, train_dataset=RandomTokens(), callbacks=[cb])

    kw = dict(top_pct=0.25, update_every=2, policy="rotate", park_state=park)
    full_cb = SpectrumCallback(**kw)
    tr = trainer(tmp_path, tiny_model("llama", layers=8), full_cb)
    tr.train()
    full = [h["loss"] for h in tr.state.log_history if "loss" in h]
    ckpt = tmp_path / "checkpoint-5"
    assert (ckpt / "spectrum_parked.rank0.pt").exists() == park
    cb = SpectrumCallback(**kw)
    tr2 = trainer(tmp_path / "resumed", tiny_model("llama", layers=8, seed=1), cb)
    tr2.train(resume_from_checkpoint=str(ckpt))
    resumed = [h["loss"] for h in tr2.state.log_history if "loss" in h and h["step"] > 5]
    assert [h["selected"] for h in cb.history] == [h["selected"] for h in full_cb.history]
    assert resumed == pytest.approx(full[5:], rel=1e-6)


@pytest.mark.parametrize("policy", ["rotate", "random", "cyclic"])
def test_plots_follow_every_policy(policy, tmp_path, monkeypatch):
    """The selection-over-time PNG is drawn from the history whatever the policy (random and
    cyclic never scan, so there is no SNR heatmap for them), and names the policy."""
    import matplotlib.figure

    from spectrum_callback.plotting import write_plots

    titles = []
    real = matplotlib.figure.Figure.suptitle

    def spy(fig, t, **kw):
        titles.append(t)
        return real(fig, t, **kw)

    monkeypatch.setattr(matplotlib.figure.Figure, "suptitle", spy)
    session, picks, _, _ = _run(policy)
    written = sorted(p.rsplit("/", 1)[-1] for p in write_plots(session.history, session.selected, str(tmp_path)))
    want = ["spectrum_selection.png"] + (["spectrum_snr.png"] if policy == "rotate" else [])
    assert written == sorted(want) == sorted(p.name for p in tmp_path.iterdir())
    assert all((tmp_path / w).stat().st_size > 5000 for w in written)
    assert any(t.endswith(f"; {policy}") for t in titles)


def test_heatmap_gives_each_type_its_own_colour_scale():
    """q_proj's SNRs sit within 1 % of each other, o_proj's span a factor 100: on one log scale
    q_proj would be one flat colour; per type, each row spans the whole scale."""
    import numpy as np

    from spectrum_callback.plotting import _row_scaled

    logv = np.log10(np.array([[1.00, 1.005, 1.01, np.nan], [1.0, 10.0, 100.0, 30.0]]))
    scaled, ranges = _row_scaled(logv)
    for row in scaled:
        finite = row[np.isfinite(row)]
        assert finite.min() == 0.0 and finite.max() == 1.0
    assert scaled[0, 1] == pytest.approx(0.5, abs=0.01) and np.isnan(scaled[0, 3])
    assert 10 ** ranges[1][1] == pytest.approx(100.0)
    flat, _ = _row_scaled(np.array([[0.3, 0.3]]))
    assert flat.tolist() == [[0.5, 0.5]]
