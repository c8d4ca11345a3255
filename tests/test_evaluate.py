"""Tests of defectfusion.evaluation.evaluate: post-processing, COCO metrics, confusion matrix, the command."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from defectfusion.core.errors import UserError
from defectfusion.data.coco import make_coco, write_split
from defectfusion.evaluation import evaluate as ev
from defectfusion.evaluation import metrics

NAMES = ["normal", "perforation", "fracture", "scratch"]


# ---- helpers ---------------------------------------------------------------------------


def synthetic_gt(seed: int, n_images: int = 12, n_classes: int = 4) -> dict:
    """Images of several sizes (so every area range is populated) with 0-5 boxes each."""
    rng = np.random.default_rng(seed)
    images, anns = [], []
    for i in range(1, n_images + 1):
        w, h = [(192, 192), (200, 200), (640, 480), (256, 192)][i % 4]
        images.append({"id": i, "file_name": f"{i}.png", "width": w, "height": h})
        for _ in range(rng.integers(0, 6)):
            bw, bh = rng.uniform(3, min(w, h) * 0.8, 2)
            x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            c = int(rng.integers(0, n_classes - 1))  # the last class never has GT
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i,
                    "category_id": c,
                    "bbox": [x, y, bw, bh],
                    "area": bw * bh,
                    "iscrowd": 0,
                }
            )
    return make_coco(images, anns, NAMES[:n_classes], {"dataset": "t"})


def synthetic_predictions(gt: dict, seed: int) -> list[dict]:
    """Jittered GT boxes (some with the wrong class, some duplicated), misses, false positives."""
    rng = np.random.default_rng(seed + 1000)
    k = len(gt["categories"])
    sizes = {im["id"]: (im["width"], im["height"]) for im in gt["images"]}
    res = []
    for a in gt["annotations"]:
        for _ in range(rng.integers(0, 3)):  # 0: a miss, 2: a duplicate
            x, y, w, h = a["bbox"]
            j = rng.normal(0, 0.15, 4) * [w, h, w, h]
            c = a["category_id"] if rng.random() < 0.8 else int(rng.integers(0, k))
            box = [x + j[0], y + j[1], max(w + j[2], 1.0), max(h + j[3], 1.0)]
            res.append(
                {"image_id": a["image_id"], "category_id": c, "bbox": box, "score": rng.random()}
            )
    for image_id, (iw, ih) in sizes.items():
        for _ in range(rng.integers(0, 6)):  # false positives anywhere
            w, h = rng.uniform(2, iw / 2), rng.uniform(2, ih / 2)
            box = [rng.uniform(0, iw - w), rng.uniform(0, ih - h), w, h]
            c = int(rng.integers(0, k))
            res.append({"image_id": image_id, "category_id": c, "bbox": box, "score": rng.random()})
    return [
        {**r, "bbox": [round(float(v), 5) for v in r["bbox"]], "score": round(float(r["score"]), 6)}
        for r in res
    ]


def perfect_predictions(gt: dict) -> list[dict]:
    return [
        {
            "image_id": a["image_id"],
            "category_id": a["category_id"],
            "bbox": a["bbox"],
            "score": 1.0,
        }
        for a in gt["annotations"]
    ]


def same(ours: float | None, coco: float) -> bool:
    """Our null is COCO's -1."""
    return coco == -1 if ours is None else abs(ours - coco) <= 1e-9


# ---- postprocess and predict -----------------------------------------------------------


def hand_topk(logits, boxes, sizes, k):
    """Top-k (query, class) pairs by sigmoid score, boxes to xyxy pixels, written out by hand."""
    out = []
    for lg, bx, (h, w) in zip(logits, boxes, sizes, strict=True):
        scores = torch.sigmoid(lg).flatten()
        order = torch.argsort(scores, descending=True)[:k]
        q, c = order // lg.shape[1], order % lg.shape[1]
        cx, cy, bw, bh = bx[q].unbind(-1)
        xyxy = torch.stack(
            [(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h], -1
        )
        out.append({"scores": scores[order], "labels": c, "boxes": xyxy})
    return out


@pytest.mark.parametrize("max_dets", [3, 300])
def test_postprocess_equals_hand_topk(max_dets):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 7, 3, generator=g) * 3
    boxes = torch.rand(2, 7, 4, generator=g) * 0.5 + 0.25
    sizes = [(100, 200), (48, 64)]
    got = ev.postprocess(logits, boxes, sizes, max_dets=max_dets)
    want = hand_topk(logits, boxes, sizes, min(max_dets, 7))  # RT-DETR keeps Q = 7 pairs
    for d, e in zip(got, want, strict=True):
        assert len(d["scores"]) == min(max_dets, 7)
        for key in ("scores", "labels", "boxes"):
            torch.testing.assert_close(d[key], e[key])


