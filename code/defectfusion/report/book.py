"""Build the thesis book (Jupyter Book 1.x, in Spanish) from the results, offline.

The book's pages never hold a measured number: thesis/_ext/results.py reads them from
results/summary.json, the tables from results/tables/ and the figures from figures/. The build
always runs with warnings as errors, so a key, table or figure the results lack stops it
with the key named, and no page with a hole in it is written.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from defectfusion.errors import UserError

BOOK_SOURCE = Path("thesis")


def build_book(
    results: str | Path, figures: str | Path, out: str | Path, source: str | Path = BOOK_SOURCE
) -> Path:
    """Build `source` into `out`/html and return the path of its index.html.

    The new site replaces `out`/html only once it has built: a failed build leaves the
    previous one untouched.
    """
    results, figures, out, source = (Path(p).resolve() for p in (results, figures, out, source))
    for path in (results / "summary.json", source / "_config.yml", source / "_toc.yml"):
        if not path.is_file():
            raise UserError(f"{path}: not found (the book needs it)")
    if not figures.is_dir():
        raise UserError(f"{figures}: not a folder of figures")

    from jupyter_book.sphinx import build_sphinx  # heavy: import only to build

    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".html.", dir=out))
    try:
        result = build_sphinx(
            source,
            tmp / "html",
            doctreedir=tmp / "doctrees",
            noconfig=True,
            path_config=str(source / "_config.yml"),
            confoverrides={
                "external_toc_path": (source / "_toc.yml").as_posix(),
                "latex_individualpages": False,  # jupyter-book's own CLI always passes it
                "results_dir": str(results),
                "figures_dir": str(figures),
            },
            warningiserror=True,
            freshenv=True,  # every page re-reads the results: no stale number survives
            quiet=True,  # warnings only: the first one stops the build, named in the error
        )
        if result != 0:  # an exception (already printed by Sphinx) or a status code
            raise UserError(f"{source}: the book did not build: {result}")
        html = out / "html"
        old = out / f".html.old.{os.getpid()}"
        if html.exists():
            html.rename(old)
        (tmp / "html").rename(html)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return html / "index.html"
