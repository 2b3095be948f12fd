"""SpectrumCallback with TRL's trainers: SFTTrainer, and DPOTrainer with a reference model."""
import pytest
import torch

from spectrum_callback import SpectrumCallback
from tiny import snapshot, tiny_model

pytestmark = pytest.mark.stack  # version-sensitive: runs on every CI stack

trl = pytest.importorskip("trl", reason="trl is part of the test extra; install with pip install -e .[test]")
datasets = pytest.importorskip("datasets")

WORDS = "in the beginning god created heaven and earth was without form void darkness upon face of deep".split()
TEXT = "in the beginning god created the heaven and the earth and the earth was without form and void"


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def _changed(model, before):
    return {n.rsplit(".", 1)[0] for n, p in model.named_parameters() if not torch.equal(before[n], p)}


COMMON = dict(max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2, weight_decay=0.1, report_to=[],
              use_cpu=True, save_strategy="no", logging_steps=1, max_length=32, disable_tqdm=True)


def test_sft_trainer_trains_the_selection_only(tmp_path):
    tok = _tiny_tokenizer()
    model = tiny_model("llama", layers=4)
    before = snapshot(model)
    ds = datasets.Dataset.from_dict({"text": [TEXT] * 32})
    cb = SpectrumCallback(top_pct=0.25)
    trainer = trl.SFTTrainer(model=model, args=trl.SFTConfig(output_dir=str(tmp_path), **COMMON), train_dataset=ds,
                             processing_class=tok, callbacks=[cb])
    trainer.train()
    assert len(cb.selected) == 7 and _changed(model, before) == set(cb.selected)


def test_dpo_selects_the_policy_and_never_touches_the_reference(tmp_path):
    tok = _tiny_tokenizer()
    model, ref = tiny_model("llama", layers=4, seed=0), tiny_model("llama", layers=4, seed=0)
    before, ref_before = snapshot(model), snapshot(ref)
    ds = datasets.Dataset.from_dict({
        "prompt": ["in the beginning"] * 16,
        "chosen": [" god created the heaven and the earth"] * 16,
        "rejected": [" darkness was upon the face of the deep"] * 16,
    })
    cb = SpectrumCallback(top_pct=0.25, update_every=2, policy="rotate", park_state=True)
    cfg = trl.DPOConfig(output_dir=str(tmp_path), **COMMON)
    trainer = trl.DPOTrainer(model=model, ref_model=ref, args=cfg, train_dataset=ds, processing_class=tok,
                             callbacks=[cb])
    trainer.train()
    assert cb.session.model is model  # the policy is what Spectrum selects in
    picks = [set(h["selected"]) for h in cb.history]
    assert len(picks) == 2 and picks[0] != picks[1]  # rotate moved the selection at step 2
    assert set() < _changed(model, before) <= picks[0] | picks[1]
    assert _changed(ref, ref_before) == set()
