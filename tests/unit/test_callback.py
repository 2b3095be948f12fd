import json
import logging

import pytest
import torch
import transformers
from transformers import TrainerCallback

from spectrum_callback import SpectrumAnalyzer, SpectrumCallback
from spectrum_callback.backends import unwrap_optimizer
from spectrum_callback.callback import STATE_FILE
import tiny
from tiny import RandomTokens, snapshot, tiny_model, training_args

pytestmark = pytest.mark.stack  # version-sensitive: runs on every CI stack


def make_trainer(tmp_path, model=None, callbacks=(), **kw):
    model = model if model is not None else tiny_model("llama", layers=4)
    args = training_args(tmp_path / "out", **kw)
    tr = transformers.Trainer(model=model, args=args, train_dataset=RandomTokens(n=64))
    for cb in callbacks:
        tr.add_callback(cb)
    return tr


def rotating_scan(monkeypatch):
    """Make every scan move the best layer of each type by one: each scan swaps the selection."""
    scan, calls = tiny.rotating_scan()
    monkeypatch.setattr(SpectrumAnalyzer, "scan", scan)
    return calls


class Recorder(TrainerCallback):
    """Checks, around every optimizer step, what the Spectrum callback promises."""

    def __init__(self, spectrum):
        self.spectrum = spectrum
        self.steps = []
        self.frozen_violations = []
        self.state_violations = []
        self.fresh_steps = []
        self.prev_trainable = None

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kw):
        self.before = snapshot(model)
        self.trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        self.joined = self.trainable - (self.prev_trainable or self.trainable)
        self.prev_trainable = set(self.trainable)

    def on_substep_end(self, args, state, control, model=None, **kw):
        # Nothing may switch inside a gradient-accumulation cycle.
        now = {n for n, p in model.named_parameters() if p.requires_grad}
        assert now == self.trainable

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kw):
        opt = unwrap_optimizer(optimizer)
        by_id = {id(p): n for n, p in model.named_parameters()}
        after = dict(model.named_parameters())
        for n, old in self.before.items():
            if n not in self.trainable and not torch.equal(old, after[n].detach()):
                self.frozen_violations.append((state.global_step, n))
        with_state = {by_id[id(p)] for p in opt.state}
        if with_state != self.trainable:
            self.state_violations.append((state.global_step, sorted(with_state ^ self.trainable)[:3]))
        for p, st in opt.state.items():
            if by_id[id(p)] in self.joined:
                self.fresh_steps.append(float(st["step"]))
        self.steps.append(state.global_step)


def test_static_freezes_bitwise_with_weight_decay(tmp_path):
    model = tiny_model("llama", layers=4)
    before = snapshot(model)
    cb = SpectrumCallback(top_pct=0.25)
    rec = Recorder(cb)
    tr = make_trainer(tmp_path, model, [cb, rec], weight_decay=0.1, max_steps=5)
    tr.train()
    after = snapshot(model)
    changed = {n.rsplit(".", 1)[0] for n in before if not torch.equal(before[n], after[n])}
    assert len(cb.selected) == 7  # 4 layers x 7 types x 25 % -> 1 per type
    assert changed == set(cb.selected)
    assert rec.frozen_violations == [] and rec.state_violations == []
    opt = unwrap_optimizer(tr.optimizer)
    sel_params = [p for n in cb.selected for p in model.get_submodule(n).parameters()]
    assert cb.backend.state_numel() == 2 * sum(p.numel() for p in sel_params)
    assert len(opt.state) == len(sel_params)
    logged = [h for h in tr.state.log_history if "spectrum/selected_modules" in h]
    assert logged and logged[0]["spectrum/selected_modules"] == 7
    assert any(k.startswith("spectrum/snr_mean/") for k in logged[0])
    assert len(cb.history) == 1 and cb.history[0]["step"] == 0


