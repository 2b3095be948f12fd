"""Every optimizer the Trainer can build, on plain PyTorch (one process): static Spectrum,
dynamic ``rotate`` with ``park_state=True``, and a resume of the dynamic run.

Checked at every step: no frozen weight changes a bit and no frozen weight holds optimizer
state; the resumed run's losses and final weights equal the uninterrupted run's exactly.
The distributed cells of the optimizer matrix (DDP, FSDP2, DeepSpeed) are in
tests/distributed/; the README's optimizer table comes from ``optim_matrix.MATRIX``.
"""
import os

import pytest
import torch
import transformers

from optim_matrix import TORCH_OPTIMS, extra_args, require
from spectrum_callback import SpectrumCallback
from spectrum_callback.backends import unwrap_optimizer
from tiny import LossLog, RandomTokens, frozen_changes, snapshot_frozen, tiny_model, training_args

pytestmark = [pytest.mark.slow, pytest.mark.stack]  # the optimizers' own versions differ per stack


class Guard(transformers.TrainerCallback):
    """Frozen bits and optimizer state on frozen weights, at every step."""

    def __init__(self):
        self.violations, self.frozen_state = [], []

    def on_step_begin(self, args, state, control, model=None, **kw):
        self.snap = snapshot_frozen(model)

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kw):
        self.violations += frozen_changes(model, self.snap)
        opt = unwrap_optimizer(optimizer)
        names = {id(p): n for n, p in model.named_parameters()}
        self.frozen_state += [names[id(p)] for p, st in opt.state.items()
                              if id(p) in names and not p.requires_grad and st]


def _run(tmp, optim, dynamic, max_steps, resume=None, save=False):
    model = tiny_model("llama", seed=0)
    kw = dict(optim=optim, max_steps=max_steps, **extra_args(optim))
    if save:
        kw.update(save_strategy="steps", save_steps=3)
    args = training_args(tmp, **kw)
    cb = SpectrumCallback(top_pct=0.25, verbose=False,
                          **(dict(update_every=2, policy="rotate", park_state=True) if dynamic else {}))
    guard, losses = Guard(), LossLog()
    trainer = transformers.Trainer(model=model, args=args, train_dataset=RandomTokens(n=64, length=16, seed=1),
                                   callbacks=[cb, guard, losses])
    trainer.train(resume_from_checkpoint=resume)
    return model, cb, guard, losses.losses


@pytest.mark.parametrize("optim", TORCH_OPTIMS)
def test_static(tmp_path, optim):
    require(optim)
    model, cb, guard, losses = _run(str(tmp_path), optim, dynamic=False, max_steps=4)
    assert guard.violations == [] and guard.frozen_state == []
    assert len(cb.selected) == 7 and len(losses) == 4


@pytest.mark.parametrize("optim", TORCH_OPTIMS)
def test_dynamic_rotate_parked_and_resumed(tmp_path, optim):
    require(optim)
    if optim in ("galore_adamw", "apollo_adamw"):
        # The Trainer loads optimizer.pt with weights_only=True: their projectors must be allowed,
        # with or without Spectrum (torch's message says so); Spectrum's parked file allows them itself.
        from spectrum_callback.state import optimizer_state_types

        torch.serialization.add_safe_globals(optimizer_state_types())
    full, cb, guard, losses = _run(str(tmp_path), optim, dynamic=True, max_steps=6, save=True)
    assert guard.violations == [] and guard.frozen_state == []
    picks = [h["selected"] for h in cb.history]
    assert len(picks) == 3 and picks[0] != picks[1] != picks[2]  # selections at 0, 2, 4
    assert os.path.isfile(tmp_path / "checkpoint-3" / "spectrum_parked.rank0.pt")  # a leaver's state waits
    resumed, cb2, guard2, losses2 = _run(str(tmp_path), optim, dynamic=True, max_steps=6,
                                         resume=str(tmp_path / "checkpoint-3"))
    assert guard2.violations == [] and guard2.frozen_state == []
    assert losses2 == {s: v for s, v in losses.items() if s > 3}
    want = dict(full.named_parameters())
    assert all(torch.equal(p, want[n]) for n, p in resumed.named_parameters())
