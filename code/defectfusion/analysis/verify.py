"""`defectfusion pipeline verify`: did a rerun reproduce the recorded study?

A rerun on another machine gives other floats (Phase 1 test mAP 0.6955 on one CPU, 0.7057 on
another, from the same commit), so "reproduced" cannot mean "equal". It means: every number
the book quotes lies within what the recorded run's own uncertainty allows, and every verdict
of the post-mortem is the same.

The numbers are those of the post-mortem's results file (``results/postmortem.json``, which
the book's tables, figures and sentences read): the Phase 1 model's metrics, each Phase 2
variant's metrics at each epoch the book shows, and every contrast (drifts, differences to
the adopted recipe, named effects), each with its recorded interval.

The rule, `tolerance`: a number reproduces when ``|rerun - recorded| <= z * sqrt(2) * se``,
``se`` the recorded standard error (the seeds' spread and the image bootstrap, in quadrature,
as the post-mortem's intervals have it; for Phase 1, trained once, the image bootstrap alone),
(never below one image's share of the split, 1/n: a spread of 0 is a boundary, a recall of
1.0 in every replicate, not certainty; that epoch 0 equals Phase 1 exactly is the summary's
own check, ``epoch0_equals_phase1``),
``sqrt(2)`` because both runs are draws of the same estimator, and ``z`` the normal quantile
at a family-wise level over all the numbers checked (Bonferroni: a study of 1,500 numbers
would otherwise fail 75 of them by chance alone). The image share makes the rule lenient for
a rerun on the same images (it differs only by training noise), the honest direction for a
check whose failure says "this did not reproduce".
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from defectfusion.core.errors import UserError, is_number
from defectfusion.core.jsonio import load_json, parse_json

VERIFY_LEVEL = 95.0  # family-wise, over every number checked


@dataclass
class Check:
    """One number: where it is, both values, the tolerance and whether it holds."""

    name: str
    recorded: float | None
    rerun: float | None
    se: float
    tol: float = 0.0

    @property
    def diff(self) -> float | None:
        if self.recorded is None or self.rerun is None:
            return None
        return self.rerun - self.recorded

    @property
    def ok(self) -> bool:
        if self.recorded is None or self.rerun is None:
            return self.recorded is None and self.rerun is None  # undefined in both
        return abs(self.rerun - self.recorded) <= self.tol + 1e-12


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)
    verdicts: list[tuple[str, Any, Any]] = field(default_factory=list)  # name, recorded, rerun
    missing: list[str] = field(default_factory=list)  # recorded numbers the rerun lacks
    z: float = 0.0

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    @property
    def changed_verdicts(self) -> list[tuple[str, Any, Any]]:
        return [v for v in self.verdicts if v[1] != v[2]]

    @property
    def reproduced(self) -> bool:
        return not (self.failed or self.changed_verdicts or self.missing)


def tolerance(se: float, n_checks: int, level: float = VERIFY_LEVEL) -> float:
    """``z * sqrt(2) * se`` with ``z`` the two-sided normal quantile at `level` percent,
    Bonferroni-adjusted over `n_checks` numbers."""
    return _z(n_checks, level) * math.sqrt(2.0) * se


@functools.cache  # one value per report: every check of it asks
def _z(n_checks: int, level: float) -> float:
    from scipy import stats

    alpha = (1.0 - level / 100.0) / max(n_checks, 1)
    return float(stats.norm.ppf(1.0 - alpha / 2.0))


def _se_of(entry: dict[str, Any], ci_level: float) -> float:
    """A recorded entry's standard error: its ``se`` when recorded, else its interval's
    half-width over the normal quantile of the interval's level."""
    if is_number(entry.get("se")):
        return float(entry["se"])
    ci = entry.get("ci")
    if isinstance(ci, list) and len(ci) == 2 and all(is_number(v) for v in ci):
        from scipy import stats

        return abs(ci[1] - ci[0]) / 2.0 / float(stats.norm.ppf(0.5 + ci_level / 200.0))
    return 0.0


def _se_ok(se: Any) -> bool:
    return is_number(se) and se >= 0


def _resolution(pm: dict[str, Any], split: Any) -> float:
    """One image's share of a split (1 / n_images): the floor of a number's standard error.
    A recall of 1.0 in every bootstrap replicate has a recorded spread of 0, yet one missed
    box on a rerun moves it by about this much; without the floor it would have to
    reproduce to the last digit."""
    n = (pm.get("n_images") or {}).get(split)
    return 1.0 / n if is_number(n) and n > 0 else 0.0


