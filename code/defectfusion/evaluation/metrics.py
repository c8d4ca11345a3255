"""The metrics the thesis names, from COCO results records: torch-free.

What `evaluate`, the bootstrap, the post-mortem and the figures compute on detections:
COCO mAP and per-class AP/AR (`coco_metrics`), the critical recall (`critical_recall`), the
composite score (`composite`), the detection confusion matrix (`confusion_matrix`) and box
IoU (`box_iou`, COCO's own). No torch here, so the jobs that only read predictions (the
bootstrap, the post-mortem, the figures) start in a second instead of importing torch.

`defectfusion.evaluation.evaluate.evaluate_checkpoint` runs a checkpoint on a split and writes two files:

- ``OUT`` (e.g. ``metrics.json``): the metrics below, plus ``"confusion"`` (see
  `confusion_matrix`, with its thresholds), ``"checkpoint"``, ``"data"``, ``"predictions"``
  (paths as given), ``"preset"`` (the checkpoint's model preset) and ``"parameters"`` (its
  parameter count, for the tables);
- ``OUT`` with its suffix replaced by ``.predictions.json`` (``metrics.json`` ->
  ``metrics.predictions.json``): the predictions as a COCO results list, one record per
  detection ``{"image_id", "category_id", "bbox": [x, y, w, h] pixels of the original image,
  "score"}``, what ``defectfusion compare`` and the figures read. Boxes are rounded to 5
  decimals and scores to 6, so the files are stable across runs.

The metrics-file schema (what `coco_metrics` returns; tables, figures and the book read it):

==========================  ===============================================================
``map``                     AP@[.50:.95], maxDets 100 (COCO's headline mAP)
``map50``, ``map75``        AP at IoU .50 / .75, maxDets 100
``map_300``, ``map50_300``  AP@[.50:.95] / AP50 with maxDets 300 (DEIMv2 emits 300 queries)
``ar_100``, ``ar_300``      AR@[.50:.95] with maxDets 100 / 300
``per_class``               ``{class name: {"id", "ap", "ap50", "recall", "recall50",
                            "n_gt"}}``: ``ap``/``ap50`` as above for one class; ``recall`` is
                            its AR@[.50:.95] at maxDets 100, ``recall50`` its recall at IoU .50
                            (maxDets 100: what an inspector calls "found the defect");
                            ``n_gt`` its number of ground-truth boxes
``critical_classes``        the critical class ids used
``critical_recall``         mean ``recall`` over the critical classes (the thesis's AR_critical)
``critical_recall50``       mean ``recall50`` over the critical classes
``composite``               ``sum(w * metrics[key] for key, w in composite_weights)``, by
                            default ``0.7 * map + 0.3 * critical_recall`` (checkpoint selection)
``composite_weights``       the weights used
``area``                    ``{"reference_side": 640, "median_side", "thresholds_px2": [a, b],
                            "ap_small", "ap_medium", "ap_large", "ar_small", "ar_medium",
                            "ar_large"}``: AP / AR (maxDets 100) by GT box area, with the
                            size-relative thresholds explained below
``max_dets``                ``[100, 300]``: the two maxDets of the keys above
``n_images``                images in the ground truth
``n_predictions``           detections evaluated
``stats_100``               the 12 standard COCO numbers (AP, AP50, AP75, AP S/M/L, AR1, AR10,
                            AR100, AR S/M/L), unchanged: COCO's absolute areas, -1 where COCO
                            has nothing to measure; for comparison with other work
==========================  ===============================================================

Null (``None``) means "nothing to measure" (COCO's -1): a class with no ground-truth box
has ``ap``/``recall`` null and is left out of the critical means; an area range with no box
has null AP/AR. A mean over no class is null, and so is a composite that needs it. Empty
results are not an error: every measurable number is 0.

Why the area ranges are rescaled: COCO's small/medium/large cut at 32² and 96² pixels,
absolute areas tuned for ~640 px images. On this project's 192-200 px images nearly every
box would be "small" or "medium" and "large" would be empty, which says nothing about the
defects' relative size. The cuts are scaled by ``(median image side / 640)²`` (image side
``sqrt(w * h)``), i.e. the same fraction of the image as COCO's: at 192 px they become
9.6² and 28.8² pixels. ``stats_100`` keeps COCO's absolute cuts.

The numbers come from faster-coco-eval (C++ COCOeval); `pycocotools_metrics` recomputes
the standard numbers with pycocotools, and the tests check that both agree.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from defectfusion.config import EvalSection
from defectfusion.core.errors import UserError
from defectfusion.core.jsonio import load_json

COCO_AREA_PX2: tuple[float, float] = (32.0**2, 96.0**2)
REFERENCE_SIDE = 640  # the image side COCO's area cuts were made for
AREA_MAX = 1e5**2  # COCO's upper bound of "all" and "large"
# params.yaml's eval.composite_weights (the config's default)
DEFAULT_WEIGHTS: dict[str, float] = EvalSection().composite_weights

Results = list[dict[str, Any]]


# ---- COCO metrics ----------------------------------------------------------------------


def load_gt(gt: dict[str, Any] | str | Path) -> dict[str, Any]:
    return gt if isinstance(gt, dict) else load_json(gt)


def check_results(gt: dict[str, Any], results: Results) -> None:
    """Refuse records the COCO tools would assert on, naming the record."""
    image_ids = {im["id"] for im in gt["images"]}
    cat_ids = {c["id"] for c in gt["categories"]}
    for i, r in enumerate(results):
        where = f"predictions: record {i}"
        if r.get("image_id") not in image_ids:
            raise UserError(f"{where}: image_id {r.get('image_id')} is not in the ground truth")
        if r.get("category_id") not in cat_ids:
            raise UserError(f"{where}: category_id {r.get('category_id')} is not a category")
        bbox = r.get("bbox")
        if not isinstance(bbox, list | tuple) or len(bbox) != 4:
            raise UserError(f"{where}: bbox must be [x, y, w, h], got {bbox!r}")
        # NaN or infinity would rank silently (a NaN score gave a plausible, wrong mAP)
        if not all(isinstance(v, int | float) and math.isfinite(v) for v in bbox):
            raise UserError(f"{where}: bbox must hold finite numbers, got {bbox!r}")
        score = r.get("score")
        if (
            not isinstance(score, int | float)
            or isinstance(score, bool)
            or not math.isfinite(score)
        ):
            raise UserError(f"{where}: score must be a finite number, got {score!r}")


def area_thresholds(gt: dict[str, Any]) -> tuple[float, float, float]:
    """``(median image side, small/medium cut, medium/large cut)``, the cuts in px².

    COCO's 32² and 96² scaled by ``(median side / 640)²``, the side of an image being
    ``sqrt(w * h)`` (rounded to 0.01 px² so the file shows round numbers).
    """
    sides = [math.sqrt(im["width"] * im["height"]) for im in gt["images"]]
    median = float(np.median(sides)) if sides else float(REFERENCE_SIDE)
    scale = (median / REFERENCE_SIDE) ** 2
    return median, round(COCO_AREA_PX2[0] * scale, 2), round(COCO_AREA_PX2[1] * scale, 2)


def _ranges(cuts: Sequence[float]) -> dict[str, list[float]]:
    a, b = cuts
    return {"small": [0.0, a], "medium": [a, b], "large": [b, AREA_MAX]}


def _empty_results(coco_gt: Any, coco_cls: type) -> Any:
    # pycocotools' loadRes indexes results[0]: build the empty result set by hand.
    res = coco_cls()
    res.dataset = {
        "images": list(coco_gt.dataset["images"]),
        "categories": copy.deepcopy(coco_gt.dataset["categories"]),
        "annotations": [],
    }
    res.createIndex()
    return res


def _quiet(*args: Any, **kwargs: Any) -> None:
    pass


def _faster_eval(
    gt: dict[str, Any], results: Results, ranges: dict[str, list[float]], max_dets: list[int]
) -> Any:
    from faster_coco_eval import COCO, COCOeval_faster

    coco_gt = COCO(copy.deepcopy(gt), print_function=_quiet)
    # loadRes adds keys to the records: give it copies.
    coco_dt = coco_gt.loadRes(copy.deepcopy(results)) if results else _empty_results(coco_gt, COCO)
    ev = COCOeval_faster(coco_gt, coco_dt, "bbox", ranges=ranges, print_function=_quiet)
    ev.params.maxDets = max_dets
    ev.evaluate()
    ev.accumulate()
    return ev


def _summarize(
    ev: Any,
    ap: bool,
    iou: float | None = None,
    area: str = "all",
    max_det: int = 100,
    cat: int | None = None,
) -> float:
    """Mean precision (``ap``) or recall over the valid cells, pycocotools' ``_summarize``.

    -1 when there is nothing to measure (no ground truth in that slice).
    """
    p = ev.params
    a = p.areaRngLbl.index(area)
    m = p.maxDets.index(max_det)
    ks = slice(None) if cat is None else [list(p.catIds).index(cat)]
    s = ev.eval["precision"] if ap else ev.eval["recall"]  # [T,R,K,A,M] / [T,K,A,M]
    if iou is not None:
        s = s[np.isclose(p.iouThrs, iou)]
    s = s[:, :, ks, a, m] if ap else s[:, ks, a, m]
    valid = s[s > -1]
    return float(np.mean(valid)) if valid.size else -1.0


def precision_recall(
    gt: dict[str, Any] | str | Path, results: Results, max_det: int = 100
) -> tuple[np.ndarray, Any]:
    """COCO's interpolated precision ``[T, R, K]`` (IoU thresholds x 101 recall points x
    classes; area "all", ``max_det`` detections per image; NaN where there is nothing to
    measure) and the evaluator's params (``iouThrs``, ``recThrs``, ``catIds``)."""
    gt = load_gt(gt)
    check_results(gt, results)
    ev = _faster_eval(gt, results, _ranges(COCO_AREA_PX2), sorted({1, 10, max_det}))
    p = ev.params
    prec = ev.eval["precision"][:, :, :, p.areaRngLbl.index("all"), p.maxDets.index(max_det)]
    prec = prec.astype(float)
    prec[prec < 0] = np.nan
    return prec, p


