import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import transformers

from spectrum_callback import SpectrumCallback
from dsrun import ds_env
from tiny import RandomTokens, tiny_model, training_args

HERE = os.path.dirname(__file__)


def run_script(mode, out):
    env = dict(ds_env(), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, os.path.join(HERE, "kill_resume.py"), mode, str(out)],
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    full, broken = tmp_path / "full", tmp_path / "broken"
    p = run_script("full", full)
    assert p.returncode == 0, p.stderr[-3000:]
    p = run_script("kill", broken)
    assert p.returncode == -signal.SIGKILL, (p.returncode, p.stderr[-2000:])
    assert (broken / "checkpoint-4" / "spectrum_state.json").exists()
    assert not (broken / "result_kill.json").exists()
    p = run_script("resume", broken)
    assert p.returncode == 0, p.stderr[-3000:]
    a = json.load(open(full / "result_full.json"))
    b = json.load(open(broken / "result_resume.json"))
    assert b["history"] == a["history"]  # same scan schedule, same selections, restored history
    assert [h[0] for h in a["history"]] == [0, 2, 4, 6]
    assert b["selected"] == a["selected"]
    for step in ("5", "6", "7", "8"):
        assert b["losses"][step] == pytest.approx(a["losses"][step], rel=1e-5)
    assert b["final_weights_sum"] == pytest.approx(a["final_weights_sum"], rel=1e-6)


def test_corrupt_or_future_state_file_is_a_clear_error(tmp_path):
    tr = transformers.Trainer(model=tiny_model("llama"), train_dataset=RandomTokens(),
                              args=training_args(tmp_path / "o", max_steps=2, save_strategy="steps", save_steps=2))
    tr.add_callback(SpectrumCallback())
    tr.train()
    ckpt = tmp_path / "o" / "checkpoint-2"
    state = json.loads((ckpt / "spectrum_state.json").read_text())
    state["version"] = 99
    (ckpt / "spectrum_state.json").write_text(json.dumps(state))

    def resume_must_fail(match):
        tr = transformers.Trainer(model=tiny_model("llama"), train_dataset=RandomTokens(),
                                  args=training_args(tmp_path / "o", max_steps=3))
        tr.add_callback(SpectrumCallback())
        with pytest.raises(ValueError, match=match):
            tr.train(resume_from_checkpoint=str(ckpt))

    resume_must_fail("upgrade spectrum_callback")
    state["version"] = 1
    state["selected"] = ["model.layers.99.mlp.up_proj"]
    (ckpt / "spectrum_state.json").write_text(json.dumps(state))
    resume_must_fail("another model")


def test_all_nan_model_gives_empty_selection_error(tmp_path):
    model = tiny_model("llama", layers=2)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.ndim == 2:
                p.fill_(float("nan"))
    tr = transformers.Trainer(model=model, train_dataset=RandomTokens(), args=training_args(tmp_path, max_steps=1))
    tr.add_callback(SpectrumCallback())
    with pytest.warns(RuntimeWarning, match="NaN"), pytest.raises(ValueError, match="selected no module"):
        tr.train()