def test_dynamic_moves_optimizer_state_with_selection(tmp_path, monkeypatch):
    calls = rotating_scan(monkeypatch)
    cb = SpectrumCallback(top_pct=0.25, update_every=2)
    rec = Recorder(cb)
    tr = make_trainer(tmp_path, None, [cb, rec], max_steps=8, weight_decay=0.1)
    tr.train()
    assert calls["n"] == 4  # steps 0, 2, 4, 6
    assert [h["step"] for h in cb.history] == [0, 2, 4, 6]
    for prev, cur in zip(cb.history, cb.history[1:]):
        assert set(prev["selected"]) != set(cur["selected"])
        assert len(cur["joined"]) == 7 and len(cur["left"]) == 7
    assert rec.frozen_violations == []
    assert rec.state_violations == []
    # joiners start from fresh state: their Adam step counter is 1 after their first step
    assert rec.fresh_steps and set(rec.fresh_steps) == {1.0}
    # optimizer memory follows the (constant-size) selection: never more than one set of moments
    key = "spectrum/optimizer_state_numel"
    numels = [h[key] for h in tr.state.log_history if key in h]
    assert len(numels) == 4 and max(numels[1:]) == numels[1]
    # the lr schedule is untouched by switches
    lrs = [h["learning_rate"] for h in tr.state.log_history if "learning_rate" in h]
    assert lrs == pytest.approx([5e-3 * (1 - i / 8) for i in range(8)])


def test_stayers_keep_state(tmp_path, monkeypatch):
    # Scans that always give the same ranking: the state must survive (no reset at rescans).
    cb = SpectrumCallback(top_pct=0.25, update_every=2)

    class StepProbe(TrainerCallback):
        steps = []

        def on_step_end(self, args, state, control, optimizer=None, **kw):
            opt = unwrap_optimizer(optimizer)
            self.steps.append(max(float(s["step"]) for s in opt.state.values()))

    probe = StepProbe()
    tr = make_trainer(tmp_path, None, [cb, probe], max_steps=6, learning_rate=1e-5)
    tr.train()
    assert all(h["selected"] == cb.history[0]["selected"] for h in cb.history)
    assert probe.steps == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]


def test_gradient_accumulation_switches_between_steps_only(tmp_path, monkeypatch):
    calls = rotating_scan(monkeypatch)
    cb = SpectrumCallback(top_pct=0.25, update_every=3)
    rec = Recorder(cb)
    tr = make_trainer(tmp_path, None, [cb, rec], max_steps=7, gradient_accumulation_steps=3,
                      per_device_train_batch_size=2)
    tr.train()
    assert calls["n"] == 3
    assert [h["step"] for h in cb.history] == [0, 3, 6]
    assert rec.frozen_violations == [] and rec.state_violations == []


def test_real_dynamic_rescan_only_rescans_trained(tmp_path):
    cb = SpectrumCallback(top_pct=0.25, update_every=2)
    tr = make_trainer(tmp_path, None, [cb], max_steps=5, learning_rate=2e-2)
    tr.train()
    scans = [h for h in tr.state.log_history if "spectrum/scanned" in h]
    assert [s["spectrum/scanned"] for s in scans] == [28.0, 7.0, 7.0]


def test_resume_restores_selection_history_and_losses(tmp_path, monkeypatch):
    rotating_scan(monkeypatch)
    full_cb = SpectrumCallback(top_pct=0.25, update_every=2)
    tr = make_trainer(tmp_path / "a", tiny_model("llama", layers=4), [full_cb], max_steps=8,
                      save_strategy="steps", save_steps=3)
    tr.train()
    full_losses = [h["loss"] for h in tr.state.log_history if "loss" in h]
    ckpt = tmp_path / "a" / "out" / "checkpoint-3"
    saved = json.loads((ckpt / STATE_FILE).read_text())
    assert saved["format"] == "spectrum_callback.state" and saved["version"] == 1
    assert saved["global_step"] == 3 and [h["step"] for h in saved["history"]] == [0, 2]

    rotating_scan(monkeypatch)["n"] = 2  # the fake scanner continues where the run was
    cb = SpectrumCallback(top_pct=0.25, update_every=2)
    tr2 = make_trainer(tmp_path / "a", tiny_model("llama", layers=4, seed=1), [cb], max_steps=8,
                       save_strategy="steps", save_steps=3)
    tr2.train(resume_from_checkpoint=str(ckpt))
    assert [h["step"] for h in cb.history] == [h["step"] for h in full_cb.history]
    assert cb.history[1]["selected"] == full_cb.history[1]["selected"]
    assert cb.selected == full_cb.selected
    losses = [h["loss"] for h in tr2.state.log_history if "loss" in h and h["step"] > 3]
    assert len(losses) == 5 and len(full_losses) == 8
    assert losses == pytest.approx(full_losses[3:], rel=1e-5)


