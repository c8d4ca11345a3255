"""Every number the book prints comes from here: the run's results or the thesis's own figures.

Roles (MyST: {role}`text`):
  {res}`PATH[:FORMAT]`        a value from results/summary.json, e.g. {res}`phase1.@main.map`;
                              FORMAT "es": class names in Spanish ({res}`dataset.classes:es`)
  {tesis}`KEY[:FORMAT]`       a figure quoted from the thesis (thesis_figures.yaml), marked so
  {ci}`PATH[|pos|neg|zero]`   says whether the interval [lo, hi] at PATH excludes zero
  {sign}`PATH|pos|neg|zero`   the text that matches the sign of the value at PATH
  {cond}`COND|yes|no`         the text that matches COND
  {best}`PATH`                the key under the one '*' of PATH whose value is largest
Directives:
  {si} COND                   its content, only when COND holds
  {results-table} NAME        results/tables/NAME.md (a Markdown table), with a caption
  {results-figure} NAME       figures/NAME.png, with its caption
  {results-math}              display math with {{res:PATH[:FORMAT]}} / {{tesis:KEY[:FORMAT]}}

Key paths, COND and number formats: see thesis_values.py. The book computes nothing:
derived values are summary.json's.

A key missing from the results, a missing table or a missing figure is a warning naming it
(an error under -W, as the book is always built), and the build stops before writing any page.
"""

from __future__ import annotations

import json
import math
import os
import re
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from docutils import nodes
from docutils.parsers.rst import directives
from docutils.statemachine import StringList
from sphinx.application import Sphinx
from sphinx.directives.patches import Figure, MathDirective
from sphinx.errors import ExtensionError
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective, SphinxRole
from thesis_values import (  # thesis/_ext is on sys.path: Jupyter Book's local_extensions
    EVAL_ERRORS,
    ResultsError,
    condition,
    evaluate,
    fmt,
    fmt_thesis,
    resolve,
    split_format,
)

logger = logging.getLogger(__name__)


# ---- the sources -------------------------------------------------------------------------


def _path(app_or_env: Any, value: str) -> Path:
    """A config path, relative to the book's folder unless absolute."""
    return (Path(app_or_env.srcdir) / value).resolve()


@cache
def _read_json(path: Path, mtime_ns: int) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


@cache
def _read_yaml(path: Path, mtime_ns: int) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8")) or {}


def summary_path(env: Any) -> Path:
    return _path(env, env.config.results_dir) / "summary.json"


def thesis_path(env: Any) -> Path:
    return _path(env, env.config.thesis_figures)


def load_summary(env: Any) -> dict:
    path = summary_path(env)
    if not path.is_file():
        raise ResultsError(f"{path}: not found (the report stage writes it)")
    return _read_json(path, path.stat().st_mtime_ns)


def load_thesis(env: Any) -> dict:
    path = thesis_path(env)
    if not path.is_file():
        raise ResultsError(f"{path}: not found")
    return _read_yaml(path, path.stat().st_mtime_ns)


# ---- roles -------------------------------------------------------------------------------


def _missing(env: Any, location: Any, message: str) -> None:
    """Report and remember a missing value: `env-updated` stops the build before writing."""
    env.results_missing.setdefault(env.docname, []).append(message)
    logger.warning(message, location=location, type="results", subtype="missing")


class _ResultsRole(SphinxRole):
    def lookup(self, path: str) -> Any:
        self.env.note_dependency(str(summary_path(self.env)))
        return resolve(load_summary(self.env), path, "results/summary.json")

    def render(self) -> list[nodes.Node]:
        raise NotImplementedError

    def choose(self, n: int) -> tuple[str, list[str]]:
        head, *texts = self.text.split("|")
        if len(texts) != n:
            raise ResultsError(f"'{self.text}': {n} texts after '|' expected")
        return head.strip(), texts

    def run(self) -> tuple[list[nodes.Node], list[nodes.system_message]]:
        try:
            return self.render(), []
        except EVAL_ERRORS as e:
            _missing(self.env, self.get_location(), f"{{{self.name}}}`{self.text}`: {e}")
            return [nodes.inline()], []


