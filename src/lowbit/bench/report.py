"""``lowbit report``: a sweep's cell results (see :mod:`lowbit.bench.results`) as one self-contained
HTML page (inline CSS, plots as inline SVG) or as Markdown with PNG plots beside it.

A page is built in memory as a list of blocks (headings, tables, figures, notes), then rendered
to HTML or Markdown and written atomically, so that a plot that fails writes nothing."""

from __future__ import annotations

import argparse
import html
import re
import shutil
import tempfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence
from urllib.parse import quote

from lowbit.errors import LowbitError
from lowbit.io.folder import write_text_atomic

# the classic comparison: (row label, the preset of its quantized rows; None for the dense rows,
# which are known by the dtype the cell ran the model in)
CLASSIC = (("original", None), ("16-bit", None), ("int8", "int8"), ("GPTQ int4", "w4a16-gptq"),
           ("AWQ int4", "w4a16-awq"))
# linear kinds in the order of a decoder block; other kinds follow in order of appearance
LINEAR_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "gate_proj", "up_proj", "gate_up_proj", "down_proj")
_LAYER_NAME = re.compile(r"(?:^|\.)(\d+)\.(?:.+\.)?([A-Za-z_][A-Za-z0-9_]*)$")
NONE = "–"


# -- page blocks ------------------------------------------------------------------------------------

@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Para:
    text: str
    kind: str = "note"  # note | warning | meta


@dataclass
class Table:
    id: str
    title: str  # empty: no heading of its own
    columns: list[str]
    rows: list[list[str]]
    text_columns: int = 4  # the leading columns that hold words (left-aligned); the rest hold numbers


@dataclass
class Plot:
    id: str
    title: str
    make: Callable[[], Any]  # -> matplotlib Figure; called only when the page is rendered


Block = Heading | Para | Table | Plot


# -- numbers ----------------------------------------------------------------------------------------

def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points that no other point beats on both coordinates (smaller is better:
    ``q`` beats ``p`` if it is no larger in both and smaller in one), sorted by x then y."""
    pts = [(float(x), float(y)) for x, y in points]
    order = sorted(range(len(pts)), key=lambda i: pts[i])
    front: list[int] = []
    best_y = float("inf")
    for i in order:
        x, y = pts[i]
        if y < best_y or (front and pts[front[-1]] == (x, y)):  # an equal point does not beat it
            front.append(i)
            best_y = min(best_y, y)
    return front


def _get(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def size_bytes(r: dict[str, Any]) -> float | None:
    """The file size of a cell: disk bytes, else the bytes of its stored tensors."""
    return _num(_get(r, "size", "disk_bytes")) or _num(_get(r, "size", "model_bytes"))


def peak_mb(r: dict[str, Any]) -> float | None:
    return _num(_get(r, "memory", "peak_mb")) or _num(_get(r, "speed", "peak_mb"))


def humaneval_ll(r: dict[str, Any]) -> float | None:
    """Mean log-probability of HumanEval's canonical solutions (nats/token; see lowbit.evaluation.humaneval)."""
    return _num(_get(r, "humaneval", "loglik"))


def _mb(v: Any) -> float | None:
    v = _num(v)
    return None if v is None else v / 1e6


def fmt(v: Any, spec: str) -> str:
    """``v`` formatted by ``spec`` (a format spec, or ``pct``: a fraction as a percentage); a dash if absent."""
    v = _num(v)
    if v is None:
        return NONE
    if spec == "pct":
        return f"{100 * v:.1f}%"
    return format(v, spec)


def text_names(cells: list[dict[str, Any]]) -> list[str]:
    """The text names of the cells in first-seen order (the first one is the one plotted)."""
    names: dict[str, None] = {}
    for r in cells:
        names.update(dict.fromkeys(r.get("texts") or {}))
    return list(names)


# -- tables -----------------------------------------------------------------------------------------