def test_resume_without_state_file_scans_afresh(tmp_path, spectrum_log):
    tr = make_trainer(tmp_path, None, [], max_steps=2, save_strategy="steps", save_steps=2)
    tr.train()
    ckpt = tmp_path / "out" / "checkpoint-2"
    assert not (ckpt / STATE_FILE).exists()
    cb = SpectrumCallback(top_pct=0.25)
    tr2 = make_trainer(tmp_path, None, [cb], max_steps=3)
    tr2.train(resume_from_checkpoint=str(ckpt))
    assert "has no spectrum_state.json" in spectrum_log.text
    assert [h["step"] for h in cb.history] == [2] and len(cb.selected) == 7


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(always_train=[r"^nothing_like_this$"]), "always_train pattern"),
        (dict(never_train=[r"no_such_module"]), "never_train pattern"),
        (dict(include=[r"no_such_module"]), "include pattern"),
        (dict(exclude=[r".*"]), "no candidate weight matrices"),
    ],
)
def test_bad_patterns_at_train_begin(tmp_path, kwargs, match):
    tr = make_trainer(tmp_path, None, [SpectrumCallback(**kwargs)], max_steps=1)
    with pytest.raises(ValueError, match=match):
        tr.train()


def test_always_train_and_never_train(tmp_path):
    model = tiny_model("llama", layers=4)
    before = snapshot(model)
    cb = SpectrumCallback(top_pct=0.25, always_train=[r"^lm_head\.weight$"], never_train=[r"layers\.0\."])
    tr = make_trainer(tmp_path, model, [cb], max_steps=2)
    tr.train()
    assert not any(".layers.0." in n for n in cb.selected)
    assert not torch.equal(before["lm_head.weight"], model.lm_head.weight)
    assert torch.equal(before["model.embed_tokens.weight"], model.model.embed_tokens.weight)


