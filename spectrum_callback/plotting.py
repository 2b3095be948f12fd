"""PNG views: SNR per layer and type, and the selection over time."""
from __future__ import annotations

import math
from typing import Dict, List, Mapping, Sequence

from .candidates import layer_index


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError(
            "the Spectrum plots need matplotlib: pip install 'spectrum_callback[plot]' (or matplotlib), "
            "or leave plot_dir unset / drop --plot"
        ) from None

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
        layer = layer_index(name)
        layer = -1 if layer is None else layer
        layers.add(layer)
        # a fused expert bank: one row for the bank (its mean) and one per expert, each framed
        # when the bank is selected
        rows = [(typ, value)] + [(f"{typ} [expert {e}]", float(v)) for e, v in enumerate(info.get("experts") or [])]
        for row, v in rows:
            if row not in types:
                types.append(row)
            cells[(row, layer)] = (v, name)
    layer_list = sorted(layers)
    grid = [[cells.get((t, layer), (math.nan, None))[0] for layer in layer_list] for t in types]
    names = [[cells.get((t, layer), (math.nan, None))[1] for layer in layer_list] for t in types]
    return types, layer_list, grid, names


def _row_scaled(logv):
    """Each row of ``logv`` mapped to [0, 1] over its own finite range (a row with one value:
    0.5), with that range: the choice is made within a type, so each type gets its own scale."""
    import numpy as np

    out = np.full_like(logv, np.nan)
    ranges = []
    for i, row in enumerate(logv):
        finite = row[np.isfinite(row)]
        if finite.size == 0:
            ranges.append(None)
            continue
        lo, hi = float(finite.min()), float(finite.max())
        out[i] = (row - lo) / (hi - lo) if hi > lo else np.where(np.isfinite(row), 0.5, np.nan)
        ranges.append((lo, hi))
    return out, ranges


