"""Build the thesis book (Jupyter Book 1.x, in Spanish) from the results, offline.

The book's pages never hold a measured number: thesis/_ext/results.py reads them from
results/summary.json, the tables from results/tables/ and the figures from figures/. The build
always runs with warnings as errors, so a key, table or figure the results lack stops it
with the key named, and no page with a hole in it is written.

The PDF (``build_pdf``) prints the built site, page after page in the order of _toc.yml,
with WeasyPrint (a Python dependency of the package; it draws text with the Pango library,
which the package's usual platforms ship). WeasyPrint runs no JavaScript, so the equations
that MathJax typesets in the HTML are drawn here, as SVG, by matplotlib's mathtext.
"""

from __future__ import annotations

import html as html_lib
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from defectfusion.core.environment import git_commit
from defectfusion.core.errors import UserError

BOOK_SOURCE = Path("thesis")
PDF_NAME = "libro.pdf"


def _check(results: Path, figures: Path, source: Path) -> None:
    for path in (results / "summary.json", source / "_config.yml", source / "_toc.yml"):
        if not path.is_file():
            raise UserError(f"{path}: not found (the book needs it)")
    if not figures.is_dir():
        raise UserError(f"{figures}: not a folder of figures")


def _sphinx(source: Path, results: Path, figures: Path, tmp: Path, builder: str = "html") -> Path:
    """One Sphinx build of `source` into tmp/`builder`; its folder."""
    from jupyter_book.sphinx import build_sphinx  # heavy: import only to build

    result = build_sphinx(
        source,
        tmp / builder,
        doctreedir=tmp / "doctrees",
        noconfig=True,
        path_config=str(source / "_config.yml"),
        confoverrides={
            "external_toc_path": (source / "_toc.yml").as_posix(),
            "latex_individualpages": False,  # jupyter-book's own CLI always passes it
            "results_dir": str(results),
            "figures_dir": str(figures),
        },
        builder=builder,
        warningiserror=True,
        freshenv=True,  # every page re-reads the results: no stale number survives
        quiet=True,  # warnings only: the first one stops the build, named in the error
    )
    if result != 0:  # an exception (already printed by Sphinx) or a status code
        raise UserError(f"{source}: the book did not build: {result}")
    return tmp / builder


def build_book(
    results: str | Path, figures: str | Path, out: str | Path, source: str | Path = BOOK_SOURCE
) -> Path:
    """Build `source` into `out`/html and return the path of its index.html.

    The new site replaces `out`/html only once it has built: a failed build leaves the
    previous one untouched.
    """
    results, figures, out, source = (Path(p).resolve() for p in (results, figures, out, source))
    _check(results, figures, source)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".html.", dir=out))
    try:
        built = _sphinx(source, results, figures, tmp)
        html = out / "html"
        old = out / f".html.old.{os.getpid()}"
        if html.exists():
            html.rename(old)
        built.rename(html)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return html / "index.html"


# ---- the PDF -----------------------------------------------------------------------------------

