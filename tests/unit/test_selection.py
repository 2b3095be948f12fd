import glob
import json
import math
import os

import pytest

from spectrum_callback import load_snr_json, select_top, unfrozen_parameters_yaml
from spectrum_callback.selection import sorted_snr, write_unfrozen_parameters_yaml


def original_yaml(snr_data: dict, top_percent: int) -> str:
    """The original tool's YAML rule as its README describes it, written independently."""
    by_type = {}
    for name, info in snr_data.items():
        by_type.setdefault(info["type"], []).append((name, info["snr"]))
    out = "unfrozen_parameters:\n- ^lm_head.weight$\n- ^model.embed_tokens.weight$\n"
    for typ, layers in by_type.items():
        layers = sorted(layers, key=lambda x: x[1], reverse=True)
        k = int(len(layers) * top_percent / 100)
        out += f"# {typ} layers\n" + "".join(f"- {n}\n" for n, _ in layers[:k])
    return out


def flat_files(reference_dir):
    files = sorted(glob.glob(os.path.join(reference_dir, "*.json")))
    flat = []
    for f in files:
        with open(f) as fh:
            d = json.load(fh)
        if isinstance(next(iter(d.values())), dict) and "snr" in next(iter(d.values())):
            flat.append(f)
    assert len(flat) >= 8
    return flat


@pytest.mark.parametrize("pct", [25, 50, 10])
def test_yaml_matches_original_rule_on_published_files(reference_dir, pct):
    for f in flat_files(reference_dir):
        with open(f) as fh:
            raw = json.load(fh)
        snr = load_snr_json(f)
        assert list(snr) == list(raw)
        assert unfrozen_parameters_yaml(snr, pct) == original_yaml(raw, pct), f


def test_select_top_with_original_truncation_equals_yaml(reference_dir):
    for f in flat_files(reference_dir):
        snr = load_snr_json(f)
        lines = unfrozen_parameters_yaml(snr, 25).splitlines()
        yaml_names = [line[2:] for line in lines if line.startswith("- ") and "^" not in line]
        assert select_top(snr, 0.25, min_per_type=0) == sorted(yaml_names)


def test_group_of_thirty_keeps_seven_and_min_one_per_type(reference_dir):
    snr = load_snr_json(os.path.join(reference_dir, "snr_results_HuggingFaceTB-SmolLM-135M.json"))
    sel = select_top(snr, 0.25, min_per_type=0)
    q = [n for n in sel if n.endswith("self_attn.q_proj")]
    assert len(q) == 7  # int(30 * 25 / 100)
    # singleton groups (model.norm) keep nothing under the original rule, one with min_per_type=1
    singles = [n for n, i in snr.items() if sum(1 for j in snr.values() if j["type"] == i["type"]) == 1]
    assert singles and not any(s in sel for s in singles)
    sel1 = select_top(snr, 0.25, min_per_type=1)
    assert all(s in sel1 for s in singles)


def test_sorted_format_is_accepted(reference_dir):
    path = os.path.join(reference_dir, "snr_results_meta-llama-Meta-Llama-3.1-8B-Instruct.json")
    with open(path) as fh:
        raw = json.load(fh)
    snr = load_snr_json(path)
    assert len(snr) == sum(len(v) for v in raw.values())
    assert snr["model.layers.0.mlp.down_proj"]["type"] == "mlp.down_proj"
    # round trip: flat -> sorted -> flat keeps every value
    back = sorted_snr(snr)
    assert {t: dict(v) for t, v in back.items()} == {t: dict(v) for t, v in raw.items()}
    sel = select_top(snr, 0.25, min_per_type=0)
    assert len([n for n in sel if n.endswith("mlp.down_proj")]) == 8  # 32 layers


def test_nan_is_never_selected_and_inf_is():
    snr = {f"m.layers.{i}.a": {"snr": v, "type": "a"} for i, v in enumerate([math.nan, 1.0, math.inf, 0.5])}
    assert select_top(snr, 0.5) == ["m.layers.1.a", "m.layers.2.a"]
    allnan = {f"m.layers.{i}.a": {"snr": math.nan, "type": "a"} for i in range(4)}
    assert select_top(allnan, 0.5) == []


def test_never_pattern_and_ties_keep_input_order():
    snr = {f"m.layers.{i}.a": {"snr": 1.0, "type": "a"} for i in range(8)}
    assert select_top(snr, 0.25) == ["m.layers.0.a", "m.layers.1.a"]
    assert select_top(snr, 0.25, never=[r"layers\.0\."]) == ["m.layers.1.a", "m.layers.2.a"]


def test_fraction_rounding_matches_integer_percent():
    snr = {f"m.layers.{i}.a": {"snr": float(i), "type": "a"} for i in range(100)}
    assert len(select_top(snr, 0.29, min_per_type=0)) == 29


def test_yaml_file_name_like_original(tmp_path, reference_dir):
    src = os.path.join(reference_dir, "snr_results_mistralai-Mistral-7B-v0.1.json")
    path = write_unfrozen_parameters_yaml(load_snr_json(src), 25, src, str(tmp_path))
    assert os.path.basename(path) == "snr_results_mistralai-Mistral-7B-v0.1_unfrozenparameters_25percent.yaml"


def test_bad_json(tmp_path):
    p = tmp_path / "x.json"
    p.write_text(json.dumps({"a": [1, 2]}))
    with pytest.raises(ValueError, match="unrecognised layout"):
        load_snr_json(p)
    p.write_text(json.dumps({"a": {"type": "t"}}))
    with pytest.raises(ValueError):
        load_snr_json(p)


def test_select_top_refuses_a_type_left_empty():
    # min_per_type=0 (the original's truncation) with a small fraction would freeze whole types
    snr = {f"m.layers.{i}.{t}": {"snr": float(i), "type": t} for i in range(30) for t in ("a", "b")}
    with pytest.raises(ValueError, match=r"keeps no matrix of 2 type\(s\).*top_pct >= 0.0333"):
        select_top(snr, 0.025, min_per_type=0)
    assert len(select_top(snr, 0.025)) == 2  # min_per_type=1 (the default) keeps one per type
    assert len(select_top(snr, 0.034, min_per_type=0)) == 2
    # a type of one matrix keeps nothing under the original rule, as the original does
    single = {"lm_head": {"snr": 1.0, "type": "lm_head"}, **snr}
    assert "lm_head" not in select_top(single, 0.25, min_per_type=0)
