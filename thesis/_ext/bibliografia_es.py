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

# pybtex's template words, as they appear in an entry's text: the authors' "and" and "others"
# (only in the author list, which ends at the entry's first ". " that does not close an
# initial like "Michael B."), and the words of the templates after it, outside the titles and
# venues pybtex sets in italics (so "Vision and Pattern Recognition" keeps its "and").
AUTHORS_END = re.compile(r"(?<![\s.][A-Z])\.\s")  # \s: pybtex joins initials with U+00A0
VOLUME_END = re.compile(r"\bvol\.\s*$")
AUTHORS = [(re.compile(r",? and "), " y "), (re.compile(r"\bothers\b"), "otros")]
WORDS = [
    (re.compile(r"(?:(?<=\. )|^)In\b"), "En"),
    (re.compile(r"\bpages\s"), ""),  # page ranges print bare, as in the other entries
    (re.compile(r"\bvolume(\s)(\S+) of\b"), r"vol.\1\2 de"),
    (re.compile(r"\b[Vv]olume\b"), "vol."),
    (re.compile(r"\beditors\b"), "eds."),
    (re.compile(r"\beditor\b"), "ed."),
]


def _translate(app: Sphinx, doctree: nodes.document, docname: str) -> None:
    for citation in doctree.findall(nodes.citation):
        # pybtex splits an entry into many text nodes: find the author list in their
        # concatenation, then edit each node by its offset in it.
        texts = [t for t in citation.findall(nodes.Text) if not isinstance(t.parent, nodes.label)]
        full = "".join(str(t) for t in texts)
        found = AUTHORS_END.search(full)
        authors_end = found.start() if found else 0
        pos, previous = 0, ""
        for text in texts:
            old = str(text)
            cut = max(0, min(len(old), authors_end - pos))
            pos += len(old)
            head, tail = old[:cut], old[cut:]
            for pattern, repl in AUTHORS:
                head = pattern.sub(repl, head)
            if not isinstance(text.parent, nodes.emphasis):
                for pattern, repl in WORDS:
                    tail = pattern.sub(repl, tail)
                if VOLUME_END.search(previous):  # "volume", nbsp, "9 of …": split nodes
                    tail = re.sub(r"^(\S*) of\b", r"\1 de", tail)
            new = head + tail
            previous = (previous + new)[-40:]
            if new != old:
                text.parent.replace(text, nodes.Text(new))
        _year_after_comma(citation)


# pybtex's plain style ends an entry without a publisher with "pages. 2015.": the year joins
# the rest with a comma, as it does after a publisher ("Springer, 2020.").
IN_NODE = re.compile(r"(?:(?<=[\w)])|^)\.\s+(?=(?:\d{4}[a-z]?|s\.\s?f\.)\.?\s*$)")
YEAR = re.compile(r"^\s*(?:\d{4}[a-z]?|s\.\s?f\.)\.?\s*$")


def _year_after_comma(citation: nodes.citation) -> None:
    texts = [t for t in citation.findall(nodes.Text) if not isinstance(t.parent, nodes.label)]
    for before, year in zip(texts, texts[1:], strict=False):  # "…256. " then "2010."
        if YEAR.match(str(year)) and re.search(r"(^|[\w)])\.\s*$", str(before)):
            sep = ", " if not str(year).startswith(" ") else ","
            before.parent.replace(before, nodes.Text(re.sub(r"\.\s*$", sep, str(before))))
    for text in citation.findall(nodes.Text):  # "…256. 2010." in one node
        new = IN_NODE.sub(", ", str(text))
        if new != str(text):
            text.parent.replace(text, nodes.Text(new))


def setup(app: Sphinx) -> dict[str, Any]:
    app.connect("doctree-resolved", _translate)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
