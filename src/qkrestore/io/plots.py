"""Figures for the diagnostics (matplotlib, an optional extra: ``pip install 'qkrestore[plot]'``).

Each function takes the command's JSON document (or the arrays behind it) and writes one PNG; none
returns anything to draw on further, so the CLI stays a thin shell. matplotlib is imported only here
and only when a figure is asked for, with the non-interactive Agg backend (no display needed).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import QKRestoreError

DPI = 90


def require() -> Any:
    """``matplotlib.pyplot`` with the Agg backend, or a one-line error naming the extra to install."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        raise QKRestoreError(
            "--plot needs matplotlib, which is not installed",
            # no square brackets: the CLI prints errors through rich, which eats "[plot]" as markup
            hint="pip install matplotlib, or install qkrestore with its 'plot' extra",
        ) from None
    return plt


def _check_target(path: Path) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise QKRestoreError(f"--plot {path}: give a file name ending in .png")
    if not path.absolute().parent.is_dir():
        raise QKRestoreError(f"--plot {path}: the folder {path.absolute().parent} does not exist")
    return path


def check_target(path: Path) -> Path:
    """Fail before any work when ``--plot`` cannot be written (no matplotlib, bad name or folder)."""
    require()
    return _check_target(path)


def _save(fig: Any, path: Path, cmaps: tuple[str, ...] = ()) -> None:
    """Write the PNG; with ``cmaps``, reduced to a palette made of those colour maps plus greys.

    Attention maps are noisy images: a true-colour PNG of four of them runs to ~0.5 MB. Every
    pixel of such a figure is a colour-map colour, a grey (text, axes) or a blend of the two at an
    edge, so a palette of the maps' own colours looks the same and is a few times smaller (a
    generic median-cut palette, by contrast, visibly shifts the rarer dark shades).
    """
    import io

    plt = require()
    if not cmaps:
        fig.savefig(path, dpi=DPI, facecolor="white")
        plt.close(fig)
        return
    from matplotlib import colormaps
    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, dpi=DPI, format="png", facecolor="white")
    plt.close(fig)
    per = (256 - 16) // len(cmaps)
    colors = [np.linspace(0, 1, 16)[:, None].repeat(3, 1)]
    colors += [colormaps[c](np.linspace(0, 1, per))[:, :3] for c in cmaps]
    table = np.concatenate(colors)
    flat = (np.clip(table, 0, 1) * 255).round().astype(np.uint8).ravel().tolist()
    pal = Image.new("P", (1, 1))
    pal.putpalette(flat + [255] * (768 - len(flat)))
    buf.seek(0)
    with Image.open(buf) as im:
        small = im.convert("RGB").quantize(palette=pal, dither=Image.Dither.NONE)
        small.save(path, format="PNG", optimize=True)


# -- drift ----------------------------------------------------------------------------------------


def drift_figure(report: dict[str, Any], path: Path) -> None:
    """Left: layer × head heatmap of routing drift. Right: Q/K/V/O relative drift per layer."""
    plt = require()
    layers = report["layers"]
    labels = [
        f"{x['layer']}" + ("" if x["kind"] == "global" else f" ({x['kind'][0]})") for x in layers
    ]
    width = max((len(x["routing_drift"]["heads"]) for x in layers if x["routing_drift"]), default=0)
    fig, (ax0, ax1) = plt.subplots(
        1,
        2,
        figsize=(12, max(3.0, 0.32 * len(layers) + 1.5)),
        width_ratios=[1.1, 1],
        layout="constrained",
    )
    if width:
        grid = np.full((len(layers), width), np.nan)
        for r, x in enumerate(layers):
            if x["routing_drift"]:
                vals = [np.nan if v is None else v for v in x["routing_drift"]["heads"]]
                grid[r, : len(vals)] = vals
        im = ax0.imshow(grid, aspect="auto", cmap="magma", interpolation="nearest", vmin=0.0)
        if width <= 32:
            ax0.set_xticks(range(width))
        fig.colorbar(im, ax=ax0, label="‖ΔQ_hᵀK_g‖ / ‖Q_hᵀK_g‖")
        ax0.set_xlabel("query head")
    else:
        ax0.text(0.5, 0.5, "no per-head routing drift\n(no single W_Q / W_K)", ha="center")
        ax0.set_xticks([])
    ax0.set_yticks(range(len(layers)), labels)
    ax0.set_ylabel("layer")
    ax0.set_title("routing drift per head")

    y = np.arange(len(layers))
    bar = 0.2
    colors = {"q": "#3b75af", "k": "#e1812c", "v": "#3a923a", "o": "#c03d3e"}
    for j, t in enumerate("qkvo"):
        vals = [
            (x[t]["rel_drift"] if t in x and x[t]["rel_drift"] is not None else np.nan)
            for x in layers
        ]
        ax1.barh(y + (j - 1.5) * bar, vals, height=bar, color=colors[t], label=t.upper())
    ax1.set_yticks(y, labels)
    ax1.invert_yaxis()
    ax0_ylim = ax0.get_ylim()
    ax1.set_ylim(ax0_ylim if width else ax1.get_ylim())
    ax1.set_xlabel("‖W_post − W_pre‖ / ‖W_pre‖")
    ax1.set_title("projection drift per layer")
    ax1.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    fig.suptitle(f"PRE {Path(report['pre']).name} → POST {Path(report['post']).name}", fontsize=10)
    _save(fig, path)


