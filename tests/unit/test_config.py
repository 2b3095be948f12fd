"""SpectrumConfig is the one declaration of the settings: every entry point refuses the same
bad values with the same message, the docs are written from the fields, and the settings
round-trip through the state file's JSON."""
import os

import numpy as np
import pytest

from dsrun import ROOT
from spectrum_callback import SpectrumCallback, SpectrumConfig, select_top, spectrum_freeze
from spectrum_callback.config import reference_markdown
from tiny import tiny_model


def _freeze(**kw):
    spectrum_freeze(tiny_model("llama", layers=4), **kw)


def _select(**kw):
    select_top({f"m.layers.{i}.a": {"snr": float(i), "type": "a"} for i in range(4)}, kw.pop("top_pct", 0.25), **kw)


ENTRY_POINTS = {"SpectrumConfig": SpectrumConfig, "SpectrumCallback": SpectrumCallback,
                "spectrum_freeze": _freeze}

BAD = [
    (dict(top_pct=0), "top_pct"),
    (dict(top_pct=-0.1), "top_pct"),
    (dict(top_pct=1.5), "top_pct"),
    (dict(top_pct=float("nan")), "top_pct"),
    (dict(top_pct="x"), "top_pct"),
    (dict(top_pct=None), "top_pct"),
    (dict(top_pct=True), "top_pct"),
    (dict(top_pct=25), "did you mean 0.25"),
    (dict(update_every=0), "update_every"),
    (dict(update_every="5"), "update_every"),
    (dict(update_every=2.5), "update_every"),
    (dict(update_every=True), "update_every"),
    (dict(min_per_type=-1), "min_per_type"),
    (dict(min_per_type=False), "min_per_type"),
    (dict(include=["("]), "include"),
    (dict(never_train=["("]), "never_train"),
    (dict(always_train=[3]), "always_train"),
    (dict(snr_json="no/such/file.json"), "no such file"),
    (dict(snr_json=42), "snr_json must be a path or a mapping"),
    (dict(method="qr"), "method"),
    (dict(dtype="float16"), "dtype"),
    (dict(chunk_mb=False), "chunk_mb"),
    (dict(chunk_mb=0), "chunk_mb"),
    (dict(plot_dir=3), "plot_dir"),
    (dict(train_heads="yes"), "train_heads"),
    (dict(policy="lisa", update_every=5), "policy='lisa' is not known"),
    (dict(policy="rotate"), "set update_every"),
    (dict(policy="random"), "set update_every"),
    (dict(policy="cyclic"), "set update_every"),
    (dict(policy="rotate", update_every=5, pool_pct=0.2), r"pool_pct=0.2 must be in \(top_pct, 1\]"),
    (dict(policy="rotate", update_every=5, pool_pct=1.5), "pool_pct"),
    (dict(policy="random", update_every=5, pool_pct=0.5), "applies to policy='rotate' only"),
    (dict(policy="scan", update_every=5, park_state=True), "park_state=True applies to the moving policies"),
    (dict(park_state="yes", policy="rotate", update_every=5), "park_state"),
    (dict(policy=object(), update_every=5), "SelectionPolicy"),
    (dict(policy="random", update_every=5, seed=1.5), "seed"),
    (dict(top_pcnt=0.25), "unknown Spectrum setting 'top_pcnt'; did you mean 'top_pct'"),
]


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
@pytest.mark.parametrize("kwargs,match", BAD, ids=[str(i) for i in range(len(BAD))])
def test_every_entry_point_refuses_a_bad_setting_with_the_same_message(entry, kwargs, match):
    if entry == "SpectrumConfig" and "top_pcnt" in kwargs:
        with pytest.raises(ValueError, match=match):
            SpectrumConfig.from_settings(**kwargs)
        return
    with pytest.raises(ValueError, match=match):
        ENTRY_POINTS[entry](**kwargs)


@pytest.mark.parametrize("kwargs,match", [c for c in BAD if set(c[0]) <= {"top_pct", "min_per_type"}])
def test_select_top_refuses_the_same_numbers(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _select(**kwargs)


def test_numpy_numbers_are_numbers_and_settings_round_trip(tmp_path):
    cfg = SpectrumConfig(top_pct=np.float32(0.5), update_every=np.int64(10), min_per_type=np.int32(2),
                         include=r"q_proj", dtype="float64")
    assert (cfg.top_pct, cfg.update_every, cfg.min_per_type, cfg.include, cfg.dtype) == (0.5, 10, 2, ["q_proj"],
                                                                                         "float64")
    assert SpectrumConfig.from_json_file(cfg.to_json_file(str(tmp_path / "c.json"))) == cfg
    with pytest.raises(ValueError, match="unknown SpectrumConfig settings"):
        SpectrumConfig.from_dict({"top_pct": 0.25, "future_knob": 1})


def test_the_callback_keeps_its_promise_and_takes_every_setting():
    # the two calls the README promises
    assert SpectrumCallback(top_pct=0.25).config == SpectrumConfig(top_pct=0.25)
    assert SpectrumCallback(top_pct=0.25, update_every=100).config == SpectrumConfig(top_pct=0.25, update_every=100)
    every = dict(include=[r"proj"], exclude=[r"layers\.0\."], always_train=[r"lm_head"], never_train=[r"v_proj"],
                 min_per_type=2, method="svd", dtype="float64", chunk_mb=64, plot_dir="p", verbose=False,
                 train_heads=False, policy="rotate", update_every=3, pool_pct=0.75, park_state=True, seed=7,
                 top_pct=0.5)
    assert set(every) | {"snr_json"} == set(SpectrumConfig.__dataclass_fields__)
    assert SpectrumCallback(**every).config == SpectrumConfig(**every)
    assert SpectrumCallback.from_config(SpectrumConfig(**every)).config == SpectrumConfig(**every)


def test_spectrum_freeze_refuses_a_moving_selection():
    with pytest.raises(ValueError, match="selects once, before training"):
        _freeze(update_every=5)


def test_every_field_is_documented_once_and_the_reference_is_current():
    fields = SpectrumConfig.__dataclass_fields__.values()
    assert all(f.metadata.get("doc") for f in fields)
    for f in fields:  # the class docstring is written from the fields
        assert f"    {f.name}: {f.metadata['doc']}" in SpectrumConfig.__doc__
    path = os.path.join(ROOT, "docs", "guide", "configuration.md")
    with open(path) as fh:
        assert fh.read() == reference_markdown(), "run: python -m spectrum_callback.config > " + path