def test_postprocess_ranks_query_class_pairs():
    # Query 0 is confident for two classes: both pairs beat query 1's best class.
    logits = torch.tensor([[[5.0, 4.0, -9.0], [3.0, -9.0, -9.0]]])
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.25, 0.25, 0.1, 0.1]]])
    (d,) = ev.postprocess(logits, boxes, [(10, 20)])
    assert d["labels"].tolist() == [0, 1]
    torch.testing.assert_close(d["boxes"][0], torch.tensor([8.0, 3.0, 12.0, 7.0]))


class FixedDetector(nn.Module):
    """Returns the same logits and boxes for every image (tiny stand-in for DEIMv2)."""

    def __init__(self, logits: torch.Tensor, boxes: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("logits", logits)
        self.register_buffer("boxes", boxes)
        self.frozen = nn.BatchNorm1d(2)
        self.seen_training: list[bool] = []

    def forward(self, pixel_values: torch.Tensor) -> SimpleNamespace:
        self.seen_training.append(self.training)
        b = pixel_values.shape[0]
        return SimpleNamespace(
            logits=self.logits.expand(b, -1, -1), pred_boxes=self.boxes.expand(b, -1, -1)
        )


def test_predict_records_and_restores_modes():
    logits = torch.tensor([[2.0, -3.0], [-1.0, 0.5], [-5.0, -6.0]])
    boxes = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.25, 0.5, 0.1, 0.2], [0.1, 0.1, 0.1, 0.1]])
    model = FixedDetector(logits, boxes)
    model.train()
    model.frozen.eval()  # a frozen module a training loop keeps in eval mode
    loader = [
        (
            torch.zeros(2, 3, 32, 32),
            [{"image_id": 1, "orig_size": (48, 64)}, {"image_id": 2, "orig_size": (100, 100)}],
        ),
        (torch.zeros(1, 3, 32, 32), [{"image_id": 3, "orig_size": (10, 20)}]),
    ]
    recs = ev.predict(model, loader, max_dets=2, progress=False)
    assert model.seen_training == [False, False]
    assert model.training and not model.frozen.training
    assert [r["image_id"] for r in recs] == [1, 1, 2, 2, 3, 3]
    first = recs[0]
    assert first == {
        "image_id": 1,
        "category_id": 0,
        "bbox": [16.0, 12.0, 32.0, 24.0],
        "score": round(float(torch.sigmoid(torch.tensor(2.0))), 6),
    }
    assert recs[1]["category_id"] == 1 and recs[1]["bbox"] == pytest.approx([12.8, 19.2, 6.4, 9.6])
    assert all(len(str(v).split(".")[-1]) <= 5 for r in recs for v in r["bbox"])


# ---- COCO metrics: agreement with pycocotools -------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_faster_coco_eval_agrees_with_pycocotools(seed):
    gt = synthetic_gt(seed)
    res = synthetic_predictions(gt, seed)
    m = metrics.coco_metrics(gt, res, critical_classes=[2])
    ref = metrics.pycocotools_metrics(gt, res)
    assert 0.05 < ref[0] < 0.95  # a non-trivial case
    np.testing.assert_allclose(m["stats_100"], ref, rtol=0, atol=1e-9)
    assert m["map"] == m["stats_100"][0] and m["ar_100"] == m["stats_100"][8]

    # The size-relative area ranges.
    rel = metrics.pycocotools_metrics(gt, res, area_thresholds_px2=m["area"]["thresholds_px2"])
    for i, a in enumerate(("small", "medium", "large")):
        assert same(m["area"][f"ap_{a}"], rel[3 + i])
        assert same(m["area"][f"ar_{a}"], rel[9 + i])

    # Per class: pycocotools restricted to that class.
    for name, pc in m["per_class"].items():
        one = metrics.pycocotools_metrics(gt, res, cat_ids=[pc["id"]])
        assert same(pc["ap"], one[0]), name
        assert same(pc["ap50"], one[1]), name
        assert same(pc["recall"], one[8]), name


