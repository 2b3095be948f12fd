"""spectrum_callback.integrations.axolotl.SpectrumPlugin with the real axolotl: ``axolotl train``
on CPU (a tiny random Llama, SmolLM2's tokenizer, a local jsonl), static and dynamic, and the
configs it refuses, each stopped at config time with the callback's own message."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from axolotl_run import PLUGIN, axolotl_config, axolotl_env, axolotl_train


def _weights(folder: str) -> dict:
    return load_file(os.path.join(folder, "model.safetensors"))


def _changed(before: dict, after: dict) -> set:
    assert set(before) == set(after)
    return {n for n in before if not torch.equal(before[n], after[n])}


def _logged(folder: str) -> list:
    with open(os.path.join(folder, "trainer_state.json")) as fh:
        return json.load(fh)["log_history"]


def _run(base_model, dataset, out, launcher="accelerate", **keys):
    proc = axolotl_train(axolotl_config(base_model, dataset, str(out), **keys), str(out), launcher)
    assert proc.returncode == 0, proc.stdout[-6000:]
    return proc, os.path.join(str(out), "model")


def test_static(base_model, dataset, tmp_path):
    from transformers import LlamaForCausalLM

    from spectrum_callback import spectrum_freeze

    proc, model_dir = _run(base_model, dataset, tmp_path)
    with open(os.path.join(model_dir, "checkpoint-4", "spectrum_state.json")) as fh:
        state = json.load(fh)
    # the callback's report: one selection, at step 0, the one a scan of the base model gives
    assert [h["step"] for h in state["history"]] == [0]
    expected = spectrum_freeze(LlamaForCausalLM.from_pretrained(base_model), top_pct=0.25)
    assert sorted(state["selected"]) == sorted(expected) and len(expected) == 7 * 4 // 4
    # exactly the selected matrices moved; everything else (embeddings, lm_head, norms) bit for bit the same
    changed = _changed(_weights(base_model), _weights(model_dir))
    assert changed == {m + ".weight" for m in expected}
    logs = [e for e in _logged(os.path.join(model_dir, "checkpoint-4")) if "spectrum/selected_modules" in e]
    assert logs and logs[0]["spectrum/selected_modules"] == len(expected)
    assert 0 < logs[0]["spectrum/trainable_fraction"] < 0.5
    assert any("loss" in e for e in _logged(os.path.join(model_dir, "checkpoint-4")))


def test_dynamic_rotate_with_always_train(base_model, dataset, tmp_path):
    proc, model_dir = _run(base_model, dataset, tmp_path, max_steps=6, save_steps=6, spectrum_update_every=2,
                           spectrum_policy="rotate", spectrum_always_train=[r"^lm_head\.weight$"])
    with open(os.path.join(model_dir, "checkpoint-6", "spectrum_state.json")) as fh:
        state = json.load(fh)
    picks = [h["selected"] for h in state["history"]]
    assert [h["step"] for h in state["history"]] == [0, 2, 4]
    assert all(a != b for a, b in zip(picks, picks[1:])), picks
    ever = {m + ".weight" for pick in picks for m in pick}
    changed = _changed(_weights(base_model), _weights(model_dir))
    # what was ever selected moved, plus lm_head (always_train); nothing else did
    assert changed == ever | {"lm_head.weight"}
    logs = _logged(os.path.join(model_dir, "checkpoint-6"))
    switches = [e for e in logs if "spectrum/changes" in e]
    assert len(switches) == 3 and all(e["spectrum/changes"] > 0 for e in switches[1:])


def test_missing_snr_json_stops_axolotl_train(base_model, dataset, tmp_path):
    from spectrum_callback import SpectrumCallback

    missing = str(tmp_path / "model_snr_results" / "snr_results_tiny.json")
    with pytest.raises(ValueError) as exc:
        SpectrumCallback(snr_json=missing)
    proc = axolotl_train(axolotl_config(base_model, dataset, str(tmp_path), spectrum_snr_json=missing),
                         str(tmp_path), launcher="python")
    assert proc.returncode != 0
    assert str(exc.value) in proc.stdout, proc.stdout[-4000:]
    assert not os.path.exists(os.path.join(tmp_path, "model", "model.safetensors"))


def test_snr_json_gives_the_first_selection(base_model, dataset, tmp_path):
    """A file whose SNRs rank the matrices unlike a scan: the static run trains the file's top."""
    from transformers import LlamaForCausalLM

    from spectrum_callback import SpectrumAnalyzer, save_snr_json, select_top

    snr = SpectrumAnalyzer(LlamaForCausalLM.from_pretrained(base_model)).scan()
    fake = {n: {"snr": float(i), "type": snr[n]["type"]} for i, n in enumerate(sorted(snr))}
    path = save_snr_json(fake, str(tmp_path / "snr_results_tiny.json"))
    expected = select_top(fake, 0.25)
    assert expected != select_top(snr, 0.25)
    proc, model_dir = _run(base_model, dataset, tmp_path, launcher="python", spectrum_snr_json=path)
    assert _changed(_weights(base_model), _weights(model_dir)) == {m + ".weight" for m in expected}