def comparison_table(cells: list[dict[str, Any]], texts: list[str], table_id: str) -> Table:
    """One row per done cell: sizes, quality per text, speed, memory, HumanEval, quant time."""
    cols = ["model", "recipe", "method", "format", "bpw", "model MB", "disk MB"]
    for t in texts:
        cols += [f"{t} KLD", f"{t} top-1", f"{t} PPL", f"{t} ΔPPL"]
    cols += ["decode tok/s", "prefill tok/s", "peak MB", "HumanEval pass@1", "HumanEval canonical LL (nats/tok)",
             "llama.cpp decode tok/s", "quant s"]
    rows = []
    for r in cells:
        row = [str(r.get("model", "")), str(r.get("recipe", "")), str(r.get("method", "")), str(r.get("format", "")),
               fmt(_get(r, "size", "bits_per_weight"), ".2f"), fmt(_mb(_get(r, "size", "model_bytes")), ".1f"),
               fmt(_mb(_get(r, "size", "disk_bytes")), ".1f")]
        for t in texts:
            q = _get(r, "texts", t) or {}
            row += [fmt(q.get("kld"), ".4g"), fmt(q.get("top1"), "pct"), fmt(q.get("ppl"), ".3f"),
                    fmt(q.get("delta_ppl"), "+.3f")]
        row += [fmt(_get(r, "speed", "decode_tokens_per_s"), ".1f"), fmt(_get(r, "speed", "prefill_tokens_per_s"), ".1f"),
                fmt(peak_mb(r), ".0f"), fmt(_get(r, "humaneval", "pass@1"), "pct"), fmt(humaneval_ll(r), ".3f"),
                fmt(_get(r, "llama_bench", "decode_tokens_per_s"), ".1f"), fmt(r.get("quant_seconds"), ".1f")]
        rows.append(row)
    return Table(table_id, "Comparison", cols, rows)


def classic_table(cells: list[dict[str, Any]], table_id: str) -> Table | None:
    """original / 16-bit / int8 / GPTQ int4 / AWQ int4, the rows the results have; None if none."""
    by_recipe = {r.get("recipe"): r for r in cells}
    rows = []
    for label, preset in CLASSIC:
        if preset is None:
            r = next((c for c in cells if (is_reference(c) if label == "original" else is_bf16(c))), None)
        else:
            r = by_recipe.get(preset)
        if r is None:
            continue
        rows.append([label, r.get("recipe"), fmt(_mb(size_bytes(r)), ".1f"), fmt(peak_mb(r), ".0f"),
                     fmt(_get(r, "speed", "decode_tokens_per_s"), ".1f"),
                     fmt(_get(r, "speed", "prefill_tokens_per_s"), ".1f"), fmt(_get(r, "humaneval", "pass@1"), "pct")])
    if not rows:
        return None
    cols = ["", "recipe", "size MB", "peak MB", "decode tok/s", "prefill tok/s", "HumanEval pass@1"]
    return Table(table_id, "Original / 16-bit / int8 / GPTQ int4 / AWQ int4", cols, rows, text_columns=2)


def failed_table(cells: list[dict[str, Any]]) -> Table:
    rows = [[str(r.get("model", "")), str(r.get("recipe", "")), str(r.get("method", "")), str(r.get("format", "")),
             str(r.get("status", "")), str(r.get("error") or NONE)] for r in cells]
    return Table("table-failed", "", ["model", "recipe", "method", "format", "status", "error"], rows, text_columns=6)


def provenance(cells: list[dict[str, Any]]) -> list[Para]:
    """One line naming the versions and machines of the cells; a warning if they differ."""
    versions = sorted({_versions(r) for r in cells})
    machines = sorted({_machine(r) for r in cells})
    line = Para(f"Provenance: {'; '.join(versions) or 'unknown versions'} on {'; '.join(machines) or 'an unknown machine'}"
                f" ({len(cells)} cells).", "meta")
    out = [line]
    if len(versions) > 1 or len(machines) > 1:
        out.append(Para(f"Warning: these cells come from {len(versions)} version sets and {len(machines)} machines;"
                        " their numbers may not be comparable.", "warning"))
    return out


def _versions(r: dict[str, Any]) -> str:
    v = r.get("versions") or {}
    return ", ".join(f"{k} {v[k]}" for k in ("lowbit", "torch", "transformers", "python") if v.get(k))


