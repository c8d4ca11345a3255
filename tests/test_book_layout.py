"""The book's layout: one numbering in the web book and the PDF, the PDF's title page, where
the PDF may break a table, and tables that fit and are captioned on the web.

The page-break rules are checked on small documents printed with the book's own print CSS,
the book's structure on a build against fake results (test_book's), printed to PDF.
"""

from __future__ import annotations

import re
from pathlib import Path

import pypdfium2 as pdfium
import pytest

from defectfusion.core.errors import UserError
from defectfusion.report import book
from test_book import THESIS, fake_summary, write_fake_results

# ---- one numbering: the post-mortem's 5.4 and 5.5 are sections of chapter 5 -------------------


def test_the_toc_nests_the_postmortem_page_in_chapter_5() -> None:
    pages = book._pages(THESIS / "_toc.yml")
    names = [name for name, _ in pages]
    assert names[0] == "index" and names.index("postmortem") == names.index("resultados") + 1
    assert [name for name, inner in pages if inner] == ["postmortem"]


RECIPE = """# La receta

| Aspecto | Fuente |
|---|---|
| Tasa mínima | configs/deimv2/deimv2_dinov3_s_coco.yml (lr_gamma) |

Nota de la receta: DEIMv2, su repositorio oficial.
"""


@pytest.fixture(scope="module")
def printed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The book built against fake results (the recipe table with a long path and a note)
    and printed, on a fixed day: its html/ folder and its PDF."""
    tmp = tmp_path_factory.mktemp("layout")
    results, figures = write_fake_results(tmp, fake_summary())
    (results / "tables" / "recipe.md").write_text(RECIPE, encoding="utf-8")
    index = book.build_book(results, figures, tmp / "_build", source=THESIS)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SOURCE_DATE_EPOCH", "1780000000")  # 28 May 2026, UTC
        pdf = book.build_pdf(index.parent, THESIS / "_toc.yml", tmp / "_build")
    return index.parent, pdf


def test_the_pdf_numbers_the_postmortem_as_the_web_does(printed: tuple[Path, Path]) -> None:
    """On the web the post-mortem's page sits under «5. Resultados» (_toc.yml); in the PDF its
    sections 5.4 and 5.5 follow 5.3 inside chapter 5, with no unnumbered chapter around them
    (the page's own title is not printed, nor the web's pointer to that page)."""
    site, pdf_path = printed
    nav = (site / "resultados.html").read_text(encoding="utf-8")
    assert re.search(r'toctree-l2[^>]*><a class="reference internal" href="postmortem.html"', nav)
    pdf = pdfium.PdfDocument(pdf_path)
    marks = [(item.level, item.get_title()) for item in pdf.get_toc()]
    chapter = marks.index((0, "5. Resultados"))
    after = [title for level, title in marks[chapter + 1 :] if level == 1]
    assert after[:5] == [
        "5.1 Datos", "5.2 Fase 1: la línea base visual",
        "5.3 Fase 2: la fusión con arranque en cero",
        "5.4 Análisis post mortem: ¿por qué bajó la mAP?", "5.5 Veredicto",
    ]  # fmt: skip
    assert marks[chapter + 1 :].index((1, "5.5 Veredicto")) < next(
        k for k, (level, _) in enumerate(marks[chapter + 1 :]) if level == 0
    )
    assert not [t for _, t in marks if "5.4–5.5" in t or t.startswith("Análisis post mortem y")]


# ---- the title page ----------------------------------------------------------------------


def test_the_title_page_names_the_author_the_day_and_the_commit(
    printed: tuple[Path, Path],
) -> None:
    _, pdf_path = printed
    title = pdfium.PdfDocument(pdf_path)[0].get_textpage().get_text_range()
    title = re.sub(r"\s+", " ", title)
    assert "Proyecto defectfusion" in title  # thesis/_config.yml's author
    assert "28 de mayo de 2026" in title  # SOURCE_DATE_EPOCH's day, in Spanish


def test_title_lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "_config.yml"
    config.write_text('title: "T"\nauthor: "Ana Pérez & co"\n', encoding="utf-8")
    monkeypatch.setattr(book, "git_commit", lambda: "0123456789abcdef0123-dirty")
    lines = book.title_lines(config, {"SOURCE_DATE_EPOCH": "0"})
    assert lines[0] == '<p class="autor">Ana Pérez &amp; co</p>'
    assert lines[1] == '<p class="fecha">1 de enero de 1970</p>'
    assert "0123456789ab</span> (con cambios sin confirmar)" in lines[2]
    monkeypatch.setattr(book, "git_commit", lambda: None)  # not a git checkout: no commit
    assert len(book.title_lines(config, {"SOURCE_DATE_EPOCH": "0"})) == 2
    with pytest.raises(UserError, match="SOURCE_DATE_EPOCH"):
        book.title_lines(config, {"SOURCE_DATE_EPOCH": "ayer"})
    config.write_text('title: "T"\n', encoding="utf-8")
    with pytest.raises(UserError, match="author"):
        book.title_lines(config, {})


# ---- where the PDF breaks a table --------------------------------------------------------


def _printed_pages(body: str) -> list[str]:
    """`body` printed with the book's print CSS: each page's text."""
    from weasyprint import CSS, HTML

    data = HTML(string=f"<html><body>{body}</body></html>").write_pdf(
        stylesheets=[CSS(string=book.PRINT_CSS)]
    )
    pdf = pdfium.PdfDocument(data)
    return [pdf[i].get_textpage().get_text_range() for i in range(len(pdf))]


def _table(rows: list[tuple[str, str]], note: str = "") -> str:
    """A results table as Sphinx writes it (and its note as thesis/_ext/results.py wraps it),
    marked by `_keep_together` as the PDF's tables are."""
    head = "<thead><tr><th><p>Modelo</p></th><th><p>Valor</p></th></tr></thead>"
    body = "".join(f"<tr><td><p>{a}</p></td><td><p>{b}</p></td></tr>" for a, b in rows)
    html = (
        '<div class="pst-scrollable-table-container"><table class="table">'
        f"<caption>Tabla</caption>{head}<tbody>{body}</tbody></table></div>"
    )
    if note:
        html += f'<div class="nota-tabla docutils container"><p>{note}</p></div>'
    return book._keep_together(html)


