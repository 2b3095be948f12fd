import glob
import json
import os
import shutil
import subprocess


from spectrum_callback import load_snr_json, select_top
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
            names = [l[2:] for l in open(yaml_files[0]).read().splitlines() if l.startswith("- ") and "^" not in l]
            assert sorted(names) == select_top(load_snr_json(src), 0.5, min_per_type=0)


def test_scan_tiny_model_writes_json_yaml_and_png(tmp_path):
    model_dir = tmp_path / "tiny_model"
    tiny_model("llama", layers=4).save_pretrained(model_dir)
    out = tmp_path / "out"
    assert main(["--model", str(model_dir), "--top-percent", "25", "--output-dir", str(out), "--plot"]) == 0
    slug = str(model_dir).replace("/", "-").replace("_", "-")
    js = out / f"snr_results_{slug}.json"
    snr = load_snr_json(js)
    assert len(snr) == 28 and {v["type"] for v in snr.values()} >= {"self_attn.q_proj", "mlp.down_proj"}
    yml = out / f"snr_results_{slug}_unfrozenparameters_25percent.yaml"
    text = yml.read_text()
    assert text.startswith("unfrozen_parameters:\n- ^lm_head.weight$\n- ^model.embed_tokens.weight$\n")
    assert text.count("\n- model.layers.") == 7
    assert (out / f"snr_results_{slug}.png").stat().st_size > 5000


def test_console_script_and_bad_input(tmp_path):
    exe = shutil.which("spectrum-scan")
    assert exe, "console script spectrum-scan not installed (pip install -e .)"
    proc = subprocess.run([exe, "--snr-json", str(tmp_path / "missing.json")], capture_output=True, text=True)
    assert proc.returncode == 2 and "no such file" in proc.stderr
    proc = subprocess.run([exe, "--snr-json", "x.json", "--top-percent", "0"], capture_output=True, text=True)
    assert proc.returncode == 2 and "--top-percent" in proc.stderr
