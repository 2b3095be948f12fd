"""The quality harness (spectrum_study.compare) on a tiny random model."""
import json
import os

import pytest
import torch

from spectrum_study import compare
from spectrum_callback.analyzer import SpectrumAnalyzer
from spectrum_study.compare import Config, StudySettings, expand_configs, run_study
from tiny import RandomTokens, tiny_model

SETTINGS = dict(max_steps=3, batch_size=4, block_size=16, eval_every=2, eval_batch_size=8, warmup=0.0)


def _data():
    train = RandomTokens(n=32, length=16, seed=1).data
    held = RandomTokens(n=8, length=16, seed=2).data
    # second domain: a different rule than the training data
    g = torch.Generator().manual_seed(3)
    other = torch.randint(0, 96, (8, 16), generator=g)
    return train, {"heldout": held, "other": other}


class CountingFactory:
    def __init__(self):
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return tiny_model("llama", seed=0)


def test_study_runs_resumes_and_reports(tmp_path):
    train, evals = _data()
    settings = StudySettings(**SETTINGS)
    configs = expand_configs(["full", "spectrum"], [5e-3])
    factory = CountingFactory()
    rep = run_study(factory, train, evals, configs, settings, str(tmp_path), progress=False)
    assert rep["trained"] == ["full_lr0.005", "spectrum_lr0.005"]
    assert rep["skipped"] == []
    assert factory.calls == 3  # baseline + two trainings

    runs = {r["key"]: r for r in rep["results"]}
    assert set(runs) == {"full_lr0.005", "spectrum_lr0.005"}
    for r in runs.values():
        # step 0 (baseline), step 2 (eval_every) and the final step 3 (extra evaluation)
        assert r["steps"] == [0, 2, 3]
        assert r["heldout"][0] == pytest.approx(rep["baseline"]["heldout"])
        assert r["other"][0] == pytest.approx(rep["baseline"]["other"])
        assert all(isinstance(x, float) for x in r["heldout"] + r["other"])
        assert r["train_seconds"] > 0 and r["mem_kind"] == "cpu_rss_above_start"
        # AdamW's two fp32 moments per trainable parameter, counted from the state tensors
        assert r["optimizer_state_bytes_end"] == 2 * r["grad_bytes"] == 8 * r["trainable_params"]
    full, spec = runs["full_lr0.005"], runs["spectrum_lr0.005"]
    assert full["trainable_params"] == full["total_params"]
    assert 0 < spec["trainable_params"] < full["trainable_params"] / 2
    # training moved the held-out loss of full fine-tuning
    assert full["heldout"][-1] != pytest.approx(full["heldout"][0])

    # one atomically written file per configuration, no temp files left over
    files = sorted(os.listdir(tmp_path / "runs"))
    assert files == ["baseline.json", "full_lr0.005.json", "spectrum_lr0.005.json"]
    assert (tmp_path / "compare.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "results.json").read_text())
    assert {r["key"] for r in saved["runs"]} == set(runs)

    # the table: one row per method with the best held-out loss and the forgetting there
    table = (tmp_path / "table.md").read_text()
    assert table == rep["table"]
    for key, r in runs.items():
        i = min(range(1, len(r["steps"])), key=lambda j: r["heldout"][j])
        forgetting = r["other"][i] - rep["baseline"]["other"]
        start = f"| {r['label']} | 0.005 | {r['heldout'][i]:.4f}"
        row = next(line for line in table.splitlines() if line.startswith(start))
        assert f"{forgetting:+.4f}" in row
        assert f"({r['steps'][i]})" in row
        assert f"| {r['trainable_params'] * 12 / 2**20:.1f} |" in row
    assert f"{rep['baseline']['heldout']:.4f}" in table

    # resume: a second run with one more configuration trains only that one
    configs2 = configs + [Config("random", 5e-3, seed=1)]
    factory2 = CountingFactory()
    rep2 = run_study(factory2, train, evals, configs2, settings, str(tmp_path), progress=False)
    assert rep2["skipped"] == ["full_lr0.005", "spectrum_lr0.005"]
    assert rep2["trained"] == ["random-s1_lr0.005"]
    assert factory2.calls == 1  # baseline reused, finished configurations not rebuilt
    assert len(rep2["results"]) == 3
    assert "| random-s1 | 0.005 |" in rep2["table"]

    # other settings in the same folder are refused instead of mixed in
    with pytest.raises(ValueError, match="other settings"):
        run_study(CountingFactory(), train, evals, configs, StudySettings(**{**SETTINGS, "max_steps": 4}),
                  str(tmp_path), progress=False)


def test_selections_differ_and_lora_trains_adapters(tmp_path):
    """random / bottom / spectrum pick different matrices of the same size; LoRA trains adapters only."""
    train, evals = _data()
    settings = StudySettings(**{**SETTINGS, "max_steps": 2, "eval_every": 2})
    model = tiny_model("llama", seed=0)
    # give the layers different spectra so that top and bottom differ
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            for lin in (layer.self_attn.q_proj, layer.mlp.up_proj):
                u = torch.randn(lin.weight.shape[0], 1)
                v = torch.randn(1, lin.weight.shape[1])
                lin.weight.add_(u @ v * (i * 0.5))
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def factory():
        m = tiny_model("llama", seed=0)
        m.load_state_dict(state)
        return m

    configs = expand_configs(["spectrum", "bottom", "random", "lora"], [1e-3], lora_lrs=[1e-2], random_seeds=[0])
    rep = run_study(factory, train, evals, configs, settings, str(tmp_path), progress=False)
    runs = {r["key"]: r for r in rep["results"]}
    top, bottom, rnd = (set(runs[k]["selected"]) for k in ("spectrum_lr0.001", "bottom_lr0.001", "random-s0_lr0.001"))
    assert len(top) == len(bottom) == len(rnd) > 0
    assert top.isdisjoint(bottom)
    snr = SpectrumAnalyzer(factory(), progress=False).scan()
    q = {n: i["snr"] for n, i in snr.items() if i["type"] == "self_attn.q_proj"}
    assert max(q, key=q.get) in top and min(q, key=q.get) in bottom
    assert max(q, key=q.get) != min(q, key=q.get)
    lora = runs["lora_lr0.01"]
    # r=16 on every linear layer of the blocks (q,k,v,o,gate,up,down; lm_head excluded): r * (in + out)
    assert lora["trainable_params"] == 4 * 16 * ((64 + 64) + 2 * (64 + 32) + (64 + 64) + 3 * (64 + 128))
    assert lora["total_params"] == runs["spectrum_lr0.001"]["total_params"]
    assert "| lora | 0.01 |" in rep["table"]


def test_cli_quick_defaults_and_bad_method():
    p = compare.build_parser()
    assert p.parse_args(["--quick"]).quick
    with pytest.raises(ValueError, match="unknown method"):
        expand_configs(["full", "spectrumm"], [1e-4])
    keys = [c.key for c in expand_configs(["random", "lora"], [1e-4], [1e-3, 3e-3], random_seeds=[0, 1])]
    assert keys == ["random-s0_lr0.0001", "random-s1_lr0.0001", "lora_lr0.001", "lora_lr0.003"]


def test_moving_methods_switch_at_every_selection_at_spectrums_fraction(tmp_path):
    """spectrum-rotate, lisa and cyclic (parked or not) train as many parameters as static
    Spectrum and change the selection at every switch; lisa's seeds give different runs."""
    train, evals = _data()
    settings = StudySettings(**dict(SETTINGS, max_steps=6, update_every=2))
    methods = ["spectrum", "spectrum-rotate", "lisa", "lisa-park", "cyclic-park"]
    configs = expand_configs(methods, [5e-3], random_seeds=[0, 1])
    assert [c.key for c in configs] == ["spectrum_lr0.005", "spectrum-rotate_lr0.005", "lisa-s0_lr0.005",
                                        "lisa-s1_lr0.005", "lisa-park-s0_lr0.005", "lisa-park-s1_lr0.005",
                                        "cyclic-park_lr0.005"]
    configs = [c for c in configs if c.key != "lisa-park-s1_lr0.005"]
    rep = run_study(CountingFactory(), train, evals, configs, settings, str(tmp_path), progress=False)
    runs = {r["key"]: r for r in rep["results"]}
    static = runs["spectrum_lr0.005"]
    assert static["switches"] == [] and static["scans"] == 1
    for key, r in runs.items():
        assert r["trainable_params"] == static["trainable_params"], key
        # AdamW's two moments for every trained parameter after the last step, parked or not
        assert r["optimizer_state_numel_end"] == 2 * r["trainable_params"], key
        assert (r["parked_state_bytes_max"] > 0) == ("park" in key), key
        if key == "spectrum_lr0.005":
            continue
        assert [s["step"] for s in r["switches"]] == [2, 4], key
        assert all(s["joined"] > 0 and s["joined"] == s["left"] for s in r["switches"]), (key, r["switches"])
    assert runs["spectrum-rotate_lr0.005"]["scans"] == 1  # one scan, then the rotation
    assert runs["lisa-s0_lr0.005"]["scans"] == runs["cyclic-park_lr0.005"]["scans"] == 0  # never scan
    assert runs["lisa-s0_lr0.005"]["selected"] != runs["lisa-s1_lr0.005"]["selected"]
    assert "lisa at lr 0.005 over 2 seeds" in rep["table"]
    assert "| cyclic-park | 0.005 |" in rep["table"]


def test_unknown_method_is_a_one_line_cli_error(capsys):
    assert compare.main(["--methods", "spectrum,badam", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "badam" in err and "spectrum-rotate" in err
