"""PNG views: SNR per layer and type, and the selection over time."""
from __future__ import annotations

import math
from typing import Dict, List, Mapping, Sequence

from .analyzer import _layer_index


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def snr_grid(snr: Mapping[str, object]):
    """``(types, layers, grid, names)``: grid[t][l] is the SNR (or NaN when absent)."""
    types: List[str] = []
    layers = set()
    cells: Dict[tuple, tuple] = {}
    for name, info in snr.items():
        if isinstance(info, Mapping):
            value, typ = float(info["snr"]), str(info["type"])
        else:
            raise ValueError("snr must map names to {'snr', 'type'}")
        if typ not in types:
            types.append(typ)
        layer = _layer_index(name)
        layer = -1 if layer is None else layer
        layers.add(layer)
        cells[(typ, layer)] = (value, name)
    layer_list = sorted(layers)
    grid = [[cells.get((t, l), (math.nan, None))[0] for l in layer_list] for t in types]
    names = [[cells.get((t, l), (math.nan, None))[1] for l in layer_list] for t in types]
    return types, layer_list, grid, names


def plot_snr_heatmap(snr, selected: Sequence[str], path: str, title: str = "Spectrum SNR (log10)") -> str:
    """Heatmap of log10 SNR, types x layers; selected cells framed."""
    import numpy as np

    plt = _pyplot()
    if snr and not isinstance(next(iter(snr.values())), Mapping):
        raise ValueError("plot_snr_heatmap needs {name: {'snr', 'type'}}")
    types, layers, grid, names = snr_grid(snr)
    arr = np.array(grid, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        logv = np.log10(np.where(np.isfinite(arr) & (arr > 0), arr, np.nan))
    fig, ax = plt.subplots(figsize=(max(6, 0.32 * len(layers) + 3), max(2.5, 0.45 * len(types) + 1.5)))
    im = ax.imshow(logv, aspect="auto", cmap="viridis", interpolation="nearest")
    sel = set(selected)
    for ti, row in enumerate(names):
        for li, n in enumerate(row):
            if n in sel:
                ax.add_patch(plt.Rectangle((li - 0.5, ti - 0.5), 1, 1, fill=False, edgecolor="red", lw=1.6))
    ax.set_yticks(range(len(types)), types, fontsize=8)
    ax.set_xticks(range(len(layers)), [str(l) for l in layers], fontsize=7)
    ax.set_xlabel("layer")
    ax.set_title(f"{title}; red frame = trainable")
    fig.colorbar(im, ax=ax, label="log10 SNR")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_selection_history(history: Sequence[Mapping], path: str) -> str:
    """One row per module, one column per scan; filled = trainable after that scan."""
    import numpy as np

    plt = _pyplot()
    if not history:
        raise ValueError("no scans in history to plot")
    names = list(history[-1]["snr"].keys())
    mat = np.array([[1.0 if n in set(h["selected"]) else 0.0 for h in history] for n in names])
    fig, ax = plt.subplots(figsize=(max(5, 0.25 * len(history) + 3), max(3, 0.09 * len(names) + 1.5)))
    ax.imshow(mat, aspect="auto", cmap="Greys", interpolation="nearest", vmin=0, vmax=1)
    ax.set_xticks(range(len(history)), [str(h["step"]) for h in history], fontsize=7, rotation=90)
    step = max(1, len(names) // 40)
    ax.set_yticks(range(0, len(names), step), names[::step], fontsize=5)
    ax.set_xlabel("scan at optimizer step")
    ax.set_title("Selection over time (black = trainable)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
