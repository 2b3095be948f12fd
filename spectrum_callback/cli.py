"""``spectrum-scan``: scan a model (or read an SNR JSON) and write the original tool's files.

Layout, as the original Spectrum scanner writes it and axolotl's Spectrum plugin reads it
(``--output-dir`` defaults to the current folder):

* ``<output-dir>/model_snr_results/snr_results_<slug>.json`` and ``..._sorted.json``;
* ``<output-dir>/snr_results_<slug>_unfrozenparameters_<P>percent.yaml``;
* with ``--lora-targets``, ``<output-dir>/snr_results_<slug>_lora_targets_<P>percent.yaml``: the
  modules :func:`~spectrum_callback.spectrum_lora_targets` selects, as axolotl's
  ``lora_target_modules`` (and ``peft.LoraConfig(target_modules=...)``) take them.

``<slug>`` is the hub id with ``/`` as ``-`` (``meta-llama/Meta-Llama-3-8B`` ->
``meta-llama-Meta-Llama-3-8B``); for a local folder, the folder's name.

A local folder of safetensors is streamed, one matrix at a time, without loading the model
(:mod:`spectrum_callback.checkpoint_scan`; ``--no-stream`` loads it); under ``torchrun`` the
matrices are split across ranks and rank 0 writes the files.  How the scan ran goes to
``<results>.scan_info.json`` beside the SNR JSON, never into it.

Every user error is one line on stderr with exit code 2, and nothing is written.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from typing import Optional, Sequence

from . import _offline_model
from .config import SpectrumConfig
from .selection import (
    check_budget,
    load_snr_json,
    model_slug,
    save_snr_json,
    select_top,
    sorted_snr,
    write_unfrozen_parameters_yaml,
)

RESULTS_DIR = "model_snr_results"
# The offline default model's alias and the hub id it stands for (its slug names the files).
ALIASES = {_offline_model.ALIAS: _offline_model.HUB_ID}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class CliError(Exception):
    """A user error: printed as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="spectrum-scan",
        description="Compute Spectrum SNR per weight matrix and write the SNR JSON files and the axolotl "
        "unfrozen_parameters YAML where the original Spectrum tool writes them (axolotl finds them as-is).",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="hub id, local folder, or smollm2-135m-instruct (the offline default model); "
                                     "a local safetensors folder is streamed (see --stream)")
    src.add_argument("--snr-json", help="an existing SNR JSON (either original format): write the YAML, no scan")
    p.add_argument("--top-percent", type=float, default=25, help="percentage kept per type, 0-100 (default 25)")
    p.add_argument("--output-dir", default=".", help=f"the YAML goes here, the JSON files to {RESULTS_DIR}/ "
                                                      "inside it (default: the current folder)")
    p.add_argument("--gguf-file", default=None, help="GGUF file inside --model (dequantized on load)")
    p.add_argument("--include", action="append", default=None, help="regex of module names to scan (repeatable)")
    p.add_argument("--exclude", action="append", default=None, help="regex of module names to skip (repeatable)")
    p.add_argument("--method", choices=["auto", "svd", "gram"], default="auto")
    p.add_argument("--device", default=None, help="device for the SVD work (default: the weights')")
    p.add_argument("--plot", action="store_true", help="also write a PNG heatmap of SNR (layer x type)")
    p.add_argument("--lora-targets", action="store_true",
                   help="also write the selected modules as a YAML list lora_target_modules (SNR-placed LoRA)")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="read a local safetensors folder one matrix at a time instead of loading the model "
                        "(default: stream where the checkpoint allows it; --no-stream loads it in fp32)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except CliError as exc:
        if os.environ.get("RANK", "0") == "0":
            print(f"spectrum-scan: {exc}", file=sys.stderr)
        return 2
    finally:
        _dist_end()