# Print layout: the book theme's navigation, sidebars and buttons hidden; A4 pages, numbered.
PRINT_CSS = """
@page { size: A4; margin: 22mm 20mm 22mm 20mm;
        @bottom-center { content: counter(page); font-size: 9pt; color: #555; } }
html { font-size: 10pt; }
body { font-family: "DejaVu Serif", serif; line-height: 1.35; margin: 0; }
.bd-header, .bd-sidebar-primary, .bd-sidebar-secondary, .bd-footer, .bd-footer-content,
.bd-header-article, .header-article-items, .prev-next-area, .headerlink, .toctree-wrapper,
.bd-search, .search-button-field, .theme-switch-button, .skip-link, .sidebar-toggle,
.primary-toggle, .secondary-toggle, .article-header-buttons, nav, .bd-footer-article,
#pst-back-to-top, .footer-article-items, .bd-toc, .bd-sidebar, footer { display: none !important; }
.bd-main, .bd-content, .bd-article-container, .bd-article, .bd-page-width, .bd-container,
.bd-container__inner, main { display: block !important; max-width: none !important;
        width: auto !important; margin: 0 !important; padding: 0 !important; }
.pagina { page-break-before: always; }
.pagina:first-child { page-break-before: avoid; }
.seccion { page-break-before: auto; }  /* a section's page goes on with its chapter */
h1 { font-size: 18pt; }
h1, h2, h3 { font-family: "DejaVu Sans", sans-serif; page-break-after: avoid; }
h2 { font-size: 13pt; } h3 { font-size: 11pt; }
img { max-width: 100% !important; height: auto; }
figure { page-break-inside: avoid; margin: 8pt 0; }  /* not 40px aside: the column is the width */
tr { page-break-inside: avoid; }
/* A cell's paragraph has no margins: rows one line high, as in print. */
th > p, td > p { margin: 0; }
/* A table split across pages leaves at least three rows at the first page's foot and
   carries at least four to the next, under its repeated header: never a header for two or
   three rows. */
tbody tr:nth-child(-n+2) { break-after: avoid; }
tbody tr:nth-last-child(-n+3) { break-before: avoid; }
/* A short table prints on one page; the rows of one group (a variant's seeds: rows that
   repeat the first cell) stay on one page where they can. Both marked by `_keep_together`. */
table.corta { break-inside: avoid; }
tr.grupo-sigue { break-before: avoid; }
/* A table's note (thesis/_ext/results.py wraps it) is never cut off from its table. */
.nota-tabla { break-before: avoid; }
/* A list item's bullet goes with its first line: its paragraph's top margin let WeasyPrint
   leave the bullet alone at a page's foot and start the text on the next page. */
li > p:first-child { margin-top: 0; }
caption { page-break-after: avoid; }
table { font-size: 8pt; border-collapse: collapse; margin: 0 auto; }
th, td { padding: 2pt 4pt; border-bottom: 0.5pt solid #bbb; }
caption, figcaption { font-size: 8.5pt; text-align: left; }
abbr { text-decoration: none; }
.math-svg { vertical-align: middle; }
.nobr { white-space: nowrap; }
.cases-eq > * { vertical-align: middle; }
table.cases { display: inline-table; margin: 0; font-size: inherit; }
table.cases td { border: none; padding: 1pt 6pt 1pt 0; text-align: left; }
div.math { text-align: center; margin: 6pt 0; }
.eqno { float: right; }
pre { font-size: 8pt; white-space: pre-wrap; }
div.citation { margin: 0 0 4pt 0; padding-left: 1.2em; text-indent: -1.2em; }
div.citation > span.label { display: none; }
div.citation > p { display: inline; }
.portada { page-break-after: always; text-align: center; padding-top: 30%; }
.portada h1 { font-size: 24pt; margin-bottom: 12pt; }
.portada p { font-size: 12pt; color: #333; margin: 0 0 6pt 0; }
.portada p.autor { margin-top: 60pt; font-size: 14pt; color: black; }
.portada p.commit { margin-top: 24pt; font-size: 9pt; color: #555; }
.portada .sha { font-family: "DejaVu Sans Mono", monospace; }
.indice { page-break-after: always; }
.indice h1 { font-size: 16pt; }
.indice ul { list-style: none; padding-left: 0; margin: 0 0 10pt 0; }
.indice li { margin: 2pt 0; }
.indice li.h2 { padding-left: 1.5em; font-size: 9.5pt; }
.indice a { color: black; text-decoration: none; }
.indice a::after { content: leader(".") target-counter(attr(href), page); }
.res-tesis, abbr.tesis { font-style: italic; }
"""

# What mathtext spells differently from TeX (regex, replacement).
_MATH_FIXES = (
    (r"\\[lr]Vert", r"\\Vert"),
    (r"\\le(?![a-zA-Z])", r"\\leq"),
    (r"\\ge(?![a-zA-Z])", r"\\geq"),
    (r"\\;", r"\\ "),
    (r"\\!", ""),
)


