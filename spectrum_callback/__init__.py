"""Spectrum for the Hugging Face Trainer and any PyTorch loop: train the highest-SNR weight matrices.

    trainer.add_callback(SpectrumCallback(top_pct=0.25))            # the Trainer
    session = SpectrumSession(model, optimizer, SpectrumConfig())   # your own loop

The names below are imported on first use, so that light entry points (``spectrum-scan
--help``, reading an SNR JSON) do not pay for importing torch and transformers.
"""
from importlib import import_module

__version__ = "0.1.0"

# public name -> submodule that defines it
_EXPORTS = {
    "SpectrumCallback": "callback",
    "SpectrumConfig": "config",
    "SpectrumSession": "session",
    "SpectrumState": "state",
    "spectrum_freeze": "preselect",
    "spectrum_lora_targets": "preselect",
    "apply_selection": "freeze",
    "SpectrumAnalyzer": "analyzer",
    "scan_checkpoint": "checkpoint_scan",
    "find_candidates": "candidates",
    "module_type": "candidates",
    "compute_snr": "snr",
    "select_top": "selection",
    "load_snr_json": "selection",
    "save_snr_json": "selection",
    "sorted_snr": "selection",
    "unfrozen_parameters_yaml": "selection",
    "write_unfrozen_parameters_yaml": "selection",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
