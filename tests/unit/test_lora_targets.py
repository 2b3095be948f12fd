"""spectrum_lora_targets with real PEFT: LoRA goes exactly where Spectrum selects."""
import pytest
import torch

from spectrum_callback import SpectrumAnalyzer, select_top, spectrum_lora_targets
from spectrum_callback.preselect import lora_params, lora_rank_for_budget
from tiny import RandomTokens, tiny_model

pytestmark = pytest.mark.stack  # version-sensitive: runs on every CI stack

peft = pytest.importorskip("peft")


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_targets_are_the_callbacks_selection(arch):
    model = tiny_model(arch)
    targets = spectrum_lora_targets(model, top_pct=0.25)
    snr = SpectrumAnalyzer(model, progress=False).scan()
    assert targets == select_top(snr, 0.25)
    assert all(p.requires_grad for p in model.parameters())  # it selects, it freezes nothing


def test_peft_adapts_exactly_the_targets_and_no_base_weight_moves():
    model = tiny_model("llama")
    targets = spectrum_lora_targets(model, top_pct=0.25)
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    adapted = sorted(n[len("base_model.model."):-len(".lora_A.default")]
                     for n, m in peft_model.named_modules() if n.endswith(".lora_A.default"))
    assert adapted == targets
    base = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_" not in n}
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    batch = RandomTokens(n=4, length=16).data
    for _ in range(3):
        loss = peft_model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    moved = [n for n, p in peft_model.named_parameters() if "lora_" not in n and not torch.equal(p, base[n])]
    assert moved == []
    lora_b = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in lora_b)  # the adapters trained


def test_rank_for_the_all_linear_budget():
    model = tiny_model("llama")
    targets = spectrum_lora_targets(model, top_pct=0.25)
    every = [n for n in SpectrumAnalyzer(model, progress=False).names]
    budget = lora_params(model, every, 16)
    r = lora_rank_for_budget(model, targets, budget)
    assert abs(lora_params(model, targets, r) - budget) <= lora_params(model, targets, 1) / 2


def test_settings_that_do_not_place_adapters_are_refused():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="update_every"):
        spectrum_lora_targets(model, update_every=10)
    with pytest.raises(ValueError, match="top_pct"):
        spectrum_lora_targets(model, top_pct=25)


def test_fused_expert_banks_are_named_with_the_fix():
    model = tiny_model("mixtral")
    with pytest.raises(ValueError, match="exclude=.*experts"):
        spectrum_lora_targets(model, top_pct=0.5)
    targets = spectrum_lora_targets(model, top_pct=0.5, exclude=[r"experts"])
    assert targets and not any("experts" in t for t in targets)
