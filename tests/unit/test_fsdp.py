"""FSDP1 and DTensor-sharded models without FSDP2: refused with a clear error that names FSDP2;
FSDP2 models are accepted (their training is tested with 2 processes in test_fsdp2.py); the
static alternative (spectrum_freeze before wrapping) keeps frozen weights as they were.

One process, gloo, on CPU: FSDP1 and FSDP2 both wrap on CPU with a world of 1 (FSDP1
then uses NO_SHARD, FSDP2 still turns every parameter into a DTensor).
"""
import pytest
import torch
import torch.distributed as dist
import transformers

from dsrun import free_port
from spectrum_callback import SpectrumAnalyzer, SpectrumCallback, spectrum_freeze
from spectrum_callback.candidates import sharding_engine
from tiny import RandomTokens, snapshot, tiny_model, training_args

pytestmark = pytest.mark.stack  # version-sensitive: runs on every CI stack

fsdp = pytest.importorskip("torch.distributed.fsdp")


@pytest.fixture
def process_group():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _decoder_layer_cls(model):
    return type(model.model.layers[0])


def test_fsdp1_wrapped_model_is_refused(process_group):
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    inner = tiny_model("llama")
    wrapped = fsdp.FullyShardedDataParallel(
        inner, device_id=torch.device("cpu"), use_orig_params=True,
        auto_wrap_policy=ModuleWrapPolicy({_decoder_layer_cls(inner)}),
    )
    # The wrapper and the inner module (what the Trainer's callbacks are handed) are both refused.
    for model in (wrapped, inner):
        assert sharding_engine(model) == "FSDP (FullyShardedDataParallel)"
        with pytest.raises(ValueError, match=r"distributed by FSDP .*Use FSDP2.*spectrum_freeze\(model"):
            SpectrumAnalyzer(model)
        with pytest.raises(ValueError, match="distributed by FSDP"):
            spectrum_freeze(model, top_pct=0.25)


@pytest.mark.parametrize("use_orig_params", [True, False])
def test_inner_module_of_a_root_only_fsdp1_wrap_is_refused(process_group, use_orig_params):
    inner = tiny_model("llama")
    fsdp.FullyShardedDataParallel(inner, device_id=torch.device("cpu"), use_orig_params=use_orig_params)
    assert not any(isinstance(m, fsdp.FullyShardedDataParallel) for m in inner.modules())
    with pytest.raises(ValueError, match="distributed by FSDP"):
        SpectrumAnalyzer(inner)


def test_fsdp2_model_is_accepted_and_scanned_like_the_plain_model(process_group):
    plain = tiny_model("qwen2")
    model = tiny_model("qwen2")
    for layer in model.model.layers:
        fsdp.fully_shard(layer)
    fsdp.fully_shard(model)
    assert sharding_engine(model) == "FSDP2 (fully_shard)"
    got, want = SpectrumAnalyzer(model).scan(), SpectrumAnalyzer(plain).scan()
    assert list(got) == list(want)
    for n in want:
        assert got[n]["snr"] == pytest.approx(want[n]["snr"], rel=1e-6), n


def test_dtensor_parameters_are_refused(process_group):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor

    model = tiny_model("llama")
    mesh = init_device_mesh("cpu", (1,))
    lin = model.model.layers[0].mlp.up_proj
    lin.weight = torch.nn.Parameter(distribute_tensor(lin.weight.detach(), mesh, [Replicate()]))
    assert sharding_engine(model).startswith("DTensor")
    with pytest.raises(ValueError, match=r"distributed by DTensor \(tensor parallelism"):
        SpectrumAnalyzer(model)


def test_plain_model_is_not_flagged():
    assert sharding_engine(tiny_model("gpt2")) is None


class _FlagTrainer(transformers.Trainer):
    def fire_train_begin(self):
        self.create_optimizer()
        self.callback_handler.optimizer = self.optimizer
        return self.callback_handler.on_train_begin(self.args, self.state, self.control)


