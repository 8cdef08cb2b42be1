"""The figures of ``lowbit report``: functions that take plain lists and dicts and return a
matplotlib Figure (Agg backend: no display), plus the two ways a page embeds one (SVG, PNG)."""

from __future__ import annotations

import io
import math
import re
import zlib
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
matplotlib.rcParams["svg.hashsalt"] = "lowbit"  # deterministic ids, so reports diff cleanly
matplotlib.rcParams["svg.fonttype"] = "path"  # text as paths: the page needs no font

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

# (x, y, label): one point of a scatter
Point = tuple[float, float, str]

_STYLES = {
    "none": ("#555555", "o"),
    "rtn": ("#1f77b4", "s"),
    "gptq": ("#ff7f0e", "^"),
    "awq": ("#2ca02c", "D"),
    "llama.cpp": ("#d62728", "X"),
}
_PALETTE = ("#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f")
_MARKERS = ("v", "P", "*", "h", "<", ">")
WIDTH, HEIGHT = 7.0, 4.4


def style(series: str) -> tuple[str, str]:
    """The colour and marker of a method (or other series name), the same in every figure."""
    if series in _STYLES:
        return _STYLES[series]
    h = zlib.crc32(series.encode())  # stable across runs, unlike hash()
    return _PALETTE[h % len(_PALETTE)], _MARKERS[(h // len(_PALETTE)) % len(_MARKERS)]


def gid(label: str) -> str:
    """``label`` as the tail of an SVG id."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", label).strip("-") or "x"


def scatter(
    series: dict[str, list[Point]],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    fronts: dict[str, list[tuple[float, float]]] | None = None,
    logx: bool = False,
    logy: bool = False,
) -> Figure:
    """Labelled points, one colour/marker per series; each series' front (if given) as a step line."""
    fig, ax = _axes(title)
    notes = []
    for name, points in series.items():
        colour, marker = style(name)
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        ax.scatter(xs, ys, color=colour, marker=marker, s=46, label=name, zorder=3, edgecolors="white", linewidths=0.6)
        for x, y, label in points:
            note = ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7.5, color="#333333")
            note.set_gid(f"{gid(name)}-label-{gid(label)}")  # text is drawn as paths: the id is what names it
            notes.append(note)
    for name, front in (fronts or {}).items():
        if len(front) > 1:
            ax.step([p[0] for p in front], [p[1] for p in front], where="post", color=style(name)[0],
                    linewidth=1.2, alpha=0.7, zorder=2)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.margins(0.12)
    ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    _place_labels(fig, ax, notes)
    return fig


def bars(labels: Sequence[str], values: Sequence[float], *, title: str, ylabel: str,
         methods: Sequence[str] | None = None, fmt: str = "{:.0f}") -> Figure:
    """One bar per label, coloured by its method, with its value written above it."""
    fig, ax = _axes(title)
    colours = [style(m)[0] for m in methods] if methods else None
    xs = range(len(labels))
    rects = ax.bar(xs, values, color=colours, width=0.65, zorder=3)
    for rect, label in zip(rects, labels):
        rect.set_gid(f"bar-{gid(label)}")
    ax.bar_label(rects, labels=[fmt.format(v) for v in values], fontsize=7.5, padding=2)
    ax.set_xticks(list(xs), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.margins(y=0.12)
    return _finish(fig)


def heatmap(rows: Sequence[int], cols: Sequence[str], values: Sequence[Sequence[float | None]], *,
            title: str, cbar_label: str) -> Figure:
    """A rows x cols grid coloured by log10 of the value; missing cells blank."""
    import numpy as np

    grid = np.array([[math.log10(v) if v is not None and v > 0 else np.nan for v in row] for row in values])
    fig, ax = plt.subplots(figsize=(WIDTH, max(2.6, 1.2 + 0.28 * len(rows))))
    ax.set_title(title, fontsize=11)
    im = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right", fontsize=8)
    step = max(1, len(rows) // 16)  # at most ~16 row labels
    ax.set_yticks(range(0, len(rows), step), [str(r) for r in rows][::step], fontsize=8)
    ax.set_ylabel("decoder block")
    cbar = fig.colorbar(im, ax=ax)
    cbar.set_label(cbar_label, fontsize=8)
    return _finish(fig)


# label offsets (points, horizontal alignment) tried in turn: beside the marker first, then further out
_SPOTS = [((dx, dy), ha) for dy in (4, -10, 13, -19, 22, -28) for dx, ha in ((5, "left"), (-5, "right"))]


def _place_labels(fig: Figure, ax, notes: list) -> None:  # type: ignore[no-untyped-def]
    """Move each point's label to the first spot that overlaps no marker and no label placed
    before it (else to the spot that overlaps least): a greedy repel, enough for a few dozen."""
    if not notes or len(notes) > 60:
        return
    r = fig.canvas.get_renderer()
    frame = ax.get_window_extent(r)
    pts = ax.transData.transform([n.xy for n in notes])
    taken = [(x - 4, y - 4, x + 4, y + 4) for x, y in pts]
    legend = ax.get_legend()
    if legend is not None:
        b = legend.get_window_extent(r)
        taken.append((b.x0, b.y0, b.x1, b.y1))
    for note in notes:
        best, best_cost, best_box = _SPOTS[0], float("inf"), (0.0, 0.0, 0.0, 0.0)
        for spot in _SPOTS:
            _put(note, spot)
            b = note.get_window_extent(r)
            box = (b.x0, b.y0, b.x1, b.y1)
            outside = (max(0.0, frame.x0 - b.x0) + max(0.0, b.x1 - frame.x1)
                       + max(0.0, frame.y0 - b.y0) + max(0.0, b.y1 - frame.y1))
            cost = sum(_overlap(box, t) for t in taken) + 50 * outside
            if cost < best_cost:
                best, best_cost, best_box = spot, cost, box
            if cost == 0:
                break
        _put(note, best)
        taken.append(best_box)


def _put(note, spot: tuple[tuple[int, int], str]) -> None:  # type: ignore[no-untyped-def]
    note.xyann = spot[0]
    note.set_ha(spot[1])


def _overlap(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


def to_svg(fig: Figure, element_id: str) -> str:
    """``fig`` as an inline ``<svg>`` element with ``id=element_id``; its internal ids are prefixed
    with it, since several SVGs in one page would otherwise share ids like ``#m1a2b`` or ``#p3c4d``."""
    buf = io.StringIO()
    try:
        fig.savefig(buf, format="svg", metadata={"Date": None})
    finally:
        plt.close(fig)
    svg = buf.getvalue()
    svg = svg[svg.index("<svg"):]  # drop the XML declaration and DOCTYPE: not valid inside HTML
    svg = re.sub(r"<metadata>.*?</metadata>", "", svg, flags=re.S)
    svg = re.sub(r'\bid="([^"]+)"', rf'id="{element_id}-\1"', svg)
    svg = re.sub(r'href="#([^"]+)"', rf'href="#{element_id}-\1"', svg)
    svg = re.sub(r"url\(#([^)]+)\)", rf"url(#{element_id}-\1)", svg)
    return svg.replace("<svg ", f'<svg id="{element_id}" role="img" ', 1)


def to_png(fig: Figure, dpi: int = 110) -> bytes:
    """``fig`` as PNG bytes."""
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    return buf.getvalue()


def _axes(title: str):  # type: ignore[no-untyped-def]
    fig, ax = plt.subplots(figsize=(WIDTH, HEIGHT))
    ax.set_title(title, fontsize=11)
    ax.grid(True, which="major", color="#e5e5e5", zorder=0)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    return fig, ax


def _finish(fig: Figure) -> Figure:
    fig.tight_layout()
    return fig
