"""Spectrum for the Hugging Face Trainer: train the highest-SNR weight matrices.

    trainer.add_callback(SpectrumCallback(top_pct=0.25))
"""
from .analyzer import SpectrumAnalyzer, find_candidates, module_type
from .callback import SpectrumCallback, apply_selection, spectrum_freeze
from .selection import (
    load_snr_json,
    save_snr_json,
    select_top,
    sorted_snr,
    unfrozen_parameters_yaml,
    write_unfrozen_parameters_yaml,
)
from .snr import compute_snr

__version__ = "0.1.0"

__all__ = [
    "SpectrumCallback",
    "SpectrumAnalyzer",
    "compute_snr",
    "select_top",
    "spectrum_freeze",
    "apply_selection",
    "find_candidates",
    "module_type",
    "load_snr_json",
    "save_snr_json",
    "sorted_snr",
    "unfrozen_parameters_yaml",
    "write_unfrozen_parameters_yaml",
]
