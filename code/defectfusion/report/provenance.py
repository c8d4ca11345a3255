"""Provenance of every table, figure and summary: which code, params and results made it.

A record says::

    {"name": "figures/confusion",        the output (kind/name)
     "rule": "figure",                   the Snakemake rule (or "manual" outside Snakemake)
     "commit": "<sha>[-dirty]",          git commit of the code that ran (-dirty: tracked
                                         files changed since), null outside a git checkout
     "params_sha256": "...",             sha256 of the config sections it depends on
     "inputs_sha256": "...",             sha256 over the inputs' (path, sha256) pairs
     "inputs": {path: sha256}}           each results file it read

It is embedded in the output itself (PNG text chunk "Provenance"; PDF "Subject", with a
short form in "Keywords"; a header comment in CSV, Markdown and LaTeX), and written as a
sidecar ``results/provenance/KIND/NAME.json`` that adds the sha256 of each file written.
Many Snakemake jobs run at once, so no job touches a shared file: the `provenance` rule
assembles the index ``results/provenance.json`` from the sidecars once they all exist.
Records hold no timestamp, so the same code, params and inputs give byte-identical files.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from defectfusion.core.environment import git_commit  # noqa: F401 (re-exported: prov.git_commit)
from defectfusion.core.errors import UserError
from defectfusion.core.fsutil import atomic_write_json, sha256_file  # noqa: F401 (re-exported: prov.sha256_file)
from defectfusion.core.jsonio import parse_json


def sha256_json(obj: Any) -> str:
    """Hash of a JSON-able object, independent of key order."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def params_subset(values: dict[str, Any], sections: Iterable[str]) -> dict[str, Any]:
    return {k: values[k] for k in sections if k in values}


def make_record(
    name: str,
    rule: str,
    params: dict[str, Any],
    inputs: Iterable[str | Path],
    optional: Iterable[str | Path] = (),
) -> dict[str, Any]:
    """The record of output `name` (``kind/name``) made by `rule` from `params` and `inputs`
    (and from the `optional` files that exist).

    Every input must exist: an output is never made from a file that is not there.
    """
    hashes: dict[str, str] = {}
    for p in sorted({str(p) for p in inputs}):
        if not Path(p).is_file():
            raise UserError(
                f"{p}: not found (needed by {name}; run the pipeline stage that makes it)"
            )
        hashes[p] = sha256_file(p)
    for p in sorted({str(p) for p in optional} - set(hashes)):
        if Path(p).is_file():
            hashes[p] = sha256_file(p)
    hashes = dict(sorted(hashes.items()))
    return {
        "name": name,
        "rule": rule,
        "commit": git_commit(),
        "params_sha256": sha256_json(params),
        "inputs_sha256": sha256_json(sorted(hashes.items())),
        "inputs": hashes,
    }


def one_line(record: dict[str, Any]) -> str:
    """The record as one line of ASCII JSON (header comments, PNG and PDF metadata)."""
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def keywords(record: dict[str, Any]) -> str:
    """The short form: what a PDF viewer's "Keywords" shows."""
    return (
        f"rule={record['rule']}; commit={record['commit']}; "
        f"params_sha256={record['params_sha256']}; inputs_sha256={record['inputs_sha256']}"
    )


def sidecar_path(results: str | Path, name: str) -> Path:
    """``results/provenance/KIND/NAME.json`` for output ``KIND/NAME``."""
    return Path(results) / "provenance" / f"{name}.json"


def write_sidecar(results: str | Path, record: dict[str, Any], outputs: Iterable[Path]) -> Path:
    """Write the record plus the sha256 of each output (written before, so hashable)."""
    files = {str(p): sha256_file(p) for p in sorted(map(str, outputs))}
    return atomic_write_json(sidecar_path(results, record["name"]), {**record, "outputs": files})


def build_index(sidecars: Iterable[str | Path], out: str | Path) -> dict[str, Any]:
    """Assemble ``results/provenance.json``: every output file -> the record that made it."""
    index: dict[str, Any] = {}
    for path in sorted(map(str, sidecars)):
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise UserError(f"{path}: unreadable provenance record ({e})") from None
        from defectfusion.core.jsonio import parse_json

        record = parse_json(text, path)
        outputs = record.pop("outputs", None)
        if not isinstance(outputs, dict):
            raise UserError(f"{path}: provenance record without 'outputs'")
        for file, digest in outputs.items():
            index[file] = {**record, "sha256": digest}
    result = {"outputs": index, "commits": sorted({str(r["commit"]) for r in index.values()})}
    atomic_write_json(out, result)
    return result


def read_embedded(path: str | Path) -> dict[str, Any]:
    """The record embedded in a table or figure file (what the tests and a reader check)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".png":
        from PIL import Image

        with Image.open(path) as im:
            text = im.text.get("Provenance")  # type: ignore[attr-defined]
    elif suffix == ".pdf":
        text = _pdf_subject(path)
    else:
        first = path.read_text(encoding="utf-8").splitlines()[0] if path.stat().st_size else ""
        text = (
            first.split("provenance: ", 1)[1].removesuffix(" -->")
            if "provenance: " in first
            else None
        )
    if not text:
        raise UserError(f"{path}: no provenance record embedded")

    return parse_json(text, path)


def _pdf_subject(path: Path) -> str | None:
    """The /Subject literal string of a PDF written by matplotlib (uncompressed Info dict)."""
    data = path.read_bytes()
    start = data.find(b"/Subject (")
    if start < 0:
        return None
    out, depth, i = bytearray(), 1, start + len(b"/Subject (")
    while i < len(data):
        c = data[i]
        if c == 0x5C:  # backslash: the next byte is literal (the record is ASCII: no octal)
            out.append(data[i + 1])
            i += 2
            continue
        depth += {0x28: 1, 0x29: -1}.get(c, 0)  # balanced parentheses need no escape
        if depth == 0:
            return out.decode("ascii")
        out.append(c)
        i += 1
    return None