def _machine(r: dict[str, Any]) -> str:
    m = r.get("machine") or {}
    if not isinstance(m, dict):
        return str(m)
    parts = [str(m["platform"])] if m.get("platform") else []
    parts += [f"{m[k]} {k}" for k in ("cpus", "threads") if m.get(k) is not None]
    parts += [f"{k} {v}" for k, v in m.items() if k not in ("platform", "cpus", "threads")]
    return ", ".join(parts) or "unknown machine"


# -- plots ------------------------------------------------------------------------------------------

Series = dict[str, list[tuple[float, float, str]]]  # method -> (x, y, recipe) points
Value = Callable[[dict[str, Any]], "float | None"]


def _series(cells: list[dict[str, Any]], x: Value, y: Value) -> Series:
    """The cells that have both values, as points grouped by method."""
    series: Series = {}
    for r in cells:
        xv, yv = x(r), y(r)
        if xv is not None and yv is not None:
            series.setdefault(str(r.get("method") or "?"), []).append((xv, yv, str(r.get("recipe", ""))))
    return series


def _fronts(series: Series) -> dict[str, list[tuple[float, float]]]:
    out = {}
    for m, pts in series.items():
        xy = [(p[0], p[1]) for p in pts]
        out[m] = [xy[i] for i in pareto_front(xy)]
    return out


def _plot(plot_id: str, title: str, make: Callable[[], Any] | None, missing: str) -> Block:
    """The plot, or a one-line note saying why it is not drawn."""
    return Plot(plot_id, title, make) if make else Para(f"{title}: not drawn, {missing}.")


def model_plots(slug: str, cells: list[dict[str, Any]], texts: list[str], heatmap: str | None) -> list[Block]:
    """The figures of one model (``slug`` names their ids), each a Plot, or a note where its data is absent."""
    return [*_quality_plots(slug, cells, texts[0] if texts else None), *_speed_plots(slug, cells),
            *_bar_plots(slug, cells), *_heatmap(slug, cells, heatmap)]


def _bpw(r: dict[str, Any]) -> float | None:
    return _num(_get(r, "size", "bits_per_weight"))


def _size_mb(r: dict[str, Any]) -> float | None:
    return _mb(size_bytes(r))


def is_reference(r: dict[str, Any]) -> bool:
    """Whether a cell result is the unquantized float32 model (the reference every KLD is taken
    against). Results stored before cells carried ``dense`` are known by their method and codec."""
    if "dense" in r:
        return r["dense"] == "float32"
    return r.get("method") == "none" and r.get("codec") == "float32"


def is_bf16(r: dict[str, Any]) -> bool:
    """Whether a cell result is the unquantized model run in bfloat16 (older results: by its codec)."""
    if "dense" in r:
        return r["dense"] == "bfloat16"
    return r.get("method") == "none" and r.get("codec") == "bf16"


def _quality_plots(slug: str, cells: list[dict[str, Any]], text: str | None) -> list[Block]:
    from lowbit.bench import plots

    def kld(r: dict[str, Any]) -> float | None:
        if is_reference(r):
            return None  # the reference against itself: KLD 0 up to rounding, which a log axis would stretch
        v = _num(_get(r, "texts", text, "kld"))
        return v if v is not None and v > 0 else None

    of = f" ({text})" if text else ""
    out = []
    for kind, xlabel, x in (("kld-bpw", "bits per weight", _bpw), ("kld-size", "file size (MB)", _size_mb)):
        s, title = _series(cells, x, kld), f"KLD vs {xlabel}{of}"
        make = partial(plots.scatter, s, title=title, xlabel=xlabel, ylabel="KLD (nats/token, log)",
                       fronts=_fronts(s), logy=True)
        out.append(_plot(f"plot-{kind}-{slug}", title, make if s else None, "no cell has a positive KLD"))
    s, title = _series(cells, _bpw, lambda r: _num(_get(r, "texts", text, "ppl"))), f"PPL vs bits per weight{of}"
    make = partial(plots.scatter, s, title=title, xlabel="bits per weight", ylabel="perplexity")
    out.append(_plot(f"plot-ppl-bpw-{slug}", title, make if s else None, "no cell has a perplexity"))
    return out


