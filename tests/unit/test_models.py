"""The models users bring beyond a dense causal LM: fused MoE experts, task heads, several
stacks of layers, parametrized layers.  Tiny random configs."""
from __future__ import annotations

import re

import pytest
import torch
import transformers
from torch import nn

from spectrum_callback import SpectrumAnalyzer, SpectrumCallback, compute_snr, spectrum_freeze
from dsrun import ROOT
from tiny import RandomTokens, snapshot, tiny_model, training_args
from zoo import ZOO

pytestmark = pytest.mark.stack  # version-sensitive: runs on every CI stack

MOE = {  # arch -> (fused banks per MoE layer, router type)
    "mixtral": (("mlp.experts.gate_up_proj", "mlp.experts.down_proj"), "mlp.gate"),
    "qwen3_moe": (("mlp.experts.gate_up_proj", "mlp.experts.down_proj"), "mlp.gate"),
    "deepseek_v3": (("mlp.experts.gate_up_proj", "mlp.experts.down_proj"), "mlp.gate"),
    "gpt_oss": (("mlp.experts.gate_up_proj", "mlp.experts.down_proj"), "mlp.router"),
}


@pytest.mark.parametrize("arch", sorted(MOE))
def test_fused_experts_are_units_with_per_expert_snrs(arch):
    model = tiny_model(arch, layers=2)
    an = SpectrumAnalyzer(model, progress=False)
    banks, router = MOE[arch]
    fused = [n for n in an.names if an.modules[n].kind == "fused"]
    assert fused and {an.types[n] for n in fused} == set(banks)
    assert router in set(an.types.values())  # routers are candidates as usual
    snr = an.scan()
    for n in fused:
        w = model.get_parameter(n).detach()
        experts = snr[n]["experts"]
        assert len(experts) == w.shape[0]
        ref = [compute_snr(w[e], dtype=torch.float64) for e in range(w.shape[0])]
        assert experts == pytest.approx(ref, rel=1e-4)
        assert snr[n]["snr"] == pytest.approx(sum(experts) / len(experts))
    # a fused bank's scan holds at most chunk_mb of copies: one expert per solver call here
    small = SpectrumAnalyzer(model, chunk_mb=1e-4, progress=False).scan()
    assert all(small[n]["snr"] == pytest.approx(snr[n]["snr"], rel=1e-6) for n in snr)


def test_selection_runs_per_kind_across_layers_and_trains_whole_banks(tmp_path):
    model = tiny_model("mixtral", layers=4)
    before = snapshot(model)
    cb = SpectrumCallback(top_pct=0.25, verbose=False)
    tr = transformers.Trainer(model=model, args=training_args(tmp_path, max_steps=2, weight_decay=0.1),
                              train_dataset=RandomTokens(n=16), callbacks=[cb])
    tr.train()
    kinds = {}
    for n in cb.selected:
        kinds.setdefault(cb.analyzer.types[n], []).append(n)
    # one of 4 layers per kind, fused banks included
    assert len(kinds["mlp.experts.gate_up_proj"]) == 1 and len(kinds["mlp.experts.down_proj"]) == 1
    after = snapshot(model)
    selected_params = {f"{n}.weight" if cb.analyzer.modules[n].kind != "fused" else n for n in cb.selected}
    for name in before:
        changed = not torch.equal(before[name], after[name])
        assert changed == (name in selected_params), name
    opt = tr.optimizer.optimizer if hasattr(tr.optimizer, "optimizer") else tr.optimizer
    assert all(p.requires_grad for p in opt.state)


def test_per_expert_linear_modules_keep_one_type_per_expert():
    # older checkpoints: one Linear per expert; the original tool gives each expert index its type
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = nn.ModuleList([nn.ModuleDict({"w1": nn.Linear(8, 8)}) for _ in range(2)])

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([Block() for _ in range(3)])

    an = SpectrumAnalyzer(Net(), progress=False)
    assert sorted(set(an.types.values())) == ["experts.0.w1", "experts.1.w1"]


# ---------------------------------------------------------------- the zoo: every architecture trains right
class _Rows(torch.utils.data.Dataset):
    def __init__(self, batch):
        self.batch = batch

    def __len__(self):
        return next(iter(self.batch.values())).shape[0]

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.batch.items()}


