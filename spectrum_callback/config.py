"""``SpectrumConfig``: every setting of a Spectrum run, declared, documented and validated once.

The callback, the session, :func:`~spectrum_callback.spectrum_freeze`,
:func:`~spectrum_callback.spectrum_lora_targets`, the axolotl plugin (``spectrum_<setting>``
keys), the ``spectrum-scan`` CLI and the checkpoint state file all take their settings from
this dataclass, so a setting means the same thing and is checked by the same rule everywhere
(the way peft's ``LoraConfig`` serves its tuners).  Each field carries its documentation
(``metadata["doc"]``): the class docstring and the configuration reference in the docs
(:func:`reference_markdown`) are written from it.

Rules: numbers must be numbers (``True``/``False`` are refused where a number is expected,
numpy integers and floats are accepted); patterns must compile; a ``snr_json`` path must
exist.  :meth:`SpectrumConfig.to_dict` / :meth:`SpectrumConfig.from_dict` round-trip through
JSON (``dtype`` as its name; a ``snr_json`` mapping is not stored, only a path is).
"""
from __future__ import annotations

import json
import numbers
import os
import re
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import List, Mapping, Optional, Sequence, Union

from .policies import BUILTIN_POLICIES, ROTATING_POLICIES, SelectionPolicy
from .selection import validate_min_per_type, validate_top_pct

__all__ = ["SpectrumConfig", "SNR_METHODS", "validate_top_pct", "compile_patterns", "check_method", "check_dtype",
           "check_chunk_mb", "reference_markdown"]

# The SNR routes the analyzer offers (see spectrum_callback.analyzer).
SNR_METHODS = ("auto", "fast", "gram", "svd")
_DTYPES = ("float32", "float64")


