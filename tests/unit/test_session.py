"""SpectrumSession in a plain PyTorch loop: the same run as through the Trainer, exact resume,
misuse refused, and the README's custom-loop example run as written."""
from __future__ import annotations

import json
import os
import re

import pytest
import torch
import transformers

from spectrum_callback import SpectrumAnalyzer, SpectrumCallback, SpectrumConfig, SpectrumSession
from spectrum_callback.session import SpectrumUsageError
from dsrun import ROOT
from tiny import RandomTokens, rotating_scan, tiny_model, training_args

pytestmark = pytest.mark.stack  # version-sensitive: runs on every CI stack

STEPS, BATCH, LR, WD = 6, 4, 5e-3, 0.1


@pytest.fixture
def rotating(monkeypatch):
    scan, calls = rotating_scan()
    monkeypatch.setattr(SpectrumAnalyzer, "scan", scan)
    return calls


def _optimizer(model):
    """The Trainer's AdamW layout: matrices decay, 1-D parameters (norms) do not."""
    named = list(model.named_parameters())
    return torch.optim.AdamW([{"params": [p for _, p in named if p.ndim >= 2], "weight_decay": WD},
                              {"params": [p for _, p in named if p.ndim < 2], "weight_decay": 0.0}], lr=LR)


def _batches():
    data = RandomTokens()
    for i in range(0, STEPS * BATCH, BATCH):
        rows = [data[j] for j in range(i, i + BATCH)]
        yield {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def _plain_loop(model, session, optimizer, scheduler, steps=range(STEPS), batches=None, checks=None):
    losses = {}
    batches = list(_batches()) if batches is None else batches
    for step in steps:
        session.maybe_switch(step)
        frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
        loss = model(**batches[step]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        losses[step] = loss.item()
        if checks is not None:
            named = dict(model.named_parameters())
            checks["frozen_moved"] += [n for n, w in frozen.items() if not torch.equal(named[n], w)]
            trainable = {id(p) for p in model.parameters() if p.requires_grad}
            checks["state_outside"] += [i for i in map(id, optimizer.state) if i not in trainable]
            checks["selections"].append(list(session.selected))
    return losses


def _session_run(update_every=2):
    model = tiny_model("llama")
    optimizer = _optimizer(model)
    scheduler = transformers.get_scheduler("linear", optimizer, num_warmup_steps=0, num_training_steps=STEPS)
    session = SpectrumSession(model, optimizer, SpectrumConfig(top_pct=0.25, update_every=update_every),
                              lr_scheduler=scheduler)
    session.start()
    return model, optimizer, scheduler, session


def test_plain_loop_matches_the_trainer_and_keeps_frozen_bits(tmp_path, rotating):
    model, optimizer, scheduler, session = _session_run()
    checks = {"frozen_moved": [], "state_outside": [], "selections": []}
    losses = _plain_loop(model, session, optimizer, scheduler, checks=checks)
    assert checks["frozen_moved"] == [] and checks["state_outside"] == []
    assert len({tuple(s) for s in checks["selections"]}) >= 3  # the rotating scan moved the selection
    assert [h["step"] for h in session.history] == [0, 2, 4]
    assert all(h["joined"] and h["left"] for h in session.history[1:])

    rotating["n"] = 0
    ref_model = tiny_model("llama")
    cb = SpectrumCallback(top_pct=0.25, update_every=2)
    seen = {}

    class Losses(transformers.TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                seen[state.global_step - 1] = logs["loss"]

    args = training_args(tmp_path, optim="adamw_torch", train_sampling_strategy="sequential", max_steps=STEPS,
                         learning_rate=LR, weight_decay=WD)
    trainer = transformers.Trainer(model=ref_model, train_dataset=RandomTokens(), callbacks=[cb, Losses()], args=args)
    trainer.train()
    assert cb.history == session.history
    assert sorted(seen) == list(range(STEPS))
    for step in range(STEPS):
        assert losses[step] == pytest.approx(seen[step], rel=1e-6)
    for (n, a), b in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=n)


def test_state_dict_round_trip_resumes_identically(rotating):
    model, optimizer, scheduler, session = _session_run()
    batches = list(_batches())
    full = _plain_loop(model, session, optimizer, scheduler, batches=batches)
    final = {n: p.detach().clone() for n, p in model.named_parameters()}

    rotating["n"] = 0
    model, optimizer, scheduler, session = _session_run()
    first = _plain_loop(model, session, optimizer, scheduler, steps=range(3), batches=batches)
    saved = json.loads(json.dumps(session.state_dict()))  # JSON-serialisable
    opt_state, sched_state = optimizer.state_dict(), scheduler.state_dict()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    calls = rotating["n"]

    rotating["n"] = calls  # the fake scanner continues where the run was
    model2 = tiny_model("llama", seed=1)
    model2.load_state_dict(weights)
    optimizer2 = _optimizer(model2)
    scheduler2 = transformers.get_scheduler("linear", optimizer2, num_warmup_steps=0, num_training_steps=STEPS)
    session2 = SpectrumSession(model2, optimizer2, SpectrumConfig(top_pct=0.25, update_every=2),
                               lr_scheduler=scheduler2)
    session2.load_state_dict(saved)
    assert session2.selected == session.selected and session2.history == session.history
    trainable = {id(p) for p in model2.parameters() if p.requires_grad}
    assert not any(p.requires_grad for n, p in model2.named_parameters()
                   if ".layers." in n and n.rsplit(".", 1)[0] not in session2.selected and p.ndim == 2)
    optimizer2.load_state_dict(opt_state)
    scheduler2.load_state_dict(sched_state)
    assert {id(p) for p in optimizer2.state} <= trainable
    rest = _plain_loop(model2, session2, optimizer2, scheduler2, steps=range(3, STEPS), batches=batches)
    assert {**first, **rest} == full
    for n, p in model2.named_parameters():
        assert torch.equal(p, final[n]), n
    assert [h["step"] for h in session2.history] == [0, 2, 4]


def test_static_session_selects_once_and_never_switches():
    model = tiny_model("llama")
    optimizer = _optimizer(model)
    session = SpectrumSession(model, optimizer, SpectrumConfig(top_pct=0.25))
    selected = session.start()
    assert selected == session.selected and len(selected) == 7  # one of 4 layers per type, 7 types
    assert not any(session.maybe_switch(step) for step in range(1, 50))
    assert len(session.history) == 1 and session.history[0]["source"] == "scan"
    assert session.metrics["spectrum/selected_modules"] == 7.0


def test_misuse_is_refused_with_a_clear_error():
    model = tiny_model("llama")
    optimizer = _optimizer(model)
    session = SpectrumSession(model, optimizer, SpectrumConfig(top_pct=0.25, update_every=2))
    with pytest.raises(SpectrumUsageError, match="before start"):
        session.maybe_switch(0)
    session.start()
    session.maybe_switch(3)
    with pytest.raises(SpectrumUsageError, match="went backwards"):
        session.maybe_switch(2)
    with pytest.raises(ValueError, match="integer >= 0"):
        session.maybe_switch(-1)
    with pytest.raises(SpectrumUsageError, match="called already"):
        session.start()
    with pytest.raises(SpectrumUsageError, match="another SpectrumSession already drives this model"):
        SpectrumSession(model, optimizer, SpectrumConfig())
    with pytest.raises(TypeError, match="SpectrumConfig"):
        SpectrumSession(tiny_model("llama"), optimizer, {"top_pct": 0.25})
    with pytest.raises(ValueError, match="needs the optimizer"):
        SpectrumSession(tiny_model("llama"), None).start()
    session.close()  # then another session may take the model over
    other = SpectrumSession(model, optimizer, SpectrumConfig(top_pct=0.5))
    assert len(other.start()) == 14


def test_ddp_without_find_unused_parameters_is_refused(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        model = tiny_model("llama")
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        with pytest.raises(ValueError, match="find_unused_parameters=True"):
            SpectrumSession(ddp, _optimizer(model), SpectrumConfig()).start()
        ddp = torch.nn.parallel.DistributedDataParallel(tiny_model("llama"), find_unused_parameters=True)
        session = SpectrumSession(ddp, _optimizer(ddp.module), SpectrumConfig())
        assert session.model is ddp.module and len(session.start()) == 7
    finally:
        dist.destroy_process_group()


def _guide_example():
    text = open(os.path.join(ROOT, "docs", "guide", "custom_loops.md")).read()
    m = re.search(r"<!-- custom-loop-example -->\s*```python\n(.*?)```", text, re.S)
    assert m, "docs/guide/custom_loops.md lacks the custom-loop example"
    return m.group(1)


def test_the_guides_custom_loop_example_runs(capsys):
    model = tiny_model("llama")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loader = list(_batches()) * 4  # 24 steps: re-scans at 10 and 20
    namespace = {"model": model, "loader": loader}
    exec(compile(_guide_example(), "custom_loops.md", "exec"), namespace)
    session = namespace["session"]
    assert [h["step"] for h in session.history] == [0, 10, 20]
    assert str(session.selected) in capsys.readouterr().out
    trained = {n.rsplit(".", 1)[0] for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    ever = {m for h in session.history for m in h["selected"]}
    assert trained and trained <= ever  # only matrices Spectrum selected moved


def test_state_reads_minimal_files_and_refuses_bad_ones(tmp_path):
    from spectrum_callback import SpectrumState

    old = {"format": "spectrum_callback.state", "version": 1, "top_pct": 0.25, "update_every": 2, "min_per_type": 1,
           "last_scan_step": 4, "selected": ["model.layers.1.mlp.up_proj"], "history": [], "global_step": 6}
    st = SpectrumState.from_dict(old)  # a minimal file: no config, trainable or step
    assert (st.step, st.last_scan_step, st.trainable) == (6, 4, None)
    assert st.config == {"top_pct": 0.25, "update_every": 2, "min_per_type": 1}
    round_trip = SpectrumState.from_dict(json.loads(json.dumps(st.to_dict())))
    assert round_trip.to_dict() == st.to_dict()
    path = st.write(str(tmp_path / "spectrum_state.json"))
    assert SpectrumState.read(str(tmp_path)).selected == st.selected == SpectrumState.read(path).selected
    for bad, match in [({**old, "version": 9}, "upgrade spectrum_callback"), ({**old, "format": "x"}, "not a"),
                       ({**old, "selected": "q_proj"}, "damaged"), ({**old, "version": True}, "not a")]:
        with pytest.raises(ValueError, match=match):
            SpectrumState.from_dict(bad)
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        SpectrumState.read(str(tmp_path / "broken.json"))
    assert SpectrumState.find([None, str(tmp_path / "nowhere")]) is None
