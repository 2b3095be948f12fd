"""Spectrum in axolotl: ``plugins: [spectrum_callback.integrations.axolotl.SpectrumPlugin]``.

Every :class:`~spectrum_callback.SpectrumConfig` setting is a YAML key ``spectrum_<setting>``
(``spectrum_top_pct: 0.25``, ``spectrum_update_every: 200``, ``spectrum_policy: rotate``, ...).
The keys are checked when axolotl validates its config, by the same rules (and with the same
messages) as :class:`~spectrum_callback.SpectrumCallback`, so a bad value stops ``axolotl
train`` before a model is loaded; then the plugin adds the callback to axolotl's Trainer.

Differences from axolotl's own ``axolotl.integrations.spectrum.SpectrumPlugin``: the model is
scanned (``spectrum_snr_json`` optionally gives the first selection from an original SNR
file; a missing file is an error, never a full fine-tune), the selection can move during
training, and ``lm_head``/``embed_tokens`` are trained only when ``spectrum_always_train``
names them (axolotl's adds both: ``spectrum_always_train: ['^lm_head\\.weight$',
'^model\\.embed_tokens\\.weight$']``).  The two plugins, or this one and
``unfrozen_parameters``, are refused together.

SNR-placed LoRA: with ``adapter: lora`` and ``spectrum_lora: true`` the plugin trains no matrix
in full; before axolotl wraps the model with PEFT it sets ``lora_target_modules`` to the
modules Spectrum selects (:func:`~spectrum_callback.spectrum_lora_targets`, with the
``spectrum_*`` selection keys: ``spectrum_top_pct``, ``spectrum_include``, ...).

This is the only module of the package that imports axolotl (``pip install
spectrum_callback[axolotl]``).
"""
from __future__ import annotations

from dataclasses import fields
from typing import Any, Mapping, Optional

from axolotl.integrations.base import BasePlugin
from pydantic import create_model, model_validator

from .._logging import get_logger
from ..callback import SpectrumCallback
from ..config import SpectrumConfig
from ..preselect import LORA_SETTINGS, spectrum_lora_targets

__all__ = ["SpectrumPlugin", "SpectrumCallbackArgs", "PLUGIN", "AXOLOTL_PLUGIN", "YAML_KEYS", "LORA_KEY",
           "spectrum_config", "check_axolotl_config", "lora_settings"]

PLUGIN = "spectrum_callback.integrations.axolotl.SpectrumPlugin"
AXOLOTL_PLUGIN = "axolotl.integrations.spectrum.SpectrumPlugin"
PREFIX = "spectrum_"
# YAML key -> SpectrumConfig field: all of them (``policy`` by name, ``snr_json`` as a path)
YAML_KEYS = {PREFIX + f.name: f.name for f in fields(SpectrumConfig)}
LORA_KEY = PREFIX + "lora"  # place LoRA on Spectrum's selection instead of training it in full
logger = get_logger(__name__)
# axolotl's own plugin's keys, which this plugin does not read
_AXOLOTL_KEYS = {
    "spectrum_top_fraction": "use spectrum_top_pct (a fraction in (0, 1], e.g. 0.25)",
    "spectrum_model_name": "drop it (this plugin scans the model; spectrum_snr_json names an SNR file to start from)",
}


def _plugins(data: Mapping) -> list:
    return [str(p) for p in (data.get("plugins") or [])]


def spectrum_config(cfg: Mapping) -> SpectrumConfig:
    """The :class:`SpectrumConfig` of an axolotl config (a mapping with ``spectrum_*`` keys;
    absent or null keys take the callback's defaults)."""
    kwargs = {field: cfg[key] for key, field in YAML_KEYS.items() if cfg.get(key) is not None}
    if "policy" in kwargs and not isinstance(kwargs["policy"], str):
        raise ValueError(f"spectrum_policy={kwargs['policy']!r} must be a policy name in YAML "
                         "('scan', 'rotate', 'random' or 'cyclic')")
    return SpectrumConfig(**kwargs)


