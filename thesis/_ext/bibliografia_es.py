"""The bibliography in Spanish: "y" between authors, "En", "págs.", "vol.", "de".

sphinxcontrib-bibtex's styles are English. The citations ("Tan y Le, 2019") get a referencing
style with Spanish separators, ``author_year_es``; the entries of the bibliography page keep
pybtex's ``plain`` style, and the words its templates add are translated in the doctree
(text nodes only: titles, authors and journals are never touched except for "and" between
names).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import sphinxcontrib.bibtex.plugin
from docutils import nodes
from sphinx.application import Sphinx
from sphinxcontrib.bibtex.style.referencing import PersonStyle
from sphinxcontrib.bibtex.style.referencing.author_year import AuthorYearReferenceStyle


def _person_es() -> PersonStyle:
    return PersonStyle(sep2=" y ", last_sep=" y ")


@dataclass
class AutorAnioReferenceStyle(AuthorYearReferenceStyle):
    person: PersonStyle = field(default_factory=_person_es)


sphinxcontrib.bibtex.plugin.register_plugin(
    "sphinxcontrib.bibtex.style.referencing", "author_year_es", AutorAnioReferenceStyle, force=True
)

# pybtex's template words, as they appear in an entry's text nodes: the authors' "and" and
# "others" (only in the author list, which ends at the entry's first ". "), and the words of
# the templates anywhere after it.
AUTHORS = [(re.compile(r",? and "), " y "), (re.compile(r"\bothers\b"), "otros")]
WORDS = [
    (re.compile(r"^In "), "En "),
    (re.compile(r"\bpages\b"), "págs."),
    (re.compile(r"\bvolume (\S+) of\b"), r"vol. \1 de"),
    (re.compile(r"\b[Vv]olume\b"), "vol."),
    (re.compile(r"\beditors\b"), "eds."),
    (re.compile(r"\beditor\b"), "ed."),
]


def _translate(app: Sphinx, doctree: nodes.document, docname: str) -> None:
    for citation in doctree.findall(nodes.citation):
        in_authors = True
        for text in list(citation.findall(nodes.Text)):
            if isinstance(text.parent, nodes.label):
                continue
            old = str(text)
            if in_authors:
                head, dot, tail = old.partition(". ")
                for pattern, repl in AUTHORS:
                    head = pattern.sub(repl, head)
                new = head + dot + tail
                in_authors = not dot
            else:
                new = old
                for pattern, repl in WORDS:
                    new = pattern.sub(repl, new)
            if new != old:
                text.parent.replace(text, nodes.Text(new))


def setup(app: Sphinx) -> dict[str, Any]:
    app.connect("doctree-resolved", _translate)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