def test_max_dets_300_agrees_with_pycocotools():
    gt = synthetic_gt(3, n_images=4)
    res = synthetic_predictions(gt, 3)
    # 150 confident false positives in each image push the true positives past rank 100.
    for im in gt["images"]:
        res += [
            {"image_id": im["id"], "category_id": 0, "bbox": [0.0, 0.0, 1.0, 1.0], "score": 1.0}
            for _ in range(150)
        ]
    m = metrics.coco_metrics(gt, res, critical_classes=[2])
    ref = metrics.pycocotools_metrics(gt, res, max_dets=(1, 10, 300))
    assert m["ar_300"] > m["ar_100"]  # maxDets matters here
    assert same(m["map50_300"], ref[1])
    assert same(m["ar_300"], ref[8])
    np.testing.assert_allclose(m["stats_100"], metrics.pycocotools_metrics(gt, res), atol=1e-9, rtol=0)


# ---- COCO metrics: values --------------------------------------------------------------


def test_perfect_predictions_score_one():
    gt = synthetic_gt(0)
    m = metrics.coco_metrics(gt, perfect_predictions(gt), critical_classes=[1, 2])
    assert m["map"] == m["map50"] == m["map_300"] == m["ar_100"] == 1.0
    assert m["critical_recall"] == m["critical_recall50"] == m["composite"] == 1.0
    assert m["per_class"]["scratch"] == {
        "id": 3, "ap": None, "ap50": None, "recall": None, "recall50": None, "n_gt": 0,
    }  # fmt: skip
    assert sum(pc["n_gt"] for pc in m["per_class"].values()) == len(gt["annotations"])
    assert m["n_predictions"] == len(gt["annotations"]) and m["n_images"] == 12


def test_empty_results_are_zero_not_a_crash():
    gt = synthetic_gt(0)
    m = metrics.coco_metrics(gt, [], critical_classes=[2, 3])
    assert m["map"] == m["map50"] == m["ar_300"] == m["composite"] == 0.0
    assert m["critical_recall"] == 0.0
    assert m["per_class"]["fracture"]["recall"] == 0.0
    assert m["per_class"]["scratch"]["recall"] is None
    assert m["n_predictions"] == 0
    assert metrics.pycocotools_metrics(gt, [])[0] == 0.0
    json.dumps(m, allow_nan=False)


def test_class_without_gt_is_left_out_of_critical_means():
    gt = synthetic_gt(1)
    res = synthetic_predictions(gt, 1)
    m = metrics.coco_metrics(gt, res, critical_classes=[2, 3])  # scratch (3) has no GT
    pc = m["per_class"]
    assert pc["scratch"]["recall"] is None
    assert m["critical_recall"] == pc["fracture"]["recall"]
    assert m["critical_recall50"] == pc["fracture"]["recall50"]
    both = metrics.coco_metrics(gt, res, critical_classes=[1, 2])
    assert both["critical_recall"] == pytest.approx(
        (pc["perforation"]["recall"] + pc["fracture"]["recall"]) / 2
    )
    assert metrics.coco_metrics(gt, res, critical_classes=[3])["critical_recall"] is None
    assert metrics.coco_metrics(gt, res, critical_classes=[3])["composite"] is None


def test_recall50_counts_loose_boxes():
    # One GT, one prediction at IoU 0.58: found at IoU .5, not at the stricter thresholds.
    gt = make_coco(
        [{"id": 1, "file_name": "a.png", "width": 100, "height": 100}],
        [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 0,
                "bbox": [0, 0, 10, 10],
                "area": 100,
                "iscrowd": 0,
            }
        ],
        ["a"],
        {},
    )
    res = [{"image_id": 1, "category_id": 0, "bbox": [0, 0, 10, 5.8], "score": 0.9}]
    m = metrics.coco_metrics(gt, res, critical_classes=[0])
    pc = m["per_class"]["a"]
    assert pc["recall50"] == 1.0 and m["critical_recall50"] == 1.0
    assert pc["recall"] == pytest.approx(0.2)  # IoU .50 and .55 of the 10 thresholds
    assert m["map50"] == 1.0


def test_composite_and_weights():
    gt = synthetic_gt(2)
    m = metrics.coco_metrics(gt, synthetic_predictions(gt, 2), critical_classes=[0, 2])
    assert m["composite"] == pytest.approx(0.7 * m["map"] + 0.3 * m["critical_recall"])
    assert m["composite_weights"] == {"map": 0.7, "critical_recall": 0.3}
    w = {"map50": 0.5, "critical_recall50": 0.5}
    m2 = metrics.coco_metrics(gt, synthetic_predictions(gt, 2), [0, 2], composite_weights=w)
    assert m2["composite"] == pytest.approx(0.5 * m2["map50"] + 0.5 * m2["critical_recall50"])
    with pytest.raises(UserError, match="unknown metric 'mAP'"):
        metrics.coco_metrics(gt, [], [0], composite_weights={"mAP": 1.0})