def _mathtext_img(tex: str, size: float) -> str | None:
    """One line of `tex` drawn by matplotlib's mathtext, as an inline <img>; None if it can't."""
    import base64
    import io

    from matplotlib.font_manager import FontProperties
    from matplotlib.mathtext import math_to_image

    buf = io.BytesIO()
    try:
        math_to_image(f"${tex}$", buf, prop=FontProperties(size=size), format="svg")
    except Exception:  # noqa: BLE001 - what mathtext does not know stays TeX
        return None
    data = base64.b64encode(buf.getvalue()).decode()
    return f'<img class="math-svg" alt="" src="data:image/svg+xml;base64,{data}"/>'


def _cases_html(lhs: str, rows: list[str], rhs: str, size: float) -> str | None:
    """``lhs \\begin{cases} a & b \\\\ c & d \\end{cases} rhs`` as what TeX prints: the left
    side, one brace as tall as the rows, and the rows in two aligned columns. mathtext has no
    environments, so the brace is mathtext's own ``\\left\\{`` around an invisible stack of
    the rows' height, and the columns are an HTML table."""
    stack = r"\phantom{(}"
    for _ in rows[1:]:
        stack = r"\genfrac{}{}{0}{0}{\phantom{(}}{" + stack + "}"
    parts = [_mathtext_img(lhs, size) if lhs.strip() else ""]
    parts.append(_mathtext_img(r"\left\{" + stack + r"\right.", size))
    cells = []
    for row in rows:
        expr, _, cond = row.partition("&")
        e, c = _mathtext_img(expr.strip(), size), _mathtext_img(cond.strip() or r"\ ", size)
        if e is None or c is None:
            return None
        cells.append(f"<tr><td>{e}</td><td>{c}</td></tr>")
    parts.append(f'<table class="cases">{"".join(cells)}</table>')
    if rhs.strip():
        parts.append(_mathtext_img(rhs, size))
    if any(p is None for p in parts):
        return None
    return f'<span class="cases-eq">{"".join(parts)}</span>'


def _math_svg(tex: str, size: float, display: bool = False) -> str | None:
    """`tex` drawn by matplotlib's mathtext, as inline <img>s; None if mathtext can't.
    Display math keeps TeX's display style: full-size fractions, and `cases` with its brace."""

    for pattern, repl in _MATH_FIXES:
        tex = re.sub(pattern, repl, tex)
    if display:
        tex = re.sub(r"\\frac(?![a-zA-Z])", r"\\dfrac", tex)
    # Sphinx wraps display math in `split`; it, like `aligned`, becomes its lines
    tex = re.sub(r"\\(begin|end)\{(split|aligned|align)\*?\}", "", tex)
    cases = re.fullmatch(r"(.*?)\\begin\{cases\}(.*?)\\end\{cases\}(.*)", tex, flags=re.S)
    if cases:
        lhs, body, rhs = (" ".join(g.split()) for g in cases.groups())
        rows = [r for r in re.split(r"\\\\", body) if r.strip()]
        return _cases_html(lhs, rows, rhs, size)
    tex = tex.replace("&", r"\quad ")  # a column break: a space
    lines = [" ".join(t.split()) for t in re.split(r"\\\\", tex) if t.strip()]
    imgs = [_mathtext_img(line, size) for line in lines]
    if any(i is None for i in imgs):
        return None
    return "<br/>".join(imgs)  # type: ignore[arg-type]


def _typeset_math(html: str) -> str:
    """MathJax's \\( \\) and \\[ \\] in Sphinx's HTML, drawn as SVG images."""

    def display(m: re.Match) -> str:
        svg = _math_svg(html_lib.unescape(m.group(1)), 11, display=True)
        return svg if svg else f"<code>{m.group(1)}</code>"

    def inline(m: re.Match) -> str:
        svg = _math_svg(html_lib.unescape(m.group(1)), 10)
        return svg if svg else f"<code>{m.group(1)}</code>"

    html = re.sub(r"\\\[(.*?)\\\]", display, html, flags=re.S)
    return re.sub(r"\\\((.*?)\\\)", inline, html, flags=re.S)