def _train(model, batch, tmp_path, cb, steps=2):
    args = training_args(tmp_path, max_steps=steps, per_device_train_batch_size=2, weight_decay=0.1,
                         remove_unused_columns=False)
    tr = transformers.Trainer(model=model, args=args, train_dataset=_Rows(batch), callbacks=[cb])
    tr.train()
    return tr


@pytest.mark.parametrize("arch", sorted(ZOO))
def test_zoo_dynamic_spectrum_keeps_its_promises(tmp_path, arch):
    build, batch = ZOO[arch]
    model = build()
    before = snapshot(model)
    cb = SpectrumCallback(top_pct=0.5, update_every=1, verbose=False)
    tr = _train(model, batch(), tmp_path, cb)
    ever = set().union(*[set(h["selected"]) for h in cb.history])
    trained = {id(p) for n in ever for p in cb.analyzer.params_of(n)}
    trained |= {id(tr.model.get_parameter(n)) for n in cb.session._heads}
    for name, p in model.named_parameters():
        if id(p) not in trained:
            assert torch.equal(before[name], p.detach()), f"{name} was frozen but changed"
    for n in cb.session._heads:  # task heads start untrained: they must train
        assert not torch.equal(before[n], model.get_parameter(n).detach()), n
    opt = tr.optimizer.optimizer if hasattr(tr.optimizer, "optimizer") else tr.optimizer
    assert all(p.requires_grad for p in opt.state)  # no optimizer state on a frozen weight


@pytest.mark.parametrize("arch", sorted(ZOO))
def test_spectrum_freeze_trains_what_the_callback_trains(tmp_path, arch):
    """The same settings give the same trainable set through spectrum_freeze (before any
    optimizer) and through the callback (at on_train_begin): task heads, the user's own frozen
    parameters and always_train included."""
    build, batch = ZOO[arch]
    sets = []
    for route in ("freeze", "callback"):
        model = build()
        names = [n for n, _ in model.named_parameters()]
        user = SpectrumAnalyzer(model, progress=False).names[0]  # the user froze one candidate
        model.get_submodule(user).weight.requires_grad_(False)
        settings = dict(top_pct=0.25, always_train=[re.escape(names[0])])
        if route == "freeze":
            spectrum_freeze(model, **settings)
        else:
            _train(model, batch(), tmp_path, SpectrumCallback(verbose=False, **settings), steps=1)
        sets.append(sorted(n for n, p in model.named_parameters() if p.requires_grad))
        assert names[0] in sets[-1] and f"{user}.weight" not in sets[-1]
    assert sets[0] == sets[1]


def _zoo_rows():
    from spectrum_callback.candidates import task_head_params

    rows = {}
    for arch, (build, _) in ZOO.items():
        model = build()
        an = SpectrumAnalyzer(model, progress=False)
        fused = sum(1 for n in an.names if an.modules[n].kind == "fused")
        stacks = len({t.split(":")[0] for t in an.types.values() if ":" in t}) or 1
        heads = sorted({n.rsplit(".", 1)[0] for n in task_head_params(model)})
        rows[arch] = (len(an.names), len(set(an.types.values())), fused, stacks, ", ".join(heads) or "-")
    return rows


def test_the_guides_models_table_matches_the_zoo():
    import os

    page = open(os.path.join(ROOT, "docs", "guide", "design.md")).read()
    table = page[page.index("| architecture (tiny random config, 2 layers) |"):]
    lines = []
    for line in table.splitlines()[2:]:
        if not line.startswith("|"):
            break
        lines.append(line)
    shown = {}
    for line in lines:
        cells = [c.strip() for c in line.strip("|").split("|")]
        shown[cells[0]] = (int(cells[1]), int(cells[2]), int(cells[3]), int(cells[4]), cells[5])
    assert shown == _zoo_rows()


