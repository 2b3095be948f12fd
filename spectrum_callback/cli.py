"""``spectrum-scan``: scan a model (or read an SNR JSON) and write the original tool's files."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from .selection import (
    load_snr_json,
    model_slug,
    save_snr_json,
    select_top,
    write_unfrozen_parameters_yaml,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="spectrum-scan",
        description="Compute Spectrum SNR per weight matrix and write the SNR JSON and the axolotl "
        "unfrozen_parameters YAML, as the original Spectrum tool names them.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="hub id or local path, loaded with AutoModelForCausalLM.from_pretrained")
    src.add_argument("--snr-json", help="an existing SNR JSON (either original format); no scan")
    p.add_argument("--top-percent", type=float, default=25, help="percentage kept per type (default 25)")
    p.add_argument("--output-dir", default=".", help="where to write the files (default: .)")
    p.add_argument("--gguf-file", default=None, help="GGUF file inside --model (dequantized on load)")
    p.add_argument("--include", action="append", default=None, help="regex of module names to scan (repeatable)")
    p.add_argument("--exclude", action="append", default=None, help="regex of module names to skip (repeatable)")
    p.add_argument("--method", choices=["auto", "svd", "gram"], default="auto")
    p.add_argument("--device", default=None, help="device for the SVD work (default: the weights')")
    p.add_argument("--plot", action="store_true", help="also write a PNG heatmap of SNR (layer x type)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if not (0 < args.top_percent <= 100):
        print(f"spectrum-scan: --top-percent {args.top_percent} must be in (0, 100]", file=sys.stderr)
        return 2
    os.makedirs(args.output_dir, exist_ok=True)
    if args.snr_json:
        if not os.path.isfile(args.snr_json):
            print(f"spectrum-scan: --snr-json {args.snr_json}: no such file", file=sys.stderr)
            return 2
        snr = load_snr_json(args.snr_json)
        json_path = args.snr_json
        base = os.path.splitext(os.path.basename(json_path))[0]
        if base.endswith("_sorted"):
            base = base[: -len("_sorted")]
        json_path = os.path.join(args.output_dir, base + ".json")
    else:
        import torch
        from transformers import AutoModelForCausalLM

        from .analyzer import SpectrumAnalyzer

        kw = {"dtype": torch.float32}
        if args.gguf_file:
            kw["gguf_file"] = args.gguf_file
        model = AutoModelForCausalLM.from_pretrained(args.model, **kw)
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer = None  # scanning dequantized weights is fine; training them is another matter
        analyzer = SpectrumAnalyzer(model, include=args.include, exclude=args.exclude, method=args.method, device=args.device)
        snr = analyzer.scan()
        json_path = os.path.join(args.output_dir, f"snr_results_{model_slug(args.model)}.json")
        save_snr_json(snr, json_path)
        print(f"SNR results saved to {json_path}")
    yaml_path = write_unfrozen_parameters_yaml(snr, args.top_percent, json_path, args.output_dir)
    print(f"Top {args.top_percent:g}% SNR layers saved to {yaml_path}")
    if args.plot:
        from .plotting import plot_snr_heatmap

        png = os.path.splitext(json_path)[0] + ".png"
        png = os.path.join(args.output_dir, os.path.basename(png))
        plot_snr_heatmap(snr, select_top(snr, args.top_percent / 100, min_per_type=0), png)
        print(f"Heatmap saved to {png}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
