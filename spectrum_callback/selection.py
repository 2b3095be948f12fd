"""Per-type top-k selection, and import/export in the original Spectrum formats.

The rules every selection follows, in one place: :func:`validate_top_pct` (the fraction),
:func:`type_budget` (how many of each type), :func:`check_budget` (refuse a budget that keeps
no matrix of a type) and :func:`top_per_type` (the highest scores of each type).  The
session, the policies, :func:`select_top`, the YAML writer and the CLI all use them.
"""
from __future__ import annotations

import json
import math
import numbers
import os
import re
from collections import OrderedDict
from typing import Dict, Iterable, List, Mapping, Optional, Sequence

__all__ = [
    "select_top",
    "keep_count",
    "type_budget",
    "check_budget",
    "top_per_type",
    "group_by_type",
    "load_snr_json",
    "parse_snr_mapping",
    "snr_from_json",
    "save_snr_json",
    "sorted_snr",
    "unfrozen_parameters_yaml",
    "write_unfrozen_parameters_yaml",
    "model_slug",
    "validate_top_pct",
    "validate_min_per_type",
]

SnrMap = Mapping[str, Mapping[str, object]]


def validate_top_pct(top_pct, arg: str = "top_pct") -> float:
    """``top_pct`` as a float in (0, 1]; a clear error otherwise (with a hint for percentages).
    Numbers (numpy's too) and numeric strings are accepted, ``True``/``False`` are not."""
    try:
        if isinstance(top_pct, bool):
            raise TypeError
        value = float(top_pct)
    except (TypeError, ValueError):
        raise ValueError(f"{arg}={top_pct!r} must be a number in (0, 1], e.g. 0.25 for the top 25 %") from None
    if not (0.0 < value <= 1.0) or math.isnan(value):
        hint = f"; did you mean {value / 100:g}?" if 1.0 < value <= 100.0 else ""
        raise ValueError(f"{arg}={top_pct!r} must be a fraction in (0, 1], e.g. 0.25 for the top 25 %{hint}")
    return value


def validate_min_per_type(min_per_type) -> int:
    """``min_per_type`` as an int >= 0 (numpy integers too; ``True``/``False`` refused)."""
    if isinstance(min_per_type, bool) or not isinstance(min_per_type, numbers.Integral) or min_per_type < 0:
        raise ValueError(f"min_per_type={min_per_type!r} must be an integer >= 0")
    return int(min_per_type)


def group_by_type(snr: SnrMap) -> "OrderedDict[str, List[tuple]]":
    """``{type: [(name, snr), ...]}`` in order of first appearance (as the original tool)."""
    groups: "OrderedDict[str, List[tuple]]" = OrderedDict()
    for name, info in snr.items():
        groups.setdefault(str(info["type"]), []).append((name, float(info["snr"])))
    return groups


def keep_count(group_len: int, top_pct: float) -> int:
    """How many of a type of ``group_len`` matrices ``top_pct`` keeps (before ``min_per_type``)."""
    # The original computes int(len * P / 100) with an integer percentage P; rounding the
    # percentage first keeps e.g. top_pct=0.29 from becoming 28.999... %.
    percent = round(top_pct * 100.0, 9)
    return int(group_len * percent / 100)


def type_budget(types: Iterable[str], top_pct: float, min_per_type: int = 1) -> "OrderedDict[str, int]":
    """``{type: how many of it train}`` for candidates of the given ``types`` (one entry per
    candidate, in model order): ``int(len(type) * top_pct)``, at least ``min_per_type``."""
    sizes: "OrderedDict[str, int]" = OrderedDict()
    for t in types:
        sizes[t] = sizes.get(t, 0) + 1
    return OrderedDict((t, max(keep_count(n, top_pct), min_per_type)) for t, n in sizes.items())


def check_budget(types: Iterable[str], top_pct: float, min_per_type: int = 1, percent: bool = False) -> None:
    """Refuse a ``top_pct`` that keeps no matrix of a type of two or more (that run would train
    less than asked).  A type of one matrix (``model.norm``, ``lm_head`` in some original
    files) keeps none below 100 % under the original's truncation, as in the original tool,
    and is not refused.  ``percent``: name the setting as ``--top-percent P`` (the CLI)."""
    types = list(types)
    budget = type_budget(types, top_pct, min_per_type)
    sizes = {t: types.count(t) for t in budget}
    empty = [(t, sizes[t]) for t, k in budget.items() if k == 0 and sizes[t] >= 2]
    if not empty:
        return
    typ, n = empty[0]
    least = 1 / min(m for _, m in empty)
    if percent:
        pct = top_pct * 100
        hint = (f"did you mean --top-percent {pct * 100:g}?" if pct < 1
                else f"use --top-percent {math.ceil(least * 10000) / 100:g} or more")
        raise ValueError(f"--top-percent {pct:g} keeps no matrix of {len(empty)} type(s), e.g. {typ} ({n} matrices; "
                         f"{pct:g} % of {n} rounds down to 0): {hint}")
    raise ValueError(f"top_pct={top_pct:g} keeps no matrix of {len(empty)} type(s), e.g. {typ!r} ({n} matrices: "
                     f"int({n} x {top_pct:g}) = 0); use top_pct >= {least:.3g} or min_per_type=1")