class ResRole(_ResultsRole):
    def render(self) -> list[nodes.Node]:
        expr, spec = split_format(self.text)
        text = fmt(evaluate(expr, self.lookup), spec)
        # The tooltip names the key as it is in summary.json.
        expr = expr.replace("@main", str(load_summary(self.env).get("main_preset")))
        return [
            nodes.abbreviation(text, text, explanation=f"summary.json: {expr}", classes=["res"])
        ]


class TesisRole(_ResultsRole):
    def render(self) -> list[nodes.Node]:
        key, spec = split_format(self.text)
        self.env.note_dependency(str(thesis_path(self.env)))
        entry = load_thesis(self.env).get(key)
        if not isinstance(entry, dict) or "value" not in entry or not entry.get("note"):
            raise ResultsError(f"thesis_figures.yaml: no entry '{key}' with a value and a note")
        text = fmt_thesis(entry["value"], spec)
        note = f"Cifra de la tesis: {entry['note']}"
        return [
            nodes.abbreviation(text, text, explanation=note, classes=["tesis"]),
            nodes.superscript("tesis", "tesis", classes=["tesis-marca"]),
        ]


class CiRole(_ResultsRole):
    DEFAULT = (
        "el intervalo excluye el cero por arriba: la diferencia es estadísticamente significativa",
        "el intervalo excluye el cero por abajo: la diferencia es estadísticamente significativa",
        "el intervalo incluye el cero: la diferencia no es estadísticamente significativa",
    )

    def render(self) -> list[nodes.Node]:
        path, texts = self.choose(3) if "|" in self.text else (self.text.strip(), self.DEFAULT)
        ci = self.lookup(path)
        if not (
            isinstance(ci, list) and len(ci) == 2 and all(isinstance(v, int | float) for v in ci)
        ):
            raise ResultsError(f"results/summary.json: '{path}' is not an interval [lo, hi]")
        text = texts[0] if ci[0] > 0 else texts[1] if ci[1] < 0 else texts[2]
        return [nodes.inline(text, text.strip(), classes=["res-texto"])]


class SignRole(_ResultsRole):
    def render(self) -> list[nodes.Node]:
        expr, texts = self.choose(3)
        value = evaluate(expr, self.lookup)
        if not isinstance(value, int | float) or math.isnan(value):
            raise ResultsError(f"'{expr}' is not a number")
        text = texts[0] if value > 0 else texts[1] if value < 0 else texts[2]
        return [nodes.inline(text, text.strip(), classes=["res-texto"])]


class CondRole(_ResultsRole):
    def render(self) -> list[nodes.Node]:
        cond, texts = self.choose(2)
        text = texts[0] if condition(cond, self.lookup) else texts[1]
        return [nodes.inline(text, text.strip(), classes=["res-texto"])]


class BestRole(_ResultsRole):
    def render(self) -> list[nodes.Node]:
        head, star, tail = self.text.strip().partition(".*")
        if not star:
            raise ResultsError(f"'{self.text}': a path with one '*' expected")
        group = self.lookup(head)
        if not isinstance(group, dict) or not group:
            raise ResultsError(f"results/summary.json: '{head}' is not a mapping")
        scores = {k: self.lookup(f"{head}.{k}{tail}") for k in group}
        name = max(scores, key=lambda k: scores[k])
        return [nodes.abbreviation(name, name, explanation=f"argmax {self.text}", classes=["res"])]


# ---- directives --------------------------------------------------------------------------


class _ResultsDirective(SphinxDirective):
    def lookup(self, path: str) -> Any:
        self.env.note_dependency(str(summary_path(self.env)))
        return resolve(load_summary(self.env), path, "results/summary.json")

    def fail(self, message: str) -> list[nodes.Node]:
        _missing(self.env, self.get_location(), message)
        return []