def _is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _setting(default=MISSING, doc: str = "", factory=MISSING):
    """A field with its documentation."""
    if factory is not MISSING:
        return field(default_factory=factory, metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


def compile_patterns(patterns: Optional[Sequence[str]], arg: str) -> List["re.Pattern"]:
    """Compile regexes (one string counts as one pattern), naming the argument when one is bad."""
    if patterns is None:
        return []
    if isinstance(patterns, str):
        patterns = [patterns]
    out = []
    for p in patterns:
        if not isinstance(p, str):
            raise ValueError(f"{arg}: {p!r} is not a regular expression string")
        try:
            out.append(re.compile(p))
        except re.error as exc:
            raise ValueError(f"{arg}: {p!r} is not a valid regular expression ({exc}); fix the pattern") from exc
    return out


@dataclass
class SpectrumConfig:
    """Settings of a Spectrum run (each field's documentation follows, from the field itself)."""

    top_pct: float = _setting(0.25, "Fraction of each matrix type kept trainable, in (0, 1]: the top ``top_pct`` by "
                              "SNR (``int(len(type) * top_pct)``, the original tool's truncation).")
    update_every: Optional[int] = _setting(None, "``None``: static Spectrum (one selection before training). N: a new "
                                           "selection every N optimizer steps (dynamic).")
    include: Optional[List[str]] = _setting(None, "Regexes on module names that make the candidates (``None``: every "
                                            "2-D weight and fused expert bank inside the numbered layers).")
    exclude: Optional[List[str]] = _setting(None, "Regexes on module names left out of the candidates.")
    always_train: List[str] = _setting(doc="Regexes on parameter names kept trainable and never scanned, e.g. "
                                       "``[r'^lm_head\\.weight$']``.", factory=list)
    never_train: List[str] = _setting(doc="Regexes on candidate module names that are scanned but never selected.",
                                      factory=list)
    min_per_type: int = _setting(1, "At least this many matrices of each type train (0: the original tool's plain "
                                 "truncation).")
    snr_json: Union[None, str, os.PathLike, Mapping] = _setting(
        None, "An SNR file of the original tool (either of its formats) or a mapping, for the first selection "
        "instead of a scan.")
    method: str = _setting("auto", "SNR route: ``'auto'`` (fast and checked, exact fallback), ``'fast'``, "
                           "``'gram'`` or ``'svd'`` (the original tool's).")
    dtype: object = _setting(None, "Precision of the SNR work: ``None`` (per method and device), "
                             "``torch.float32`` or ``torch.float64`` (or their names).")
    chunk_mb: float = _setting(512, "Most MiB of matrix copies one solver call holds.")
    plot_dir: Optional[str] = _setting(None, "A folder for ``spectrum_snr.png`` (and ``spectrum_selection.png`` for a "
                                       "moving selection), written at the end of training.")
    verbose: bool = _setting(True, "Log a one-line summary at every selection (INFO).")
    train_heads: bool = _setting(True, "Train the task heads a ``*For...`` model adds to its base model "
                                 "(classifier, score, QA head, pooler); ``False`` keeps them frozen, with a warning.")
    policy: object = _setting("scan", "How each selection chooses: ``'scan'`` (top by SNR, re-scanned), "
                              "``'rotate'`` (moves through the top ``pool_pct``), ``'random'`` (LISA-like), "
                              "``'cyclic'`` (BAdam-like), or a ``SelectionPolicy`` object. All but ``'scan'`` need "
                              "``update_every``.")
    pool_pct: Optional[float] = _setting(None, "The pool ``'rotate'`` moves through, per type, in (top_pct, 1] "
                                         "(``None``: ``min(1, 2 * top_pct)``).")
    park_state: bool = _setting(False, "Moving policies: a leaver's optimizer state waits in host memory and comes "
                                "back when the matrix rejoins, instead of being dropped.")
    seed: Optional[int] = _setting(None, "Seed of ``'random'`` (``None``: the Trainer's ``seed``, else 0).")

    def __post_init__(self):
        self.top_pct = validate_top_pct(self.top_pct)
        if self.update_every is not None:
            if not _is_int(self.update_every) or self.update_every < 1:
                raise ValueError(
                    f"update_every={self.update_every!r} must be None (static Spectrum) or an integer >= 1 "
                    "(re-scan every that many optimizer steps)"
                )
            self.update_every = int(self.update_every)
        self.min_per_type = validate_min_per_type(self.min_per_type)
        for name in ("include", "exclude", "always_train", "never_train"):
            value = getattr(self, name)
            compile_patterns(value, name)
            if value is not None:
                setattr(self, name, [value] if isinstance(value, str) else list(value))
        if self.always_train is None:
            self.always_train = []
        if self.never_train is None:
            self.never_train = []
        if isinstance(self.snr_json, (str, os.PathLike)):
            if not os.path.isfile(self.snr_json):
                raise ValueError(f"snr_json={str(self.snr_json)!r}: no such file (an original Spectrum SNR JSON)")
            self.snr_json = os.fspath(self.snr_json)
        elif self.snr_json is not None and not isinstance(self.snr_json, Mapping):
            raise ValueError(f"snr_json must be a path or a mapping, got {type(self.snr_json).__name__}")
        check_method(self.method)
        self.dtype = _dtype_name(self.dtype)
        self.chunk_mb = check_chunk_mb(self.chunk_mb)
        if self.plot_dir is not None:
            if not isinstance(self.plot_dir, (str, os.PathLike)):
                raise ValueError(f"plot_dir={self.plot_dir!r} must be a folder path or None")
            self.plot_dir = os.fspath(self.plot_dir)
        self.verbose = bool(self.verbose)
        if not isinstance(self.train_heads, bool):
            raise ValueError(f"train_heads={self.train_heads!r} must be True or False")
        self._check_policy()

    def _check_policy(self) -> None:
        if isinstance(self.policy, str):
            if self.policy not in BUILTIN_POLICIES:
                raise ValueError(f"policy={self.policy!r} is not known; use one of "
                                 f"{', '.join(map(repr, BUILTIN_POLICIES))} or a SelectionPolicy object")
        elif not isinstance(self.policy, SelectionPolicy):
            raise ValueError(f"policy must be a name ({', '.join(map(repr, BUILTIN_POLICIES))}) or a "
                             f"spectrum_callback.policies.SelectionPolicy, got {type(self.policy).__name__}")
        moving = self.policy in ROTATING_POLICIES or isinstance(self.policy, SelectionPolicy)
        if moving and self.update_every is None and isinstance(self.policy, str):
            raise ValueError(f"policy={self.policy!r} changes the selection every update_every steps: set "
                             "update_every=N (e.g. 50), or use policy='scan' for static Spectrum")
        if self.pool_pct is not None:
            if self.policy != "rotate":
                raise ValueError(f"pool_pct applies to policy='rotate' only (policy={self.policy!r}); drop it")
            value = validate_top_pct(self.pool_pct, "pool_pct")
            if value <= self.top_pct:
                raise ValueError(f"pool_pct={self.pool_pct!r} must be in (top_pct, 1] = ({self.top_pct:g}, 1]: the "
                                 "pool rotates through more matrices than train at once")
            self.pool_pct = value
        if not isinstance(self.park_state, bool):
            raise ValueError(f"park_state={self.park_state!r} must be True or False")
        if self.park_state and self.policy == "scan":
            raise ValueError("park_state=True applies to the moving policies ('rotate', 'random', 'cyclic'): with "
                             "policy='scan' drop it")
        if self.seed is not None:
            if not _is_int(self.seed):
                raise ValueError(f"seed={self.seed!r} must be an integer or None")
            self.seed = int(self.seed)

    @property
    def effective_pool_pct(self) -> float:
        """The rotation pool of ``"rotate"``: ``pool_pct``, or ``min(1, 2 * top_pct)``."""
        return self.pool_pct if self.pool_pct is not None else min(1.0, 2 * self.top_pct)

    @property
    def policy_name(self) -> str:
        return self.policy if isinstance(self.policy, str) else getattr(self.policy, "name", type(self.policy).__name__)

    @property
    def dynamic(self) -> bool:
        return self.update_every is not None

    @property
    def torch_dtype(self):
        """The ``dtype`` setting as a torch dtype (or ``None``)."""
        return check_dtype(self.dtype)

    def to_dict(self) -> dict:
        """JSON-able settings (a ``snr_json`` mapping is left out: only a path is kept)."""
        d = asdict(self)
        if isinstance(self.snr_json, Mapping):
            d["snr_json"] = None
        d["policy"] = self.policy_name
        return d

    @classmethod
    def from_settings(cls, **settings) -> "SpectrumConfig":
        """``SpectrumConfig(**settings)``, an unknown name refused with the closest known one (the
        callback, ``spectrum_freeze`` and ``spectrum_lora_targets`` take their settings here)."""
        import difflib

        known = [f.name for f in fields(cls)]
        for name in settings:
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else f"; the settings are {', '.join(known)}"
                raise ValueError(f"unknown Spectrum setting {name!r}{hint}")
        return cls(**settings)

    @classmethod
    def from_dict(cls, data: Mapping) -> "SpectrumConfig":
        """Settings from :meth:`to_dict`; unknown keys (from a newer version) are refused."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown SpectrumConfig settings {unknown}; written by a newer spectrum_callback?")
        return cls(**dict(data))

    def to_json_file(self, path: str) -> str:
        """Write :meth:`to_dict` as JSON (like ``TrainerState.save_to_json``)."""
        with open(path, "w") as fh:
            json.dump(self.to_dict(), fh, indent=2)
        return path

    @classmethod
    def from_json_file(cls, path: str) -> "SpectrumConfig":
        """Read a file written by :meth:`to_json_file`."""
        with open(path) as fh:
            return cls.from_dict(json.load(fh))

    def selection_settings(self) -> dict:
        """The settings that decide which matrices are selected (compared on resume)."""
        return {"top_pct": self.top_pct, "min_per_type": self.min_per_type, "include": self.include,
                "exclude": self.exclude, "never_train": self.never_train, "update_every": self.update_every,
                "policy": self.policy_name, "pool_pct": self.pool_pct}


def check_method(method) -> str:
    """The analyzer's ``method`` argument, checked."""
    if method not in SNR_METHODS:
        raise ValueError(f"method={method!r} is not supported; use 'auto', 'fast', 'svd' or 'gram'")
    return method


def check_chunk_mb(chunk_mb) -> float:
    """The analyzer's ``chunk_mb`` argument, checked."""
    if not _is_number(chunk_mb) or not chunk_mb > 0:
        raise ValueError(f"chunk_mb={chunk_mb!r} must be > 0 (MiB of matrix copies per solver call)")
    return float(chunk_mb)


def check_dtype(dtype):
    """The analyzer's ``dtype`` argument as a torch dtype (or ``None``), checked."""
    name = _dtype_name(dtype)
    if name is None:
        return None
    import torch

    return getattr(torch, name)


def _dtype_name(dtype) -> Optional[str]:
    if dtype is None:
        return None
    name = dtype if isinstance(dtype, str) else str(dtype).replace("torch.", "")
    if name not in _DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; use None, torch.float32 or torch.float64")
    return name


def _settings_doc() -> str:
    lines = ["Settings of a Spectrum run, validated once (``SpectrumConfig(top_pct=0.25, update_every=100)``).", "",
             "Args:"]
    for f in fields(SpectrumConfig):
        lines.append(f"    {f.name}: {f.metadata['doc']}")
    return "\n".join(lines)


SpectrumConfig.__doc__ = _settings_doc()


def _default_text(f) -> str:
    value = f.default_factory() if f.default is MISSING else f.default
    return repr(value)


def reference_markdown() -> str:
    """The configuration reference (``docs/guide/configuration.md``), written from the fields."""
    lines = ["# Configuration reference", "",
             "<!-- generated by `python -m spectrum_callback.config` from the fields of SpectrumConfig; "
             "tests/unit/test_config.py checks it -->", "",
             "Every setting of a Spectrum run is a field of `SpectrumConfig`. The same names are keyword arguments "
             "of `SpectrumCallback(top_pct=0.25, update_every=None, **settings)`, `spectrum_freeze(model, "
             "top_pct=0.25, **settings)` and `SpectrumSession(model, optimizer, SpectrumConfig(...))`, and axolotl "
             "keys `spectrum_<setting>`. A bad value is refused when the object is built, with a message that names "
             "the setting.", "",
             "| setting | default | meaning |", "| --- | --- | --- |"]
    for f in fields(SpectrumConfig):
        doc = re.sub(r"``(.+?)``", r"`\1`", f.metadata["doc"]).replace("|", "\\|")
        lines.append(f"| `{f.name}` | `{_default_text(f)}` | {doc} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # python -m spectrum_callback.config > docs/guide/configuration.md
    print(reference_markdown(), end="")
