"""``lowbit report`` on synthetic results written through the store."""

from __future__ import annotations

import argparse
import random
import re
from pathlib import Path
from typing import Any

import pytest

from lowbit.bench import report
from lowbit.bench.report import pareto_front, write_report
from lowbit.bench.results import ResultsStore, load_results
from lowbit.errors import LowbitError

MODEL = "smollm2-135m"
SLUG = "smollm2-135m"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
KINDS = ("kld-bpw", "kld-size", "ppl-bpw", "decode-size", "prefill-size", "peak-memory", "humaneval", "layer-error")


def cell(recipe: str, method: str, bpw: float, kld: float, fmt: str = "lowbit", **over: Any) -> dict[str, Any]:
    """A done cell result with every field of schema 1."""
    model_bytes = int(bpw * 135e6 / 8 + 40e6)
    r = {
        "cell": f"{MODEL}--{recipe}", "model": MODEL, "recipe": recipe,
        "recipe_digest": None if method == "none" else "ab12", "method": method, "format": fmt, "codec": f"{recipe} codec", "dense": None, "status": "done", "error": None,
        "model_fingerprint": "f00d", "machine": {"platform": "Linux-x86_64", "cpus": 16, "threads": 8},
        "versions": {"lowbit": "0.1.0", "torch": "2.5.1", "transformers": "4.46.0", "python": "3.11.2"},
        "started_at": "2025-01-01T00:00:00Z", "seconds": 12.0,
        "size": {"bits_per_weight": bpw, "model_bytes": model_bytes, "disk_bytes": model_bytes + 1000},
        "quant_seconds": 3.25,
        "texts": {t: {"ppl": 20 + 50 * kld, "delta_ppl": 50 * kld, "kld": kld, "kld_p99": 10 * kld, "top1": 1 - kld,
                      "tokens": 4096} for t in ("pydoc", "stdlib")},
        "speed": {"batch": 1, "prompt_tokens": 128, "new_tokens": 32, "prefill_tokens_per_s": 900.0 / bpw,
                  "decode_tokens_per_s": 200.0 / bpw, "peak_mb": model_bytes / 1e6 + 300},
        "memory": {"model_mb": model_bytes / 1e6, "peak_mb": model_bytes / 1e6 + 250},
        "humaneval": {"pass@1": 0.25 - kld, "problems": 164, "loglik": -0.5 - kld},
        "layers": None if method == "none" else {
            f"model.layers.{b}.{part}": kld * (1 + b) / (1 + i)
            for b in range(4) for i, part in enumerate(("self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj"))},
        "llama_bench": None,
    }
    r.update(over)
    return r


def failed(recipe: str, error: str) -> dict[str, Any]:
    r = cell(recipe, "gptq", 3.0, 0.1)
    r.update(status="failed", error=error, texts={}, speed=None, memory=None, humaneval=None, layers=None)
    return r


def sweep() -> list[dict[str, Any]]:
    return [
        cell("unquantized", "none", 16.0, 0.0, dense="float32"),
        cell("bf16", "none", 16.0, 1.5e-4, dense="bfloat16"),
        cell("int8", "rtn", 8.25, 0.00123),
        cell("w4a16", "rtn", 4.25, 0.0456),
        cell("w4a16-gptq", "gptq", 4.25, 0.0312),
        cell("w3a16-gptq", "gptq", 3.25, 0.0987),
        cell("w4a16-awq", "awq", 4.25, 0.0333),
        cell("gguf-q4_k_m", "rtn", 4.85, 0.0401, fmt="gguf",
             llama_bench={"prefill_tokens_per_s": 1500.0, "decode_tokens_per_s": 91.5, "threads": 8}),
        failed("w2a16-gptq", "RuntimeError: Cholesky failed: the Hessian is not positive definite"),
    ]


def stored(root: Path) -> list[dict[str, Any]]:
    store = ResultsStore(root)
    for r in sweep():
        store.put(r)
    return load_results(root)


