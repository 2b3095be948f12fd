import math

import pytest
import torch
from torch import nn

from spectrum_callback import SpectrumAnalyzer, compute_snr, find_candidates, module_type, spectrum_freeze
from tiny import tiny_model

EXPECTED_TYPES = {
    "llama": {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"},
    "mistral": {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"},
    "qwen2": {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"},
    "phi3": {"self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"},
    "gpt2": {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"},
}


def test_module_type():
    assert module_type("model.layers.12.self_attn.q_proj") == "self_attn.q_proj"
    assert module_type("transformer.h.0.mlp.c_fc") == "mlp.c_fc"
    assert module_type("model.layers.3.block_sparse_moe.experts.7.w1") == "block_sparse_moe.experts.7.w1"
    assert module_type("lm_head") is None


@pytest.mark.parametrize("arch", sorted(EXPECTED_TYPES))
def test_scan_each_architecture_matches_reference(arch):
    model = tiny_model(arch, layers=3)
    an = SpectrumAnalyzer(model, method="svd", progress=False)
    snr = an.scan()
    assert {i["type"] for i in snr.values()} == EXPECTED_TYPES[arch]
    assert len(snr) == 3 * len(EXPECTED_TYPES[arch])
    for name, info in snr.items():
        w = model.get_submodule(name).weight
        assert info["snr"] == pytest.approx(compute_snr(w), rel=1e-5), name


def test_gram_method_gives_same_selection_and_close_snr():
    from spectrum_callback import select_top

    model = tiny_model("llama", layers=8)
    a = SpectrumAnalyzer(model, method="svd", dtype=torch.float64, progress=False).scan()
    b = SpectrumAnalyzer(model, method="gram", dtype=torch.float64, progress=False).scan()
    for n in a:
        assert b[n]["snr"] == pytest.approx(a[n]["snr"], rel=1e-6)
    assert select_top(a, 0.25) == select_top(b, 0.25)


def test_chunking_does_not_change_results():
    model = tiny_model("llama", layers=4)
    big = SpectrumAnalyzer(model, progress=False).scan()
    small = SpectrumAnalyzer(model, chunk_mb=0.01, progress=False).scan()  # one matrix per solver call
    assert {n: v["snr"] for n, v in big.items()} == pytest.approx({n: v["snr"] for n, v in small.items()}, rel=1e-6)


def test_skip_unchanged_rescans_only_dirty():
    model = tiny_model("llama", layers=2)
    an = SpectrumAnalyzer(model, progress=False)
    first = an.scan()
    assert an.last_scan_stats["scanned"] == len(first)
    an.scan()
    assert an.last_scan_stats["scanned"] == 0
    name = an.names[0]
    with torch.no_grad():
        model.get_submodule(name).weight.mul_(0).add_(torch.eye(*model.get_submodule(name).weight.shape))
    an.mark_dirty([name])
    third = an.scan()
    assert an.last_scan_stats["scanned"] == 1
    assert third[name]["snr"] != first[name]["snr"]
    # A replaced tensor (new storage) is noticed without being marked
    other = an.names[1]
    mod = model.get_submodule(other)
    mod.weight = nn.Parameter(torch.eye(*mod.weight.shape))
    fourth = an.scan()
    assert an.last_scan_stats["scanned"] == 1 and fourth[other]["snr"] == math.inf


def test_include_exclude():
    model = tiny_model("llama", layers=2)
    c = find_candidates(model, exclude=[r"mlp\."])
    assert c and all("mlp" not in n for n in c)
    c = find_candidates(model, include=[r"self_attn\.q_proj$"])
    assert list(c) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    with pytest.raises(ValueError, match="no layer index"):
        find_candidates(model, include=[r"lm_head"])
    with pytest.raises(ValueError, match="not a valid regular expression"):
        find_candidates(model, include=["("])


def test_model_without_candidates_is_refused():
    with pytest.raises(ValueError, match="no candidate weight matrices"):
        SpectrumAnalyzer(nn.Sequential(nn.Linear(4, 4)), progress=False)
    with pytest.raises(ValueError, match="no candidate"):
        SpectrumAnalyzer(tiny_model("llama", layers=1), exclude=[".*"], progress=False)


def test_nan_weights_are_reported_and_never_selected():
    model = tiny_model("llama", layers=4)
    bad = "model.layers.2.self_attn.q_proj"
    with torch.no_grad():
        model.get_submodule(bad).weight[0, 0] = float("nan")
        model.get_submodule(bad).weight.mul_(100)  # would otherwise rank high
    with pytest.warns(RuntimeWarning, match=bad.replace(".", r"\.")):
        sel = spectrum_freeze(model, 0.25)
    assert bad not in sel
    assert len([n for n in sel if n.endswith("q_proj")]) == 1


def test_quantized_and_peft_models_are_refused():
    model = tiny_model("llama", layers=1)

    class Q:
        class quantization_config:
            quant_method = "bitsandbytes"

    model.hf_quantizer = Q()
    with pytest.raises(ValueError, match="bitsandbytes.*LoRA"):
        SpectrumAnalyzer(model)
    peft = pytest.importorskip("peft")
    model = tiny_model("llama", layers=1)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="wrapped by PEFT"):
        SpectrumAnalyzer(pm)


def test_spectrum_freeze_sets_requires_grad_and_tied_embeddings():
    model = tiny_model("llama", layers=4, tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    sel = spectrum_freeze(model, 0.25, always_train=[r"^lm_head\.weight$"])
    assert len(sel) == 7
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "model.embed_tokens.weight" in trainable  # tied to lm_head: one tensor
    mods = {n.rsplit(".", 1)[0] for n in trainable} - {"model.embed_tokens"}
    assert mods == set(sel)


def test_cpu_threads_setting(monkeypatch):
    model = tiny_model("llama", layers=2)
    ref = SpectrumAnalyzer(model, progress=False).scan()
    seen = []
    import spectrum_callback._cpu as cpu
    import spectrum_callback.analyzer as am

    real = am.torch_threads

    def spy(n):
        seen.append(n)
        return real(n)

    monkeypatch.setattr(am, "torch_threads", spy)
    one = SpectrumAnalyzer(model, progress=False, cpu_threads=1).scan()
    assert seen and set(seen) == {1}
    assert {k: v["snr"] for k, v in one.items()} == pytest.approx({k: v["snr"] for k, v in ref.items()}, rel=1e-6)
    # automatic: never more than torch's setting, at least one
    an = SpectrumAnalyzer(model, progress=False)

    def must_not_sample(window_s=0.05):
        raise AssertionError("a scan of milliseconds sampled the machine's load")

    monkeypatch.setattr(cpu, "busy_cores_of_other_processes", must_not_sample)
    assert an._solver_threads(an.names) == 1
    monkeypatch.setattr(am, "_SMALL_SCAN_COST", 0.0)  # as if the matrices were large
    monkeypatch.setattr(cpu, "busy_cores_of_other_processes", lambda window_s=0.05: 0.0)
    assert an._solver_threads(an.names) == min(torch.get_num_threads(), cpu.os.cpu_count())
    monkeypatch.setattr(cpu, "busy_cores_of_other_processes", lambda window_s=0.05: 50.0)
    assert an._solver_threads(an.names) == 1
    with pytest.raises(ValueError, match="cpu_threads"):
        SpectrumAnalyzer(model, cpu_threads=0)


def test_idle_threads_leave_out_this_process_and_count_others(monkeypatch):
    import spectrum_callback._cpu as cpu

    monkeypatch.setattr(cpu.os, "cpu_count", lambda: 4)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    samples = []
    monkeypatch.setattr(cpu, "_cpu_jiffies", lambda: samples.pop(0))
    # (machine busy, this process, all) jiffies before and after the 50 ms window; 4 cores
    samples[:] = [(0, 0, 0), (380, 380, 400)]  # only this process is busy: all 4 cores are free
    assert cpu.idle_cpu_threads(4) == 4
    samples[:] = [(0, 0, 0), (300, 100, 400)]  # others keep 2 cores busy
    assert cpu.idle_cpu_threads(4) == 2
    samples[:] = [(0, 0, 0), (400, 0, 400)]  # others use everything: still 1 thread
    assert cpu.idle_cpu_threads(4) == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two ranks on this machine share the cores
    samples[:] = [(0, 0, 0), (0, 0, 400)]
    assert cpu.idle_cpu_threads(4) == 2

    def no_proc():
        raise OSError("no /proc")

    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.setattr(cpu, "_cpu_jiffies", no_proc)
    monkeypatch.setattr(cpu.os, "getloadavg", lambda: (3.0, 0.0, 0.0))  # fallback: this process + 2 others
    assert cpu.busy_cores_of_other_processes() is None
    assert cpu.idle_cpu_threads(4) == 2


def test_busy_cores_sees_another_process():
    import subprocess
    import sys

    from spectrum_callback._cpu import busy_cores_of_other_processes

    if busy_cores_of_other_processes() is None:
        pytest.skip("no /proc on this platform (the load-average fallback is tested above)")
    child = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        import time

        time.sleep(0.3)
        assert busy_cores_of_other_processes(0.3) >= 0.5
    finally:
        child.kill()
        child.wait()


def test_auto_method_solves_in_float64_on_cuda_and_float32_on_cpu():
    # The choice only (no GPU here): on CUDA, fp64 straight away beat fp32 + fp64 fallbacks
    # (docs/results/gpu.md); on CPU fp32 stays.  Explicit settings are kept as given.
    model = tiny_model("llama", layers=1)
    w = model.model.layers[0].self_attn.q_proj.weight
    cpu = SpectrumAnalyzer(model, progress=False)
    assert cpu.route(w)[1:] == ("fast", torch.float32)
    cuda = SpectrumAnalyzer(model, device="cuda", progress=False)
    assert cuda.route(w)[1:] == ("fast", torch.float64)
    explicit = SpectrumAnalyzer(model, method="fast", device="cuda", progress=False)
    assert explicit.route(w)[1:] == ("fast", torch.float32)
    assert SpectrumAnalyzer(model, device="cuda", dtype=torch.float32, progress=False).route(w)[1:] == (
        "fast", torch.float32)


def test_scan_progress_bar_follows_disable_tqdm(monkeypatch, tmp_path):
    # The callback shows the scan's tqdm bar unless TrainingArguments(disable_tqdm=True).
    import transformers
    from tiny import RandomTokens, training_args

    from spectrum_callback import SpectrumCallback

    seen = []
    real_init = SpectrumAnalyzer.__init__

    def spy(self, *a, **kw):
        seen.append(kw.get("progress"))
        real_init(self, *a, **kw)

    monkeypatch.setattr(SpectrumAnalyzer, "__init__", spy)
    for disable in (True, False):
        trainer = transformers.Trainer(model=tiny_model("llama", layers=1), train_dataset=RandomTokens(n=8),
                                       args=training_args(tmp_path / str(disable), max_steps=1, disable_tqdm=disable),
                                       callbacks=[SpectrumCallback(top_pct=0.25, verbose=False)])
        trainer.train()
    assert seen == [False, True]