def test_area_thresholds_scale_with_image_side():
    def gt_of(side):
        return make_coco(
            [{"id": 1, "file_name": "a", "width": side, "height": side}], [], ["a"], {}
        )

    assert metrics.area_thresholds(gt_of(640)) == (640.0, 1024.0, 9216.0)
    assert metrics.area_thresholds(gt_of(192)) == (192.0, 92.16, 829.44)
    assert metrics.area_thresholds(gt_of(200))[1:] == (100.0, 900.0)
    m = metrics.coco_metrics(gt_of(200), [], [0])
    assert m["area"]["thresholds_px2"] == [100.0, 900.0] and m["map"] is None


def test_bad_inputs_are_user_errors():
    gt = synthetic_gt(0)
    with pytest.raises(UserError, match="class id 7"):
        metrics.coco_metrics(gt, [], critical_classes=[7])
    bad = [{"image_id": 99, "category_id": 0, "bbox": [0, 0, 1, 1], "score": 0.5}]
    with pytest.raises(UserError, match="record 0: image_id 99"):
        metrics.coco_metrics(gt, bad, critical_classes=[0])
    bad = [{"image_id": 1, "category_id": 9, "bbox": [0, 0, 1, 1], "score": 0.5}]
    with pytest.raises(UserError, match="category_id 9"):
        metrics.confusion_matrix(gt, bad)


def test_metrics_do_not_mutate_results():
    gt = synthetic_gt(0)
    res = synthetic_predictions(gt, 0)
    before = json.dumps(res)
    metrics.coco_metrics(gt, res, [0])
    metrics.pycocotools_metrics(gt, res)
    assert json.dumps(res) == before


# ---- confusion matrix ------------------------------------------------------------------


