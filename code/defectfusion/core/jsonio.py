"""Reading JSON from files this package did not necessarily write (a shared DVC remote, a
user's export): every way a file can be unreadable, malformed or hostile (nested past any
real file's depth) is one `UserError` line. The results, the data layer, the report and the
engine all read JSON through here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from defectfusion.core.errors import UserError

# JSON from a shared remote is untrusted: deeper nesting than any COCO or results file has
# would only end in a RecursionError (here or in whatever walks the object next).
MAX_JSON_DEPTH = 64
def parse_json(text: str, where: str | Path) -> Any:
    """`json.loads` with a depth cap; every way it can fail is one `UserError` line."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(
            f"{where}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}"
        ) from None
    except RecursionError:
        data = None
        depth = MAX_JSON_DEPTH + 1
    else:
        depth = json_depth(data, MAX_JSON_DEPTH)
    if depth > MAX_JSON_DEPTH:
        raise UserError(
            f"{where}: JSON nested more than {MAX_JSON_DEPTH} levels deep; not a file this "
            "tool wrote (a corrupt or hostile file): restore it, e.g. with `dvc checkout`"
        )
    return data


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """A JSON-lines file (a training history, its steps): one parsed row per non-empty line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        rows.append(parse_json(line, f"{path}: line {i}"))  # depth-capped, one line on error
    return rows


def json_depth(obj: Any, limit: int) -> int:
    """Nesting depth of lists/dicts in `obj`, counted without recursion; stops past `limit`."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        node, d = stack.pop()
        if isinstance(node, dict):
            children = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        deepest = max(deepest, d)
        if deepest > limit:
            return deepest
        stack.extend((c, d + 1) for c in children if isinstance(c, dict | list))
    return deepest


def load_json(path: str | Path, max_bytes: int | None = None) -> Any:
    """Read a JSON file, turning every way it can be unreadable into one `UserError` line;
    with `max_bytes`, a larger file is refused before it is read."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        size = path.stat().st_size
        if max_bytes is not None and size > max_bytes:
            raise UserError(f"{path}: {size} bytes, more than any file it could be ({max_bytes})")
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read ({e.__class__.__name__}: {e})") from None
    if not text.strip():
        raise UserError(f"{path}: empty file, expected JSON")
    return parse_json(text, path)