def _check_percent(snr, pct: float) -> None:
    """Refuse a percentage that keeps no matrix of some type (before anything is written)."""
    try:
        check_budget((str(i["type"]) for i in snr.values()), pct / 100.0, 0, percent=True)
    except ValueError as exc:
        raise CliError(str(exc)) from None


def _write_lora_targets(snr, pct: float, json_path: str, output_dir: str) -> str:
    """``<json base>_lora_targets_<P>percent.yaml``: the modules the callback would train with
    ``top_pct = P / 100`` (its rule: at least one per type), for ``lora_target_modules``.  Fused
    expert banks (parameters, not modules) are left out, and said so."""
    selected = select_top(snr, pct / 100)
    fused = [n for n in selected if snr[n].get("experts")]
    targets = [n for n in selected if n not in fused]
    if fused:
        print(f"left out of the LoRA targets: {len(fused)} fused expert bank(s) (e.g. {fused[0]}), which are "
              "parameters, not modules (peft.LoraConfig(target_parameters=...) adapts them)", file=sys.stderr)
    base = os.path.splitext(os.path.basename(json_path))[0]
    label = str(int(pct)) if float(pct).is_integer() else f"{pct:g}"
    path = os.path.join(output_dir, f"{base}_lora_targets_{label}percent.yaml")
    with open(path, "w") as fh:
        fh.write("lora_target_modules:\n" + "".join(f"- {n}\n" for n in targets))
    return path


def _read_snr_json(path: str):
    if not os.path.isfile(path):
        raise CliError(f"--snr-json {path}: no such file")
    try:
        return load_snr_json(path)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CliError(str(exc).splitlines()[0]) from None


def resolve_model(name: str):
    """``(path_or_id, slug)``: the alias, a local folder or a hub id; refuses what is none of them."""
    if name in ALIASES:
        try:
            return _offline_model.smollm2_dir(), model_slug(ALIASES[name])
        except FileNotFoundError as exc:
            raise CliError(f"--model {name}: {exc}") from None
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        return path, model_slug(os.path.basename(os.path.abspath(path)))
    if os.path.exists(path):
        raise CliError(f"--model {name}: a file, not a model folder; pass the folder that holds config.json "
                       "(and --gguf-file for a GGUF file in it)")
    looks_like_path = name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name
    if looks_like_path or not _HUB_ID.match(name):
        raise CliError(f"--model {name}: no such folder, and not a hub id (owner/name)")
    return name, model_slug(name)


def _offline() -> bool:
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _load_model(ref: str, name: str, gguf_file: Optional[str]):
    import torch
    from transformers import AutoModelForCausalLM

    kw = {"dtype": torch.float32}
    if gguf_file:
        kw["gguf_file"] = gguf_file
    try:
        model = AutoModelForCausalLM.from_pretrained(ref, **kw)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if not os.path.isdir(ref):
            how = (f"download it where there is a network (e.g. `hf download {ref} --local-dir DIR`) and pass "
                   "--model DIR")
            if _offline():
                raise CliError(f"--model {name}: not found locally and the hub is switched off "
                               f"(HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE): {how}") from None
            raise CliError(f"--model {name}: could not load it from the hub ({first}); if this machine is offline, "
                           f"{how}") from None
        raise CliError(f"--model {name}: could not load the model in this folder: {first}") from None
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None  # scanning dequantized weights is fine; training them is another matter
    return model