def top_per_type(names: Sequence[str], types: Mapping[str, str], budget: Mapping[str, int],
                 score: Mapping[str, float], eligible: Optional[Mapping[str, bool]] = None) -> List[str]:
    """The ``budget[type]`` highest-``score`` eligible candidates of each type, in type order
    (ties keep model order: a stable sort, as the original)."""
    by_type: "OrderedDict[str, List[str]]" = OrderedDict()
    for n in names:
        by_type.setdefault(types[n], [])
        if eligible is None or eligible[n]:
            by_type[types[n]].append(n)
    out: List[str] = []
    for t, members in by_type.items():
        out += sorted(members, key=lambda n: -score[n])[:budget[t]]
    return out


def select_top(
    snr: SnrMap,
    top_pct: float,
    min_per_type: int = 1,
    never: Optional[Sequence[str]] = None,
) -> List[str]:
    """Names kept trainable: per type, highest SNR first, ``int(len(group) * top_pct)``.

    NaN entries and names matching a ``never`` regex are never selected (they still count
    in the group size).  Ties keep the input order (stable sort, as the original).

    Args:
        snr: ``{name: {"snr": float, "type": str}}`` (a scan, or an original SNR file).
        top_pct: fraction kept per type, in (0, 1].
        min_per_type: at least this many per type (1 by default; 0 reproduces the original
            tool exactly, where a group of 1 keeps nothing).
        never: regexes of names never selected.

    Returns:
        The selected names, sorted.

    Raises:
        ValueError: a bad ``top_pct``/``min_per_type``, or a type of two or more matrices
            would keep none (``min_per_type=0`` with a small ``top_pct``): that run would
            train less than asked.
    """
    top_pct = validate_top_pct(top_pct)
    min_per_type = validate_min_per_type(min_per_type)
    names = list(snr)
    types = {n: str(snr[n]["type"]) for n in names}
    check_budget(types.values(), top_pct, min_per_type)
    never_re = [re.compile(p) for p in (never or [])]
    score = {n: float(snr[n]["snr"]) for n in names}
    eligible = {n: not math.isnan(score[n]) and not any(p.search(n) for p in never_re) for n in names}
    return sorted(top_per_type(names, types, type_budget(types.values(), top_pct, min_per_type), score, eligible))


def load_snr_json(path: str | os.PathLike) -> "OrderedDict[str, dict]":
    """Read an SNR file written by the original tool, in either of its two formats.

    Args:
        path: a JSON file, ``{name: {"snr": x, "type": t}}`` or the sorted ``{type: {name: x}}``.

    Returns:
        ``{name: {"snr": float, "type": str}}`` in file order.

    Raises:
        ValueError: the file is not valid JSON, or not an SNR file (naming the entry).
    """
    with open(path) as fh:
        try:
            data = json.load(fh)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); "
                             "is the file complete?") from None
    return parse_snr_mapping(data, source=str(path))


def parse_snr_mapping(data: object, source: str = "SNR data") -> "OrderedDict[str, dict]":
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{source}: expected a non-empty JSON object of SNR results")
    out: "OrderedDict[str, dict]" = OrderedDict()
    first = next(iter(data.values()))
    if isinstance(first, dict) and "snr" in first:
        for name, info in data.items():
            if not isinstance(info, dict) or "snr" not in info or "type" not in info:
                raise ValueError(f"{source}: entry {name!r} lacks 'snr'/'type'; not an original Spectrum SNR file")
            out[name] = {"snr": _number(info["snr"], source, name), "type": str(info["type"])}
    elif isinstance(first, dict):
        for typ, members in data.items():
            if not isinstance(members, dict):
                raise ValueError(f"{source}: type {typ!r} maps to {type(members).__name__}, expected {{name: snr}}")
            for name, value in members.items():
                out[name] = {"snr": _number(value, source, name), "type": str(typ)}
    else:
        raise ValueError(f"{source}: unrecognised layout; expected {{name: {{snr, type}}}} or {{type: {{name: snr}}}}")
    return out