@pytest.fixture
def results(tmp_path: Path) -> list[dict[str, Any]]:
    return stored(tmp_path / "results")


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The HTML report of the whole sweep, drawn once for the tests that only read it."""
    tmp = tmp_path_factory.mktemp("page")
    out = tmp / "r.html"
    assert write_report(stored(tmp / "results"), out, title="My sweep") == [out]
    return out.read_text()


def svgs(page: str) -> dict[str, str]:
    """Each inline SVG of the page by its id."""
    return {m.group(1): m.group(0) for m in re.finditer(r'<svg id="([^"]+)".*?</svg>', page, flags=re.S)}


def table(page: str, table_id: str) -> list[list[str]]:
    """The body rows of a table of the page, as cell texts."""
    found = re.search(rf'<table id="{table_id}">.*?<tbody>(.*?)</tbody>', page, flags=re.S).group(1)
    return [re.findall(r"<td[^>]*>([^<]*)</td>", row) for row in re.findall(r"<tr>(.*?)</tr>", found)]


def test_pareto_front_matches_brute_force() -> None:
    rng = random.Random(0)
    for _ in range(200):
        pts = [(rng.randint(0, 6), rng.randint(0, 6)) for _ in range(rng.randint(1, 12))]

        def beaten(p: tuple[int, int]) -> bool:
            return any(q[0] <= p[0] and q[1] <= p[1] and q != p for q in pts)

        assert sorted(pareto_front(pts)) == [i for i, p in enumerate(pts) if not beaten(p)]
        xs = [pts[i] for i in pareto_front(pts)]
        assert xs == sorted(xs)  # ordered for a step line


def test_html_has_every_plot_and_formatted_table(page: str) -> None:
    found = svgs(page)
    assert set(found) == {f"plot-{k}-{SLUG}" for k in KINDS}
    assert "<title>My sweep</title>" in page
    comp = {row[1]: row for row in table(page, f"table-comparison-{SLUG}")}
    assert len(comp) == 8
    # w4a16-gptq: bpw, model MB, disk MB, per text KLD (4 significant), top-1 %, PPL, signed delta PPL,
    # decode and prefill tok/s, peak MB, pass@1, canonical LL, no llama.cpp speed, quant s
    assert comp["w4a16-gptq"] == ["smollm2-135m", "w4a16-gptq", "gptq", "lowbit", "4.25", "111.7", "111.7",
                                  *["0.0312", "96.9%", "21.560", "+1.560"] * 2,
                                  "47.1", "211.8", "362", "21.9%", "-0.531", "–", "3.2"]
    assert comp["gguf-q4_k_m"][-2] == "91.5"  # llama.cpp's decode speed of the GGUF row
    assert comp["unquantized"][7] == "0"
    for head in ("<th class=\"n\">pydoc KLD</th>", "<th class=\"n\">stdlib ΔPPL</th>", "HumanEval canonical LL"):
        assert head in page
    classic = table(page, f"table-classic-{SLUG}")
    assert [row[0] for row in classic] == ["original", "16-bit", "int8", "GPTQ int4", "AWQ int4"]
    assert classic[3] == ["GPTQ int4", "w4a16-gptq", "111.7", "362", "47.1", "211.8", "21.9%"]
    assert "Provenance: lowbit 0.1.0, torch 2.5.1" in page and "Warning" not in page


def test_kld_plot_draws_labelled_points_and_leaves_out_zero_kld(page: str) -> None:
    found = svgs(page)
    kld = found[f"plot-kld-bpw-{SLUG}"]
    for recipe in ("int8", "w4a16-gptq", "w4a16-awq", "bf16"):
        assert f"label-{recipe}" in kld
    assert "label-unquantized" not in kld  # KLD 0 has no place on a log axis
    assert "label-unquantized" in found[f"plot-ppl-bpw-{SLUG}"]
    assert found[f"plot-decode-size-{SLUG}"].count("label-gguf-q4_k_m") == 2  # lowbit's and llama.cpp's speed


def test_failed_cells_listed_and_not_plotted(page: str) -> None:
    assert table(page, "table-failed") == [["smollm2-135m", "w2a16-gptq", "gptq", "lowbit", "failed",
                                            "RuntimeError: Cholesky failed: the Hessian is not positive definite"]]
    assert "w2a16-gptq" not in [row[1] for row in table(page, f"table-comparison-{SLUG}")]
    for svg in svgs(page).values():
        assert "w2a16-gptq" not in svg


def test_html_is_self_contained(page: str) -> None:
    refs = re.findall(r'\b(?:src|href)\s*=\s*["\']([^"\']*)', page)
    # only in-page references (SVG <use>) and inline images (the heat map's raster)
    assert refs and all(ref.startswith(("#", "data:image/png;base64,")) for ref in refs)
    assert any(ref.startswith("#") for ref in refs)
    assert not re.search(r"<(?:script|link|img|iframe)\b", page)
    assert "@import" not in page and "url(http" not in page
    # each SVG's internal ids are its own: one page, many SVGs
    ids = re.findall(r'\bid="([^"]+)"', page)
    assert len(ids) == len(set(ids))


def test_absent_plots_leave_a_note(results: list[dict[str, Any]], tmp_path: Path) -> None:
    for r in results:
        r.update(speed=None, humaneval=None, llama_bench=None)
    write_report(results, tmp_path / "r.html")
    page = (tmp_path / "r.html").read_text()
    found = svgs(page)
    for kind in ("decode-size", "prefill-size", "humaneval"):
        assert f"plot-{kind}-{SLUG}" not in found
    assert "Decode tokens/s vs file size: not drawn, no speed was measured." in page
    assert "HumanEval pass@1 per recipe: not drawn, no HumanEval was run." in page
    assert f"plot-peak-memory-{SLUG}" in found  # memory still measured


def test_heatmap_recipe_chosen_and_unknown_refused(results: list[dict[str, Any]], tmp_path: Path) -> None:
    def heatmaps(heatmap: str | None) -> list[str]:
        return [b.title for b in report.build_page(results, heatmap) if isinstance(b, report.Plot) and "layer" in b.id]

    assert heatmaps("w4a16-awq") == ["Per-layer quantization error (w4a16-awq)"]
    # by default the quantized recipe with the fewest bits per weight
    assert heatmaps(None) == ["Per-layer quantization error (w3a16-gptq)"]
    with pytest.raises(LowbitError, match="--heatmap nope"):
        write_report(results, tmp_path / "s.html", heatmap="nope")
    rows, cols, grid = report.layer_grid({"model.layers.1.mlp.down_proj": 0.2, "model.layers.0.self_attn.q_proj": 0.1,
                                          "lm_head": 0.5})
    assert (rows, cols, grid) == ([0, 1], ["q_proj", "down_proj"], [[0.1, None], [None, 0.2]])


def test_the_reference_row_is_not_on_the_log_kld_plots() -> None:
    cells = sweep()[:4]  # the unquantized row (dense float32) as a sweep writes it: KLD against itself ~1e-10
    for t in cells[0]["texts"].values():
        t["kld"] = 1.2e-10
    kld_plots = [b for b in report._quality_plots("m", cells, "pydoc") if isinstance(b, report.Plot) and "kld" in b.id]
    assert len(kld_plots) == 2
    for plot in kld_plots:
        drawn = {p[2] for pts in plot.make.args[0].values() for p in pts}  # type: ignore[attr-defined]
        assert drawn == {"bf16", "int8", "w4a16"}


def test_rows_are_listed_largest_first() -> None:
    (table,) = [b for b in report.build_page(sweep()) if isinstance(b, report.Table) and "comparison" in b.id]
    recipe = table.columns.index("recipe")
    assert [row[recipe] for row in table.rows][:3] == ["bf16", "unquantized", "int8"]
    assert [row[recipe] for row in table.rows][-1] == "w3a16-gptq"


def test_mixed_versions_warn() -> None:
    cells = sweep()
    assert [p.kind for p in report.provenance(cells)] == ["meta"]
    cells[0]["versions"] = {**cells[0]["versions"], "torch": "2.4.0"}
    cells[1]["machine"] = {**cells[1]["machine"], "cpus": 2}
    warn = report.provenance(cells)[1]
    assert warn.kind == "warning" and "2 version sets and 2 machines" in warn.text


def test_markdown_writes_linked_pngs(results: list[dict[str, Any]], tmp_path: Path) -> None:
    out = tmp_path / "r.md"
    written = write_report(results, out)
    text = out.read_text()
    pngs = written[1:]
    assert written[0] == out and len(pngs) == len(KINDS)
    for png in pngs:
        assert png.parent == tmp_path / "r_files" and png.read_bytes().startswith(PNG_SIGNATURE)
        assert f"](r_files/{png.name})" in text
    assert "| smollm2-135m | w4a16-gptq | gptq | lowbit | 4.25 |" in text
    assert "Cholesky failed" in text
    # the reference alone: no KLD plot, and no stale one left from the first report
    again = write_report([r for r in results if r["recipe"] == "unquantized"], out)
    assert sorted((tmp_path / "r_files").iterdir()) == sorted(again[1:])
    assert not (tmp_path / "r_files" / f"plot-kld-bpw-{SLUG}.png").exists()


def test_bad_suffix_refused(results: list[dict[str, Any]], tmp_path: Path) -> None:
    with pytest.raises(LowbitError, match=r"\.html or \.md"):
        write_report(results, tmp_path / "r.pdf")
    assert list(tmp_path.iterdir()) == [tmp_path / "results"]


@pytest.mark.parametrize("name", ["r.html", "r.md"])
def test_failing_plot_writes_nothing(results: list[dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     name: str) -> None:
    from lowbit.bench import plots

    def boom(*a: Any, **k: Any) -> Any:
        raise RuntimeError("boom")

    monkeypatch.setattr(plots, "bars", boom)
    with pytest.raises(RuntimeError, match="boom"):
        write_report(results, tmp_path / name)
    assert list(tmp_path.iterdir()) == [tmp_path / "results"]


def test_report_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = ResultsStore(tmp_path / "results")
    store.put(cell("int8", "rtn", 8.25, 0.00123))
    parser = argparse.ArgumentParser()
    report.add_report_args(parser)
    args = parser.parse_args([str(tmp_path / "results"), "-o", str(tmp_path / "out.html"), "--title", "T"])
    assert report.report_command(args) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "out.html")
    assert "<h1>T</h1>" in (tmp_path / "out.html").read_text()


def test_dense_rows_are_known_by_their_dtype_not_their_name() -> None:
    renamed = [cell("float-model", "none", 32.0, 0.0, dense="float32"), cell("half", "none", 16.0, 1e-4, dense="bfloat16"),
               cell("bf16", "rtn", 4.25, 0.2)]  # a quantized recipe that happens to be called bf16
    classic = report.classic_table(renamed, "t")
    assert classic is not None and [row[:2] for row in classic.rows] == [["original", "float-model"], ["16-bit", "half"]]
    assert report.is_reference(renamed[0]) and not report.is_reference(renamed[1])
    # results written before cells kept ``dense``: known by method and codec as those sweeps wrote them
    old = [cell("unquantized", "none", 32.0, 0.0, codec="float32"), cell("bf16", "none", 16.0, 1e-4, codec="bf16")]
    for r in old:
        del r["dense"]
    assert report.is_reference(old[0]) and report.is_bf16(old[1]) and not report.is_reference(old[1])