# ---------------------------------------------------------------- task heads
def test_task_heads_train_by_default_and_can_stay_frozen(tmp_path, spectrum_log):

    build, batch = ZOO["bert sequence classification"]
    model = build()
    before = snapshot(model)
    cb = SpectrumCallback(top_pct=0.25, verbose=False)
    _train(model, batch(), tmp_path / "on", cb)
    assert set(cb.session._heads) == {"classifier.weight", "classifier.bias", "bert.pooler.dense.weight",
                              "bert.pooler.dense.bias"}
    assert all(not torch.equal(before[n], model.get_parameter(n).detach()) for n in cb.session._heads)
    model = build()
    before = snapshot(model)
    _train(model, batch(), tmp_path / "off", SpectrumCallback(top_pct=0.25, verbose=False, train_heads=False))
    assert "stays frozen at its initial values" in spectrum_log.text
    assert torch.equal(before["classifier.weight"], model.get_parameter("classifier.weight").detach())


# ---------------------------------------------------------------- several stacks
def test_stacks_get_their_own_types_single_stacks_keep_the_original_names():
    from spectrum_callback.candidates import candidate_types

    llava = ["model.vision_tower.vision_model.encoder.layers.0.self_attn.k_proj",
             "model.language_model.layers.0.self_attn.k_proj"]
    assert candidate_types(llava) == {
        llava[0]: "model.vision_tower.vision_model.encoder.layers:self_attn.k_proj",
        llava[1]: "model.language_model.layers:self_attn.k_proj"}
    single = ["model.layers.0.self_attn.k_proj", "model.layers.1.self_attn.k_proj"]
    assert set(candidate_types(single).values()) == {"self_attn.k_proj"}
    model, _ = ZOO["t5 (encoder + decoder)"]
    an = SpectrumAnalyzer(model(), progress=False)
    from spectrum_callback import select_top

    selected = select_top(an.scan(), 0.5)
    # each stack's types keep 1 of their 2 layers: 16 types, 16 selected
    assert len(selected) == len(set(an.types.values())) == 16


# ---------------------------------------------------------------- parametrized layers
def test_parametrized_layers_are_found_scanned_and_trained(tmp_path):
    from torch.nn.utils import parametrizations

    model = tiny_model("llama", layers=4)
    for layer in model.model.layers:
        parametrizations.weight_norm(layer.self_attn.q_proj)
    parametrizations.orthogonal(model.model.layers[0].self_attn.o_proj)
    an = SpectrumAnalyzer(model, progress=False)
    assert len(an.names) == 28  # every one found, once
    kinds = {n: an.modules[n].kind for n in an.names}
    assert sum(k == "parametrized" for k in kinds.values()) == 5
    q0 = "model.layers.0.self_attn.q_proj"
    assert an.scan()[q0]["snr"] == pytest.approx(compute_snr(model.get_submodule(q0).weight), rel=1e-5)
    before = snapshot(model)
    cb = SpectrumCallback(top_pct=0.25, verbose=False, never_train=[r"layers\.[123]\.self_attn\.q_proj"])
    tr = transformers.Trainer(model=model, args=training_args(tmp_path, max_steps=2, weight_decay=0.1),
                              train_dataset=RandomTokens(n=16), callbacks=[cb])
    tr.train()
    assert q0 in cb.selected  # the only q_proj allowed
    originals = [n for n, _ in model.named_parameters() if n.startswith(q0 + ".parametrizations.weight.original")]
    assert len(originals) == 2 and all(not torch.equal(before[n], model.get_parameter(n)) for n in originals)
    for n, p in model.named_parameters():
        if ".layers.2.self_attn.q_proj." in n:
            assert torch.equal(before[n], p), n


def test_heatmap_shows_each_expert_of_a_fused_bank():
    from spectrum_callback.plotting import snr_grid

    snr = {"model.layers.0.mlp.experts.down_proj": {"snr": 2.0, "type": "mlp.experts.down_proj",
                                                    "experts": [1.0, 3.0]},
           "model.layers.0.self_attn.q_proj": {"snr": 5.0, "type": "self_attn.q_proj"}}
    types, layers, grid, names = snr_grid(snr)
    assert types == ["mlp.experts.down_proj", "mlp.experts.down_proj [expert 0]",
                     "mlp.experts.down_proj [expert 1]", "self_attn.q_proj"]
    assert [row[0] for row in grid] == [2.0, 1.0, 3.0, 5.0]
    # every expert row belongs to the bank: framed when the bank is selected
    assert names[1][0] == names[2][0] == "model.layers.0.mlp.experts.down_proj"