def test_snr_json_import(tmp_path):
    from spectrum_callback import save_snr_json

    model = tiny_model("llama", layers=4)
    snr = SpectrumAnalyzer(model, progress=False).scan()
    # invert the ranking: the file decides, not a fresh scan
    for v in snr.values():
        v["snr"] = -v["snr"]
    path = save_snr_json(snr, tmp_path / "snr.json")
    cb = SpectrumCallback(top_pct=0.25, snr_json=str(path))
    make_trainer(tmp_path, model, [cb], max_steps=1).train()
    from spectrum_callback import select_top

    assert cb.selected == select_top(snr, 0.25)
    bad = {"other.layers.0.x": {"snr": 1.0, "type": "x"}}
    tr = make_trainer(tmp_path, tiny_model("llama", layers=4), [SpectrumCallback(snr_json=bad)], max_steps=1)
    with pytest.raises(ValueError, match="another model"):
        tr.train()


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_with_frozen_embeddings(tmp_path, reentrant):
    model = tiny_model("llama", layers=4)
    before = snapshot(model)

    class LikeOlderTransformers(TrainerCallback):
        # transformers 5 makes the inputs require grad itself; older versions and custom
        # models don't: undo it so the test shows what the callback does on its own.
        def on_train_begin(self, args, state, control, model=None, **kw):
            if hasattr(model, "_require_grads_hook"):
                model.disable_input_require_grads()

    cb = SpectrumCallback(top_pct=0.25)
    tr = make_trainer(tmp_path, model, [LikeOlderTransformers(), cb], max_steps=2, gradient_checkpointing=True,
                      gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    tr.train()
    after = snapshot(model)
    changed = {n.rsplit(".", 1)[0] for n in before if not torch.equal(before[n], after[n])}
    assert changed == set(cb.selected)


def test_plots_written(tmp_path, monkeypatch):
    rotating_scan(monkeypatch)
    cb = SpectrumCallback(top_pct=0.25, update_every=1, plot_dir=str(tmp_path / "plots"))
    make_trainer(tmp_path, None, [cb], max_steps=3).train()
    for f in ("spectrum_snr.png", "spectrum_selection.png"):
        p = tmp_path / "plots" / f
        assert p.exists() and p.stat().st_size > 5000
    # static: one scan, the heatmap shows the selection; no one-column selection plot
    static = SpectrumCallback(top_pct=0.25, plot_dir=str(tmp_path / "static"))
    make_trainer(tmp_path, None, [static], max_steps=1).train()
    assert sorted(p.name for p in (tmp_path / "static").iterdir()) == ["spectrum_snr.png"]


def test_heatmap_leaves_out_modules_outside_layers_and_marks_inf(tmp_path, reference_dir):
    from spectrum_callback import load_snr_json, select_top
    from spectrum_callback.plotting import plot_snr_heatmap, snr_grid

    # SmolLM-135M's published file lists embed_tokens, lm_head and model.norm (no layer index)
    # and 1-D norms with SNR inf
    snr = load_snr_json(f"{reference_dir}/snr_results_HuggingFaceTB-SmolLM-135M.json")
    seen = {}
    real = snr_grid

    def spy(data):
        out = real(data)
        seen["layers"] = out[1]
        return out

    import spectrum_callback.plotting as plotting

    plotting.snr_grid = spy
    try:
        path = plot_snr_heatmap(snr, select_top(snr, 0.25, min_per_type=0), str(tmp_path / "h.png"))
    finally:
        plotting.snr_grid = real
    assert -1 not in seen["layers"] and seen["layers"] == list(range(30))
    assert (tmp_path / "h.png").stat().st_size > 5000 and path.endswith("h.png")


@pytest.mark.parametrize("arch", ["mistral", "qwen2", "phi3", "gpt2"])
def test_static_each_architecture(tmp_path, arch):
    model = tiny_model(arch, layers=4)
    before = snapshot(model)
    cb = SpectrumCallback(top_pct=0.25, update_every=2)
    make_trainer(tmp_path, model, [cb], max_steps=3, weight_decay=0.1).train()
    changed = {n.rsplit(".", 1)[0] for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    ever = set().union(*[set(h["selected"]) for h in cb.history])
    assert changed == ever
    assert len(cb.selected) == len({model_type for model_type in cb.analyzer.types.values()})


@pytest.mark.parametrize("update_every", [None, 1])
def test_parameters_frozen_by_the_user_are_respected(tmp_path, spectrum_log, update_every):
    # static and dynamic alike: never selected, bits unchanged, said once in the log
    model = tiny_model("llama", layers=4)
    for p in model.model.layers[1].parameters():
        p.requires_grad_(False)
    before = snapshot(model)
    cb = SpectrumCallback(top_pct=0.5, update_every=update_every, verbose=False)
    make_trainer(tmp_path, model, [cb], max_steps=3, weight_decay=0.1).train()
    assert not any(".layers.1." in n for n in cb.analyzer.names)
    assert all(".layers.1." not in n for h in cb.history for n in h["selected"])
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters() if ".layers.1." in n)
    assert spectrum_log.text.count("were frozen before the Trainer") == 1


def test_spectrum_freeze_then_dynamic_callback_can_select_any_candidate(tmp_path):
    # spectrum_freeze's own freezing is not the user's: those candidates stay selectable and
    # join the optimizer's decay group
    from spectrum_callback import spectrum_freeze

    model = tiny_model("llama", layers=4)
    spectrum_freeze(model, 0.25, never_train=[r"layers\.1\."])
    cb = SpectrumCallback(top_pct=0.25, update_every=1, never_train=[r"layers\.[023]\."])
    before = snapshot(model)
    tr = make_trainer(tmp_path, model, [cb], max_steps=2, weight_decay=0.1)
    tr.train()
    assert all(".layers.1." in n for n in cb.selected) and len(cb.selected) == 7
    changed = {n.rsplit(".", 1)[0] for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert changed == set(cb.selected)
    opt = unwrap_optimizer(tr.optimizer)
    decay = max(opt.param_groups, key=lambda g: g["weight_decay"])
    assert decay["weight_decay"] == 0.1
    assert all(any(p is q for q in decay["params"]) for n in cb.selected for p in [model.get_submodule(n).weight])


def test_two_spectrum_callbacks_are_refused(tmp_path):
    tr = make_trainer(tmp_path, None, [SpectrumCallback(), SpectrumCallback(top_pct=0.5)], max_steps=1)
    with pytest.raises(ValueError, match="2 SpectrumCallbacks"):
        tr.train()


def test_callback_reused_on_another_model_starts_afresh(tmp_path, spectrum_log):
    cb = SpectrumCallback(top_pct=0.25, verbose=False)
    make_trainer(tmp_path / "a", None, [cb], max_steps=1).train()
    first = list(cb.selected)
    make_trainer(tmp_path / "b", tiny_model("llama", layers=2), [cb], max_steps=1).train()
    assert "used with another model before" in spectrum_log.text
    assert len(cb.history) == 1 and len(cb.selected) == 7 and cb.selected != first


def test_always_train_parameters_are_no_candidates_and_keep_state(tmp_path, monkeypatch):
    rotating_scan(monkeypatch)
    cb = SpectrumCallback(top_pct=0.25, update_every=1, always_train=[r"layers\.0\.self_attn\.q_proj"])
    tr = make_trainer(tmp_path, None, [cb], max_steps=3)
    tr.train()
    assert "model.layers.0.self_attn.q_proj" not in cb.analyzer.names
    q = tr.model.get_submodule("model.layers.0.self_attn.q_proj").weight
    opt = unwrap_optimizer(tr.optimizer)
    assert q.requires_grad and int(opt.state[q]["step"]) == 3  # its state was never dropped


def test_nan_in_a_trainable_weight_stops_training(tmp_path, monkeypatch):
    cb = SpectrumCallback(top_pct=0.25, update_every=2, verbose=False)

    class Poison(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            if state.global_step == 1:
                with torch.no_grad():
                    model.get_submodule(cb.selected[0]).weight[0, 0] = float("nan")

    tr = make_trainer(tmp_path, None, [cb, Poison()], max_steps=4)
    with pytest.raises(RuntimeError, match=r"at step 2 the trainable matrices .* hold NaN/Inf"):
        tr.train()


@pytest.mark.parametrize("optim", ["adamw_torch_fused", "adafactor", "sgd", "rmsprop", "adagrad"])
def test_trainer_optim_choices_dynamic(tmp_path, monkeypatch, optim):
    """Other `TrainingArguments.optim` values than the default AdamW: frozen weights keep
    their bits (weight decay on), state exists only for trainable matrices (Adagrad builds
    state for every parameter up front: it must go for the frozen ones), trainable ones move."""
    calls = rotating_scan(monkeypatch)
    cb = SpectrumCallback(top_pct=0.25, update_every=2)

    class Watch(TrainerCallback):
        frozen_changed, stale_state, moved = [], [], []

        def on_step_begin(self, args, state, control, model=None, **kw):
            self.before = snapshot(model)
            self.trainable = {n for n, p in model.named_parameters() if p.requires_grad}

        def on_step_end(self, args, state, control, model=None, optimizer=None, **kw):
            opt = unwrap_optimizer(optimizer)
            names = {id(p): n for n, p in model.named_parameters()}
            for n, p in model.named_parameters():
                same = torch.equal(self.before[n], p.detach())
                if n not in self.trainable and not same:
                    self.frozen_changed.append((state.global_step, n))
                if n in self.trainable and not same:
                    self.moved.append(n)
            self.stale_state += [(state.global_step, names[id(p)]) for p in opt.state
                                 if names[id(p)] not in self.trainable and opt.state[p]]

    watch = Watch()
    extra = {"optim_args": "momentum=0.9"} if optim == "sgd" else {}  # the Trainer's SGD has no state otherwise
    tr = make_trainer(tmp_path, None, [cb, watch], max_steps=6, weight_decay=0.1, optim=optim, learning_rate=1e-2,
                      **extra)
    tr.train()
    assert calls["n"] == 3 and len({tuple(h["selected"]) for h in cb.history}) == 3
    assert watch.frozen_changed == []
    assert watch.stale_state == []
    assert {n.rsplit(".", 1)[0] for n in watch.moved} >= {n for h in cb.history for n in h["selected"]}


@pytest.mark.parametrize("log_level,shown", [("info", True), ("warning", False)])
def test_scan_summary_is_info_and_follows_the_trainer_log_level(tmp_path, spectrum_log, log_level, shown):
    make_trainer(tmp_path, None, [SpectrumCallback(top_pct=0.25)], max_steps=1, log_level=log_level).train()
    summaries = [r for r in spectrum_log.records if "modules trainable" in r.getMessage()]
    assert bool(summaries) == shown
    assert all(r.levelno == logging.INFO for r in summaries)


def test_callback_refuses_a_selection_that_leaves_types_empty(tmp_path):
    # The same trap through the callback: min_per_type=0 and a fraction below 1/layers.
    trainer = make_trainer(tmp_path, callbacks=[SpectrumCallback(top_pct=0.1, min_per_type=0, verbose=False)],
                           max_steps=1)
    with pytest.raises(ValueError, match="keeps no matrix"):
        trainer.train()


def test_resume_with_changed_settings_warns_and_applies_them(tmp_path, spectrum_log):
    tr = make_trainer(tmp_path, None, [SpectrumCallback(top_pct=0.25, verbose=False)], max_steps=2,
                      save_strategy="steps", save_steps=2)
    tr.train()
    ckpt = tmp_path / "out" / "checkpoint-2"
    cb = SpectrumCallback(top_pct=0.5, verbose=False)
    tr2 = make_trainer(tmp_path, None, [cb], max_steps=3)
    tr2.train(resume_from_checkpoint=str(ckpt))
    assert "changed settings (top_pct: 0.25 -> 0.5)" in spectrum_log.text
    # re-selected at the resume step from the saved SNRs, without a scan: 2 of 4 layers per type
    assert [(h["step"], h["source"]) for h in cb.history] == [(0, "scan"), (2, "resume")]
    assert len(cb.selected) == 14 and cb.history[1]["snr"] == cb.history[0]["snr"]
    trainable = {n.rsplit(".", 1)[0] for n, p in tr2.model.named_parameters() if p.requires_grad}
    assert trainable == set(cb.selected)


def test_always_train_on_biases_leaves_the_matrices_candidates(tmp_path):
    cb = SpectrumCallback(top_pct=0.25, always_train=[r"\.bias$"], verbose=False)
    make_trainer(tmp_path, tiny_model("gpt2", layers=4), [cb], max_steps=1).train()
    assert len(cb.analyzer.names) == 16 and len(cb.selected) == 4
    assert all(p.requires_grad for n, p in cb.session.model.named_parameters() if n.endswith(".bias"))


def test_deepspeed_full_build_is_said_once_and_names_the_fix(spectrum_log):
    """Where DeepSpeed built its optimizer over every parameter before Spectrum selected (the
    callback was added after train() began, a resume without Spectrum state), the backend
    says so once per process, with the start-up cost and the fix."""
    pytest.importorskip("deepspeed")
    from spectrum_callback._logging import forget_warnings
    from spectrum_callback.backends.deepspeed import backend as ds_backend

    forget_warnings("deepspeed.full_build")
    ds_backend._say_full_build_once(1000, 250)
    ds_backend._say_full_build_once(1000, 250)
    said = [r.getMessage() for r in spectrum_log.records if "built over" in r.getMessage()]
    assert len(said) == 1
    assert "1000 trainable parameters" in said[0] and "full fine-tuning" in said[0]
    assert "Trainer(callbacks=[...])" in said[0] and "spectrum_freeze" in said[0]


def test_deepspeed_startup_split_keeps_the_trainers_hyperparameters(tmp_path):
    """ZeRO-1/2 start-up: the Trainer's optimizer becomes one param group per parameter (the
    layout the rebuilds keep), each with its original group's hyperparameters and a layout tag
    naming that group as its class; a step of either optimizer gives the same weights."""
    pytest.importorskip("deepspeed")
    from spectrum_callback.backends.deepspeed.backend import LAYOUT_KEY, one_group_per_parameter

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3), torch.nn.Linear(3, 2))
    model[2].weight.requires_grad_(False)
    decay = [model[0].weight]
    rest = [model[0].bias, model[1].weight, model[1].bias, model[2].bias]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=1e-2, betas=(0.8, 0.9))
    split = one_group_per_parameter(opt, model)
    assert [g["params"] for g in split.param_groups] == [[p] for p in decay + rest]
    names = [g[LAYOUT_KEY]["params"] for g in split.param_groups]
    assert names == [["0.weight"], ["0.bias"], ["1.weight"], ["1.bias"], ["2.bias"]]
    assert [g[LAYOUT_KEY]["class"] for g in split.param_groups] == [0, 1, 1, 1, 1]
    assert all(g[LAYOUT_KEY]["startup"] and len(g[LAYOUT_KEY]["classes"]) == 2 for g in split.param_groups)
    assert [g["weight_decay"] for g in split.param_groups] == [0.1, 0.0, 0.0, 0.0, 0.0]
    assert all(g["betas"] == (0.8, 0.9) and g["lr"] == 1e-2 for g in split.param_groups)
    # the same update as the Trainer's optimizer
    twin = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3), torch.nn.Linear(3, 2))
    twin.load_state_dict(model.state_dict())
    twin[2].weight.requires_grad_(False)
    ref = torch.optim.AdamW([{"params": [twin[0].weight], "weight_decay": 0.1},
                             {"params": [twin[0].bias, *twin[1].parameters(), twin[2].bias], "weight_decay": 0.0}],
                            lr=1e-2, betas=(0.8, 0.9))
    x = torch.randn(5, 4)
    for m, o in ((model, split), (twin, ref)):
        for _ in range(2):
            m(x).square().sum().backward()
            o.step()
            o.zero_grad()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))
    # anything but torch Adam/AdamW, or an optimizer that already stepped, is left as it is
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    assert one_group_per_parameter(sgd, model) is sgd
    assert one_group_per_parameter(ref, twin) is ref