# -- attention maps -------------------------------------------------------------------------------

_CMAPS = ("Blues", "Reds", "Greens", "Purples", "Oranges")


def attention_figure(
    maps: list[np.ndarray],
    names: list[str],
    layer: int,
    head: int,
    length: int,
    needle: tuple[int, int],
    path: Path,
) -> None:
    """The paper's Figure 4: each model's attention map (log colour scale) and, last, the log-ratio
    of the last model over the one before (restored / POST with three models): red where the last
    attends more."""
    plt = require()
    from matplotlib.colors import LogNorm, TwoSlopeNorm

    arrays = [np.asarray(m, dtype=np.float64) for m in maps]
    positive = np.concatenate([a[a > 0].ravel() for a in arrays])
    hi = float(positive.max()) if positive.size else 1.0
    lo = max(float(np.quantile(positive, 0.01)), hi * 1e-5) if positive.size else 1e-8
    n = len(arrays) + (1 if len(arrays) >= 2 else 0)
    fig, axes = plt.subplots(1, n, figsize=(3.8 * n, 3.6), squeeze=False, layout="constrained")
    extent = (0, length, length, 0)
    for i, (a, name) in enumerate(zip(arrays, names)):
        ax = axes[0, i]
        shown = np.where(a > 0, a, np.nan)
        im = ax.imshow(
            shown,
            cmap=_CMAPS[i % len(_CMAPS)],
            norm=LogNorm(vmin=max(lo, 1e-12), vmax=max(hi, lo * 10)),
            extent=extent,
            interpolation="nearest",
        )
        ax.set_title(name, fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03).ax.tick_params(labelsize=7)
    if len(arrays) >= 2:
        a, b = arrays[-2], arrays[-1]
        eps = max(lo, 1e-12)
        both = (a > 0) & (b > 0)
        ratio = np.where(both, np.log(np.maximum(b, eps) / np.maximum(a, eps)), np.nan)
        vmax = float(np.nanquantile(np.abs(ratio), 0.99)) if np.isfinite(ratio).any() else 1.0
        vmax = vmax if vmax > 0 and math.isfinite(vmax) else 1.0
        ax = axes[0, -1]
        im = ax.imshow(
            ratio,
            cmap="RdBu_r",
            norm=TwoSlopeNorm(vcenter=0.0, vmin=-vmax, vmax=vmax),
            extent=extent,
            interpolation="nearest",
        )
        ax.set_title(f"log({names[-1]} / {names[-2]})", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03).ax.tick_params(labelsize=7)
    for ax in axes[0]:
        ax.axvline(needle[0], color="black", lw=0.6, ls="--")
        ax.axhline(needle[0], color="black", lw=0.6, ls="--")
        ax.set_xlabel("key position j", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0, 0].set_ylabel("query position i", fontsize=8)
    fig.suptitle(
        f"layer {layer}, head {head} — {length} tokens, needle at {needle[0]}", fontsize=10
    )
    used = tuple(_CMAPS[i % len(_CMAPS)] for i in range(len(arrays)))
    _save(fig, path, cmaps=(*used, "RdBu_r") if len(arrays) >= 2 else used)


# -- autocorrelation ------------------------------------------------------------------------------


def autocorr_figure(report: dict[str, Any], path: Path) -> None:
    """ρ(d) on a log scale with the fitted A·exp(−d/τ) over the range it was fitted on."""
    plt = require()
    d = np.asarray(report["distances"], dtype=np.float64)
    rho = np.asarray([np.nan if v is None else v for v in report["rho"]], dtype=np.float64)
    fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
    pos = rho > 0
    ax.semilogy(d[pos], rho[pos], "o", ms=3, color="#3b75af", label="ρ(d) > 0")
    if (~pos & np.isfinite(rho)).any():
        ax.semilogy(
            d[~pos & np.isfinite(rho)],
            np.abs(rho[~pos & np.isfinite(rho)]),
            "x",
            ms=3,
            color="#999999",
            label="|ρ(d)|, ρ ≤ 0",
        )
    tau, a = report.get("tau"), report.get("A")
    if tau and report.get("fit_distances"):
        end = report["fit_distances"][1]
        x = np.linspace(1, end, 200)
        ax.semilogy(
            x, a * np.exp(-x / tau), "-", color="#c03d3e", label=f"{a:.3g}·exp(−d/{tau:.3g})"
        )
    ax.set_xlabel("distance d (tokens)")
    ax.set_ylabel("token autocorrelation ρ(d)")
    title = "no fit" if a is None else f"τ = {tau:.3g} tokens" if tau else "τ = ∞ (no decay)"
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    _save(fig, path)


# -- sweep ----------------------------------------------------------------------------------------

SWEEP_COLORS = {
    "pre": "#1f77b4",
    "post": "#d62728",
    "restore": "#2ca02c",
    "single": "#98df8a",
    "top-k": "#17becf",
    "ablations": "#9467bd",
    "pro": "#ff7f0e",
    "cross-gram": "#8c564b",
}