def check_axolotl_config(data: Mapping) -> SpectrumConfig:
    """Refuse what cannot work with this plugin (one ``ValueError`` naming the problem and the
    fix), then build the :class:`SpectrumConfig` of ``data``, axolotl's unparsed config."""
    plugins = _plugins(data)
    if AXOLOTL_PLUGIN in plugins:
        raise ValueError(f"plugins lists both {AXOLOTL_PLUGIN} and {PLUGIN}: keep one (this one scans the model "
                         f"and can re-select during training; for it, remove {AXOLOTL_PLUGIN} and its "
                         "spectrum_top_fraction/spectrum_model_name keys)")
    if data.get("unfrozen_parameters"):
        raise ValueError(f"unfrozen_parameters and {PLUGIN} both choose the trainable parameters: keep one "
                         "(with the plugin, remove unfrozen_parameters and put parameters to train always in "
                         "spectrum_always_train)")
    for key, fix in _AXOLOTL_KEYS.items():
        if key in data:
            raise ValueError(f"{key} is a key of axolotl's own Spectrum plugin, not of {PLUGIN}: {fix}")
    unknown = sorted(k for k in data if str(k).startswith(PREFIX) and k not in YAML_KEYS and k != LORA_KEY)
    if unknown:
        raise ValueError(f"unknown Spectrum key(s) {unknown}; the keys are {', '.join(sorted(YAML_KEYS))}")
    if (data.get("fsdp") or data.get("fsdp_config")) and str(data.get("fsdp_version") or 1) != "2":
        raise ValueError("Spectrum changes which parameters require grad, which FSDP1's flat parameters do not "
                         "allow: set fsdp_version: 2")
    if data.get(LORA_KEY):
        _check_spectrum_lora(data)
    elif data.get("adapter"):
        raise ValueError(f"adapter: {data['adapter']} trains adapters, and {PLUGIN} selects base-model matrices "
                         f"to train in full: remove adapter for Spectrum, or set {LORA_KEY}: true to place the LoRA "
                         "adapters on Spectrum's selection")
    return spectrum_config(data)


def _check_spectrum_lora(data: Mapping) -> None:
    if data.get("adapter") != "lora":
        raise ValueError(f"{LORA_KEY}: true places LoRA adapters and needs adapter: lora (got adapter: "
                         f"{data.get('adapter')!r}; QLoRA's quantized model cannot be scanned)")
    if data.get("lora_target_modules") or data.get("lora_target_linear"):
        raise ValueError(f"{LORA_KEY}: true sets lora_target_modules to Spectrum's selection: remove "
                         "lora_target_modules and lora_target_linear")
    keys = LORA_SETTINGS | {"top_pct", "verbose"}
    other = sorted(k for k, f in YAML_KEYS.items() if data.get(k) is not None and f not in keys)
    if other:
        raise ValueError(f"{LORA_KEY}: true selects once, where the adapters go: {', '.join(other)} do(es) not "
                         f"apply (the selection keys are {', '.join(PREFIX + k for k in sorted(keys))})")


def lora_settings(cfg: Mapping) -> dict:
    """The selection settings of :func:`~spectrum_callback.spectrum_lora_targets` in an axolotl
    config (``spectrum_top_pct``, ``spectrum_include``, ...)."""
    return {f: cfg[k] for k, f in YAML_KEYS.items() if f in LORA_SETTINGS | {"top_pct"} and cfg.get(k) is not None}


def _validate(cls, data: Any) -> Any:
    if isinstance(data, dict):
        check_axolotl_config(data)
    return data


# The input arguments merged into axolotl's config model: one optional key per setting (kept
# as given, so that SpectrumConfig checks them and words the error).
# (named unlike axolotl's own plugin's SpectrumArgs: axolotl imports each plugin's class by its
# name into one namespace, where the same name twice would be one class)
SpectrumCallbackArgs = create_model(
    "SpectrumCallbackArgs",
    __module__=__name__,
    __validators__={"check_spectrum": model_validator(mode="before")(classmethod(_validate))},
    **{key: (Optional[Any], None) for key in [*YAML_KEYS, LORA_KEY]},
)
SpectrumCallbackArgs.__doc__ = "axolotl config keys of this SpectrumPlugin (spectrum_<SpectrumConfig field>)."


class SpectrumPlugin(BasePlugin):
    """axolotl plugin: :class:`~spectrum_callback.SpectrumCallback` on axolotl's Trainer,
    configured by the ``spectrum_*`` keys (:data:`YAML_KEYS`)."""

    def get_input_args(self) -> str:
        return f"{__name__}.SpectrumCallbackArgs"

    def pre_lora_load(self, cfg, model) -> None:
        """With ``spectrum_lora: true``: ``lora_target_modules`` becomes Spectrum's selection,
        scanned on the loaded base model before PEFT wraps it."""
        if not cfg.get(LORA_KEY):
            return
        cfg["lora_target_modules"] = spectrum_lora_targets(model, **lora_settings(cfg))
        cfg["lora_target_linear"] = False
        logger.warning("Spectrum: LoRA adapters on the %d modules Spectrum selected (top %g per type), e.g. %s",
                       len(cfg["lora_target_modules"]), lora_settings(cfg).get("top_pct", 0.25),
                       cfg["lora_target_modules"][0])

    def add_callbacks_post_trainer(self, cfg, trainer) -> list:
        if cfg.get(LORA_KEY):
            return []  # the adapters train, no base matrix (the config was checked when it loaded)
        self.callback = SpectrumCallback.from_config(check_axolotl_config(cfg))
        return [self.callback]
