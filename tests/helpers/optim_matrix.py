"""The optimizer matrix: which optimizer runs with Spectrum under which engine, and how that
is tested.  The tests parametrize over it and the README's optimizer table is written from
it (``tests/unit/test_docs.py`` checks that the two agree)."""
from __future__ import annotations

import importlib.util

import pytest

# TrainingArguments.optim values, and the package each needs
TORCH_OPTIMS = ["adamw_torch", "adamw_bnb_8bit", "paged_adamw_8bit", "lion_8bit", "adamw_torch_8bit",
                "adamw_torch_4bit", "adafactor", "schedule_free_adamw", "galore_adamw", "apollo_adamw"]
_PACKAGE = {"adamw_bnb_8bit": "bitsandbytes", "paged_adamw_8bit": "bitsandbytes", "lion_8bit": "bitsandbytes",
            "adamw_torch_8bit": "torchao", "adamw_torch_4bit": "torchao", "schedule_free_adamw": "schedulefree",
            "galore_adamw": "galore_torch", "apollo_adamw": "apollo_torch"}


# what the other CI stacks (SPECTRUM_TESTS_CORE=1) run of the optimizers beside torch's AdamW
CORE_OPTIMS = ("adamw_bnb_8bit", "adamw_torch_8bit")


def other_optims(core: bool) -> list:
    """The optimizers beside ``adamw_torch`` a distributed worker runs: all, or the core ones."""
    return list(CORE_OPTIMS) if core else [o for o in TORCH_OPTIMS if o != "adamw_torch"]


def module_of(optim: str) -> str:
    """The package (or module) the optimizer class the Trainer builds for ``optim`` lives in."""
    return _PACKAGE.get(optim, "transformers.optimization" if optim == "adafactor" else "torch.optim")


def require(optim: str) -> None:
    """Fail (not skip) when the optimizer's package is missing: the [optim] extra installs it."""
    pkg = _PACKAGE.get(optim)
    if pkg and importlib.util.find_spec(pkg) is None:
        pytest.fail(f"{optim} needs {pkg}: pip install -e .[test] (the [optim] extra) installs it")


def extra_args(optim: str) -> dict:
    """TrainingArguments an optimizer needs beside ``optim``."""
    if optim in ("galore_adamw", "apollo_adamw"):
        return {"optim_target_modules": [r".*attn.*", r".*mlp.*"]}
    return {}


# ---------------------------------------------------------------------------- the README table
ENGINES = ("plain PyTorch", "DDP", "FSDP2", "ZeRO-2", "ZeRO-3")
_T = "tests/unit/test_optimizer_matrix.py"
_DDP = "tests/distributed/ddp/test_ddp.py"
_FSDP = "tests/distributed/fsdp/test_fsdp2.py"
_DS = "tests/distributed/deepspeed/test_deepspeed.py"
_FSDP_UNIT = "tests/unit/test_fsdp.py"


def ci(where: str, what: str):
    """A cell tested in CI: ``what`` names the test case in the file ``where``."""
    return ("tested in CI", where, what)


NA = ("n/a", None, None)


def refused(note: str, where: str, what: str):
    return (f"refused{note}", where, what)


# footnotes of the refused cells: what the message says
NOTES = {
    "¹": "bitsandbytes has no DTensor support (it fails without Spectrum too); the message points to "
         "`adamw_torch_8bit`",
    "²": "GaLore / APOLLO project whole weight matrices; FSDP2 shards and ZeRO's flat partitions are none",
    "³": "a switch rebuilds the ZeRO optimizer, which only the Adam family's state survives; the message names "
         "the optimizer with its module and what works: static Spectrum, or the optimizer on plain PyTorch, DDP "
         "(FSDP2 where it takes DTensors)",
    "⁴": "DeepSpeed's scheduler stays bound to the optimizer a switch replaces; the message points to "
         "`lr_scheduler_type`",
    "⁵": "fails in torchao 0.18 itself on CPU, with or without Spectrum (its compiled step rejects the shards)",
    "⁶": "transformers' Adafactor keeps plain-tensor moments beside DTensor gradients (it fails without Spectrum "
         "too); the message points to `adamw_torch` and `adamw_torch_8bit`",
    "⁷": "trains, static and rotating; resuming it under FSDP2 fails without Spectrum too (torch's DCP steps the "
         "optimizer before the Trainer puts it in train mode)",
}
_BNB_FSDP = refused("¹", _FSDP_UNIT, "test_fsdp2_refuses_bitsandbytes")
_PROJ_FSDP = refused("²", _FSDP_UNIT, "test_fsdp2_refuses_projected_optimizers")
_PROJ_DS = refused("²", _DS, "z2_galore_static")
_ADAFACTOR_FSDP = refused("⁶", _FSDP_UNIT, "test_fsdp2_refuses_adafactor_naming_what_works")
_DYN_DS = refused("³", _DS, "z2_bnb8_dynamic")


def _torch(optim):
    return (ci(_T, optim), ci(_T, optim))


def _ddp(optim):
    return (ci(_DDP, optim), ci(_DDP, optim))


