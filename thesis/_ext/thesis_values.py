"""The values the book prints: key paths into the results, conditions, and the formatting
of numbers. Pure Python (no Sphinx), so it is tested on its own.

The book looks values up, it never computes them: anything derived (a difference, a count,
a ratio) is computed by the report stage into summary.json (report/summary.py), where it is
tested and traced like every other result.

VALUE: a key path or a number. A path is dot-separated: dict keys, list indices, '@main'
(summary.json's main_preset) and '*' (every key of a mapping). COND: VALUE [OP VALUE] (OP:
< <= > >= == !=), optionally with 'not', joined by 'and' / 'or': the wording a result
chooses. Numbers print with a decimal point, like the tables and figures, a narrow space
between thousands and a true minus sign (U+2212), never "-0.000".
"""

from __future__ import annotations

import operator
import re
from typing import Any

NNBSP = "\u202f"  # narrow no-break space: the thousands separator of Spanish (RAE, SI)
OPS = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
    "==": operator.eq,
    "!=": operator.ne,
}


class ResultsError(Exception):
    """A key, table or figure the book needs and the results lack."""


# What a role or directive reports as a problem with the results (never a traceback).
EVAL_ERRORS = (ResultsError, TypeError, ValueError)


# ---- key paths and values -------------------------------------------------------------


def resolve(data: Any, path: str, source: str) -> Any:
    """The value at a dot path; '*' gives a list over a mapping's values."""
    main = data.get("main_preset") if isinstance(data, dict) else None

    def walk(node: Any, parts: list[str], done: list[str]) -> Any:
        if not parts:
            if node is None:
                raise ResultsError(f"{source}: key '{path}' is null")
            return node
        head, rest = parts[0], parts[1:]
        if head == "@main":
            if main is None:
                raise ResultsError(f"{source}: key 'main_preset' missing (needed by '{path}')")
            head = main
        if head == "*" and isinstance(node, dict):
            return [walk(v, rest, [*done, k]) for k, v in node.items()]
        if isinstance(node, dict) and head in node:
            return walk(node[head], rest, [*done, head])
        if (
            isinstance(node, list)
            and re.fullmatch(r"-?\d+", head)
            and -len(node) <= int(head) < len(node)
        ):
            return walk(node[int(head)], rest, [*done, head])
        where = ".".join(done) or "the top level"
        raise ResultsError(f"{source}: key '{path}' missing ('{head}' not under {where})")

    return walk(data, path.split("."), [])


def evaluate(expr: str, lookup: Any) -> Any:
    """VALUE := number | path: a lookup, nothing computed (derived values are summary.json's)."""
    text = expr.strip()
    if not re.fullmatch(r"[-+]?\d+(\.\d+)?|[\w@*-]+(\.[\w@*-]+)*", text):
        raise ResultsError(
            f"'{expr}': the book looks up values and computes none; put what it needs into "
            "summary.json (report/summary.py) and look that up"
        )
    try:
        return float(text)
    except ValueError:
        return lookup(text)


def condition(cond: str, lookup: Any) -> bool:
    """COND := CLAUSE ('or' CLAUSE)*; CLAUSE := ATOM ('and' ATOM)*; ATOM := ['not'] EXPR [OP EXPR]."""

    def atom(text: str) -> bool:
        text = text.strip()
        if text.startswith("not "):
            return not atom(text[4:])
        parts = re.split(r"\s(<=|>=|==|!=|<|>)\s", text)
        if len(parts) == 1:
            return bool(evaluate(text, lookup))
        if len(parts) != 3:
            raise ResultsError(f"condition '{cond}': one comparison per clause")
        return OPS[parts[1]](evaluate(parts[0], lookup), evaluate(parts[2], lookup))

    return any(
        all(atom(a) for a in re.split(r"\sand\s", clause)) for clause in re.split(r"\sor\s", cond)
    )


# ---- formatting (decimal point, as in the tables and figures) -------------------------------

MINUS = "\u2212"  # the true minus sign: an ASCII hyphen never stands for one
SUPERSCRIPTS = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")


def names_es(value: Any) -> Any:
    """Class names (a name or a list) in Spanish, as the tables and figures print them."""
    try:
        from defectfusion.report import class_name_es
    except ImportError:  # the extension's logic tested without the package
        return value
    if isinstance(value, list | tuple):
        return [class_name_es(v) if isinstance(v, str) else v for v in value]
    return class_name_es(value) if isinstance(value, str) else value


def _number(value: float, spec: str) -> str:
    text = format(value, spec)
    digits = text.rstrip("%").replace(",", "")
    try:
        zero = float(digits) == 0
    except ValueError:
        zero = False
    if zero:  # no "-0.000" nor "+0.000": a zero has no sign
        text = text.lstrip("+-")
    if re.fullmatch(r"[+-]?[\d.]+e[+-]\d+", text):  # 3e-05 -> 3 × 10⁻⁵
        mantissa, exponent = text.split("e")
        sup = str(int(exponent)).translate(SUPERSCRIPTS)
        text = f"{mantissa}{NNBSP}×{NNBSP}10{sup}"
    return text.replace("-", MINUS)


def fmt(value: Any, spec: str = "") -> str:
    """SPEC: a Python format spec, or "es" for class names in Spanish."""
    if spec == "es":
        value, spec = names_es(value), ""
    if isinstance(value, bool):
        return "sí" if value else "no"
    if isinstance(value, str):
        return value
    if isinstance(value, list | tuple):
        if not value:  # an empty list of names in the prose
            return "ninguna"
        if all(isinstance(v, str) for v in value):
            return value[0] if len(value) == 1 else ", ".join(value[:-1]) + " y " + value[-1]
        return "[" + ", ".join(fmt(v, spec) for v in value) + "]"
    if isinstance(value, dict):
        raise ResultsError("a mapping, not a value: name one of its keys")
    if isinstance(value, float) and value.is_integer() and not spec and abs(value) >= 1000:
        value = int(value)
    if isinstance(value, int) and not spec:
        spec = "," if abs(value) >= 10000 else "d"  # RAE: no separator in four-digit numbers
    text = _number(value, spec or ".3f")
    if spec.endswith("%"):
        text = text[:-1] + NNBSP + "%"
    return text.replace(",", NNBSP)


def fmt_thesis(value: Any, spec: str = "") -> str:
    """A thesis figure prints as written in thesis_figures.yaml unless a format is given."""
    return repr(value) if isinstance(value, float) and not spec else fmt(value, spec)


def split_format(text: str) -> tuple[str, str]:
    expr, _, spec = text.partition(":")
    return expr.strip(), spec.strip()