def _speed_plots(slug: str, cells: list[dict[str, Any]]) -> list[Block]:
    from lowbit.bench import plots

    out = []
    for kind in ("decode", "prefill"):
        key = f"{kind}_tokens_per_s"
        s = _series(cells, _size_mb, lambda r: _num(_get(r, "speed", key)))
        peer = _series(cells, _size_mb, lambda r: _num(_get(r, "llama_bench", key)))
        if peer:  # llama.cpp's own speed of the GGUF rows: one series of its own
            s["llama.cpp"] = [p for pts in peer.values() for p in pts]
        title = f"{kind.capitalize()} tokens/s vs file size"
        make = partial(plots.scatter, s, title=title, xlabel="file size (MB)", ylabel="tokens/s")
        out.append(_plot(f"plot-{kind}-size-{slug}", title, make if s else None, "no speed was measured"))
    return out


def _bar_plots(slug: str, cells: list[dict[str, Any]]) -> list[Block]:
    from lowbit.bench import plots

    out = []
    for kind, title, ylabel, value, fmt_, missing in (
            ("peak-memory", "Peak memory per recipe", "peak resident MB", peak_mb, "{:.0f}", "no memory was measured"),
            ("humaneval", "HumanEval pass@1 per recipe", "pass@1 (%)", _pass_pct, "{:.1f}", "no HumanEval was run")):
        have = [(r, v) for r, v in ((r, value(r)) for r in cells) if v is not None]
        make = partial(plots.bars, [str(r.get("recipe")) for r, _ in have], [v for _, v in have],
                       methods=[str(r.get("method")) for r, _ in have], title=title, ylabel=ylabel, fmt=fmt_)
        out.append(_plot(f"plot-{kind}-{slug}", title, make if have else None, missing))
    return out


def _pass_pct(r: dict[str, Any]) -> float | None:
    v = _num(_get(r, "humaneval", "pass@1"))
    return None if v is None else 100 * v


def layer_grid(layers: dict[str, float]) -> tuple[list[int], list[str], list[list[float | None]]]:
    """``{model.layers.3.self_attn.q_proj: error}`` as (block indices, linear kinds, grid[block][kind]);
    names without a block index (lm_head) are left out."""
    cells: dict[tuple[int, str], float] = {}
    for name, err in layers.items():
        m = _LAYER_NAME.search(name)
        if m and _num(err) is not None:
            cells[(int(m.group(1)), m.group(2))] = float(err)
    rows = sorted({b for b, _ in cells})
    seen = list(dict.fromkeys(k for _, k in cells))
    cols = [k for k in LINEAR_ORDER if k in seen] + [k for k in seen if k not in LINEAR_ORDER]
    return rows, cols, [[cells.get((b, k)) for k in cols] for b in rows]


def _heatmap(slug: str, cells: list[dict[str, Any]], recipe: str | None) -> list[Block]:
    from lowbit.bench import plots

    if recipe is None:  # the fewest bits per weight, where layers differ most; then the larger mean error
        measured = [r for r in cells if r.get("method") not in (None, "none") and r.get("layers")]
        chosen = min(measured, default=None, key=lambda r: (
            _bpw(r) or float("inf"), -sum(r["layers"].values()) / len(r["layers"]), str(r.get("recipe"))))
    else:
        chosen = next((r for r in cells if r.get("recipe") == recipe), None)
    title = f"Per-layer quantization error ({chosen.get('recipe') if chosen else recipe or 'no recipe'})"
    grid = layer_grid(chosen.get("layers") or {}) if chosen else ([], [], [])
    if not grid[0]:
        why = f"recipe {recipe} has no per-layer errors" if recipe else "no quantized cell has per-layer errors"
        return [Para(f"Per-layer quantization error: not drawn, {why}.")]
    return [Plot(f"plot-layer-error-{slug}", title, lambda: plots.heatmap(
        *grid, title=title, cbar_label="log10 ‖W − Q(W)‖² / ‖W‖²"))]


# -- the page ---------------------------------------------------------------------------------------

