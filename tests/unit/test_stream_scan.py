"""Streaming scans of safetensors checkpoints (spectrum_callback.checkpoint_scan), one process."""
import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from spectrum_callback import SpectrumAnalyzer, scan_checkpoint
from spectrum_callback._safetensors_files import Checkpoint
from spectrum_callback.cli import main
from tiny import tiny_model

pytestmark = pytest.mark.stack  # version-sensitive: runs on every CI stack

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _save(tmp_path, arch, name=None, dtype=None, **save_kw):
    folder = tmp_path / (name or arch)
    kw = {"tie_word_embeddings": True} if name == "tied" else {}
    model = tiny_model(arch, layers=4, **kw)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(folder, **save_kw)
    return folder


def _cli(folder, out, *flags):
    return main(["--model", str(folder), "--top-percent", "50", "--output-dir", str(out), "--no-progress", *flags])


def _files(out):
    """Every file the CLI wrote, by relative path, except the side file (compared on its own)."""
    got = {}
    for dirpath, _, names in os.walk(out):
        for n in names:
            if not n.endswith(".scan_info.json"):
                got[os.path.relpath(os.path.join(dirpath, n), out)] = open(os.path.join(dirpath, n)).read()
    return got


def _info(out):
    (path,) = [os.path.join(d, n) for d, _, ns in os.walk(out) for n in ns if n.endswith(".scan_info.json")]
    return json.load(open(path))


