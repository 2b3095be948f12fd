import glob
import json
import os
import shutil
import subprocess
import sys

import pytest

from spectrum_callback import load_snr_json, select_top, sorted_snr
from spectrum_callback import cli
from spectrum_callback.cli import main
from test_selection import original_yaml
from tiny import tiny_model


def test_yaml_from_each_published_json(tmp_path, reference_dir):
    for src in sorted(glob.glob(os.path.join(reference_dir, "*.json"))):
        out = tmp_path / os.path.basename(src)
        assert main(["--snr-json", src, "--top-percent", "50", "--output-dir", str(out)]) == 0
        base = os.path.splitext(os.path.basename(src))[0]
        yaml_files = glob.glob(str(out / "*.yaml"))
        assert [os.path.basename(y) for y in yaml_files] == [f"{base}_unfrozenparameters_50percent.yaml"]
        raw = json.load(open(src))
        if "snr" in next(iter(raw.values())):
            assert open(yaml_files[0]).read() == original_yaml(raw, 50)
        else:  # sorted format: same names as the flat equivalent
            lines = open(yaml_files[0]).read().splitlines()
            names = [line[2:] for line in lines if line.startswith("- ") and "^" not in line]
            assert sorted(names) == select_top(load_snr_json(src), 0.5, min_per_type=0)


def test_scan_writes_the_layout_axolotl_reads(tmp_path):
    # axolotl's Spectrum plugin reads ./model_snr_results/snr_results_<slug>.json; the original
    # also writes the _sorted.json there and the YAML in the current folder.
    model_dir = tmp_path / "tiny_model"
    tiny_model("llama", layers=4).save_pretrained(model_dir)
    out = tmp_path / "out"
    assert main(["--model", str(model_dir), "--top-percent", "25", "--output-dir", str(out), "--plot"]) == 0
    slug = "tiny-model"  # a local folder: its name, not its whole path
    js = out / "model_snr_results" / f"snr_results_{slug}.json"
    snr = load_snr_json(js)
    assert len(snr) == 28 and {v["type"] for v in snr.values()} >= {"self_attn.q_proj", "mlp.down_proj"}
    srt = json.loads((out / "model_snr_results" / f"snr_results_{slug}_sorted.json").read_text())
    assert srt == json.loads(json.dumps(sorted_snr(snr)))
    assert list(srt["self_attn.q_proj"].values()) == sorted(srt["self_attn.q_proj"].values(), reverse=True)
    yml = out / f"snr_results_{slug}_unfrozenparameters_25percent.yaml"
    text = yml.read_text()
    assert text.startswith("unfrozen_parameters:\n- ^lm_head.weight$\n- ^model.embed_tokens.weight$\n")
    assert text.count("\n- model.layers.") == 7
    assert (out / f"snr_results_{slug}.png").stat().st_size > 5000


def test_offline_alias_resolves_to_the_hub_slug(monkeypatch, tmp_path):
    from spectrum_callback import _offline_model

    monkeypatch.setattr(_offline_model, "smollm2_dir", lambda: str(tmp_path))
    assert cli.resolve_model("smollm2-135m-instruct") == (str(tmp_path), "HuggingFaceTB-SmolLM2-135M-Instruct")
    hub = "meta-llama/Meta-Llama-3-8B"
    assert cli.resolve_model(hub) == (hub, "meta-llama-Meta-Llama-3-8B")