def build_page(results: list[dict[str, Any]], heatmap: str | None = None) -> list[Block]:
    """The blocks of the report: provenance, then per model its tables and plots, then failed cells."""
    done = [r for r in results if r.get("status") == "done"]
    failed = [r for r in results if r.get("status") != "done"]
    if heatmap is not None and not any(r.get("recipe") == heatmap for r in done):
        known = ", ".join(sorted({str(r.get("recipe")) for r in done})) or "none"
        raise LowbitError(f"--heatmap {heatmap}: no done cell of that recipe (recipes: {known})")
    blocks: list[Block] = [*provenance(results)]
    slugs: set[str] = set()
    for model in dict.fromkeys(str(r.get("model", "")) for r in done):
        cells = sorted((r for r in done if str(r.get("model", "")) == model),
                       key=lambda r: (-(_bpw(r) or 0.0), str(r.get("recipe"))))  # the largest first
        texts = text_names(cells)
        slug = _slug(model)
        while slug in slugs:  # "org/m" and "org-m" would share their element ids
            slug += "-x"
        slugs.add(slug)
        blocks.append(Heading(model))
        if len(texts) > 1:
            blocks.append(Para(f"{len(texts)} texts: the KLD and PPL plots show the first, {texts[0]};"
                               " the table shows all."))
        blocks.append(comparison_table(cells, texts, f"table-comparison-{slug}"))
        classic = classic_table(cells, f"table-classic-{slug}")
        blocks.append(classic or Para("Original / 16-bit / int8 / GPTQ int4 / AWQ int4: not shown,"
                                      " none of these recipes is in the results."))
        blocks += model_plots(slug, cells, texts, heatmap)
    if not done:
        blocks.append(Para("No cell finished: nothing to plot."))
    if failed:
        blocks += [Heading("Failed cells"), failed_table(failed)]
    return blocks


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "model"


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#222;
  margin:24px auto;max-width:1400px;padding:0 16px}
