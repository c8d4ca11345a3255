"""`defectfusion compare`: paired bootstrap confidence intervals of B - A on one test split.

Both models' predictions are resampled with the same bootstrap replicate of the test
images (Efron's percentile bootstrap over images, paired), so the interval is that of the
*difference*, and "no gain" or "a loss" becomes a statistical statement rather than one run.
The machinery (exact COCO metrics per replicate, and the hierarchical bootstrap over seeds
and images that `defectfusion postmortem` uses) lives in `defectfusion.analysis.bootstrap`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from defectfusion.analysis.bootstrap import (  # noqa: F401  (re-exported: the historical names)
    DEFAULT_CRITICAL,
    EXTRA,
    IOU_THRS,
    MAX_DET,
    METRICS,
    REC_THRS,
    PerImageEval,
    Results,
    paired_bootstrap,
    resample,
)
from defectfusion.config import weights_ok
from defectfusion.core.errors import UserError, is_int
from defectfusion.core.fsutil import atomic_write_json
from defectfusion.core.jsonio import load_json
from defectfusion.data.coco import load_split
from defectfusion.evaluation.metrics import DEFAULT_WEIGHTS

# ---- the command ---------------------------------------------------------------------------


def _read_predictions(path: Path) -> tuple[Results, dict[str, Any] | None]:
    """A COCO results list, or a metrics file of `evaluate_checkpoint` (follow "predictions")."""
    data = load_json(path)
    if isinstance(data, list):
        return data, None
    if isinstance(data, dict) and "predictions" in data:
        if not isinstance(data["predictions"], str) or not data["predictions"]:
            raise UserError(
                f"{path}: 'predictions' is {data['predictions']!r}, not the path of a COCO "
                "results file; pass the metrics file evaluate wrote, or the results JSON itself"
            )
        pred = Path(data["predictions"])
        if not pred.is_absolute() and not pred.is_file():
            pred = path.parent / pred.name  # written beside the metrics file
        results = load_json(pred)
        if not isinstance(results, list):
            raise UserError(f"{pred}: expected a COCO results list (from {path})")
        return results, data
    raise UserError(
        f"{path}: expected COCO results (a JSON list) or a metrics file with a 'predictions' key"
    )


def _settings(
    config: Any, metas: list[dict[str, Any] | None], paths: list[Path]
) -> tuple[list[int], dict[str, float]]:
    """Critical classes and composite weights: config, else the metrics files, else defaults."""
    if config is not None:
        return list(config.data.critical_classes), dict(config.eval.composite_weights)
    found = [(p, m) for p, m in zip(paths, metas, strict=True) if m is not None]
    for key in ("critical_classes", "composite_weights"):
        values = {p: m.get(key) for p, m in found if key in m}
        if len(set(map(str, values.values()))) > 1:
            raise UserError(f"{' and '.join(map(str, values))}: different {key}; pass --config")
    path, meta = found[0] if found else (None, {})
    critical = meta.get("critical_classes", DEFAULT_CRITICAL)
    weights = meta.get("composite_weights", DEFAULT_WEIGHTS)
    # The same rule as a checkpoint's meta (a metrics file is as untrusted as one).
    if not (isinstance(critical, list) and all(is_int(c) for c in critical)):
        raise UserError(f"{path}: critical_classes {critical!r} is not a list of class ids")
    if not weights_ok(weights):
        raise UserError(f"{path}: composite_weights {weights!r} are not non-negative numbers")
    return list(critical), dict(weights)


def compare_files(
    a: Path, b: Path, data: Path, out: Path, n_boot: int = 1000, seed: int = 0, config: Any = None
) -> dict[str, Any]:
    """Paired bootstrap of model B minus model A on split `data`; writes the JSON `out`.

    `a` and `b` are COCO results JSON or metrics files of `evaluate_checkpoint`. Critical
    classes and composite weights come from `config`, else from the metrics files, else
    the defaults ([2, 3, 5]; 0.7 mAP + 0.3 critical recall).
    """
    a, b, data, out = Path(a), Path(b), Path(data), Path(out)
    gt = load_split(data)
    (res_a, meta_a), (res_b, meta_b) = _read_predictions(a), _read_predictions(b)
    critical, weights = _settings(config, [meta_a, meta_b], [a, b])
    result = paired_bootstrap(gt, res_a, res_b, critical, weights, n_boot, seed)
    result = {"a": str(a), "b": str(b), "data": str(data), "diff": "b - a", **result}
    atomic_write_json(out, result)
    m = result["metrics"]
    for k in METRICS:
        lo, hi = m[k]["ci95"]
        if m[k]["diff"] is not None and lo is not None:
            print(
                f"{k:16s} A {m[k]['value_a']:.4f}  B {m[k]['value_b']:.4f}  B-A {m[k]['diff']:+.4f}  95% CI [{lo:+.4f}, {hi:+.4f}]  P(B>A) {m[k]['frac_b_gt_a']:.3f}"
            )
    return result
