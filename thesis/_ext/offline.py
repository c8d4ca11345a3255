"""The book works offline: MathJax is served from _vendor/, and no page may load a remote asset.

Jupyter Book adds every .js file under html_static_path to every page, so the vendored
MathJax lives outside it (thesis/_vendor/) and joins the static files only here, at run
time; sphinx.ext.mathjax then loads it, deferred, on the pages that have math.
A script or stylesheet with a remote URL, whatever extension adds it, fails the build.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from sphinx.application import Sphinx
from sphinx.config import Config
from sphinx.errors import ExtensionError

REMOTE = re.compile(r"^\s*(https?:)?//", re.I)


def _serve_vendor(app: Sphinx, config: Config) -> None:
    config.html_static_path = [*config.html_static_path, str(Path(app.srcdir) / "_vendor")]


def _refuse_remote_assets(
    app: Sphinx, pagename: str, templatename: str, context: dict[str, Any], doctree: Any
) -> None:
    for kind in ("script_files", "css_files"):
        for asset in context.get(kind, []):
            url = str(getattr(asset, "filename", asset) or "")
            body = str(getattr(asset, "attributes", {}).get("body", ""))
            if REMOTE.match(url) or re.search(r"https?://", body):
                raise ExtensionError(f"{pagename}: remote asset in {kind}: {url or body[:80]}")


def setup(app: Sphinx) -> dict:
    app.connect("config-inited", _serve_vendor)
    app.connect("html-page-context", _refuse_remote_assets)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