def _null(x: float) -> float | None:
    return None if x < 0 else x


def _mean(xs: Iterable[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return float(np.mean(vals)) if vals else None


def coco_metrics(
    gt: dict[str, Any] | str | Path,
    results: Results,
    critical_classes: Sequence[int],
    composite_weights: dict[str, float] | None = None,
    max_dets: tuple[int, int] = (100, 300),
) -> dict[str, Any]:
    """The metrics of the module docstring, computed with faster-coco-eval."""
    gt = load_gt(gt)
    weights = dict(DEFAULT_WEIGHTS if composite_weights is None else composite_weights)
    m_lo, m_hi = max_dets
    if not 10 < m_lo <= m_hi:
        raise ValueError(f"max_dets={max_dets}: need 10 < first <= second")
    cats = sorted(gt["categories"], key=lambda c: c["id"])
    cat_ids = [c["id"] for c in cats]
    check_critical(gt, critical_classes)
    check_results(gt, results)

    median_side, *cuts = area_thresholds(gt)
    ranges = {**_ranges(COCO_AREA_PX2), **{f"{k}_rel": v for k, v in _ranges(cuts).items()}}
    ev = _faster_eval(gt, results, ranges, sorted({1, 10, m_lo, m_hi}))

    def summ(ap: bool, **kw: Any) -> float:
        return _summarize(ev, ap, **{"max_det": m_lo, **kw})

    n_gt = dict.fromkeys(cat_ids, 0)
    for ann in gt["annotations"]:
        if not ann.get("iscrowd", 0):
            n_gt[ann["category_id"]] += 1
    per_class = {
        c["name"]: {
            "id": c["id"],
            "ap": _null(summ(True, cat=c["id"])),
            "ap50": _null(summ(True, cat=c["id"], iou=0.5)),
            "recall": _null(summ(False, cat=c["id"])),
            "recall50": _null(summ(False, cat=c["id"], iou=0.5)),
            "n_gt": n_gt[c["id"]],
        }
        for c in cats
    }
    stats = [
        summ(True),
        summ(True, iou=0.5),
        summ(True, iou=0.75),
        *(summ(True, area=a) for a in ("small", "medium", "large")),
        summ(False, max_det=1),
        summ(False, max_det=10),
        summ(False),
        *(summ(False, area=a) for a in ("small", "medium", "large")),
    ]
    metrics: dict[str, Any] = {
        "map": _null(stats[0]),
        "map50": _null(stats[1]),
        "map75": _null(stats[2]),
        "map_300": _null(summ(True, max_det=m_hi)),
        "map50_300": _null(summ(True, iou=0.5, max_det=m_hi)),
        "ar_100": _null(stats[8]),
        "ar_300": _null(summ(False, max_det=m_hi)),
        "per_class": per_class,
        "critical_classes": list(critical_classes),
        "critical_recall": critical_recall(per_class, critical_classes),
        "critical_recall50": critical_recall(per_class, critical_classes, "recall50"),
        "area": {
            "reference_side": REFERENCE_SIDE,
            "median_side": median_side,
            "thresholds_px2": list(cuts),
            **{f"ap_{a}": _null(summ(True, area=f"{a}_rel")) for a in ("small", "medium", "large")},
            **{
                f"ar_{a}": _null(summ(False, area=f"{a}_rel")) for a in ("small", "medium", "large")
            },
        },
        "max_dets": [m_lo, m_hi],
        "n_images": len(gt["images"]),
        "n_predictions": len(results),
        "stats_100": stats,
        "composite_weights": weights,
    }
    metrics["composite"] = composite(metrics, weights)
    return metrics


def check_critical(gt: dict[str, Any], critical_classes: Sequence[int]) -> None:
    """Refuse a critical class id the dataset does not have, naming the ids it has."""
    cat_ids = sorted(c["id"] for c in gt["categories"])
    for c in critical_classes:
        if c not in cat_ids:
            raise UserError(
                f"critical_classes: class id {c} is not in the dataset (ids {cat_ids}); "
                "set data.critical_classes with --config"
            )


def critical_recall(
    per_class: dict[str, dict[str, Any]], critical_classes: Sequence[int], key: str = "recall"
) -> float | None:
    """The thesis's AR_critical: the mean of ``key`` (``recall``: AR@[.50:.95] at maxDets 100;
    ``recall50``: recall at IoU .50) over the critical classes; classes with no ground truth
    (null) are left out, and the mean over none is null."""
    by_id = {v["id"]: v for v in per_class.values()}
    return _mean(by_id[c][key] for c in critical_classes)


def composite(metrics: dict[str, Any], weights: dict[str, float]) -> float | None:
    """``sum(w * metrics[key])``; null when a weighted metric is null."""
    total = 0.0
    for key, w in weights.items():
        value = metrics.get(key)
        if key not in metrics or isinstance(value, dict | list):
            scalars = sorted(k for k, v in metrics.items() if not isinstance(v, dict | list))
            raise UserError(f"composite_weights: unknown metric {key!r}; use one of {scalars}")
        if value is None:
            return None
        total += float(w) * value
    return total


def pycocotools_metrics(
    gt: dict[str, Any] | str | Path,
    results: Results,
    area_thresholds_px2: Sequence[float] = COCO_AREA_PX2,
    max_dets: Sequence[int] = (1, 10, 100),
    cat_ids: Sequence[int] | None = None,
) -> list[float]:
    """The 12 numbers of pycocotools' own ``summarize()`` (the reference implementation).

    Only the tests use it, to check faster-coco-eval. ``cat_ids`` restricts the evaluation to
    some classes (one class: its AP and AR). As in pycocotools, ``stats[0]`` is always at
    maxDets 100; the other AP numbers and AR[8] use ``max_dets[2]``.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = load_gt(gt)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints as it goes
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        coco_dt = (
            coco_gt.loadRes(copy.deepcopy(results)) if results else _empty_results(coco_gt, COCO)
        )
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.params.areaRng = [[0.0, AREA_MAX], *_ranges(area_thresholds_px2).values()]
        ev.params.maxDets = list(max_dets)
        if cat_ids is not None:
            ev.params.catIds = list(cat_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [float(x) for x in ev.stats]


# ---- boxes and the confusion matrix -------------------------------------------------------


def box_iou(dets: Sequence[dict[str, Any]], gts: Sequence[dict[str, Any]]) -> np.ndarray:
    """``[len(dets), len(gts)]`` IoU of COCO ``[x, y, w, h]`` boxes, computed by pycocotools
    (``maskUtils.iou``), the function COCOeval matches with, so every IoU in this project is
    the evaluator's own. A crowd ground truth (``iscrowd``) divides by the detection's area
    only, as in COCOeval."""
    if not len(dets) or not len(gts):
        return np.zeros((len(dets), len(gts)))
    from pycocotools import mask as mask_utils

    crowd = [int(g.get("iscrowd", 0)) for g in gts]
    iou = mask_utils.iou([d["bbox"] for d in dets], [g["bbox"] for g in gts], crowd)
    return np.asarray(iou, dtype=np.float64).reshape(len(dets), len(gts))


def confusion_matrix(
    gt: dict[str, Any] | str | Path,
    results: Results,
    iou_threshold: float = 0.5,
    score_threshold: float = 0.3,
) -> dict[str, Any]:
    """Detection confusion matrix with a background class.

    Rows are the ground-truth class, plus a last "background" row for false positives;
    columns the predicted class, plus a last "background" column for missed ground truth.
    Per image, detections with ``score >= score_threshold`` are taken best first, and each
    is matched to the unmatched ground-truth box it overlaps most, whatever the classes, if
    that IoU is ``>= iou_threshold``: a fracture predicted as a scratch counts in
    [fracture, scratch], not as a miss plus a false positive. Ties keep the records' order.
    """
    gt = load_gt(gt)
    check_results(gt, results)
    cats = sorted(gt["categories"], key=lambda c: c["id"])
    index = {c["id"]: i for i, c in enumerate(cats)}
    bg = len(cats)
    matrix = np.zeros((bg + 1, bg + 1), dtype=np.int64)

    gts: dict[int, list[dict[str, Any]]] = {im["id"]: [] for im in gt["images"]}
    for ann in gt["annotations"]:
        if not ann.get("iscrowd", 0):
            gts[ann["image_id"]].append(ann)
    dets: dict[int, Results] = {i: [] for i in gts}
    for r in results:
        if r["score"] >= score_threshold:
            dets[r["image_id"]].append(r)

    for image_id, g in gts.items():
        d = sorted(dets[image_id], key=lambda r: -r["score"])  # stable: ties keep order
        iou = box_iou(d, g)  # [n_det, n_gt]
        matched = np.zeros(len(g), dtype=bool)
        for i, r in enumerate(d):
            cand = np.where(matched, -1.0, iou[i])
            j = int(cand.argmax()) if len(g) else -1  # argmax: the first of equal overlaps
            if j >= 0 and cand[j] >= iou_threshold:
                matched[j] = True
                matrix[index[g[j]["category_id"]], index[r["category_id"]]] += 1
            else:
                matrix[bg, index[r["category_id"]]] += 1
        for j in np.flatnonzero(~matched).tolist():
            matrix[index[g[j]["category_id"]], bg] += 1

    return {
        "classes": [c["name"] for c in cats] + ["background"],
        "matrix": matrix.tolist(),
        "iou_threshold": iou_threshold,
        "score_threshold": score_threshold,
    }


def row_normalized(confusion: dict[str, Any]) -> np.ndarray:
    """The matrix with each row divided by its sum (NaN for an empty row).

    Row "fracture" then reads: of the fracture boxes, the fraction found as each class
    (and, in the last column, missed).
    """
    m = np.asarray(confusion["matrix"], dtype=np.float64)
    sums = m.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(sums > 0, m / sums, np.nan)


# ---- the qualitative cases (figure `qualitative`, counted in summary.json) ----------------


def _best_match(
    dets: list[dict[str, Any]], box: dict[str, Any], iou_min: float = 0.5
) -> float | None:
    """The best score among same-class detections overlapping `box` at IoU >= iou_min."""
    same = [d for d in dets if d["category_id"] == box["category_id"]]
    if not same:
        return None
    ious = box_iou(same, [box])[:, 0]
    scores = [d["score"] for d, i in zip(same, ious, strict=True) if i >= iou_min]
    return max(scores) if scores else None


def qualitative_cases(
    gt: dict[str, Any],
    preds_a: list[dict[str, Any]],
    preds_b: list[dict[str, Any]],
    critical: Sequence[int],
    score_threshold: float,
    top: int | None = 4,
) -> dict[str, list[dict[str, Any]]]:
    """The critical boxes one model finds and the other does not, ``{"b_not_a": [...],
    "a_not_b": [...]}``, the best `top` images of each direction: a model *finds* a box when
    a same-class detection with score >= `score_threshold` overlaps it at IoU >= 0.5; a
    case's gap is the finder's score minus the other's best same-class score there (0 if
    none); per image the largest gap counts. The ``qualitative`` figure draws them, the
    summary counts them (``top=None``: all)."""
    by_image: dict[int, list[dict[str, Any]]] = {}
    for ann in gt["annotations"]:
        if ann["category_id"] in critical and not ann.get("iscrowd", 0):
            by_image.setdefault(ann["image_id"], []).append(ann)
    dets = {"a": {}, "b": {}}
    for key, preds in (("a", preds_a), ("b", preds_b)):
        for d in preds:
            dets[key].setdefault(d["image_id"], []).append(d)
    cases: dict[str, list[dict[str, Any]]] = {"b_not_a": [], "a_not_b": []}
    for image_id in sorted(by_image):
        best: dict[str, dict[str, Any]] = {}
        for box in by_image[image_id]:
            sa = _best_match(dets["a"].get(image_id, []), box)
            sb = _best_match(dets["b"].get(image_id, []), box)
            found_a = sa is not None and sa >= score_threshold
            found_b = sb is not None and sb >= score_threshold
            if found_a == found_b:
                continue
            direction = "b_not_a" if found_b else "a_not_b"
            gap = (sb if found_b else sa) - ((sa if found_b else sb) or 0.0)
            case = {"image_id": image_id, "box": box, "gap": gap, "score_a": sa, "score_b": sb}
            if direction not in best or gap > best[direction]["gap"]:
                best[direction] = case
        for direction, case in best.items():
            cases[direction].append(case)
    for direction in cases:
        cases[direction].sort(key=lambda c: (-c["gap"], c["image_id"]))
        cases[direction] = cases[direction][:top] if top is not None else cases[direction]
    return cases


def pooled_cases(
    gt: dict[str, Any],
    preds_a: list[dict[str, Any]],
    preds_b: dict[int, list[dict[str, Any]]],
    critical: Sequence[int],
    score_threshold: float,
    top: int | None = 4,
) -> dict[str, list[dict[str, Any]]]:
    """`qualitative_cases` of model A against each seed's model B (`preds_b`: seed ->
    predictions), pooled: each case carries its ``seed``; an image counts once per direction,
    with the seed of its largest gap (ties: the first seed); ranked by gap, then image id,
    then seed; the best `top` of each direction (None: all)."""
    pooled: dict[str, dict[int, dict[str, Any]]] = {"b_not_a": {}, "a_not_b": {}}
    for seed, preds in preds_b.items():
        cases = qualitative_cases(gt, preds_a, preds, critical, score_threshold, top=None)
        for direction, found in cases.items():
            for case in found:
                known = pooled[direction].get(case["image_id"])
                if known is None or case["gap"] > known["gap"]:
                    pooled[direction][case["image_id"]] = {**case, "seed": seed}
    order = {seed: i for i, seed in enumerate(preds_b)}
    out = {}
    for direction, by_image in pooled.items():
        ranked = sorted(
            by_image.values(), key=lambda c: (-c["gap"], c["image_id"], order[c["seed"]])
        )
        out[direction] = ranked[:top] if top is not None else ranked
    return out