class SiDirective(_ResultsDirective):
    """The content, only when the condition on the results holds."""

    required_arguments = 1
    final_argument_whitespace = True
    has_content = True

    def run(self) -> list[nodes.Node]:
        try:
            holds = condition(self.arguments[0], self.lookup)
        except EVAL_ERRORS as e:
            return self.fail(f"{{si}} {self.arguments[0]}: {e}")
        if not holds:
            return []
        holder = nodes.Element()
        self.state.nested_parse(self.content, self.content_offset, holder)
        return holder.children


class ResultsTable(_ResultsDirective):
    """A Markdown table the report stage wrote, as a numbered, captioned table."""

    required_arguments = 1
    option_spec = {"caption": directives.unchanged, "name": directives.unchanged}

    def run(self) -> list[nodes.Node]:
        path = _path(self.env, self.config.results_dir) / "tables" / f"{self.arguments[0]}.md"
        if not path.is_file():
            return self.fail(f"table '{self.arguments[0]}': {path} not found")
        self.env.note_dependency(str(path))
        lines, titles = [], []
        for line in path.read_text(encoding="utf-8").splitlines():
            # A heading of the file becomes the caption: headings cannot nest in a page.
            if line.startswith("#"):
                titles.append(line.lstrip("#").strip())
            else:
                lines.append(line)
        holder = nodes.Element()
        self.state.nested_parse(StringList(lines, source=str(path)), 0, holder)
        tables = [n for n in holder.children if isinstance(n, nodes.table)]
        if not tables:
            return self.fail(f"table '{self.arguments[0]}': {path} holds no Markdown table")
        for table in tables:
            _path_breaks(table)
        caption = self.options.get("caption") or " ".join(titles)
        if caption:
            text_nodes, messages = self.state.inline_text(caption, self.lineno)
            tables[0].insert(0, nodes.title(caption, "", *text_nodes))
            holder.extend(messages)
        self.add_name(tables[0])
        return _wrap_note(list(holder.children), tables[-1])


# A long path or identifier: 20 characters or more without a space, with a '/' or a '_'
# ("configs/deimv2/deimv2_dinov3_s_coco.yml"); a short one ("(lr_gamma)") wraps whole.
_LONG_NAME = re.compile(r"\S{20,}")
_NAME_BREAK = re.compile(r"(?<=[/_])(?=\w)")


def _path_breaks(table: nodes.table) -> None:
    """The long file paths and identifiers in `table`'s cells may break after a '/' or a '_'
    (a <wbr>, which copying the text leaves out), and only there: a narrow column wraps them
    there instead of widening the table or breaking inside a name."""
    for entry in table.findall(nodes.entry):
        for text in list(entry.findall(nodes.Text)):
            if isinstance(text.parent, (nodes.literal, nodes.raw)):
                continue
            marked = _LONG_NAME.sub(lambda m: _NAME_BREAK.sub("\0", m.group(0)), str(text))
            if "\0" not in marked:
                continue
            pieces: list[nodes.Node] = []
            for k, part in enumerate(marked.split("\0")):
                if k:
                    pieces.append(nodes.raw("", "<wbr>", format="html"))
                pieces.append(nodes.Text(part))
            text.parent.replace(text, pieces)


def _wrap_note(children: list[nodes.Node], table: nodes.table) -> list[nodes.Node]:
    """What the table's file says below the table (its note) in a ``nota-tabla`` container:
    the PDF's print CSS keeps it on the page where the table ends."""
    at = next(k for k, n in enumerate(children) if n is table)
    notes = [
        n for n in children[at + 1 :]
        if isinstance(n, nodes.Element) and not isinstance(n, (nodes.system_message, nodes.raw))
    ]  # fmt: skip
    if not notes:
        return children
    kept = [n for n in children if all(n is not m for m in notes)]
    box = nodes.container("", classes=["nota-tabla"])
    for n in notes:
        n.parent = None
        box += n
    return [*kept[: at + 1], box, *kept[at + 1 :]]


