"""Bootstrap confidence intervals of COCO metrics: over images, and over seeds and images.

Two resampling schemes, both Efron's percentile bootstrap:

- `paired_bootstrap`: two prediction sets on one split, resampled with the same replicate
  of the images, so the interval is that of the *difference* B - A over the images.
- `Hierarchical`: several prediction sets (Phase 1, every Phase 2 variant and seed, several
  epochs), each replicate resampling the Phase 2 seeds with replacement and the images with
  replacement. A difference B - A is averaged over the resampled seeds; A is either one
  shared reference (Phase 1: trained once, so its training variance is *not* covered) or
  another per-seed set (paired by seed: seed s of both variants saw the same data order).
  Every set is evaluated on the *same* image replicates, so each set's metrics are
  computed once per replicate and reused by every contrast (`drift`, `contrast`).

Speed: COCO evaluation splits into a per-image part (matching detections to ground truth
at each IoU threshold) and an accumulation over images (ranking all detections of a class
by score, precision/recall curves). A resampled set repeats or drops whole images, so its
per-image matches are those of the full set: `PerImageEval` matches once and
`PerImageEval.metrics` re-accumulates a replicate following pycocotools'
``evaluateImg``/``accumulate`` step by step; `PerImageEval.metrics_many` does the same for
many replicates at once (see `_ClassData.accumulate_many`). The tests check both against
`metrics.coco_metrics` on replicates materialised by `resample` (duplicated images get
fresh image and annotation ids), which is the definition.

Fixed-threshold recall (the operating point): a ground-truth box of class c counts as found
when a detection of class c with score >= the threshold is matched to it at the IoU
threshold, with COCO's matching (greedy by score, maxDets 100 per image and class). As the
matching is greedy by score, the matches above a threshold are those of the full ranking,
so the found boxes of a replicate are a weighted sum of per-image counts: exact.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats
from tqdm import tqdm

from defectfusion.config import DataSection
from defectfusion.core.errors import UserError
from defectfusion.evaluation.metrics import (
    AREA_MAX,
    DEFAULT_WEIGHTS,
    box_iou,
    check_critical,
    check_results,
    composite,
)

# pycocotools' default bbox parameters (what coco_metrics' headline numbers use).
IOU_THRS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)
REC_THRS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)
MAX_DET = 100
METRICS = ("map", "critical_recall", "composite")  # reported with a CI
EXTRA = ("map50", "critical_recall50")  # also computed (the composite may weight them)
DEFAULT_CRITICAL = DataSection().critical_classes  # params.yaml's data.critical_classes
CI_LEVEL = 95.0

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
        self.n_images = n_img

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

    def metrics_many(
        self,
        counts: np.ndarray,
        critical_classes: Sequence[int],
        weights: dict[str, float] | None = None,
        chunk: int = 500,
    ) -> dict[str, np.ndarray]:
        """`metrics` of many replicates at once: ``counts`` ``[R, n_images]`` says how many
        times each image is in each replicate. Arrays ``[R]``, NaN where `metrics` says None."""
        counts = np.asarray(counts, dtype=np.float64).reshape(-1, self.n_images)
        parts = [self._metrics_chunk(counts[i : i + chunk], critical_classes, weights)
                 for i in range(0, len(counts), chunk)]  # fmt: skip
        keys = ("map", "map50", "critical_recall", "critical_recall50", "composite")
        if not parts:
            return {k: np.zeros(0) for k in keys}
        return {k: np.concatenate([p[k] for p in parts]) for k in keys}

    def _metrics_chunk(
        self,
        counts: np.ndarray,
        critical_classes: Sequence[int],
        weights: dict[str, float] | None,
    ) -> dict[str, np.ndarray]:
        stacks: dict[str, list[np.ndarray]] = {"ap": [], "ap50": [], "rec": [], "rec50": []}
        for c in self.per_class:
            precision, recall, valid = c.accumulate_many(counts)  # [R,T,K], [R,T], [R]
            r_n = len(counts)
            nan = np.where(valid, 0.0, np.nan)  # COCO's -1: no GT of the class
            stacks["ap"].append(precision.reshape(r_n, -1).mean(axis=1) + nan)
            stacks["ap50"].append(precision[:, 0, :].mean(axis=1) + nan)
            stacks["rec"].append(recall.mean(axis=1) + nan)
            stacks["rec50"].append(recall[:, 0] + nan)
        crit = [i for i, k in enumerate(self.cat_ids) if k in set(critical_classes)]
        m: dict[str, Any] = {
            "map": _class_mean(stacks["ap"], len(counts)),
            "map50": _class_mean(stacks["ap50"], len(counts)),
            "critical_recall": _class_mean([stacks["rec"][i] for i in crit], len(counts)),
            "critical_recall50": _class_mean([stacks["rec50"][i] for i in crit], len(counts)),
        }
        # composite() sums w * value in the weights' order: on arrays, the same floats.
        m["composite"] = composite(m, dict(DEFAULT_WEIGHTS if weights is None else weights))
        return m

    def found(self, thresholds: Sequence[float], iou: float) -> dict[int, np.ndarray]:
        """Per class id: ``[n_images, len(thresholds)]``, the ground-truth boxes of each image
        found by a detection of their class with score >= each threshold, matched at IoU
        `iou` (one of COCO's thresholds .50:.05:.95)."""
        t = _iou_index(iou)
        thr = np.asarray(thresholds, dtype=np.float64)
        out = {}
        for k, c in zip(self.cat_ids, self.per_class, strict=True):
            hits = c.tp[t][:, None] & (c.scores[:, None] >= thr[None, :])  # [D, n_thr]
            image = np.repeat(np.arange(self.n_images), c.lengths)
            per_image = np.zeros((self.n_images, len(thr)))
            np.add.at(per_image, image, hits.astype(np.float64))
            out[k] = per_image
        return out

    def recall_at(
        self,
        counts: np.ndarray | None,
        thresholds: Sequence[float],
        iou: float,
        class_ids: Sequence[int] | None = None,
    ) -> dict[int, np.ndarray]:
        """Per class id: recall at each score threshold ``[R, n_thr]`` of each replicate
        (``counts`` ``[R, n_images]``; None: the full set, R = 1). NaN: no box to find."""
        w = (
            np.ones((1, self.n_images))
            if counts is None
            else np.asarray(counts, dtype=np.float64).reshape(-1, self.n_images)
        )
        found = self.found(thresholds, iou)
        npig = {k: c.npig for k, c in zip(self.cat_ids, self.per_class, strict=True)}
        out = {}
        for k in self.cat_ids if class_ids is None else class_ids:
            # Integer counts in float64: exact sums, one division (as a materialised replicate).
            n = w @ npig[k].astype(np.float64)
            with np.errstate(invalid="ignore", divide="ignore"):
                out[k] = np.where(n[:, None] > 0, (w @ found[k]) / n[:, None], np.nan)
        return out


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
        ious = box_iou(dt, gt)
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
        self._runs: dict[int, tuple[np.ndarray, np.ndarray]] = {}

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

    def _tp_runs(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        """At IoU threshold `t`: the image of each true positive, in ranking order, and
        ``gaps[i, j]``, the false positives of image i ranked between TP j-1 and TP j."""
        if t not in self._runs:
            n_img = len(self.lengths)
            tp_pos = np.flatnonzero(self.tp_sorted[t])
            fp_pos = np.flatnonzero(self.fp_sorted[t])
            seg = np.searchsorted(tp_pos, fp_pos, side="left")  # the TP each FP precedes
            ok = seg < len(tp_pos)  # FPs after the last TP move no point that is read
            gaps = np.zeros((n_img, len(tp_pos)))
            np.add.at(gaps, (self.image_sorted[fp_pos[ok]], seg[ok]), 1.0)
            self._runs[t] = (self.image_sorted[tp_pos], gaps)
        return self._runs[t]

    def accumulate_many(self, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`accumulate` of replicates ``counts`` ``[R, n_images]`` (float64 image counts):
        precision ``[R, T, len(REC_THRS)]``, recall ``[R, T]`` and whether the class has a
        GT box in each replicate (where not, both are 0 and mean nothing).

        Only the true positives matter. The interpolated precision at a recall threshold is
        the maximum precision at or after the first detection reaching that recall; the
        first such detection is a true positive (recall only grows there), and a false
        positive never has a higher precision than the true positive ranked just before
        it (same tp, more fp). A true positive of an image drawn c times is a run of c
        copies whose precision grows along the run, so the envelope is read at the run's
        end: ``tp = cumsum(counts of the TPs' images)``, ``fp = cumsum(counts @ gaps)``, with
        the same float operations as pycocotools at those points.
        """
        r_n, t_n = len(counts), len(IOU_THRS)
        precision = np.zeros((r_n, t_n, len(REC_THRS)))
        recall = np.zeros((r_n, t_n))
        npig = counts @ self.npig.astype(np.float64)
        valid = npig > 0
        if self.exact_layout:  # rare exact ties: lay each replicate out (the definition)
            for r in np.flatnonzero(valid):
                c = counts[r].astype(np.int64)
                res = self.accumulate(c, np.repeat(np.arange(len(c)), c))
                if res is not None:
                    precision[r], recall[r] = res
            return precision, recall, valid
        rows = np.flatnonzero(valid)
        if rows.size == 0:
            return precision, recall, valid
        w, n = counts[rows], npig[rows]
        need = _needed_tp(n)  # [R', len(REC_THRS)]: the TPs each recall threshold needs
        big = float(n.max()) + 2.0  # row offsets: one sorted array, exact in float64
        for t in range(t_n):
            images, gaps = self._tp_runs(t)
            j_n = len(images)
            if j_n == 0:
                continue  # no TP at this IoU: precision and recall 0 (pycocotools agrees)
            tp = np.cumsum(w[:, images], axis=1)  # [R', J]
            fp = np.cumsum(w @ gaps, axis=1)
            pr = tp / (fp + tp + np.spacing(1))
            env = np.maximum.accumulate(pr[:, ::-1], axis=1)[:, ::-1]
            off = np.arange(len(rows), dtype=np.float64)[:, None] * big
            pos = np.searchsorted((tp + off).ravel(), (need + off).ravel(), side="left")
            pos = pos.reshape(need.shape) - np.arange(len(rows))[:, None] * j_n
            reached = pos < j_n
            q = np.take_along_axis(env, np.minimum(pos, j_n - 1), axis=1)
            precision[rows, t] = np.where(reached, q, 0.0)
            recall[rows, t] = tp[:, -1] / n
        return precision, recall, valid


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


def _needed_tp(npig: np.ndarray) -> np.ndarray:
    """``[R, len(REC_THRS)]``: the smallest integer m with ``m / npig >= x`` in floating
    point, for each recall threshold x; pycocotools compares ``tp / npig >= x``, and for a
    fixed npig that float is nondecreasing in tp, so "first rc >= x" is "first tp >= m"."""
    n = npig[:, None]
    x = REC_THRS[None, :]
    m = np.ceil(x * n)
    while True:  # ceil(x * n) is off by at most one either way; settle it exactly
        down = (m > 0) & ((m - 1) / n >= x)
        up = m / n < x
        if not (down.any() or up.any()):
            return m
        m = np.where(down, m - 1, np.where(up, m + 1, m))


def _class_mean(values: Sequence[np.ndarray], r_n: int) -> np.ndarray:
    """Mean over classes of ``[R]`` arrays, NaN entries left out (COCO's -1), summed in
    class order as np.mean of the per-class list; NaN where no class has a value."""
    if not values:
        return np.full(r_n, np.nan)
    stack = np.stack(values)
    ok = ~np.isnan(stack)
    count = ok.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, np.where(ok, stack, 0.0).sum(axis=0) / count, np.nan)


def _iou_index(iou: float) -> int:
    hit = np.flatnonzero(np.isclose(IOU_THRS, iou, rtol=0, atol=1e-9))
    if hit.size == 0:
        raise UserError(
            f"eval.iou_match={iou}: the operating point needs one of COCO's IoU thresholds "
            f"({', '.join(f'{t:.2f}' for t in IOU_THRS)})"
        )
    return int(hit[0])


# ---- replicates ------------------------------------------------------------------------------


def image_replicates(n_images: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """``[n_boot, n_images]``: how many times each image is in each replicate (float64)."""
    if n_images == 0:
        raise UserError("ground truth: no images to resample")
    out = np.zeros((n_boot, n_images))
    for r in range(n_boot):
        out[r] = np.bincount(rng.integers(0, n_images, size=n_images), minlength=n_images)
    return out


def seed_replicates(n_seeds: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """``[n_boot, n_seeds]``: the seeds (indices) each replicate draws, with replacement."""
    if n_seeds < 1:
        raise UserError("no seeds to resample")
    return rng.integers(0, n_seeds, size=(n_boot, n_seeds))


def phase1_groups(phase1_of: Sequence[int]) -> list[list[int]]:
    """The runs (indices) of each Phase 1 seed, in first-seen order; the design must be
    balanced (every Phase 1 seed has as many Phase 2 seeds), as the nested estimators assume."""
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(phase1_of):
        groups.setdefault(int(p), []).append(i)
    out = list(groups.values())
    if not out or len({len(g) for g in out}) != 1:
        raise UserError(
            f"runs per Phase 1 seed {[len(g) for g in out]}: the study needs the same Phase 2 "
            "seeds on every Phase 1 seed (pipeline.seeds and pipeline.phase1_seeds)"
        )
    return out


def nested_replicates(
    phase1_of: Sequence[int], n_boot: int, rng: np.random.Generator
) -> np.ndarray:
    """``[n_boot, n_runs]``: the runs each replicate of a three-level resample draws: Phase 1
    seeds with replacement, then, within each drawn Phase 1 seed, its Phase 2 seeds with
    replacement (the images are the third level: `image_replicates`). With one Phase 1 seed
    it is `seed_replicates`."""
    groups = np.asarray(phase1_groups(phase1_of))  # [P, S] run indices
    n_p1, n_p2 = groups.shape
    p1 = rng.integers(0, n_p1, size=(n_boot, n_p1))
    p2 = rng.integers(0, n_p2, size=(n_boot, n_p1, n_p2))
    return groups[p1[:, :, None], p2].reshape(n_boot, n_p1 * n_p2)


def percentile_ci(values: np.ndarray) -> list[float | None]:
    """The 95 % percentile interval of the replicates that have a value (NaN: none)."""
    valid = values[~np.isnan(values)]
    if not valid.size:
        return [None, None]
    half = (100.0 - CI_LEVEL) / 2
    return [float(x) for x in np.percentile(valid, [half, 100.0 - half])]


def verdict(ci: Sequence[float | None] | None) -> str:
    """The sign an interval shows: "drop" when it lies below 0, "rise" above, "inconclusive"
    when it contains 0 (touching 0 contains it: absence of evidence, never "no change", which
    only an equivalence margin can say: postmortem.judge); "no_data" without an interval."""
    if ci is None or ci[0] is None or ci[1] is None:
        return "no_data"
    if ci[1] < 0:
        return "drop"
    if ci[0] > 0:
        return "rise"
    return "inconclusive"


# ---- the paired bootstrap over images (`defectfusion compare`) -------------------------------


def _summary(a: float | None, b: float | None, diffs: np.ndarray) -> dict[str, Any]:
    valid = diffs[~np.isnan(diffs)]
    return {
        "value_a": a,
        "value_b": b,
        "diff": None if a is None or b is None else b - a,
        "boot_mean_diff": float(valid.mean()) if valid.size else None,
        "ci95": percentile_ci(diffs),
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
    check_critical(gt, critical_classes)
    check_results(gt, results_a)
    check_results(gt, results_b)
    ev_a, ev_b = PerImageEval(gt, results_a), PerImageEval(gt, results_b)
    keys = (*METRICS, *EXTRA)
    full_a = ev_a.metrics(None, critical_classes, weights)
    full_b = ev_b.metrics(None, critical_classes, weights)
    counts = image_replicates(len(gt["images"]), n_boot, np.random.default_rng(seed))
    diffs = {k: np.full(n_boot, np.nan) for k in keys}
    step = 128
    for i in tqdm(range(0, n_boot, step), desc="bootstrap", unit="chunk", disable=None if progress else True):
        ma = ev_a.metrics_many(counts[i : i + step], critical_classes, weights)
        mb = ev_b.metrics_many(counts[i : i + step], critical_classes, weights)
        for k in keys:
            diffs[k][i : i + step] = mb[k] - ma[k]  # NaN where either is undefined
    return {
        "n_images": len(gt["images"]),
        "n_boot": n_boot,
        "seed": seed,
        "critical_classes": list(critical_classes),
        "composite_weights": dict(DEFAULT_WEIGHTS if weights is None else weights),
        "metrics": {k: _summary(full_a[k], full_b[k], diffs[k]) for k in keys},
    }


# ---- the hierarchical bootstrap over seeds and images ----------------------------------------


def metric_key(class_name: str) -> str:
    """The metric name of a class's fixed-threshold recall (a key path segment of the book)."""
    return "op_recall_" + re.sub(r"\W+", "_", class_name).strip("_").lower()


class SetMetrics:
    """One prediction set's metrics on the full split (``full``) and on every image
    replicate (``reps``: arrays ``[n_boot]``, NaN where a metric is undefined)."""

    def __init__(self, full: Mapping[str, float | None], reps: Mapping[str, np.ndarray]):
        self.full = dict(full)
        self.reps = dict(reps)

    @classmethod
    def compute(
        cls,
        ev: PerImageEval,
        counts: np.ndarray,
        critical_classes: Sequence[int],
        weights: dict[str, float] | None,
        class_names: Mapping[int, str],
        score_threshold: float,
        iou: float,
    ) -> SetMetrics:
        """COCO metrics, and the recall of each critical class at the operating point (score
        >= `score_threshold`, IoU `iou`) with its mean over them (``op_recall_critical``)."""
        ones = np.ones((1, ev.n_images))
        full_m = ev.metrics_many(ones, critical_classes, weights)
        reps = ev.metrics_many(counts, critical_classes, weights)
        op_full = ev.recall_at(None, [score_threshold], iou, critical_classes)
        op_reps = ev.recall_at(counts, [score_threshold], iou, critical_classes)
        for k in critical_classes:
            name = metric_key(class_names[k])
            full_m[name], reps[name] = op_full[k][:, 0], op_reps[k][:, 0]
        crit_full = [op_full[k][:, 0] for k in critical_classes]
        crit_reps = [op_reps[k][:, 0] for k in critical_classes]
        full_m["op_recall_critical"] = _class_mean(crit_full, 1)
        reps["op_recall_critical"] = _class_mean(crit_reps, len(counts))
        full = {k: (None if np.isnan(v[0]) else float(v[0])) for k, v in full_m.items()}
        return cls(full, reps)


INTERVALS = ("seed_t", "percentile")  # hierarchical_diff's methods (the first: the default)


def hierarchical_diff(
    b: Sequence[SetMetrics],
    a: Sequence[SetMetrics] | SetMetrics | None,
    seed_idx: np.ndarray,
    metric: str,
    method: str = "seed_t",
    phase1_of: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Mean over seeds of B - A (A: one shared set, one set per seed paired with B's, or None
    for B's value itself), and its interval at CI_LEVEL.

    ``method``:

    - ``"seed_t"`` (the default): `seed_t_interval`, the seeds' share of the standard error
      (sample SD of the per-seed differences over sqrt(S)) at a t(S - 1) quantile and the
      image bootstrap's share (SD of the mean over all seeds) at the normal one, added in
      quadrature. It keeps its coverage at 3 seeds (benchmarks/bench_coverage.py), where the
      percentile interval does not: resampling 3 seeds with replacement underestimates their
      spread by a factor (S - 1) / S and has only 10 distinct draws.
    - ``"percentile"``: Efron's percentile interval of the hierarchical bootstrap; replicate r
      averages the differences of the seeds ``seed_idx[r]`` on image replicate r (shared by
      every set). Kept as the reference the coverage benchmark compares against.

    Also returned, whatever the method: `seed_spread`'s ``se``, ``seed_se``, ``image_se`` and
    ``df``, from which `seed_t_interval` rebuilds the interval at another level (the
    post-mortem's multiplicity adjustment).
    """
    n_seeds = len(b)
    if seed_idx.shape[1] != n_seeds:
        raise ValueError(f"seed_idx draws {seed_idx.shape[1]} seeds, B has {n_seeds}")
    a_list: list[SetMetrics | None]
    if a is None or isinstance(a, SetMetrics):
        a_list = [a] * n_seeds
    else:
        if len(a) != n_seeds:
            raise ValueError(f"A has {len(a)} seeds, B has {n_seeds}")
        a_list = list(a)
    groups: list[Sequence[SetMetrics | None]] = [b, a_list]
    out = linear_combination(groups, [1.0, -1.0], seed_idx, metric, method, phase1_of)
    if a is not None:

        def mean_full(sets: Sequence[SetMetrics | None]) -> float | None:
            vals = [None if s is None else s.full.get(metric) for s in sets]
            return None if None in vals else float(np.mean(vals))  # type: ignore[arg-type]

        out["value_a"] = mean_full(a_list)
        out["value_b"] = mean_full(b)
    return out


def linear_combination(
    groups: Sequence[Sequence[SetMetrics | None]],
    weights: Sequence[float],
    seed_idx: np.ndarray,
    metric: str,
    method: str = "seed_t",
    phase1_of: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Mean over seeds of ``sum_g w_g * group_g[seed]`` and its interval (`hierarchical_diff`
    is B - A; a factorial effect weighs eight cells). Every group holds one set per seed,
    paired by seed; a None set counts as 0 (the value of B itself). ``phase1_of``: the
    Phase 1 seed of each run (a study with several: `nested_spread`, and ``seed_idx`` from
    `nested_replicates`); None, one Phase 1 run."""
    if method not in INTERVALS:
        raise ValueError(f"interval method {method!r}: one of {INTERVALS}")
    n_seeds = len(groups[0])
    if any(len(g) != n_seeds for g in groups) or seed_idx.shape[1] != n_seeds:
        raise ValueError("every group, and seed_idx, must have one entry per seed")
    per_seed: list[float | None] = []
    rows = []
    for s in range(n_seeds):
        full = [None if g[s] is None else g[s].full.get(metric) for g in groups]  # type: ignore[union-attr]
        known = [0.0 if g[s] is None else f for g, f in zip(groups, full, strict=True)]
        per_seed.append(
            None
            if None in known
            else float(sum(w * f for w, f in zip(weights, known, strict=True)))  # type: ignore[misc]
        )
        rows.append(
            sum(
                w * (0.0 if g[s] is None else g[s].reps[metric])  # type: ignore[union-attr]
                for w, g in zip(weights, groups, strict=True)
            )
        )
    d = np.stack(
        [np.broadcast_to(np.asarray(r, dtype=np.float64), (seed_idx.shape[0],)) for r in rows]
    )
    diff = None if None in per_seed else float(np.mean(per_seed))  # type: ignore[arg-type]
    reps = d[seed_idx, np.arange(d.shape[1])[:, None]].mean(axis=1)  # [R]
    valid = reps[~np.isnan(reps)]
    spread = seed_spread(per_seed, d, phase1_of)
    ci = percentile_ci(reps) if method == "percentile" else seed_t_interval(diff, spread)
    return {
        "diff": diff,
        "ci": ci,
        "method": method,
        **spread,
        "n_seeds": n_seeds,
        "n_valid": int(valid.size),
        "frac_gt_0": float((valid > 0).mean()) if valid.size else None,
    }


def seed_spread(
    per_seed: Sequence[float | None], d: np.ndarray, phase1_of: Sequence[int] | None = None
) -> dict[str, Any]:
    """The standard error of a mean over seeds, from its two sources.

    ``per_seed``: each seed's difference on the full split; ``d`` ``[S, R]``: each seed's
    difference on every image replicate. The seeds' share (``seed_se``) is their sample
    standard deviation over sqrt(S), with S - 1 degrees of freedom (``df``; with one seed,
    none: its training variance is not covered); the images' share (``image_se``) is the
    bootstrap standard deviation of the mean over *all* seeds on the image replicates (the
    images are the same for every seed, so their error is shared, not averaged away).
    Written here because no library (scipy included) combines a t interval over a few seeds
    with a bootstrap variance over images.

    ``phase1_of`` (the study design, `nested_spread`): the Phase 1 seed each run started from.
    With two or more, the seeds' share is that of the Phase 1 seeds' means, which holds both
    training levels; with one (or None) the intervals are conditional on that Phase 1 run."""
    if any(v is None for v in per_seed):
        return {"se": None, "seed_se": None, "image_se": None, "df": None, "levels": None}
    mean_reps = d.mean(axis=0)
    mean_reps = mean_reps[~np.isnan(mean_reps)]
    image_var = float(np.var(mean_reps, ddof=1)) if mean_reps.size > 1 else 0.0
    values = np.asarray(per_seed, dtype=np.float64)
    if phase1_of is not None and len(set(phase1_of)) > 1:
        nested = nested_spread(values, phase1_of)
        se = float(np.sqrt(nested["seed_se"] ** 2 + image_var))
        return {**nested, "se": se, "image_se": float(np.sqrt(image_var))}
    s = len(per_seed)
    seed_var = float(np.var(values, ddof=1)) if s > 1 else 0.0
    return {
        "se": float(np.sqrt(seed_var / s + image_var)),
        "seed_se": float(np.sqrt(seed_var / s)),
        "image_se": float(np.sqrt(image_var)),
        "df": float(s - 1) if seed_var > 0 else None,  # None: no seed share
        "levels": "phase2_seeds+images" if s > 1 else "images",
    }


def nested_spread(values: np.ndarray, phase1_of: Sequence[int]) -> dict[str, Any]:
    """The training share of the standard error of a mean over a balanced nested design:
    P Phase 1 seeds, each with S Phase 2 seeds (``values``: one per run, ``phase1_of``: its
    Phase 1 seed).

    The grand mean's variance is var(Phase 1 means) / P, and var(Phase 1 means) already holds
    the Phase 2 seeds' share (sigma1^2 + sigma2^2 / S), so the interval is a t over the P
    means with P - 1 degrees of freedom: exact for normal effects, whatever the split between
    the levels. The variance components are the one-way ANOVA's (method of moments):
    ``phase2_var`` the pooled within-Phase-1 variance, ``phase1_var`` the between-means
    variance less its Phase 2 share (0 when negative), so a reader sees which level dominates."""
    groups = phase1_groups(phase1_of)
    x = np.asarray([[values[i] for i in g] for g in groups])  # [P, S]
    n_p1, n_p2 = x.shape
    means_var = float(np.var(x.mean(axis=1), ddof=1))
    within = float(np.var(x, axis=1, ddof=1).mean()) if n_p2 > 1 else None
    between = means_var - (within or 0.0) / n_p2
    return {
        "seed_se": float(np.sqrt(means_var / n_p1)),
        "df": float(n_p1 - 1) if means_var > 0 else None,
        "phase1_var": max(0.0, between) if within is not None else None,
        "phase2_var": within,
        "n_phase1": n_p1,
        "levels": "phase1_seeds+phase2_seeds+images" if n_p2 > 1 else "phase1_seeds+images",
    }


def _half_width(spread: dict[str, Any], level: float, power: float | None = None) -> float:
    """Each share at its own quantile, added in quadrature: t(S - 1) for the seeds, the
    normal one for the images. With the seeds dominating it is the exact t interval over
    seeds, with the images dominating the normal interval of the bootstrap; between the
    two it is a little wide. (A Welch-Satterthwaite t on the summed variance under-covers
    at 3 seeds: its estimated df grows exactly when the seeds' variance is small by chance,
    92.6 % at a 5x seed spread in benchmarks/bench_coverage.py.) With `power`, each quantile
    gains that of the power (`detectable_drop`)."""
    q = 1.0 - (1.0 - level / 100.0) / 2.0
    z = float(stats.norm.ppf(q)) + (float(stats.norm.ppf(power)) if power else 0.0)
    t = z
    if spread["df"] is not None:
        t = float(stats.t.ppf(q, spread["df"]))
        t += float(stats.t.ppf(power, spread["df"])) if power else 0.0
    return float(np.hypot(t * spread["seed_se"], z * spread["image_se"]))


def seed_t_interval(
    diff: float | None, spread: dict[str, Any], level: float = CI_LEVEL
) -> list[float | None]:
    """``diff ± half-width`` at `level` percent (`_half_width`; `spread`: `seed_spread`'s)."""
    if diff is None or spread.get("se") is None:
        return [None, None]
    h = _half_width(spread, level)
    return [diff - h, diff + h]


POWER = 0.8  # the probability `detectable_drop` asks of the rule to see a drop


def detectable_drop(spread: dict[str, Any], level: float, power: float = POWER) -> float | None:
    """The smallest true difference the interval at `level` would exclude 0 for in about
    `power` of repeated runs with this run's spread: the textbook ``(t_{1-a/2} + t_power) SE``
    (the sample-size formula of a t test), each share at its own quantile as in
    `_half_width`. A difference under the half-width is never declared, however exactly it is
    measured; this is what the rule can see at the seed count it ran. An approximation: with
    3 seeds the seed share of the SE is itself uncertain, which the t quantiles only price in."""
    return None if spread.get("se") is None else _half_width(spread, level, power)


def t_p_value(diff: float | None, spread: dict[str, Any]) -> float | None:
    """Two-sided p-value of ``diff = 0``, the dual of `seed_t_interval`: one minus the level
    at which the interval just touches 0."""
    if diff is None or spread.get("se") is None:
        return None
    if spread["se"] == 0:
        return 1.0 if diff == 0 else 0.0
    from scipy.optimize import brentq

    def gap(p: float) -> float:  # > 0 while the interval at level 1 - p still holds 0
        return _half_width(spread, 100.0 * (1.0 - p)) - abs(diff)

    if gap(1e-15) < 0:
        return 0.0
    if gap(1.0 - 1e-12) > 0:
        return 1.0
    return float(brentq(gap, 1e-15, 1.0 - 1e-12, xtol=1e-12))


def drift(
    epoch: Sequence[SetMetrics],
    reference: SetMetrics | Sequence[SetMetrics],
    seed_idx: np.ndarray,
    metrics: Sequence[str],
    phase1_of: Sequence[int] | None = None,
) -> dict[str, dict[str, Any]]:
    """Epoch k of each seed minus the Phase 1 reference (one set, or each seed's own Phase 1
    run in a study with several), on the same images, per metric."""
    return {
        m: hierarchical_diff(epoch, reference, seed_idx, m, phase1_of=phase1_of) for m in metrics
    }


def contrast(
    a: Sequence[SetMetrics],
    b: Sequence[SetMetrics],
    seed_idx: np.ndarray,
    metrics: Sequence[str],
    phase1_of: Sequence[int] | None = None,
) -> dict[str, dict[str, Any]]:
    """Variant b minus variant a, paired by seed, per metric."""
    return {m: hierarchical_diff(b, a, seed_idx, m, phase1_of=phase1_of) for m in metrics}