def box_gt(boxes: list[tuple[int, list[float]]]) -> dict:
    anns = [
        {"id": i + 1, "image_id": 1, "category_id": c, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
        for i, (c, b) in enumerate(boxes)
    ]
    return make_coco(
        [{"id": 1, "file_name": "a", "width": 200, "height": 200}], anns, ["a", "b", "c"], {}
    )


def det(c: int, box: list[float], score: float) -> dict:
    return {"image_id": 1, "category_id": c, "bbox": box, "score": score}


def test_confusion_matrix_hand_built_cases():
    gt = box_gt(
        [
            (0, [0, 0, 20, 20]),  # found with the right class
            (2, [50, 50, 20, 20]),  # found as class 1 (a confusion)
            (1, [100, 100, 20, 20]),  # missed
            (1, [150, 0, 20, 20]),  # only a box at IoU < .5 and one under the score threshold
        ]
    )
    res = [
        det(0, [1, 1, 20, 20], 0.9),
        det(0, [0, 0, 20, 20], 0.8),  # duplicate on the already matched GT: false positive
        det(1, [50, 50, 20, 20], 0.7),
        det(2, [0, 150, 20, 20], 0.6),  # on background: false positive
        det(1, [160, 0, 20, 20], 0.5),  # IoU 1/3 with GT 4: false positive
        det(1, [150, 0, 20, 20], 0.1),  # under the score threshold: ignored
    ]
    cm = metrics.confusion_matrix(gt, res, iou_threshold=0.5, score_threshold=0.3)
    assert cm["classes"] == ["a", "b", "c", "background"]
    assert cm["matrix"] == [
        [1, 0, 0, 0],
        [0, 0, 0, 2],
        [0, 1, 0, 0],
        [1, 1, 1, 0],
    ]
    assert (cm["iou_threshold"], cm["score_threshold"]) == (0.5, 0.3)
    # A looser IoU turns the near-miss into a match, a lower score threshold adds nothing new.
    loose = metrics.confusion_matrix(gt, res, iou_threshold=0.3, score_threshold=0.05)
    assert loose["matrix"][1] == [0, 1, 0, 1]
    assert loose["matrix"][3] == [1, 1, 1, 0]  # the 0.1 box finds GT 4 already taken


def test_confusion_matrix_matches_best_score_first():
    gt = box_gt([(0, [0, 0, 20, 20])])
    # The wrong class scores higher, so it takes the GT; the right class becomes a FP.
    res = [det(0, [0, 0, 20, 20], 0.6), det(2, [0, 0, 20, 20], 0.9)]
    m = metrics.confusion_matrix(gt, res)["matrix"]
    assert m[0] == [0, 0, 1, 0] and m[3] == [1, 0, 0, 0]


def test_confusion_matrix_totals():
    gt = synthetic_gt(4)
    res = synthetic_predictions(gt, 4)
    m = np.array(metrics.confusion_matrix(gt, res)["matrix"])
    assert m[:-1].sum() == len(gt["annotations"])  # every GT box once: matched or missed
    assert m[:, :-1].sum() == sum(r["score"] >= 0.3 for r in res)  # every kept detection once
    assert m[-1, -1] == 0


def test_row_normalized():
    cm = {"matrix": [[1, 3, 0], [0, 0, 0], [2, 0, 0]]}
    r = metrics.row_normalized(cm)
    np.testing.assert_allclose(r[0], [0.25, 0.75, 0.0])
    assert np.isnan(r[1]).all()
    np.testing.assert_allclose(r[2], [1.0, 0.0, 0.0])


# ---- evaluate_checkpoint (load_detector faked) -------------------------------------------


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Path:
    """Three non-square images, each with one class-2 box in the middle half."""
    images, anns = [], []
    for i, (w, h) in enumerate([(64, 48), (80, 60), (48, 64)], start=1):
        Image.new("RGB", (w, h), (90, 90, 90)).save(tmp_path / f"img{i}.png")
        images.append({"id": i, "file_name": f"img{i}.png", "width": w, "height": h})
        box = [w / 4, h / 4, w / 2, h / 2]
        anns.append(
            {"id": i, "image_id": i, "category_id": 2, "bbox": box, "area": w * h / 4, "iscrowd": 0}
        )
    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    for p in tmp_path.glob("img*.png"):
        p.rename(root / "images" / p.name)
    return write_split(root, "test", make_coco(images, anns, NAMES, {"dataset": "tiny"}))


def fake_checkpoint_module(monkeypatch, names: list[str]) -> None:
    """Stand evaluation's `load_detector` in with one giving a `FixedDetector`."""
    # Query 0: class 2, centred box of half the image (right in every image, whatever its size).
    logits = torch.full((5, 4), -6.0)  # 4 classes, whatever `names` claims
    logits[0, 2] = 4.0
    logits[1:, 0] = torch.linspace(-1.0, -3.0, 4)
    boxes = torch.tensor(
        [[0.5, 0.5, 0.5, 0.5]] + [[0.1 + 0.2 * i, 0.1, 0.05, 0.05] for i in range(4)]
    )
    meta = {
        "image_size": 32,
        "class_names": names,
        "critical_classes": [2, 3],
        "composite_weights": {"map": 0.7, "critical_recall": 0.3},
        "preset": "fake",
    }

    def load_detector(path, device="cpu"):
        return FixedDetector(logits, boxes).to(device), meta

    monkeypatch.setattr(ev, "load_detector", load_detector)


def test_evaluate_checkpoint_writes_metrics_and_predictions(tiny_dataset, tmp_path, monkeypatch):
    fake_checkpoint_module(monkeypatch, NAMES)
    out = tmp_path / "eval" / "metrics.json"
    m = ev.evaluate_checkpoint(tmp_path / "model.pt", tiny_dataset, out)
    on_disk = json.loads(out.read_text())
    assert on_disk == json.loads(json.dumps(m))
    assert m["map"] == 1.0 and m["critical_recall"] == 1.0  # boxes mapped back to each size
    assert m["composite"] == pytest.approx(0.7 + 0.3 * 1.0)
    assert m["preset"] == "fake" and m["checkpoint"] == str(tmp_path / "model.pt")
    # Only query 0 passes the 0.3 score threshold: one right box per image.
    assert m["confusion"]["matrix"] == [[0] * 5, [0] * 5, [0, 0, 3, 0, 0], [0] * 5, [0] * 5]
    preds = json.loads((tmp_path / "eval" / "metrics.predictions.json").read_text())
    assert m["predictions"] == str(tmp_path / "eval" / "metrics.predictions.json")
    assert len(preds) == m["n_predictions"] == 3 * 5
    assert preds[0] == {
        "image_id": 1,
        "category_id": 2,
        "bbox": [16.0, 12.0, 32.0, 24.0],
        "score": preds[0]["score"],
    }
    # Same inputs, byte-identical files.
    first = out.read_bytes()
    ev.evaluate_checkpoint(tmp_path / "model.pt", tiny_dataset, out)
    assert out.read_bytes() == first


def test_evaluate_checkpoint_refuses_other_classes(tiny_dataset, tmp_path, monkeypatch):
    fake_checkpoint_module(monkeypatch, ["x", "y"])
    with pytest.raises(UserError, match=r"dataset classes .*normal.* differ .*\['x', 'y'\]"):
        ev.evaluate_checkpoint(tmp_path / "model.pt", tiny_dataset, tmp_path / "m.json")
    assert not (tmp_path / "m.json").exists()