CASES = {
    "llama": ("llama", {}),
    "mistral": ("mistral", {}),
    "qwen2": ("qwen2", {}),
    "gpt2 (Conv1D)": ("gpt2", {}),
    "phi3 (fused qkv)": ("phi3", {}),
    "tied": ("llama", {}),
    "sharded": ("llama", {"max_shard_size": "40KB"}),
    "bf16": ("qwen2", {"dtype": torch.bfloat16}),
    "gpt_oss (fused experts, stored fused)": ("gpt_oss", {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_streamed_and_in_memory_scans_write_the_same_files(tmp_path, case, capsys):
    arch, kw = CASES[case]
    folder = _save(tmp_path, arch, name="tied" if case == "tied" else arch, **kw)
    if case == "sharded":
        assert len([f for f in os.listdir(folder) if f.endswith(".safetensors")]) > 3
    assert _cli(folder, tmp_path / "stream", "--stream") == 0
    assert _cli(folder, tmp_path / "memory", "--no-stream") == 0
    streamed, loaded = _files(tmp_path / "stream"), _files(tmp_path / "memory")
    assert len(streamed) == 3 and streamed == loaded
    (js,) = [v for k, v in streamed.items() if k.endswith(".json") and "_sorted" not in k]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    # the original format exactly: every top-level key a matrix of the loaded model
    assert list(json.loads(js)) == list(SpectrumAnalyzer(model, progress=False).modules)
    info_s, info_m = _info(tmp_path / "stream"), _info(tmp_path / "memory")
    assert (info_s["route"], info_m["route"]) == ("stream", "memory")
    assert info_s["dtype"] == "float32" and info_s["device"] == "cpu" and info_s["ranks"] == 1
    assert "Scanned" in capsys.readouterr().out


def test_the_library_call_matches_the_loaded_models_scan_and_reads_one_expert_at_a_time(tmp_path, monkeypatch):
    folder = _save(tmp_path, "gpt_oss")
    reads = []
    real = Checkpoint.read
    monkeypatch.setattr(Checkpoint, "read", lambda self, key, expert=None: reads.append((key, expert))
                        or real(self, key, expert))
    info = {}
    got = scan_checkpoint(str(folder), progress=False, info=info)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    want = SpectrumAnalyzer(model, progress=False).scan()
    assert got == want and info["route"] == "stream"
    banks = [n for n in want if "experts" in want[n]]
    assert banks and all(len(want[n]["experts"]) == 4 for n in banks)
    fused = [(k, e) for k, e in reads if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    assert sorted(fused) == sorted((n, e) for n in banks for e in range(4))  # one expert per read, once each
    assert len(reads) == len(want) - len(banks) + len(fused)  # each matrix read once
    # the bytes read equal the candidates' stored bytes
    assert info["bytes_read_rank0"] == sum(int(p.numel()) * 4 for n in want
                                           for p in [model.get_parameter(n if n in banks else n + ".weight")])


def test_a_base_models_checkpoint_streams_under_its_prefix(tmp_path):
    from transformers import GPT2Model

    folder = tmp_path / "gpt2base"
    base = tiny_model("gpt2", layers=4).transformer
    assert isinstance(base, GPT2Model)
    base.save_pretrained(folder)
    info = {}
    got = scan_checkpoint(str(folder), progress=False, info=info)
    want = SpectrumAnalyzer(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), progress=False).scan()
    assert info["route"] == "stream" and got == want and next(iter(got)).startswith("transformer.h.0.")


def test_moe_experts_stored_per_expert_fall_back_to_memory_with_one_line(tmp_path, capsys):
    # transformers 5 fuses Mixtral's per-expert Linears at load time: the stored names are not
    # the model's, so the scan loads the model instead (and --stream refuses).
    folder = _save(tmp_path, "mixtral")
    assert _cli(folder, tmp_path / "auto") == 0
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("spectrum-scan:")]
    assert len(lines) == 1 and "not streaming" in lines[0] and "block_sparse_moe.experts.0.w1.weight" in lines[0]
    assert _info(tmp_path / "auto")["route"] == "memory"
    assert _cli(folder, tmp_path / "memory", "--no-stream") == 0
    assert _files(tmp_path / "auto") == _files(tmp_path / "memory")
    snr = json.loads(_files(tmp_path / "auto")["model_snr_results/snr_results_mixtral.json"])
    assert "model.layers.0.mlp.experts.gate_up_proj" in snr  # the model's names, not the file's
    assert not any("block_sparse_moe" in n for n in snr)
    capsys.readouterr()
    assert _cli(folder, tmp_path / "forced", "--stream") == 2
    assert "cannot be streamed" in capsys.readouterr().err and not (tmp_path / "forced").exists()
    with pytest.raises(ValueError, match="cannot be streamed"):
        scan_checkpoint(str(folder), stream=True, progress=False)


def _truncated(tmp_path):
    folder = _save(tmp_path, "llama")
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    return folder, "truncated"


def _missing_shard(tmp_path):
    folder = _save(tmp_path, "llama", max_shard_size="40KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    os.remove(folder / shard)
    return folder, f"{shard}: missing"


def _no_safetensors(tmp_path):
    folder = _save(tmp_path, "llama")
    os.remove(folder / "model.safetensors")
    return folder, "no *.safetensors file"


@pytest.mark.parametrize("broken", [_truncated, _missing_shard, _no_safetensors])
@pytest.mark.parametrize("flag", [[], ["--stream"]])
def test_broken_checkpoints_are_one_line_errors_and_write_nothing(tmp_path, capsys, broken, flag):
    folder, words = broken(tmp_path)
    out = tmp_path / "out"
    capsys.readouterr()
    assert _cli(folder, out, *flag) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("spectrum-scan: --model ") and words in err, err
    assert "Traceback" not in err and not out.exists()


def test_the_cli_error_is_one_line_in_a_real_process(tmp_path):
    folder, _ = _truncated(tmp_path)
    env = dict(os.environ, PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-m", "spectrum_callback.cli", "--model", str(folder), "--output-dir",
                        str(tmp_path / "out")], capture_output=True, text=True, env=env, cwd=tmp_path)
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("spectrum-scan:") or "Traceback" in ln]
    assert r.returncode == 2 and len(lines) == 1 and "truncated" in lines[0], r.stderr[-2000:]
    assert not (tmp_path / "out").exists()