def test_deepspeed_startup_split_wrapper_is_one_shot():
    """The start-up wrapper of ``trainer.create_optimizer`` splits once, puts back what the
    instance had (a user's own instance-level method included) and never wraps twice."""
    pytest.importorskip("deepspeed")
    from spectrum_callback.backends.deepspeed import startup

    class FakeTrainer:
        def __init__(self):
            self.model = torch.nn.Linear(3, 2)
            self.optimizer = None
            self.calls = 0

        def create_optimizer(self):
            self.calls += 1
            self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=0.1)
            return self.optimizer

    t = FakeTrainer()
    startup._split_when_created(t)
    startup._split_when_created(t)  # a second train() before the first created its optimizer
    opt = t.create_optimizer()
    assert t.calls == 1 and len(opt.param_groups) == 2 and opt is t.optimizer
    assert "create_optimizer" not in t.__dict__  # the class's method again
    t.optimizer = None
    assert len(t.create_optimizer().param_groups) == 1  # not split any more

    own = FakeTrainer()
    mine = own.create_optimizer  # a bound method set on the instance by the user

    def user_create_optimizer():
        return mine()

    own.create_optimizer = user_create_optimizer
    startup._split_when_created(own)
    assert len(own.create_optimizer().param_groups) == 2
    assert own.__dict__["create_optimizer"] is user_create_optimizer