def _pages(toc: Path) -> list[tuple[str, bool]]:
    """The book's pages in reading order, from _toc.yml (root, chapters, and each chapter's
    `sections` after it), each with whether it continues the chapter above it: a section's
    page, whose headings carry that chapter's numbers (the post-mortem's 5.4 and 5.5)."""
    import yaml

    data = yaml.safe_load(toc.read_text(encoding="utf-8")) or {}

    def walk(entries: list[dict], inner: bool) -> list[tuple[str, bool]]:
        out = []
        for entry in entries:
            out.append((str(Path(entry["file"]).with_suffix("")), inner))
            out += walk(entry.get("sections") or [], True)
        return out

    return walk([{"file": data["root"]}, *(data.get("chapters") or [])], False)


_HEADERLINK = re.compile(r'<a class="headerlink".*?</a>', re.S)  # Sphinx's "#" anchor


def _heading_text(text: str) -> str:
    """A heading as the contents print it: its text, escaped, with its italics kept (the book
    sets *post mortem* in italics, in the headings too)."""

    text = _HEADERLINK.sub("", text).strip()
    parts = text.replace("</em>", "<em>").split("<em>")  # odd parts: inside <em>
    plain = [html_lib.escape(html_lib.unescape(re.sub(r"<[^>]+>", "", p))) for p in parts]
    return "".join(f"<em>{p}</em>" if i % 2 else p for i, p in enumerate(plain) if p)


def _strip_tags(text: str) -> str:

    text = _HEADERLINK.sub("", text)
    return html_lib.unescape(re.sub(r"<[^>]+>", "", text)).strip()


def _heading_ids(article: str) -> str:
    """Each section's heading given the id ``SECTION-titulo``: the contents point at the
    heading, whose page is the one it prints on (a section's own box can start at the foot
    of the page before, with its label)."""

    # a labelled section ("(sec-x)=") opens with an empty <span id> before its heading
    return re.sub(
        r'(<section[^>]*\bid="([^"]+)"[^>]*>\s*(?:<span id="[^"]*"></span>\s*)*)<h([12])>',
        lambda m: f'{m.group(1)}<h{m.group(3)} id="{m.group(2)}-titulo">',
        article,
    )


def _one_document(name: str, article: str) -> str:
    """A page's article made part of one document: its ids prefixed with the page's name and
    its links, to itself or to another page, pointed at those ids, so references and the
    contents' page numbers (``target-counter``) resolve inside the PDF."""

    article = re.sub(r'\bid="([^"]+)"', lambda m: f'id="{name}--{m.group(1)}"', article)
    article = re.sub(r'href="#([^"]+)"', lambda m: f'href="#{name}--{m.group(1)}"', article)
    article = re.sub(
        r'href="([\w-]+)\.html#([^"]+)"', lambda m: f'href="#{m.group(1)}--{m.group(2)}"', article
    )
    return re.sub(r'href="([\w-]+)\.html"', lambda m: f'href="#pdf-{m.group(1)}"', article)


def title_lines(config: Path, environ: Mapping[str, str] = os.environ) -> list[str]:
    """The title page's lines under the subtitle, as HTML: the author (`author` of
    _config.yml), the day the book was built and the commit of the code that built it (left
    out where that code is not a git checkout). No institution: the artifact names none.

    The day is today's, or SOURCE_DATE_EPOCH's where it is set (the reproducible-builds
    convention: a rebuild of the same commit prints the same day)."""
    import datetime as dt

    import yaml
    from babel.dates import format_date  # Sphinx's own dependency: the date in Spanish

    author = (yaml.safe_load(config.read_text(encoding="utf-8")) or {}).get("author")
    if not isinstance(author, str) or not author.strip():
        raise UserError(f"{config}: no `author` (the PDF's title page prints it)")
    epoch = environ.get("SOURCE_DATE_EPOCH")
    if epoch is None:
        day = dt.datetime.now(dt.UTC).date()
    elif epoch.isdigit():
        day = dt.datetime.fromtimestamp(int(epoch), dt.UTC).date()
    else:
        raise UserError(f"SOURCE_DATE_EPOCH={epoch!r}: not a count of seconds")
    lines = [
        f'<p class="autor">{html_lib.escape(author.strip())}</p>',
        f'<p class="fecha">{format_date(day, format="long", locale="es")}</p>',
    ]
    commit = git_commit()
    if commit:
        sha, dirty = commit.removesuffix("-dirty"), commit.endswith("-dirty")
        lines.append(
            f'<p class="commit">Código del commit <span class="sha">{sha[:12]}</span>'
            + (" (con cambios sin confirmar)" if dirty else "")
            + "</p>"
        )
    return lines