def _sweep(table: str, heights: range) -> list[list[str]]:
    """`table` printed below a block of each height (mm), then a paragraph: the pages."""
    return [
        _printed_pages(f'<div style="height:{h}mm"></div>{table}<p>Después.</p>') for h in heights
    ]


def test_a_split_table_carries_four_rows_or_more_and_keeps_its_note() -> None:
    """Wherever a long table falls, a split leaves three rows or more at the page's foot and
    carries four or more under the repeated header (Tablas 12 and 13 had carried 2 and 3),
    and the note prints on the page of the table's last row (Tabla 6's had not)."""
    rows = [(f"fila{i:02d}", f"v{i:02d}") for i in range(20)]
    splits = 0
    for pages in _sweep(_table(rows, "NOTA de la tabla."), range(110, 240, 4)):
        counts = [n for n in (len(re.findall(r"fila\d\d", p)) for p in pages) if n]
        if len(counts) > 1:
            splits += 1
            assert counts[0] >= 3 and counts[-1] >= 4, counts
        note = next(k for k, p in enumerate(pages) if "NOTA" in p)
        assert "fila19" in pages[note]
    assert splits > 10


def test_a_group_of_rows_stays_on_one_page() -> None:
    """Rows that repeat the first cell (a variant's seeds, Tabla 10's «Pesos sin EMA») print
    on one page."""
    rows = [(f"Variante {v}", f"semilla {s}") for v in "ABCDEFGH" for s in range(3)]
    html = _table(rows)
    assert html.count("grupo-sigue") == 16 and "corta" not in html
    splits = 0
    for pages in _sweep(html, range(110, 240, 5)):
        for v in "ABCDEFGH":
            on = {k for k, p in enumerate(pages) if f"Variante {v}" in p}
            assert len(on) == 1, (v, on)
        splits += sum("Variante" in p for p in pages) > 1
    assert splits > 10


def test_a_short_table_never_splits() -> None:
    rows = [(f"fila{i:02d}", f"v{i:02d}") for i in range(book.SHORT_TABLE_ROWS)]
    assert "corta" in _table(rows)
    for pages in _sweep(_table(rows), range(150, 250, 5)):
        assert sum(bool(re.search(r"fila\d\d", p)) for p in pages) == 1


# ---- tables on the web -------------------------------------------------------------------


def test_long_paths_break_only_after_a_slash_or_underscore(printed: tuple[Path, Path]) -> None:
    """The recipe's sources: a <wbr> after each '/' and '_' of a long path, none inside a word
    or a short name, and no CSS that breaks a word anywhere (Tabla 3 had broken
    «configs/dei|mv2/deimv|2_dinov3_s…»)."""
    site, _ = printed
    html = (site / "diferencias.html").read_text(encoding="utf-8")
    assert "configs/<wbr>deimv2/<wbr>deimv2_<wbr>dinov3_<wbr>s_<wbr>coco.yml (lr_gamma)" in html
    css = (THESIS / "_static/custom.css").read_text(encoding="utf-8")
    assert "anywhere" not in re.sub(r"abbr\.res \{[^}]*\}", "", css)


def test_a_table_note_is_marked_for_print(printed: tuple[Path, Path]) -> None:
    site, _ = printed
    html = (site / "diferencias.html").read_text(encoding="utf-8")
    assert re.search(
        r'</table>\s*</div>\s*<div class="nota-tabla docutils container">\s*'
        r"<p>Nota de la receta: DEIMv2, su repositorio oficial.</p>",
        html,
    )


def test_every_table_has_a_caption(printed: tuple[Path, Path]) -> None:
    """The reproduction appendix's Markdown tables too (Perfiles, Procedencia)."""
    site, _ = printed
    for page in sorted(site.glob("*.html")):
        html = page.read_text(encoding="utf-8")
        for table in re.findall(r'<table class="table[^>]*>\s*(<caption>)?', html):
            assert table, page.name
    reproducir = (site / "reproducir.html").read_text(encoding="utf-8")
    assert "Los perfiles de ejecución" in reproducir
    assert "Procedencia de esta ejecución</span>" in reproducir