def plot_snr_heatmap(snr, selected: Sequence[str], path: str, title: str = "Spectrum SNR") -> str:
    """Heatmap of SNR, types x layers, each type on its own colour scale (the row's lowest
    log10 SNR darkest, its highest brightest; the range is in the row's label); selected
    cells framed.

    Only modules inside numbered layers are drawn; those outside (``embed_tokens``,
    ``lm_head``, the final norm, as some original files list) are counted in the title.
    An infinite SNR (no singular value at or below the threshold, e.g. a 1-D norm weight)
    is drawn as a hatched cell marked "inf".
    """
    import numpy as np

    plt = _pyplot()
    if snr and not isinstance(next(iter(snr.values())), Mapping):
        raise ValueError("plot_snr_heatmap needs {name: {'snr', 'type'}}")
    inside = {n: i for n, i in snr.items() if layer_index(n) is not None}
    outside = len(snr) - len(inside)
    if not inside:
        raise ValueError("no module of the SNR data sits inside numbered layers: nothing to draw per layer")
    types, layers, grid, names = snr_grid(inside)
    arr = np.array(grid, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        logv = np.log10(np.where(np.isfinite(arr) & (arr > 0), arr, np.nan))
    scaled, ranges = _row_scaled(logv)
    fig, ax = plt.subplots(figsize=(max(7, 0.32 * len(layers) + 5), max(2.5, 0.45 * len(types) + 1.5)))
    im = ax.imshow(scaled, aspect="auto", cmap="viridis", interpolation="nearest", vmin=0, vmax=1)
    sel = set(selected)
    n_inf = 0
    for ti, row in enumerate(names):
        for li, n in enumerate(row):
            if np.isinf(arr[ti, li]):
                n_inf += 1
                ax.add_patch(plt.Rectangle((li - 0.5, ti - 0.5), 1, 1, facecolor="white", edgecolor="grey",
                                           hatch="////", lw=0.5))
                ax.text(li, ti, "inf", ha="center", va="center", fontsize=5, color="black")
            if n in sel:
                ax.add_patch(plt.Rectangle((li - 0.5, ti - 0.5), 1, 1, fill=False, edgecolor="red", lw=1.6))
    labels = [t if r is None else f"{t}  SNR {10 ** r[0]:.3g}–{10 ** r[1]:.3g}" for t, r in zip(types, ranges)]
    ax.set_yticks(range(len(types)), labels, fontsize=8)
    ax.set_xticks(range(len(layers)), [str(layer) for layer in layers], fontsize=7)
    ax.set_xlabel("layer")
    notes = ["red frame = trainable"]
    if n_inf:
        notes.append("inf = nothing at or below the noise threshold")
    if outside:
        notes.append(f"{outside} module(s) outside the numbered layers not shown")
    ax.set_title(f"{title}\n" + "; ".join(notes), fontsize=9)
    bar = fig.colorbar(im, ax=ax, ticks=[0, 1])
    bar.ax.set_yticklabels(["type's\nlowest", "type's\nhighest"], fontsize=7)
    bar.set_label("log10 SNR within its type", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_selection_history(history: Sequence[Mapping], path: str) -> str:
    """Which layers of each type were trainable after each selection: one panel per type,
    layers down, selections across (black = trainable), whatever the policy (the title names
    the policies in the history).  Meant for dynamic runs (for a single scan the SNR heatmap
    already shows the selection)."""
    import numpy as np

    plt = _pyplot()
    if not history:
        raise ValueError("no selection in history to plot")
    last = history[-1]
    types: List[str] = []
    for name, typ in last["types"].items():
        if str(typ) not in types:
            types.append(str(typ))
    layers = sorted({layer_index(n) for n in last["types"] if layer_index(n) is not None})
    row = {layer: i for i, layer in enumerate(layers)}
    scans = len(history)
    panel_w = max(1.3, 0.12 * scans + 0.9)
    fig, axes = plt.subplots(1, len(types), figsize=(panel_w * len(types) + 0.8, max(3.0, 0.14 * len(layers) + 1.6)),
                             squeeze=False, sharey=True)
    for ax, typ in zip(axes[0], types):
        mat = np.zeros((len(layers), scans))
        for j, h in enumerate(history):
            for n in h["selected"]:
                li = layer_index(n)
                if li is not None and str(last["types"].get(n, h["types"].get(n))) == typ:
                    mat[row[li], j] = 1.0
        ax.imshow(mat, aspect="auto", cmap="Greys", interpolation="nearest", vmin=0, vmax=1)
        ax.set_title(typ, fontsize=7)
        step = max(1, scans // 6)
        ax.set_xticks(range(0, scans, step), [str(history[j]["step"]) for j in range(0, scans, step)], fontsize=6,
                      rotation=90)
    lstep = max(1, len(layers) // 16)
    axes[0][0].set_yticks(range(0, len(layers), lstep), [str(layer) for layer in layers[::lstep]], fontsize=6)
    axes[0][0].set_ylabel("layer")
    sources = []
    for h in history:
        if h.get("source") and h["source"] not in sources:
            sources.append(str(h["source"]))
    fig.supxlabel("selection at optimizer step", fontsize=8)
    fig.suptitle("Selection over time (black = trainable)" + (f"; {', '.join(sources)}" if sources else ""),
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(history: Sequence[dict], selected: Sequence[str], folder: str) -> List[str]:
    """In ``folder``: the SNR heatmap of the last scan (``spectrum_snr.png``), framing the
    current selection, when any selection was made from SNRs (``"random"`` and ``"cyclic"``
    never scan); and, for a run with more than one selection, the selection over time
    (``spectrum_selection.png``).  Returns the paths written."""
    import os

    os.makedirs(folder, exist_ok=True)
    written = []
    scanned = next((h for h in reversed(history) if h.get("snr")), None)
    if scanned is not None:
        snr = {n: {"snr": v, "type": scanned["types"][n], "experts": scanned.get("experts", {}).get(n)}
               for n, v in scanned["snr"].items()}
        written.append(plot_snr_heatmap(snr, list(selected), os.path.join(folder, "spectrum_snr.png")))
    if len(history) > 1:  # a single scan: the heatmap's frames already show the selection
        written.append(plot_selection_history(list(history), os.path.join(folder, "spectrum_selection.png")))
    return written