def front_matter(title: str, subtitle: str, articles: list[str], byline: Sequence[str] = ()) -> str:
    """The PDF's title page (title, subtitle and the `byline`, HTML lines from `title_lines`),
    contents (each chapter and section with its page: the headings `_heading_ids` marked)
    and lists of figures and tables (each numbered caption with its page), from the joined
    articles. Written here because the book is printed from its HTML by WeasyPrint, which
    has no LaTeX-style front matter; `target-counter` gives the page numbers."""

    joined = "\n".join(articles)
    # every section's heading, with the id `_heading_ids` gave it
    heads = re.findall(r'<h([12]) id="([^"]+-titulo)">(.*?)</h\1>', joined, re.S)
    contents = "".join(
        f'<li class="h{level}"><a href="#{hid}">{_heading_text(text)}</a></li>'
        for level, hid, text in heads
    )

    def short(caption: str) -> str:
        """A caption's first sentence, cut at a word (never inside its math) past 140
        characters."""
        first = _strip_tags(caption).split(". ")[0]
        if len(first) <= 140:
            return first
        cut = first[:140].rsplit(" ", 1)[0]
        if cut.count("\\(") > cut.count("\\)"):  # an inline formula would be cut open
            cut = cut[: cut.rfind("\\(")].rstrip()
        return cut.rstrip(",;:") + "…"

    def listed(pattern: str) -> str:
        items = re.findall(pattern, joined, re.S)
        return "".join(
            f'<li><a href="#{fid}">{html_lib.escape(_strip_tags(num))} '
            f"{html_lib.escape(short(text))}</a></li>"
            for fid, num, text in items
        )

    figures = listed(
        r'<figure[^>]*\bid="([^"]+)"[^>]*>.*?<span class="caption-number">(.*?)</span>'
        r'<span class="caption-text">(.*?)</span>'
    )
    tables = listed(
        r'<table[^>]*\bid="([^"]+)"[^>]*>\s*<caption><span class="caption-number">(.*?)</span>'
        r'<span class="caption-text">(.*?)</span>'
    )
    return (
        f'<div class="portada"><h1>{title}</h1><p class="subtitulo">{subtitle}</p>'
        f"{''.join(byline)}</div>"
        f'<div class="indice"><h1>Índice</h1><ul>{contents}</ul></div>'
        f'<div class="indice"><h1>Índice de figuras</h1><ul>{figures}</ul>'
        f"<h1>Índice de tablas</h1><ul>{tables}</ul></div>"
    )


def _unbroken_intervals(html: str) -> str:
    """Each confidence interval ``[−0.0437, −0.0068]`` of a table cell kept on one line: a
    narrow printed column broke them after the comma."""

    interval = re.compile(r"\[[−+-]?\d+(?:\.\d+)?, [−+-]?\d+(?:\.\d+)?\]")

    def table(m: re.Match) -> str:
        return interval.sub(lambda i: f'<span class="nobr">{i.group(0)}</span>', m.group(0))

    return re.sub(r"<table\b.*?</table>", table, html, flags=re.S)


SHORT_TABLE_ROWS = 12  # a table of at most this many rows prints on one page


def _add_class(attrs: str, name: str) -> str:
    """A tag's attributes with `name` added to its class."""
    if 'class="' in attrs:
        return attrs.replace('class="', f'class="{name} ', 1)
    return f'{attrs} class="{name}"'