def _numbers(pm: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every number of a post-mortem file the book can quote, by a stable name, with the
    entry holding its value (``value`` or ``diff``) and uncertainty (``se`` or ``ci``)."""
    out: dict[str, dict[str, Any]] = {}
    for split, metrics in (pm.get("phase1") or {}).items():
        for m, e in metrics.items():
            out[f"phase1 {split} {m}"] = {"value": e.get("value"), "split": split, **e}
    for v, entry in (pm.get("phase2") or {}).items():
        for which, splits in (entry.get("values") or {}).items():
            for split, metrics in splits.items():
                for m, e in metrics.items():
                    out[f"{v} {which} {split} {m}"] = {"value": e.get("value"), "split": split, **e}
    for c in pm.get("contrasts") or []:
        name = f"{c.get('b')} - {c.get('a')} {c.get('which')} {c.get('split')} {c.get('metric')}"
        out[name] = {**c, "value": c.get("diff")}
    for name, effect in (pm.get("effects") or {}).items():
        for which, splits in effect.items():
            if not isinstance(splits, dict):
                continue
            for split, metrics in splits.items():
                for m, e in (metrics or {}).items():
                    if isinstance(e, dict):
                        out[f"effect {name} {which} {split} {m}"] = {
                            **e,
                            "value": e.get("diff"),
                            "split": split,
                        }
    return out


def _verdicts(pm: dict[str, Any]) -> dict[str, Any]:
    """The post-mortem's conclusions: each variant's branch and the outcome's booleans and
    name lists (what §5.5 of the book says)."""
    out: dict[str, Any] = {}
    for v, entry in (pm.get("phase2") or {}).items():
        out[f"verdict {v}"] = (entry.get("verdict") or {}).get("branch")
    for k, value in (pm.get("outcome") or {}).items():
        if isinstance(value, bool | str) or (isinstance(value, list) and k.endswith("_variants")):
            out[f"outcome {k}"] = value
    return out


def compare_postmortems(
    recorded: dict[str, Any], rerun: dict[str, Any], level: float = VERIFY_LEVEL
) -> Report:
    """Every recorded number and verdict against the rerun's (the rule: module docstring)."""
    ci_level = recorded.get("ci_level", 95.0)
    if not (is_number(ci_level) and 50 <= ci_level < 100):
        raise UserError(f"recorded results: ci_level {ci_level!r} is not a percentage")
    try:  # a file from a remote: any shape it should not have is one line
        rec, new = _numbers(recorded), _numbers(rerun)
    except (AttributeError, TypeError, ValueError) as e:
        raise UserError(
            f"not a post-mortem results file (malformed: {e.__class__.__name__}: {e})"
        ) from None
    bad_se = [n for n, e in rec.items() if e.get("se") is not None and not _se_ok(e["se"])]
    if bad_se:
        raise UserError(f"recorded results: {bad_se[0]} has se {rec[bad_se[0]]['se']!r}")
    report = Report(z=_z(len(rec), level))
    for name, entry in rec.items():
        if name not in new:
            report.missing.append(name)
            continue
        r, n = entry.get("value"), new[name].get("value")
        se = max(_se_of(entry, ci_level), _resolution(recorded, entry.get("split")))
        report.checks.append(
            Check(
                name,
                float(r) if is_number(r) else None,
                float(n) if is_number(n) else None,
                se,
                tolerance(se, len(rec), level),
            )
        )
    vr, vn = _verdicts(recorded), _verdicts(rerun)
    report.verdicts = [(k, vr[k], vn.get(k)) for k in vr]
    return report


def read_postmortem(path: str | Path) -> dict[str, Any]:
    """A post-mortem results file, or the ``postmortem.json`` of a results folder."""

    path = Path(path)
    if path.is_dir():
        path = path / "postmortem.json"
    return _postmortem(load_json(path), path)


def _postmortem(data: Any, where: str | Path) -> dict[str, Any]:
    """`data` if it has a post-mortem results file's shape, else one line naming `where`."""
    if not isinstance(data, dict) or "phase2" not in data or "contrasts" not in data:
        raise UserError(f"{where}: not a post-mortem results file (no 'phase2' and 'contrasts')")
    return data


def recorded_from_dvc(root: str | Path = ".", rev: str = "HEAD") -> dict[str, Any]:
    """The recorded results: ``results/postmortem.json`` as the `rev` commit's dvc.lock
    records it, read from the DVC cache or remote (a rerun may since have replaced the
    working copy)."""
    try:
        import dvc.api

        text = dvc.api.read("results/postmortem.json", repo=str(root), rev=rev)
    except Exception as e:  # noqa: BLE001 - DVC's many errors: all mean "no recorded copy"
        raise UserError(
            f"no recorded results/postmortem.json in DVC at {rev} ({e.__class__.__name__}); "
            "`dvc pull` the recorded run first, or pass --recorded FILE"
        ) from None

    where = f"results/postmortem.json@{rev}"
    return _postmortem(parse_json(text, where) if text else None, where)


def format_report(report: Report, limit: int = 40) -> list[str]:
    """The lines `pipeline verify` prints: the failures first, then a one-line summary."""
    lines = []
    for c in sorted(report.failed, key=lambda c: -abs(c.diff or 0) / max(c.tol, 1e-12))[:limit]:
        shown = "undefined" if c.diff is None else f"{c.diff:+.4f}"
        lines.append(
            f"  differs   {c.name}: recorded {_f(c.recorded)}, rerun {_f(c.rerun)} "
            f"(diff {shown}, tolerance +-{c.tol:.4f})"
        )
    for name, r, n in report.changed_verdicts:
        lines.append(f"  verdict   {name}: recorded {r!r}, rerun {n!r}")
    for name in report.missing[:limit]:
        lines.append(f"  missing   {name}: recorded, not in the rerun")
    worst = max(
        (abs(c.diff) / c.tol for c in report.checks if c.diff is not None and c.tol > 0),
        default=0.0,
    )
    n_ok = sum(c.ok for c in report.checks)
    lines.append(
        f"{n_ok} of {len(report.checks)} numbers within tolerance (z = {report.z:.2f}, "
        f"family-wise {VERIFY_LEVEL:g} %; largest |diff|/tolerance {worst:.2f}); "
        f"{len(report.verdicts) - len(report.changed_verdicts)} of {len(report.verdicts)} "
        f"verdicts the same; {len(report.missing)} missing: "
        + ("REPRODUCED" if report.reproduced else "NOT REPRODUCED")
    )
    return lines


def _f(x: float | None) -> str:
    return "undefined" if x is None else f"{x:.4f}"