def test_spectrum_lora_places_the_adapters_on_the_selection(base_model, dataset, tmp_path):
    """adapter: lora with spectrum_lora: true: PEFT adapts exactly the modules Spectrum selects
    on the base model, no base weight changes, and the saved adapter is those modules'."""
    from transformers import LlamaForCausalLM

    from spectrum_callback import spectrum_lora_targets

    expected = spectrum_lora_targets(LlamaForCausalLM.from_pretrained(base_model), top_pct=0.25)
    proc, model_dir = _run(base_model, dataset, tmp_path, launcher="python", adapter="lora", lora_r=4,
                           lora_alpha=8, lora_dropout=0.0, spectrum_lora=True)
    adapter = load_file(os.path.join(model_dir, "checkpoint-4", "adapter_model.safetensors"))
    adapted = sorted({n.split(".lora_")[0].replace("base_model.model.", "") for n in adapter})
    assert adapted == expected and len(expected) == 7
    assert any(adapter[n].abs().sum() > 0 for n in adapter if "lora_B" in n)  # the adapters trained
    with open(os.path.join(model_dir, "checkpoint-4", "adapter_config.json")) as fh:
        assert sorted(json.load(fh)["target_modules"]) == expected
    assert not os.path.isfile(os.path.join(model_dir, "checkpoint-4", "spectrum_state.json"))  # no base matrix trained


# ------------------------------------------------------------------ refused at config time
def _callback_error(**kwargs) -> str:
    from spectrum_callback import SpectrumCallback

    with pytest.raises(ValueError) as exc:
        SpectrumCallback(**kwargs)
    return str(exc.value)


@pytest.fixture
def load_cfg(base_model, dataset, tmp_path):
    """axolotl's own config loading (plugins registered, then validated) of our test config
    with ``keys``; axolotl's plugin registry is emptied around each call."""
    from axolotl.cli.config import load_cfg as axolotl_load_cfg
    from axolotl.integrations.base import PluginManager

    os.environ.update({k: v for k, v in axolotl_env().items() if k != "PATH"})

    def load(**keys):
        import yaml

        path = tmp_path / "cfg.yml"
        path.write_text(yaml.safe_dump(axolotl_config(base_model, dataset, str(tmp_path), **keys)))
        PluginManager._instance = None
        try:
            return axolotl_load_cfg(str(path))
        finally:
            PluginManager._instance = None

    return load


BAD = {
    "top_pct_as_percent": ({"spectrum_top_pct": 25}, lambda: _callback_error(top_pct=25)),
    "moving_policy_static": ({"spectrum_policy": "random"}, lambda: _callback_error(policy="random")),
    "bad_pattern": ({"spectrum_always_train": ["lm_head("]}, lambda: _callback_error(always_train=["lm_head("])),
    "bad_method": ({"spectrum_method": "qr"}, lambda: _callback_error(method="qr")),
    "update_every_zero": ({"spectrum_update_every": 0}, lambda: _callback_error(update_every=0)),
    "unfrozen_parameters": ({"unfrozen_parameters": ["^lm_head.weight$"]},
                            lambda: "unfrozen_parameters and " + PLUGIN + " both choose the trainable parameters"),
    "both_plugins": ({"plugins": ["axolotl.integrations.spectrum.SpectrumPlugin", PLUGIN]},
                     lambda: "keep one"),
    "axolotl_key": ({"spectrum_top_fraction": 0.5}, lambda: "use spectrum_top_pct"),
    "typo": ({"spectrum_updte_every": 10}, lambda: "unknown Spectrum key(s) ['spectrum_updte_every']"),
    "fsdp1": ({"fsdp_version": 1, "fsdp_config": {"reshard_after_forward": True}}, lambda: "set fsdp_version: 2"),
    "lora": ({"adapter": "lora", "lora_r": 8}, lambda: "remove adapter for Spectrum, or set spectrum_lora: true"),
    "spectrum_lora_without_adapter": ({"spectrum_lora": True}, lambda: "needs adapter: lora"),
    "spectrum_lora_with_targets": ({"spectrum_lora": True, "adapter": "lora", "lora_target_linear": True},
                                   lambda: "remove lora_target_modules and lora_target_linear"),
    "spectrum_lora_dynamic": ({"spectrum_lora": True, "adapter": "lora", "spectrum_update_every": 10},
                              lambda: "spectrum_update_every do(es) not apply"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_config_refused_with_the_callback_message(load_cfg, case):
    keys, message = BAD[case]
    with pytest.raises(Exception) as exc:
        load_cfg(**keys)
    assert message() in str(exc.value)


def test_good_config_loads(load_cfg):
    from spectrum_callback.integrations.axolotl import spectrum_config

    cfg = load_cfg(spectrum_update_every=200, spectrum_policy="rotate", spectrum_pool_pct=0.75,
                   spectrum_park_state=True, spectrum_dtype="float64", spectrum_never_train=["layers\\.0\\."])
    sc = spectrum_config(cfg)
    assert (sc.top_pct, sc.update_every, sc.policy, sc.pool_pct, sc.park_state, sc.dtype) == \
        (0.25, 200, "rotate", 0.75, True, "float64")


def test_every_setting_has_a_key():
    from dataclasses import fields

    from spectrum_callback import SpectrumConfig
    from spectrum_callback.integrations.axolotl import SpectrumCallbackArgs, YAML_KEYS

    assert set(YAML_KEYS.values()) == {f.name for f in fields(SpectrumConfig)}
    assert set(SpectrumCallbackArgs.model_fields) == set(YAML_KEYS) | {"spectrum_lora"}


def test_only_the_plugin_module_imports_axolotl():
    import re
    import subprocess
    import sys

    code = ("import sys, spectrum_callback, spectrum_callback.callback, spectrum_callback.session, "
            "spectrum_callback.integrations, spectrum_callback.cli; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'axolotl'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
    root = os.path.join(os.path.dirname(__file__), "..", "..", "spectrum_callback")
    importers = []
    for folder, _, files in os.walk(root):
        for f in files:
            if f.endswith(".py"):
                with open(os.path.join(folder, f)) as fh:
                    if re.search(r"^\s*(from|import) axolotl\b", fh.read(), re.M):
                        importers.append(f)
    assert importers == ["axolotl.py"]