def test_load_best_model_at_end_restores_that_checkpoints_selection(tmp_path, monkeypatch):
    """The Trainer rolls the weights back to the best checkpoint: the selection and
    requires_grad are that checkpoint's too, not the last scan's."""
    rotating_scan(monkeypatch)
    model = tiny_model("llama")
    cb = SpectrumCallback(top_pct=0.25, update_every=2)
    # greater_is_better on the loss: the first checkpoint is the best one
    args = training_args(tmp_path, max_steps=6, save_strategy="steps", save_steps=2, eval_strategy="steps",
                         eval_steps=2, load_best_model_at_end=True, metric_for_best_model="eval_loss",
                         greater_is_better=True)
    tr = transformers.Trainer(model=model, args=args, train_dataset=RandomTokens(), eval_dataset=RandomTokens(n=8),
                              callbacks=[cb])
    last_scan = []
    tr.add_callback(type("Last", (TrainerCallback,), {
        "on_step_end": lambda self, a, s, c, **kw: last_scan.append(list(cb.selected))})())
    tr.train()
    assert tr.state.best_model_checkpoint.endswith("checkpoint-2")
    saved = json.loads((tmp_path / "checkpoint-2" / STATE_FILE).read_text())
    assert saved["selected"] != last_scan[-1]  # the rotating scans moved on after checkpoint-2
    assert cb.selected == saved["selected"] and cb.history == saved["history"]
    trainable = {n.rsplit(".", 1)[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(saved["selected"])
    assert all(p.requires_grad for p in cb.backend.opt.state)  # no state left on a frozen weight