class ResultsFigure(Figure):
    """A figure the report stage drew, found in figures/ (PNG for the HTML book)."""

    def run(self) -> list[nodes.Node]:
        env = self.state.document.settings.env
        name = self.arguments[0]
        path = _path(env, env.config.figures_dir) / (name if Path(name).suffix else f"{name}.png")
        if not path.is_file():
            location = self.state_machine.get_source_and_line(self.lineno)
            _missing(env, location, f"figure '{name}': {path} not found")
            return []
        env.note_dependency(str(path))
        # A leading '/' is the book's folder: Sphinx copies the file into _images/.
        self.arguments[0] = "/" + os.path.relpath(path, env.srcdir)
        return super().run()


class ResultsMath(MathDirective):
    """Display math whose numbers come from the results: {{res:EXPR}}, {{tesis:KEY}}."""

    def run(self) -> list[nodes.Node]:
        try:
            self.content = StringList(
                [self.substitute(line) for line in self.content], items=self.content.items
            )
            self.arguments = [self.substitute(a) for a in self.arguments]
        except EVAL_ERRORS as e:
            _missing(self.env, self.get_location(), f"{{results-math}}: {e}")
            return []
        return super().run()

    def substitute(self, text: str) -> str:
        def one(m: re.Match) -> str:
            kind, body = m.group(1), m.group(2)
            expr, spec = split_format(body)
            if kind == "tesis":
                self.env.note_dependency(str(thesis_path(self.env)))
                entry = load_thesis(self.env).get(expr)
                if not isinstance(entry, dict) or "value" not in entry:
                    raise ResultsError(f"thesis_figures.yaml: no entry '{expr}'")
                return fmt_thesis(entry["value"], spec)
            self.env.note_dependency(str(summary_path(self.env)))
            summary = load_summary(self.env)
            return fmt(evaluate(expr, lambda p: resolve(summary, p, "results/summary.json")), spec)

        return re.sub(r"\{\{(res|tesis):([^}]+)\}\}", one, text)


# ---- build events ------------------------------------------------------------------------


def _check_sources(app: Sphinx) -> None:
    """Fail early, with the path, when the results or the thesis figures are absent."""
    try:
        load_summary(app.env)
        thesis = load_thesis(app.env)
    except (ResultsError, json.JSONDecodeError, yaml.YAMLError) as e:
        raise ExtensionError(str(e)) from e
    for key, entry in thesis.items():
        if not (isinstance(entry, dict) and "value" in entry and entry.get("note")):
            raise ExtensionError(f"{thesis_path(app.env)}: '{key}' needs a value and a note")
    if not hasattr(app.env, "results_missing"):
        app.env.results_missing = {}


def _purge(app: Sphinx, env: Any, docname: str) -> None:
    getattr(env, "results_missing", {}).pop(docname, None)


def _stop_if_missing(app: Sphinx, env: Any) -> None:
    """Without -W too: no page is written while a value is missing."""
    missing = [m for ms in getattr(env, "results_missing", {}).values() for m in ms]
    if missing:
        raise ExtensionError("the results lack what the book needs:\n  " + "\n  ".join(missing))


def setup(app: Sphinx) -> dict:
    app.add_config_value("results_dir", "../results", "env", [str])
    app.add_config_value("figures_dir", "../figures", "env", [str])
    app.add_config_value("thesis_figures", "thesis_figures.yaml", "env", [str])
    for name, role in {
        "res": ResRole,
        "tesis": TesisRole,
        "ci": CiRole,
        "sign": SignRole,
        "cond": CondRole,
        "best": BestRole,
    }.items():
        app.add_role(name, role())
    app.add_directive("si", SiDirective)
    app.add_directive("results-table", ResultsTable)
    app.add_directive("results-figure", ResultsFigure)
    app.add_directive("results-math", ResultsMath)
    app.connect("builder-inited", _check_sources)
    app.connect("env-purge-doc", _purge)
    app.connect("env-updated", _stop_if_missing)
    return {"version": "1.0", "parallel_read_safe": False, "parallel_write_safe": True}