def _number(value, source: str, name: str) -> float:
    # bool is an int in Python; the original writes numbers, NaN or Infinity only
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{source}: entry {name!r} has snr {value!r}, which is not a number")
    return float(value)


def snr_from_json(snr_json, analyzer):
    """The SNRs of ``analyzer``'s candidates from an SNR file (path) or mapping, in candidate
    order; a clear error when the file was made for another model or lacks candidates."""
    data = load_snr_json(snr_json) if isinstance(snr_json, (str, os.PathLike)) else parse_snr_mapping(snr_json)
    known = set(analyzer.names)
    snr = {n: info for n, info in data.items() if n in known}
    missing = [n for n in analyzer.names if n not in data]
    if not snr:
        raise ValueError(
            f"snr_json: none of its {len(data)} module names (e.g. {next(iter(data))}) is a candidate of this model "
            f"(e.g. {analyzer.names[0]}); was it made for another model?"
        )
    if missing:
        raise ValueError(
            f"snr_json lacks {len(missing)} candidate modules of this model (e.g. {missing[0]}); rescan the model or "
            "pass exclude=[...] for them"
        )
    return {n: snr[n] for n in analyzer.names}


def save_snr_json(snr: SnrMap, path: str | os.PathLike) -> str:
    """Write ``{name: {"snr", "type"}}`` like the original (indent 4, NaN/Infinity literals)."""
    data = {n: {"snr": float(i["snr"]), "type": str(i["type"])} for n, i in snr.items()}
    with open(path, "w") as fh:
        json.dump(data, fh, indent=4)
    return str(path)


def sorted_snr(snr: SnrMap) -> "OrderedDict[str, Dict[str, float]]":
    """The original's second format: ``{type: {name: snr}}``, highest SNR first."""
    out: "OrderedDict[str, Dict[str, float]]" = OrderedDict()
    for typ, members in group_by_type(snr).items():
        out[typ] = {n: v for n, v in sorted(members, key=lambda x: x[1], reverse=True)}
    return out


def unfrozen_parameters_yaml(
    snr: SnrMap,
    top_percent: int | float,
    always: Iterable[str] = ("^lm_head.weight$", "^model.embed_tokens.weight$"),
) -> str:
    """The axolotl ``unfrozen_parameters`` YAML the original tool writes for ``top_percent`` %.

    Same rule as the original (truncation, no minimum per type), same lines: the two
    regexes first, then per type a ``# <type> layers`` comment and the kept names,
    highest SNR first.  Raises ``ValueError`` when a type of two or more matrices would
    keep none (e.g. ``top_percent=0.25`` meant as 25 %): axolotl would then train only
    the embeddings and the head there.
    """
    pct = float(top_percent)
    if not (0 < pct <= 100):
        raise ValueError(f"top_percent={top_percent!r} must be in (0, 100]")
    check_budget((str(i["type"]) for i in snr.values()), pct / 100.0, 0, percent=True)
    lines = ["unfrozen_parameters:"]
    lines += [f"- {a}" for a in always]
    for typ, members in group_by_type(snr).items():
        k = keep_count(len(members), pct / 100.0)
        ranked = [(n, v) for n, v in sorted(members, key=lambda x: x[1], reverse=True) if not math.isnan(v)]
        lines.append(f"# {typ} layers")
        lines += [f"- {n}" for n, _ in ranked[:k]]
    return "\n".join(lines) + "\n"


def _percent_label(top_percent: int | float) -> str:
    p = float(top_percent)
    return str(int(p)) if p.is_integer() else f"{p:g}"


def write_unfrozen_parameters_yaml(
    snr: SnrMap, top_percent: int | float, json_path: str | os.PathLike, output_dir: Optional[str] = None
) -> str:
    """Write ``<json base>_unfrozenparameters_<P>percent.yaml`` (the original's file name)."""
    base = os.path.splitext(os.path.basename(str(json_path)))[0]
    out_dir = output_dir if output_dir is not None else os.path.dirname(str(json_path)) or "."
    path = os.path.join(out_dir, f"{base}_unfrozenparameters_{_percent_label(top_percent)}percent.yaml")
    with open(path, "w") as fh:
        fh.write(unfrozen_parameters_yaml(snr, top_percent))
    return path


def model_slug(name_or_path: str) -> str:
    """The original's file slug: ``meta-llama/Meta-Llama-3-8B`` -> ``meta-llama-Meta-Llama-3-8B``."""
    return name_or_path.rstrip("/").replace("/", "-").replace("_", "-")