def _run(args) -> int:
    pct = args.top_percent
    if not (0 < pct <= 100) or math.isnan(pct):
        raise CliError(f"--top-percent {pct:g} must be in (0, 100], e.g. 25")
    try:  # the same rules as the callback and spectrum_freeze
        cfg = SpectrumConfig(top_pct=pct / 100, include=args.include, exclude=args.exclude, method=args.method)
    except ValueError as exc:
        raise CliError(str(exc).splitlines()[0]) from None
    results_dir = os.path.join(args.output_dir, RESULTS_DIR)
    if args.snr_json:
        snr = _read_snr_json(args.snr_json)
        _check_percent(snr, pct)
        base = os.path.splitext(os.path.basename(args.snr_json))[0]
        if base.endswith("_sorted"):
            base = base[: -len("_sorted")]
        json_path = os.path.join(results_dir, base + ".json")
    else:
        ref, slug = resolve_model(args.model)
        snr, info = _scan(args, cfg, ref)
        _check_percent(snr, pct)
        if os.environ.get("RANK", "0") != "0":
            return 0  # rank 0 writes the files
        from .checkpoint_scan import write_scan_info

        os.makedirs(results_dir, exist_ok=True)
        json_path = os.path.join(results_dir, f"snr_results_{slug}.json")
        save_snr_json(snr, json_path)
        sorted_path = os.path.join(results_dir, f"snr_results_{slug}_sorted.json")
        _write_sorted(snr, sorted_path)
        info_path = write_scan_info(dict(info, model=args.model), json_path)
        print(f"SNR results saved to {json_path} and {sorted_path}")
        print(f"Scanned {info['matrices']} matrices: {info['route']}, {info['method']} in {info['dtype']} on "
              f"{info['device']}, {info['ranks']} rank(s), {info['seconds']:.1f} s ({info_path})")
    os.makedirs(args.output_dir, exist_ok=True)
    yaml_path = write_unfrozen_parameters_yaml(snr, pct, json_path, args.output_dir)
    print(f"Top {pct:g}% SNR layers saved to {yaml_path}")
    if args.lora_targets:
        path = _write_lora_targets(snr, pct, json_path, args.output_dir)
        print(f"LoRA targets (top {pct:g}% per type) saved to {path}")
    if args.plot:
        from .plotting import plot_snr_heatmap

        png = os.path.join(args.output_dir, os.path.splitext(os.path.basename(json_path))[0] + ".png")
        plot_snr_heatmap(snr, select_top(snr, pct / 100, min_per_type=0), png)
        print(f"Heatmap saved to {png}")
    return 0


def _dist_begin() -> None:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1): the scan is split across ranks."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    import torch

    if not torch.distributed.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def _dist_end() -> None:
    if "torch" in sys.modules:
        import torch

        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _scan(args, cfg, ref: str):
    """``(snr, info)``: streamed from a local safetensors folder where possible, else loaded in memory."""
    import time

    from .checkpoint_scan import CheckpointError, choose_route, memory_scan, stream_scan

    if args.gguf_file:
        if args.stream:
            raise CliError("--stream needs a local folder of safetensors files, not --gguf-file")
        plan, reason = None, "--gguf-file"
    else:
        try:
            plan, reason = choose_route(ref, args.stream, include=cfg.include, exclude=cfg.exclude, method=cfg.method,
                                        device=args.device)
        except (OSError, ValueError) as exc:  # CheckpointError included
            first = str(exc).splitlines()[0]
            raise CliError(f"--model {args.model}: {first}" if isinstance(exc, CheckpointError) else first) from None
        reason = "--no-stream" if args.stream is False else reason
        if plan is None and args.stream is None and os.path.isdir(ref):
            print(f"spectrum-scan: loading the model in memory, not streaming: {reason}", file=sys.stderr)
    _dist_begin()
    if plan is not None:
        return stream_scan(plan, progress=not args.no_progress)
    t0 = time.perf_counter()
    model = _load_model(ref, args.model, args.gguf_file)
    try:
        snr, info = memory_scan(model, cfg.include, cfg.exclude, cfg.method, device=args.device,
                                progress=not args.no_progress)
    except ValueError as exc:
        raise CliError(str(exc).splitlines()[0]) from None
    info.update(reason=reason, load_seconds=round(time.perf_counter() - t0 - info["seconds"], 3))
    return snr, info


def _write_sorted(snr, path: str) -> None:
    with open(path, "w") as fh:
        json.dump(sorted_snr(snr), fh, indent=4)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