# row -> one (static, dynamic) pair per engine of ENGINES
MATRIX = {
    "`adamw_torch` (torch AdamW, the default)": [
        _torch("adamw_torch"), (ci(_DDP, "b_history"), ci(_DDP, "a_history_steps")),
        (ci(_FSDP, "accel_static"), ci(_FSDP, "accel_dynamic")),
        (ci(_DS, "z2_static"), ci(_DS, "z2_dynamic")), (ci(_DS, "z3_static"), ci(_DS, "z3_dynamic"))],
    "DeepSpeed `optimizer` block, Adam/AdamW": [
        (NA, NA), (NA, NA), (NA, NA),
        (ci(_DS, "z2_block_static"), ci(_DS, "z2_block_dynamic")),
        (ci(_DS, "z3_block_static"), ci(_DS, "z3_block_dynamic"))],
    "DeepSpeed `scheduler` block": [
        (NA, NA), (NA, NA), (NA, NA),
        (ci(_DS, "z2_block_static"), refused("⁴", _DS, "z2_sched_dynamic")),
        (ci(_DS, "z3_block_static"), refused("⁴", _DS, "z2_sched_dynamic"))],
    "`offload_optimizer` (ZeRO-3: and `offload_param`)": [
        (NA, NA), (NA, NA), (NA, NA),
        (ci(_DS, "z2_offload_static"), ci(_DS, "z2_offload_dynamic")),
        (ci(_DS, "z3_offload_static"), ci(_DS, "z3_offload_dynamic"))],
    "`adamw_bnb_8bit` (bitsandbytes)": [
        _torch("adamw_bnb_8bit"), _ddp("adamw_bnb_8bit"), (_BNB_FSDP, _BNB_FSDP),
        (ci(_DS, "z2_bnb8_static"), _DYN_DS), (ci(_DS, "z3_bnb8_static"), _DYN_DS)],
    "`paged_adamw_8bit` (bitsandbytes)": [
        _torch("paged_adamw_8bit"), _ddp("paged_adamw_8bit"), (_BNB_FSDP, _BNB_FSDP),
        (ci(_DS, "z2_paged8_static"), _DYN_DS), (ci(_DS, "z3_offload_static"), _DYN_DS)],
    "`lion_8bit` (bitsandbytes)": [
        _torch("lion_8bit"), _ddp("lion_8bit"), (_BNB_FSDP, _BNB_FSDP),
        (ci(_DS, "z2_lion8_static"), _DYN_DS), (ci(_DS, "z3_lion8_static"), _DYN_DS)],
    "`adamw_torch_8bit` (torchao)": [
        _torch("adamw_torch_8bit"), _ddp("adamw_torch_8bit"),
        (ci(_FSDP, "accel_torchao8_static"), ci(_FSDP, "accel_torchao8_rotate_park")),
        (ci(_DS, "z2_torchao8_static"), _DYN_DS), (ci(_DS, "z3_torchao8_static"), _DYN_DS)],
    "`adamw_torch_4bit` (torchao)": [
        _torch("adamw_torch_4bit"), _ddp("adamw_torch_4bit"),
        (("fails upstream⁵", None, None), ("fails upstream⁵", None, None)),
        (ci(_DS, "z2_torchao4_static"), _DYN_DS), (ci(_DS, "z3_torchao4_static"), _DYN_DS)],
    "`adafactor`": [_torch("adafactor"), _ddp("adafactor"), (_ADAFACTOR_FSDP, _ADAFACTOR_FSDP),
                    (ci(_DS, "z2_adafactor_static"), _DYN_DS), (ci(_DS, "z3_adafactor_static"), _DYN_DS)],
    "`schedule_free_adamw`": [
        _torch("schedule_free_adamw"), _ddp("schedule_free_adamw"),
        (("tested in CI⁷", _FSDP, "accel_schedfree_static"), ("tested in CI⁷", _FSDP, "accel_schedfree_rotate_park")),
        (ci(_DS, "z2_schedfree_static"), _DYN_DS), (ci(_DS, "z3_schedfree_static"), _DYN_DS)],
    "`galore_adamw`, `apollo_adamw`": [
        (ci(_T, "galore_adamw"), ci(_T, "apollo_adamw")), _ddp("galore_adamw"), (_PROJ_FSDP, _PROJ_FSDP),
        (_PROJ_DS, _PROJ_DS), (_PROJ_DS, _PROJ_DS)],
}


def _short(cell) -> str:
    return cell[0].replace("tested in CI", "CI")


def readme_table() -> str:
    """The README's optimizer table: static / dynamic per engine."""
    lines = ["| optimizer (`TrainingArguments.optim`) | " + " | ".join(ENGINES) + " |",
             "| --- |" + " --- |" * len(ENGINES)]
    for row, cells in MATRIX.items():
        lines.append(f"| {row} | " + " | ".join(f"{_short(s)} / {_short(d)}" for s, d in cells) + " |")
    lines.append("")
    lines.append("Each cell: static / dynamic (`update_every`, with `policy=\"rotate\"` and `park_state=True` "
                 "where tested). CI: tested in CI: frozen weights bitwise unchanged and no optimizer state on a "
                 "frozen weight; a resume gives exactly the uninterrupted run's losses and weights in every plain "
                 "PyTorch and DDP cell, with FSDP2 for `adamw_torch` and `adamw_torch_8bit`, with ZeRO-2 and ZeRO-3 "
                 "for `adamw_torch` and ZeRO-2 for `adamw_bnb_8bit`. Refused: at `on_train_begin`, "
                 "before any step, with a message that names the optimizer class with its module and what works:")
    for k, v in NOTES.items():
        lines.append(f"{k} {v}.")
    return "\n".join(lines)