def _keep_together(html: str) -> str:
    """What the print CSS keeps on one page, marked in each results table: the whole table
    where it is short (``corta``: at most SHORT_TABLE_ROWS rows), and each row whose first
    cell repeats the one above's (``grupo-sigue``: the next seed of a variant) with it."""

    def table(t: re.Match) -> str:
        body = re.search(r"<tbody\b.*?</tbody>", t.group(2), flags=re.S)
        if not body:  # not a results table (the cases of an equation)
            return t.group(0)
        above = None

        def row(m: re.Match) -> str:
            nonlocal above
            first = re.search(r"<t[dh]\b[^>]*>(.*?)</t[dh]>", m.group(2), flags=re.S)
            key = _strip_tags(first.group(1)) if first else ""
            same, above = bool(key) and key == above, key
            if not same:
                return m.group(0)
            return f"<tr{_add_class(m.group(1), 'grupo-sigue')}>{m.group(2)}</tr>"

        rows = re.sub(r"<tr\b([^>]*)>(.*?)</tr>", row, body.group(0), flags=re.S)
        attrs = t.group(1)
        if len(re.findall(r"<tr\b", rows)) <= SHORT_TABLE_ROWS:
            attrs = _add_class(attrs, "corta")
        inner = t.group(2)[: body.start()] + rows + t.group(2)[body.end() :]
        return f"<table{attrs}>{inner}</table>"

    return re.sub(r"<table\b([^>]*)>(.*?)</table>", table, html, flags=re.S)


def build_pdf(html: str | Path, toc: str | Path, out: str | Path) -> Path:
    """Print the built site `html` (from `build_book`) to `out`/libro.pdf, pages in the order
    of `toc`: each page's article, one after the other, through WeasyPrint."""
    import logging

    html, toc, out = (Path(p).resolve() for p in (html, toc, out))
    try:
        from weasyprint import CSS, HTML
    except (ImportError, OSError) as e:  # OSError: the Pango library is missing
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"the PDF needs WeasyPrint and its Pango library: {first}") from None
    for name in ("weasyprint", "weasyprint.progress"):  # e.g. links between pages
        logging.getLogger(name).setLevel(logging.CRITICAL)
    logging.getLogger("fontTools").setLevel(logging.CRITICAL)
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    articles = []
    for name, inner in _pages(toc):
        page = html / f"{name}.html"
        if not page.is_file():
            raise UserError(f"{page}: not found (build the HTML book first)")
        text = page.read_text(encoding="utf-8")
        m = re.search(r'<article class="bd-article"[^>]*>(.*?)</article>', text, flags=re.S)
        if not m:
            raise UserError(f"{page}: no <article> to print")
        # the web's pointer to the post-mortem's own page: in print that page follows
        article = re.sub(
            r'<section[^>]*>\s*<span id="sec-postmortem-enlace"></span>.*?</section>',
            "",
            m.group(1),
            flags=re.S,
        )
        if inner:
            # A section's page goes on with its chapter, as on the web (where _toc.yml nests
            # it under the chapter): no new page, and not its page title, which would print
            # as an unnumbered chapter around the chapter's own numbered sections.
            article = re.sub(r"<h1\b.*?</h1>", "", article, count=1, flags=re.S)
        body = _one_document(name, _heading_ids(article))
        kind = "seccion" if inner else "pagina"
        articles.append(f'<div class="{kind}" id="pdf-{name}">{body}</div>')
    title = re.search(r"<title>(.*?)</title>", (html / "index.html").read_text(encoding="utf-8"))
    book_title = title.group(1).split(" &#8212; ")[-1] if title else "Libro"
    doc = (
        '<!DOCTYPE html><html lang="es"><head><meta charset="utf-8"/>'
        f"<title>{book_title}</title>"
        '<link rel="stylesheet" href="_static/pygments.css"/></head><body>'
        + _typeset_math(
            front_matter(
                book_title,
                "Artefacto reproducible de la tesis: método, resultados "
                "y análisis <i>post mortem</i>",
                articles,
                title_lines(toc.parent / "_config.yml"),
            )
            + _keep_together(_unbroken_intervals("\n".join(articles)))
        )
        + "</body></html>"
    )
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".pdf.", dir=out))
    try:
        pdf = tmp / PDF_NAME
        HTML(string=doc, base_url=str(html) + "/").write_pdf(
            pdf, stylesheets=[CSS(string=PRINT_CSS)]
        )
        target = out / PDF_NAME
        pdf.replace(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
