"""Parked optimizer state in a checkpoint is loaded without running code."""
import os
import pickle

import pytest
import torch

from spectrum_callback.state import PARKED_FILE, read_parked, write_parked


class _Exploit:
    """Unpickling this makes a folder: what a crafted checkpoint file could do instead."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_a_parked_file_that_would_run_code_is_refused_and_not_run(tmp_path):
    marker = str(tmp_path / "ran")
    with open(tmp_path / PARKED_FILE.format(rank=0), "wb") as fh:
        pickle.dump({"model.layers.0.self_attn.q_proj.weight": {"exp_avg": _Exploit(marker)}}, fh)
    with pytest.raises(ValueError, match="could run as code: refused, nothing in it was executed"):
        read_parked(str(tmp_path), 0)
    assert not os.path.exists(marker)


def test_parked_state_round_trips(tmp_path):
    parked = {"model.layers.1.mlp.up_proj.weight": {"step": torch.tensor(3.0), "exp_avg": torch.randn(4, 8),
                                                    "exp_avg_sq": torch.rand(4, 8)}}
    write_parked(str(tmp_path), parked, rank=1)
    back = read_parked(str(tmp_path), 1)
    assert back.keys() == parked.keys()
    for k, v in parked["model.layers.1.mlp.up_proj.weight"].items():
        assert torch.equal(back["model.layers.1.mlp.up_proj.weight"][k], v)
    assert read_parked(str(tmp_path), 0) == {}  # no file for rank 0: nothing was parked there


def test_low_bit_state_round_trips(tmp_path):
    pytest.importorskip("torchao")
    from torchao.optim import AdamW8bit

    p = torch.nn.Parameter(torch.randn(64, 128))
    opt = AdamW8bit([p], lr=1e-3)
    p.grad = torch.randn_like(p)
    opt.step()
    write_parked(str(tmp_path), {"w": dict(opt.state[p])}, rank=0)
    back = read_parked(str(tmp_path), 0)["w"]
    assert type(back["exp_avg"]) is type(opt.state[p]["exp_avg"])
    assert torch.equal(back["exp_avg"].dequantize(), opt.state[p]["exp_avg"].dequantize())


def test_a_trainer_resume_with_a_crafted_parked_file_stops_and_says_why(tmp_path):
    import transformers

    from spectrum_callback import SpectrumCallback
    from tiny import RandomTokens, tiny_model, training_args

    def trainer(out, steps):
        cb = SpectrumCallback(top_pct=0.25, update_every=2, policy="rotate", park_state=True, verbose=False)
        args = training_args(out, max_steps=steps, save_strategy="steps", save_steps=3)
        return transformers.Trainer(model=tiny_model("llama"), args=args, train_dataset=RandomTokens(n=32),
                                    callbacks=[cb])

    trainer(tmp_path, 3).train()
    ckpt = tmp_path / "checkpoint-3"
    parked = ckpt / PARKED_FILE.format(rank=0)
    assert parked.is_file()  # the run parked a leaver's state at step 2
    marker = str(tmp_path / "ran")
    with open(parked, "wb") as fh:
        pickle.dump({"model.layers.0.mlp.up_proj.weight": {"exp_avg": _Exploit(marker)}}, fh)
    with pytest.raises(ValueError, match="could run as code: refused"):
        trainer(tmp_path, 6).train(resume_from_checkpoint=str(ckpt))
    assert not os.path.exists(marker)