def test_offline_alias_needs_no_study_package():
    # The library resolves its offline default model itself: spectrum_study is not imported.
    code = ("import sys; from spectrum_callback import _offline_model, cli; "
            "_offline_model.smollm2_dir = lambda: '/nowhere'; "
            "print(cli.resolve_model('smollm2-135m-instruct')[0], 'spectrum_study' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.split() == ["/nowhere", "False"], out.stderr[-2000:]


def _bad_inputs(tmp_path, reference_dir):
    llama = os.path.join(reference_dir, "snr_results_meta-llama-Meta-Llama-3-8B.json")
    files = {
        "trunc.json": '{"model.layers.0.q": {"snr": 1.0, "type"',
        "list.json": "[1, 2]",
        "word.json": '{"model.layers.0.q": {"snr": "high", "type": "q"}}',
        "null.json": '{"model.layers.0.q": {"snr": null, "type": "q"}}',
        "notype.json": '{"model.layers.0.q": {"snr": 1.0}}',
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    j = lambda n: str(tmp_path / n)  # noqa: E731
    return [
        (["--model", str(tmp_path / "no" / "such" / "model")], "no such folder"),
        (["--model", "meta-llama/Meta-Llama-3-8B"], "hub is switched off"),
        (["--model", llama], "a file, not a model folder"),
        (["--snr-json", j("missing.json")], "no such file"),
        (["--snr-json", j("trunc.json")], "trunc.json: not valid JSON"),
        (["--snr-json", j("list.json")], "expected a non-empty JSON object"),
        (["--snr-json", j("word.json")], "word.json: entry 'model.layers.0.q' has snr 'high', which is not a number"),
        (["--snr-json", j("null.json")], "has snr None, which is not a number"),
        (["--snr-json", j("notype.json")], "lacks 'snr'/'type'"),
        (["--snr-json", llama, "--top-percent", "0.25"], "did you mean --top-percent 25?"),
        (["--snr-json", llama, "--top-percent", "2"], "use --top-percent 3.13 or more"),
        (["--snr-json", llama, "--top-percent", "0"], "must be in (0, 100]"),
    ]


def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, reference_dir, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for argv, expected in _bad_inputs(tmp_path, reference_dir):
        out = tmp_path / "out"
        assert main(argv + ["--output-dir", str(out)]) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("spectrum-scan: "), (argv, err)
        assert expected in err, (argv, err)
        assert not out.exists(), f"{argv} left {out} behind"


def test_console_script_help_is_light_and_errors_have_no_traceback(tmp_path):
    exe = shutil.which("spectrum-scan")
    assert exe, "console script spectrum-scan not installed (pip install -e .)"
    # --help must not import torch, transformers or deepspeed (7 s before; well under 1 s now)
    probe = ("import sys, spectrum_callback.cli; "
             "print(sorted(m for m in ('torch', 'transformers', 'deepspeed') if m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip() == "[]"
    proc = subprocess.run([exe, "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "model_snr_results" in proc.stdout
    proc = subprocess.run([exe, "--model", str(tmp_path / "nothing_here")], capture_output=True, text=True,
                          cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1
    assert sorted(os.listdir(tmp_path)) == []


@pytest.mark.parametrize("pct", [0.25, 2])
def test_yaml_api_refuses_a_percentage_that_keeps_nothing(reference_dir, pct):
    from spectrum_callback import unfrozen_parameters_yaml

    snr = load_snr_json(os.path.join(reference_dir, "snr_results_meta-llama-Meta-Llama-3-8B.json"))
    with pytest.raises(ValueError, match="keeps no matrix"):
        unfrozen_parameters_yaml(snr, pct)


def test_cli_checks_patterns_by_the_config_rules(tmp_path, reference_dir, capsys):
    src = os.path.join(reference_dir, "snr_results_meta-llama-Meta-Llama-3-8B.json")
    assert main(["--snr-json", src, "--include", "(", "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "include: '(' is not a valid regular expression" in err and err.count("\n") == 1


def test_lora_targets_are_what_spectrum_lora_targets_selects(tmp_path):
    from spectrum_callback import spectrum_lora_targets

    model_dir = tmp_path / "tiny_model"
    model = tiny_model("llama", layers=4)
    model.save_pretrained(model_dir)
    out = tmp_path / "out"
    assert main(["--model", str(model_dir), "--top-percent", "25", "--output-dir", str(out), "--lora-targets"]) == 0
    lines = (out / "snr_results_tiny-model_lora_targets_25percent.yaml").read_text().splitlines()
    assert lines[0] == "lora_target_modules:"
    assert [x[2:] for x in lines[1:]] == spectrum_lora_targets(model, top_pct=0.25)