h1{font-size:24px;margin:0 0 6px} h2{font-size:19px;margin:32px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
h3{font-size:15px;margin:18px 0 6px}
.meta{color:#555} .note{color:#666;font-style:italic;margin:4px 0} .warning{color:#a33;font-weight:600}
.scroll{overflow-x:auto;margin-bottom:12px}
table{border-collapse:collapse;font-size:11.5px;font-variant-numeric:tabular-nums}
th,td{border:1px solid #ddd;padding:2px 4px;white-space:nowrap;text-align:left}
th{background:#f4f4f4;white-space:normal;vertical-align:bottom;max-width:76px} .n{text-align:right}
#table-failed td:last-child{white-space:normal;max-width:760px}
tr:nth-child(even) td{background:#fafafa}
.plots{display:grid;grid-template-columns:repeat(auto-fill,minmax(600px,1fr));gap:12px;align-items:start}
figure{margin:0;border:1px solid #eee;padding:6px} figure svg{width:100%;height:auto;display:block}
"""


def render_html(blocks: list[Block], title: str) -> str:
    """The page as one HTML document with everything inline."""
    from lowbit.bench.plots import to_svg

    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>", f"<h1>{html.escape(title)}</h1>"]
    figures: list[str] = []

    def flush() -> None:
        if figures:
            out.append('<div class="plots">' + "".join(figures) + "</div>")
            figures.clear()

    for b in blocks:
        if isinstance(b, Plot):
            figures.append(f'<figure title="{html.escape(b.title)}">{to_svg(b.make(), b.id)}</figure>')
            continue
        flush()
        if isinstance(b, Heading):
            out.append(f"<h{b.level}>{html.escape(b.text)}</h{b.level}>")
        elif isinstance(b, Para):
            out.append(f'<p class="{b.kind}">{html.escape(b.text)}</p>')
        elif isinstance(b, Table):
            out.append(_html_table(b))
    flush()
    out.append("</body></html>\n")
    return "\n".join(out)


def _html_table(t: Table) -> str:
    def cls(i: int) -> str:
        return "" if i < t.text_columns else ' class="n"'

    head = "".join(f"<th{cls(i)}>{html.escape(c)}</th>" for i, c in enumerate(t.columns))
    body = "".join("<tr>" + "".join(f"<td{cls(i)}>{html.escape(c)}</td>" for i, c in enumerate(row)) + "</tr>"
                   for row in t.rows)
    heading = f"<h3>{html.escape(t.title)}</h3>" if t.title else ""
    return (f'{heading}<div class="scroll"><table id="{t.id}"><thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table></div>")


def render_markdown(blocks: list[Block], title: str, folder: str) -> tuple[str, dict[str, bytes]]:
    """The page as Markdown, and the PNG files (name -> bytes) it links under ``folder``."""
    from lowbit.bench.plots import to_png

    out, files = [f"# {title}", ""], {}
    for b in blocks:
        if isinstance(b, Plot):
            name = f"{b.id}.png"
            files[name] = to_png(b.make())
            out += [f"![{_md(b.title)}]({quote(folder)}/{name})", ""]
        elif isinstance(b, Heading):
            out += [f"{'#' * b.level} {b.text}", ""]
        elif isinstance(b, Para):
            out += [f"**{b.text}**" if b.kind == "warning" else f"_{b.text}_" if b.kind == "note" else b.text, ""]
        elif isinstance(b, Table):
            out += [*([f"### {b.title}", ""] if b.title else []), "| " + " | ".join(_md(c) for c in b.columns) + " |",
                    "|" + "|".join("---" if i < b.text_columns else "---:" for i in range(len(b.columns))) + "|",
                    *("| " + " | ".join(_md(c) for c in row) + " |" for row in b.rows), ""]
    return "\n".join(out), files


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


# -- writing ----------------------------------------------------------------------------------------

def write_report(results: list[dict[str, Any]], out: Path, heatmap: str | None = None,
                 title: str | None = None) -> list[Path]:
    """Write the report of ``results`` to ``out`` (``.html``: one self-contained file; ``.md``:
    Markdown plus PNG plots in ``<stem>_files/``); return the files written. Everything is drawn
    before anything is written, so a failure leaves no file behind."""
    out = Path(out)
    suffix = out.suffix.lower()
    if suffix not in (".html", ".md"):
        raise LowbitError(f"{out}: a report is .html or .md, not {out.suffix or 'a file without suffix'}")
    blocks = build_page(results, heatmap)
    title = title or "lowbit report"
    if suffix == ".html":
        write_text_atomic(out, render_html(blocks, title))
        return [out]
    folder = out.parent / f"{out.stem}_files"
    text, files = render_markdown(blocks, title, folder.name)
    written = _write_folder(folder, files)
    write_text_atomic(out, text)
    return [out, *written]


def _write_folder(folder: Path, files: dict[str, bytes]) -> list[Path]:
    """Replace ``folder`` by one holding ``files`` (none: no folder): built beside it, then swapped in."""
    if not files:
        shutil.rmtree(folder, ignore_errors=True)  # the plots of an earlier report of the same name
        return []
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    old = None
    try:
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        if folder.exists():
            old = folder.with_name(f"{tmp.name}.old")
            folder.rename(old)
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not folder.exists():
            old.rename(folder)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return [folder / name for name in files]


# -- command line -----------------------------------------------------------------------------------

def add_report_args(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``lowbit report``."""
    parser.add_argument("results", type=Path, metavar="RESULTS", help="a results folder written by `lowbit sweep`")
    parser.add_argument("-o", "--out", type=Path, required=True, metavar="FILE.html|FILE.md",
                        help="one self-contained HTML file, or Markdown with PNG plots in FILE_files/")
    parser.add_argument("--heatmap", metavar="RECIPE",
                        help="recipe whose per-layer errors are drawn (default: the quantized one with the fewest "
                             "bits per weight)")
    parser.add_argument("--title", metavar="T", help="page title (default: lowbit report)")


def report_command(args: argparse.Namespace) -> int:
    """``lowbit report``: load the store, write the report, print the files written."""
    from lowbit.bench.results import load_results

    results = load_results(args.results)
    if not results:
        raise LowbitError(f"{args.results}: the results store holds no cells yet")
    for path in write_report(results, args.out, heatmap=args.heatmap, title=args.title):
        print(path)
    return 0