def label_clusters(points: list[tuple[float, float]], tol: float = 0.025) -> list[list[int]]:
    """Indices of points grouped so that each group gets one label (names stacked): points closer
    than ``tol`` of the axes' spans in both directions would print their names over each other.
    Greedy in input order; each group is labelled at its first point."""
    if not points:
        return []
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    dx, dy = (max(xs) - min(xs)) or 1.0, (max(ys) - min(ys)) or 1.0
    groups: list[list[int]] = []
    for i, (x, y) in enumerate(points):
        for g in groups:
            gx, gy = points[g[0]]
            if abs(x - gx) < tol * dx and abs(y - gy) < tol * dy:
                g.append(i)
                break
        else:
            groups.append([i])
    return groups


# Where a label may go around its point: offset in points, and the text's alignment there.
_LABEL_SPOTS = [
    (4, 3, "left", "bottom"),
    (4, -3, "left", "top"),
    (-4, 3, "right", "bottom"),
    (-4, -3, "right", "top"),
    (0, 9, "center", "bottom"),
    (0, -9, "center", "top"),
    (10, 12, "left", "bottom"),
    (10, -12, "left", "top"),
    (-10, 12, "right", "bottom"),
    (-10, -12, "right", "top"),
]


def _place_labels(fig: Any, ax: Any, anchors: list[tuple[float, float]], texts: list[str]) -> None:
    """Annotate each anchor with its text at the first spot around it whose box overlaps no label
    placed before (greedy; the first spot when none is free), so names stay readable where
    candidates crowd together."""
    fig.canvas.draw()  # fixes the axes' limits and gives a renderer to measure text with
    renderer = fig.canvas.get_renderer()
    placed: list[Any] = []
    for (x, y), text in zip(anchors, texts, strict=True):
        for spot in [*_LABEL_SPOTS, None]:  # None: every spot taken, so the first one
            dx, dy, ha, va = spot or _LABEL_SPOTS[0]
            t = ax.annotate(
                text, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=7, ha=ha, va=va
            )
            box = t.get_window_extent(renderer)
            if spot is None or not any(box.overlaps(b) for b in placed):
                break
            t.remove()
        placed.append(box)


def sweep_figure(report: dict[str, Any], path: Path) -> None:
    """Recall against reasoning for every candidate of a sweep, the Pareto front joined by a line.

    Candidates without both numbers are left out (the report still lists them). The picked
    candidate, if any, is ringed. When the probe cannot decide (``report["probe"]``), neither the
    front nor the pick is drawn, and the title says why.
    """
    plt = require()
    decides = (report.get("probe") or {}).get("decides", True)
    rows = [
        r
        for r in report["candidates"]
        if r.get("recall_mean") is not None and r.get("reasoning_score") is not None
    ]
    fig, ax = plt.subplots(figsize=(7.5, 5.5), layout="constrained")
    if not rows:
        ax.text(0.5, 0.5, "no candidate has both a recall and a reasoning score", ha="center")
    seen: set[str] = set()
    for r in rows:
        g = r.get("group", "")
        ax.scatter(
            r["recall_mean"],
            r["reasoning_score"],
            s=70 if r.get("pareto") and decides else 36,
            color=SWEEP_COLORS.get(g, "#7f7f7f"),
            edgecolor="black" if r.get("pareto") and decides else "none",
            label=None if g in seen else g,
            zorder=3,
        )
        seen.add(g)
    points = [(r["recall_mean"], r["reasoning_score"]) for r in rows]
    clusters = label_clusters(points)
    _place_labels(
        fig,
        ax,
        [points[c[0]] for c in clusters],
        ["\n".join(rows[i]["name"] for i in c) for c in clusters],
    )
    front = sorted((r for r in rows if r.get("pareto") and decides), key=lambda r: r["recall_mean"])
    if len(front) > 1:
        ax.plot(
            [r["recall_mean"] for r in front],
            [r["reasoning_score"] for r in front],
            color="black",
            lw=1,
            ls="--",
            zorder=2,
            label="Pareto front",
        )
    pick_doc = report.get("pick") or {}
    pick = pick_doc.get("name") if pick_doc.get("decided", True) else None
    for r in rows:
        if r["name"] == pick:
            ax.scatter(
                r["recall_mean"],
                r["reasoning_score"],
                s=260,
                facecolor="none",
                edgecolor="black",
                lw=1.5,
                zorder=4,
                label="picked",
            )
    src = report.get("recall_source") or "recall"
    lengths = (report.get("niah") or {}).get("lengths")
    ax.set_xlabel(f"recall ({src}, mean" + (f" over {lengths})" if lengths else ")"))
    ax.set_ylabel(f"reasoning ({report.get('reasoning_metric') or '-'})")
    ax.set_title(
        "qkrestore sweep: recall vs reasoning"
        + ("" if decides else "\n(no front or pick: the probe cannot decide)")
    )
    ax.grid(alpha=0.3)
    if rows:
        ax.legend(fontsize=8, loc="best")
    _save(fig, path)