@pytest.mark.parametrize("version", [1, None])
def test_trainer_with_fsdp1_is_refused_before_any_change(tmp_path, version):
    """Under the Trainer's FSDP1 the callback may be handed the inner module, whose parameters
    are views of FSDP's flat shards: the callback refuses on ``trainer.is_fsdp_enabled`` unless
    the plugin says ``fsdp_version`` 2, and the message names FSDP2 as the way."""
    from types import SimpleNamespace

    model = tiny_model("llama")
    before = snapshot(model)
    cb = SpectrumCallback(top_pct=0.25)
    trainer = _FlagTrainer(model=model, args=training_args(tmp_path, max_steps=1), train_dataset=RandomTokens(8),
                           callbacks=[cb])
    trainer.is_fsdp_enabled = True
    plugin = SimpleNamespace(fsdp_version=version) if version else None
    trainer.accelerator.state.fsdp_plugin = plugin
    try:
        with pytest.raises(ValueError, match=r"Trainer runs FSDP1 .*Use FSDP2.*fsdp_version"):
            trainer.fire_train_begin()
    finally:
        trainer.accelerator.state.fsdp_plugin = None
    assert all(p.requires_grad for p in model.parameters())  # nothing was frozen
    after = snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_spectrum_freeze_before_fsdp2_keeps_frozen_weights(process_group):
    """Static Spectrum without the callback: freeze on the plain model, then shard, then train."""
    model = tiny_model("llama")
    selected = spectrum_freeze(model, top_pct=0.25)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert selected and frozen and trainable
    for layer in model.model.layers:
        fsdp.fully_shard(layer)
    fsdp.fully_shard(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    batch = RandomTokens(2)[0]
    ids = batch["input_ids"].unsqueeze(0)
    for _ in range(2):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    params = {n: p.full_tensor() for n, p in model.named_parameters()}
    for n, w in frozen.items():
        assert torch.equal(params[n], w), n
    changed = [n for n, w in trainable.items() if not torch.equal(params[n], w)]
    assert len(changed) == len(trainable)


def test_fsdp2_resume_restores_trainable_as_saved_keeping_user_frozen_and_tied():
    """The FSDP2 and DeepSpeed resume hooks set requires_grad as saved before the optimizer state
    loads (one function): a parameter the user froze stays the user's, a tied weight trains when
    any of its names was saved as trainable."""
    from spectrum_callback import _frozen
    from spectrum_callback._frozen import restore_trainable

    model = tiny_model("llama", tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    user = model.model.layers[0].mlp.up_proj.weight
    user.requires_grad_(False)  # frozen by the user before the Trainer
    saved = ["model.embed_tokens.weight", "model.layers.1.self_attn.q_proj.weight"]
    restore_trainable(model, saved)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(saved)
    assert model.lm_head.weight.requires_grad  # its other name was not in the file
    assert _frozen.frozen_by_user(user)
    assert not _frozen.frozen_by_user(model.model.layers[1].mlp.up_proj.weight)  # frozen by Spectrum


def test_state_file_names_every_alias_of_a_trainable_tied_weight(tmp_path):
    from spectrum_callback import SpectrumConfig, SpectrumSession

    model = tiny_model("llama", tie_word_embeddings=True)
    session = SpectrumSession(model, None, SpectrumConfig(top_pct=0.25, always_train=[r"embed_tokens"]))
    for n, p in model.named_parameters():
        p.requires_grad_("embed_tokens" in n)
    names = session.state_dict()["trainable"]
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= set(names)


def _sharded_session(optimizer_factory):
    from spectrum_callback import SpectrumConfig, SpectrumSession

    model = tiny_model("llama")
    for layer in model.model.layers:
        fsdp.fully_shard(layer)
    fsdp.fully_shard(model)
    return SpectrumSession(model, optimizer_factory(model.parameters()), SpectrumConfig(top_pct=0.25))


def test_fsdp2_refuses_bitsandbytes_naming_what_works(process_group):
    bnb = pytest.importorskip("bitsandbytes")
    session = _sharded_session(lambda ps: bnb.optim.AdamW8bit(ps, lr=1e-3))
    with pytest.raises(ValueError, match=r"bitsandbytes\.optim\.adamw\.AdamW8bit cannot step FSDP2's DTensor.*"
                                         r"adamw_torch_8bit"):
        session.start()


def test_fsdp2_refuses_adafactor_naming_what_works(process_group):
    from transformers.optimization import Adafactor

    session = _sharded_session(lambda ps: Adafactor(ps, lr=1e-3, scale_parameter=False, relative_step=False))
    with pytest.raises(ValueError, match=r"transformers\.optimization\.Adafactor cannot step FSDP2's DTensor.*"
                                         r"optim='adamw_torch'"):
        session.start()


@pytest.mark.parametrize("package,cls", [("galore_torch", "GaLoreAdamW"), ("apollo_torch", "APOLLOAdamW")])
def test_fsdp2_refuses_projected_optimizers(process_group, package, cls):
    mod = pytest.importorskip(package)
    session = _sharded_session(lambda ps: getattr(mod, cls)(ps, lr=1e-3))
    with pytest.raises(ValueError, match="projects the gradient of each whole weight matrix"):
        session.start()
