"""`defectfusion compare`: paired bootstrap confidence intervals of B - A on one test split.

Both models' predictions are resampled with the same bootstrap replicate of the test
images (Efron's percentile bootstrap over images, paired), so the interval is that of the
*difference*, and "no gain" or "a loss" becomes a statistical statement rather than one run.

Speed: COCO evaluation splits into a per-image part (matching detections to ground truth
at each IoU threshold) and an accumulation over images (ranking all detections of a class
by score, precision/recall curves). A resampled set repeats or drops whole images, so its
per-image matches are those of the full set: `PerImageEval` matches once and
`PerImageEval.metrics` re-accumulates each replicate in numpy, following pycocotools'
``evaluateImg``/``accumulate`` step by step. The tests check it against
`evaluate.coco_metrics` on replicates materialised by `resample` (duplicated images get
fresh image and annotation ids), which is the definition.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils
from tqdm import tqdm

from defectfusion.data.coco import load_json
from defectfusion.errors import UserError
from defectfusion.evaluate import AREA_MAX, DEFAULT_WEIGHTS, _check_results, composite
from defectfusion.fsutil import atomic_write_json

# pycocotools' default bbox parameters (what coco_metrics' headline numbers use).
IOU_THRS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)
REC_THRS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)
MAX_DET = 100
METRICS = ("map", "critical_recall", "composite")  # reported with a CI
EXTRA = ("map50", "critical_recall50")  # also computed (the composite may weight them)
DEFAULT_CRITICAL = [2, 3, 5]

Results = list[dict[str, Any]]


# ---- the definition: materialise a replicate -------------------------------------------


def resample(gt: dict[str, Any], results: Results, sample: Sequence[int]) -> tuple[dict, Results]:
    """The GT and predictions of a bootstrap replicate (``sample``: indices into gt images).

    Copy ``j`` of the replicate gets image id ``j + 1``, and annotations fresh ids, so a
    duplicated image counts twice. Copies are laid out in the order of ``sample``.
    """
    anns: dict[int, list[dict]] = defaultdict(list)
    for a in gt["annotations"]:
        anns[a["image_id"]].append(a)
    dets: dict[int, Results] = defaultdict(list)
    for r in results:
        dets[r["image_id"]].append(r)
    images, new_anns, new_res = [], [], []
    for j, i in enumerate(sample):
        im = gt["images"][int(i)]
        images.append({**im, "id": j + 1})
        for a in anns[im["id"]]:
            new_anns.append({**a, "id": len(new_anns) + 1, "image_id": j + 1})
        new_res.extend({**r, "image_id": j + 1} for r in dets[im["id"]])
    return {**gt, "images": images, "annotations": new_anns}, new_res


# ---- the fast path: match once, accumulate per replicate ---------------------------------


class PerImageEval:
    """COCO bbox matching of one prediction set, done once; metrics of any replicate.

    For each class: the detections of every image (top `MAX_DET` per image, score order),
    whether each is a true positive / false positive / ignored at each IoU threshold, and
    the number of non-ignored GT boxes of each image.
    """

    def __init__(self, gt: dict[str, Any], results: Results):
        self.image_ids = [im["id"] for im in gt["images"]]
        self.cat_ids = sorted(c["id"] for c in gt["categories"])
        pos = {i: n for n, i in enumerate(self.image_ids)}
        n_img = len(self.image_ids)
        gts: dict[tuple[int, int], list[dict]] = defaultdict(list)
        for a in gt["annotations"]:
            gts[a["image_id"], a["category_id"]].append(a)
        dts: dict[tuple[int, int], Results] = defaultdict(list)
        for r in results:
            dts[r["image_id"], r["category_id"]].append(r)
        self.per_class = []
        for k in self.cat_ids:
            scores, tp, fp, lengths = [], [], [], np.zeros(n_img, dtype=np.int64)
            npig = np.zeros(n_img, dtype=np.int64)
            for img in self.image_ids:
                s, t, f, n = _match(gts.get((img, k), []), dts.get((img, k), []))
                scores.append(s)
                tp.append(t)
                fp.append(f)
                lengths[pos[img]], npig[pos[img]] = len(s), n
            self.per_class.append(
                _ClassData(
                    np.concatenate(scores),
                    np.concatenate(tp, axis=1),
                    np.concatenate(fp, axis=1),
                    lengths,
                    npig,
                )
            )

    def metrics(
        self,
        sample: Sequence[int] | None,
        critical_classes: Sequence[int],
        weights: dict[str, float] | None = None,
    ) -> dict[str, float | None]:
        """map, map50, critical_recall(50) and composite of the replicate ``sample``
        (indices into the images; ``None``: the full set), as `coco_metrics` computes them."""
        n = len(self.image_ids)
        idx = np.arange(n) if sample is None else np.sort(np.asarray(sample, dtype=np.int64))
        counts = np.bincount(idx, minlength=n)
        ap, ap50, rec, rec50 = {}, {}, {}, {}
        for k, c in zip(self.cat_ids, self.per_class, strict=True):
            res = c.accumulate(counts, idx)
            if res is None:  # no GT of this class in the replicate: COCO's -1
                continue
            precision, recall = res  # [T, R], [T]
            ap[k], ap50[k] = precision.mean(), precision[0].mean()
            rec[k], rec50[k] = recall.mean(), recall[0]

        def mean(d: dict[int, float], keys: Sequence[int] | None = None) -> float | None:
            vals = [d[k] for k in (d if keys is None else keys) if k in d]
            return float(np.mean(vals)) if vals else None

        m: dict[str, float | None] = {
            "map": mean(ap),
            "map50": mean(ap50),
            "critical_recall": mean(rec, critical_classes),
            "critical_recall50": mean(rec50, critical_classes),
        }
        m["composite"] = composite(m, dict(DEFAULT_WEIGHTS if weights is None else weights))
        return m


def _iou(dt: Results, gt: list[dict]) -> np.ndarray:
    # pycocotools' own box IoU (a crowd GT is divided by the detection's area only).
    crowd = [int(g.get("iscrowd", 0)) for g in gt]
    return np.asarray(mask_utils.iou([d["bbox"] for d in dt], [g["bbox"] for g in gt], crowd))


def _match(gt: list[dict], dt: Results) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """pycocotools' ``evaluateImg`` for one image and class, area "all", maxDets 100.

    Returns the kept detections' scores (best first), tp and fp flags ``[T, D]``, and the
    number of non-ignored GT boxes.
    """
    ignore = [
        int(bool(g.get("iscrowd", 0)) or not 0 <= g.get("area", _area(g)) <= AREA_MAX) for g in gt
    ]
    order = np.argsort(ignore, kind="mergesort")  # ignored GT last
    gt = [gt[i] for i in order]
    gt_ig = np.asarray([ignore[i] for i in order], dtype=bool)
    dt_order = np.argsort([-d["score"] for d in dt], kind="mergesort")[:MAX_DET]
    dt = [dt[i] for i in dt_order]
    t_n, d_n = len(IOU_THRS), len(dt)
    matched = np.zeros((t_n, d_n), dtype=bool)
    dt_ig = np.zeros((t_n, d_n), dtype=bool)
    if gt and dt:
        ious = _iou(dt, gt)
        crowd = [bool(g.get("iscrowd", 0)) for g in gt]
        best = ious.max(axis=1)
        for ti, t in enumerate(IOU_THRS):
            gt_taken = np.zeros(len(gt), dtype=bool)
            for di in range(d_n):
                if best[di] < min(t, 1 - 1e-10):
                    continue  # matches nothing at this threshold (the loop below would agree)
                thr, m = min(t, 1 - 1e-10), -1
                for gi in range(len(gt)):
                    if gt_taken[gi] and not crowd[gi]:
                        continue
                    if m > -1 and not gt_ig[m] and gt_ig[gi]:
                        break
                    if ious[di, gi] < thr:
                        continue
                    thr, m = ious[di, gi], gi
                if m == -1:
                    continue
                dt_ig[ti, di] = gt_ig[m]
                matched[ti, di] = True
                gt_taken[m] = True
    out_of_range = np.asarray([not 0 <= _area(d) <= AREA_MAX for d in dt], dtype=bool)
    dt_ig |= ~matched & out_of_range[None, :]
    tp = matched & ~dt_ig
    fp = ~matched & ~dt_ig
    scores = np.asarray([d["score"] for d in dt], dtype=np.float64)
    return scores, tp, fp, int((~gt_ig).sum())


def _area(box_record: dict) -> float:
    return float(box_record["bbox"][2]) * float(box_record["bbox"][3])


class _ClassData:
    """One class's matched detections over all images, ready for any replicate.

    A replicate that repeats an image ``c`` times is, for COCO, ``c`` images whose
    detections are ranked together by score (stable: image order, then rank within the
    image). Where no image has two detections of the same score with different outcomes,
    that ranking is the full set's ranking with each detection repeated ``c`` times, and
    runs of identical copies change no point of the precision envelope that the recall
    thresholds read: so the replicate is a weighted cumulative sum over one fixed order.
    Otherwise (rare exact ties) the replicate's detections are laid out and sorted.
    """

    def __init__(
        self,
        scores: np.ndarray,
        tp: np.ndarray,
        fp: np.ndarray,
        lengths: np.ndarray,
        npig: np.ndarray,
    ):
        self.lengths, self.npig = lengths, npig
        self.starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        self.scores, self.tp, self.fp = scores, tp, fp  # image order, score order within
        image = np.repeat(np.arange(len(lengths)), lengths)
        order = np.argsort(-scores, kind="mergesort")  # (-score, image, rank)
        s, image, tp_s, fp_s = scores[order], image[order], tp[:, order], fp[:, order]
        tie = (s[1:] == s[:-1]) & (image[1:] == image[:-1])
        differ = (tp_s[:, 1:] != tp_s[:, :-1]).any(0) | (fp_s[:, 1:] != fp_s[:, :-1]).any(0)
        self.exact_layout = bool((tie & differ).any())
        # Detections ranked below the last true positive of every image raise no recall in
        # any replicate: they never reach the envelope at a recall threshold. Drop them.
        hits = np.flatnonzero(tp_s.any(0))
        keep = hits[-1] + 1 if hits.size else 0
        self.image_sorted = image[:keep]
        self.tp_sorted = tp_s[:, :keep].astype(np.int64)
        self.fp_sorted = fp_s[:, :keep].astype(np.int64)

    def accumulate(
        self, counts: np.ndarray, idx: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """pycocotools' ``accumulate`` for this class over the replicate (``counts`` per
        image; ``idx`` the sorted image indices with repeats). None: no GT box to find."""
        npig = int(counts @ self.npig)
        if npig == 0:
            return None
        if self.exact_layout:
            lengths, starts = self.lengths[idx], self.starts[idx]
            total = int(lengths.sum())
            det = np.repeat(starts - (np.cumsum(lengths) - lengths), lengths) + np.arange(total)
            det = det[np.argsort(-self.scores[det], kind="mergesort")]
            tp = np.cumsum(self.tp[:, det], axis=1, dtype=np.float64)
            fp = np.cumsum(self.fp[:, det], axis=1, dtype=np.float64)
        else:
            w = counts[self.image_sorted]
            tp = np.cumsum(self.tp_sorted * w, axis=1).astype(np.float64)
            fp = np.cumsum(self.fp_sorted * w, axis=1).astype(np.float64)
        return _precision_recall(tp, fp, npig)


def _precision_recall(tp: np.ndarray, fp: np.ndarray, npig: int) -> tuple[np.ndarray, np.ndarray]:
    """Interpolated precision ``[T, R]`` and final recall ``[T]`` from cumulative counts."""
    t_n, d_n = tp.shape
    if d_n == 0:
        return np.zeros((t_n, len(REC_THRS))), np.zeros(t_n)
    rc = tp / npig
    pr = tp / (fp + tp + np.spacing(1))
    pr = np.maximum.accumulate(pr[:, ::-1], axis=1)[:, ::-1]  # precision envelope
    precision = np.zeros((t_n, len(REC_THRS)))
    for t in range(t_n):
        ri = np.searchsorted(rc[t], REC_THRS, side="left")
        ok = ri < d_n
        precision[t, ok] = pr[t, ri[ok]]
    return precision, rc[:, -1]


# ---- the command ---------------------------------------------------------------------------


def _read_predictions(path: Path) -> tuple[Results, dict[str, Any] | None]:
    """A COCO results list, or a metrics file of `evaluate_checkpoint` (follow "predictions")."""
    data = load_json(path)
    if isinstance(data, list):
        return data, None
    if isinstance(data, dict) and "predictions" in data:
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
    meta = found[0][1] if found else {}
    return (
        list(meta.get("critical_classes", DEFAULT_CRITICAL)),
        dict(meta.get("composite_weights", DEFAULT_WEIGHTS)),
    )


def _summary(a: float | None, b: float | None, diffs: np.ndarray) -> dict[str, Any]:
    valid = diffs[~np.isnan(diffs)]
    lo, hi = (float(x) for x in np.percentile(valid, [2.5, 97.5])) if valid.size else (None, None)
    return {
        "value_a": a,
        "value_b": b,
        "diff": None if a is None or b is None else b - a,
        "boot_mean_diff": float(valid.mean()) if valid.size else None,
        "ci95": [lo, hi],
        "frac_b_gt_a": float((valid > 0).mean()) if valid.size else None,
        "n_valid": int(valid.size),  # replicates where both values exist
    }


def paired_bootstrap(
    gt: dict[str, Any],
    results_a: Results,
    results_b: Results,
    critical_classes: Sequence[int],
    weights: dict[str, float] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Full-set values of both models and the bootstrap distribution of B - A."""
    if n_boot < 1:
        raise UserError(f"n_boot={n_boot}: need at least 1 bootstrap replicate")
    cat_ids = {c["id"] for c in gt["categories"]}
    for c in critical_classes:
        if c not in cat_ids:
            raise UserError(
                f"critical_classes: class id {c} is not in the dataset (ids {sorted(cat_ids)}); "
                "set data.critical_classes with --config"
            )
    _check_results(gt, results_a)
    _check_results(gt, results_b)
    ev_a, ev_b = PerImageEval(gt, results_a), PerImageEval(gt, results_b)
    keys = (*METRICS, *EXTRA)
    full_a = ev_a.metrics(None, critical_classes, weights)
    full_b = ev_b.metrics(None, critical_classes, weights)
    n = len(gt["images"])
    if n == 0:
        raise UserError("ground truth: no images to resample")
    rng = np.random.default_rng(seed)
    diffs = {k: np.full(n_boot, np.nan) for k in keys}
    for r in tqdm(range(n_boot), desc="bootstrap", unit="rep", disable=not progress):
        # Sorted: a replicate is a multiset of images; sorting fixes the layout of ties.
        sample = np.sort(rng.integers(0, n, size=n))
        ma = ev_a.metrics(sample, critical_classes, weights)
        mb = ev_b.metrics(sample, critical_classes, weights)
        for k in keys:
            if ma[k] is not None and mb[k] is not None:
                diffs[k][r] = mb[k] - ma[k]
    return {
        "n_images": n,
        "n_boot": n_boot,
        "seed": seed,
        "critical_classes": list(critical_classes),
        "composite_weights": dict(DEFAULT_WEIGHTS if weights is None else weights),
        "metrics": {k: _summary(full_a[k], full_b[k], diffs[k]) for k in keys},
    }


def compare_files(
    a: Path, b: Path, data: Path, out: Path, n_boot: int = 1000, seed: int = 0, config: Any = None
) -> dict[str, Any]:
    """Paired bootstrap of model B minus model A on split `data`; writes the JSON `out`.

    `a` and `b` are COCO results JSON or metrics files of `evaluate_checkpoint`. Critical
    classes and composite weights come from `config`, else from the metrics files, else
    the defaults ([2, 3, 5]; 0.7 mAP + 0.3 critical recall).
    """
    a, b, data, out = Path(a), Path(b), Path(data), Path(out)
    if data.is_dir():
        raise UserError(
            f"{data}: is a folder; pass a split JSON, e.g. {data}/annotations/test.json"
        )
    gt = load_json(data)
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
