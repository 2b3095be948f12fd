"""Tiny random models of many architectures, with one batch of inputs each (tests/unit/test_models.py,
the README's "Models" table)."""
from __future__ import annotations

import torch
import transformers

import tiny

V = tiny.VOCAB


def _lm(arch):
    return lambda: tiny.tiny_model(arch, layers=2)


def _tokens(n=4, length=16, labels=True, vocab=V):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (n, length), generator=g)
    out = {"input_ids": x, "attention_mask": torch.ones_like(x)}
    if labels:
        out["labels"] = x.clone()
    return out


def _bert_cfg():
    return dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                max_position_embeddings=64)


def _seq_cls(model_cls, cfg):
    def build():
        torch.manual_seed(0)
        return model_cls(cfg)
    return build


def _t5():
    torch.manual_seed(0)
    return transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=V, d_model=32, d_ff=64, d_kv=16, num_layers=2, num_decoder_layers=2, num_heads=2,
        decoder_start_token_id=0, pad_token_id=0))


def _vit():
    torch.manual_seed(0)
    return transformers.ViTForImageClassification(transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=16,
        patch_size=8, num_labels=3))


def _llava():
    torch.manual_seed(0)
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=16, patch_size=8)
    text = transformers.LlamaConfig(vocab_size=V + 4, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2)
    cfg = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_id=V + 1,
                                   vision_feature_layer=-1, projector_hidden_act="gelu")
    return transformers.LlavaForConditionalGeneration(cfg)


def _llama_cls():
    torch.manual_seed(0)
    cfg = tiny.tiny_config("llama", layers=2, num_labels=3, pad_token_id=0)
    return transformers.LlamaForSequenceClassification(cfg)


# name -> (builder, batch) ; batch: dict of tensors for one training step
ZOO = {
    "llama": (_lm("llama"), lambda: _tokens()),
    "mistral": (_lm("mistral"), lambda: _tokens()),
    "qwen2": (_lm("qwen2"), lambda: _tokens()),
    "phi3": (_lm("phi3"), lambda: _tokens()),
    "gpt2": (_lm("gpt2"), lambda: _tokens()),
    "mixtral (fused experts)": (_lm("mixtral"), lambda: _tokens()),
    "qwen3_moe (fused experts)": (_lm("qwen3_moe"), lambda: _tokens()),
    "deepseek_v3 (fused experts)": (_lm("deepseek_v3"), lambda: _tokens()),
    "gpt_oss (fused experts)": (_lm("gpt_oss"), lambda: _tokens()),
    "llama sequence classification": (_llama_cls,
                                      lambda: {**_tokens(labels=False), "labels": torch.tensor([0, 1, 2, 1])}),
    "bert sequence classification": (_seq_cls(transformers.BertForSequenceClassification,
                                              transformers.BertConfig(**_bert_cfg(), num_labels=3)),
                                     lambda: {**_tokens(labels=False), "labels": torch.tensor([0, 1, 2, 1])}),
    "bert question answering": (_seq_cls(transformers.BertForQuestionAnswering, transformers.BertConfig(**_bert_cfg())),
                                lambda: {**_tokens(labels=False), "start_positions": torch.tensor([1, 2, 3, 4]),
                                         "end_positions": torch.tensor([5, 6, 7, 8])}),
    "vit image classification": (_vit, lambda: {"pixel_values": torch.randn(4, 3, 16, 16,
                                                                            generator=torch.Generator().manual_seed(0)),
                                                "labels": torch.tensor([0, 1, 2, 1])}),
    "t5 (encoder + decoder)": (_t5, lambda: {**_tokens(), "decoder_input_ids": _tokens(labels=False)["input_ids"]}),
    "llava (vision + language)": (_llava, lambda: _tokens(vocab=V)),
}
