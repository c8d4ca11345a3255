"""Tests of defectfusion.analysis.compare: the paired bootstrap of `defectfusion compare`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from common import NAMES
from defectfusion import cli
from defectfusion.analysis.compare import PerImageEval, compare_files, paired_bootstrap, resample
from defectfusion.core.errors import UserError
from defectfusion.core.fsutil import atomic_write_json
from defectfusion.data.coco import make_coco
from defectfusion.evaluation.metrics import coco_metrics

CRITICAL = [2, 3, 5]


def make_gt(seed: int, n_images: int = 40, crowd: bool = False) -> dict:
    rng = np.random.default_rng(seed)
    images, anns = [], []
    for i in range(1, n_images + 1):
        images.append({"id": i, "file_name": f"{i}.png", "width": 192, "height": 192})
        for _ in range(rng.integers(0, 4)):
            w, h = rng.uniform(8, 80, 2)
            x, y = rng.uniform(0, 192 - w), rng.uniform(0, 192 - h)
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i,
                    "category_id": int(rng.integers(0, len(NAMES))),
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": int(crowd and rng.random() < 0.1),
                }
            )
    return make_coco(images, anns, NAMES, {"dataset": "t"})


def noisy_predictions(gt: dict, seed: int, ties: bool = False) -> list[dict]:
    """Jittered GT boxes (some wrong class, some duplicated), misses and false positives."""
    rng = np.random.default_rng(seed + 1000)
    res = []
    for a in gt["annotations"]:
        for _ in range(rng.integers(0, 3)):
            x, y, w, h = a["bbox"]
            jx, jy, jw, jh = rng.normal(0, 0.12, 4) * [w, h, w, h]
            c = a["category_id"] if rng.random() < 0.8 else int(rng.integers(0, len(NAMES)))
            res.append(
                {
                    "image_id": a["image_id"],
                    "category_id": c,
                    "bbox": [x + jx, y + jy, max(1.0, w + jw), max(1.0, h + jh)],
                    "score": round(float(rng.uniform(0.2, 1.0)), 6),
                }
            )
    for im in gt["images"]:
        for _ in range(rng.integers(0, 6)):
            w, h = rng.uniform(5, 60, 2)
            res.append(
                {
                    "image_id": im["id"],
                    "category_id": int(rng.integers(0, len(NAMES))),
                    "bbox": [float(rng.uniform(0, 130)), float(rng.uniform(0, 130)), w, h],
                    "score": round(float(rng.uniform(0.0, 0.6)), 6),
                }
            )
    if ties:  # equal scores within an image: the layout of duplicated images matters
        for r in res[::3]:
            r["score"] = 0.5
    return res


def perfect(gt: dict, image_ids: set[int] | None = None) -> list[dict]:
    return [
        {
            "image_id": a["image_id"],
            "category_id": a["category_id"],
            "bbox": a["bbox"],
            "score": 0.9,
        }
        for a in gt["annotations"]
        if image_ids is None or a["image_id"] in image_ids
    ]


def perfect_gt(n_images: int = 40) -> dict:
    """Every image has one box of every critical class, so no replicate lacks one."""
    images, anns = [], []
    for i in range(1, n_images + 1):
        images.append({"id": i, "file_name": f"{i}.png", "width": 192, "height": 192})
        for j, c in enumerate(CRITICAL):
            box = [10.0 + 50 * j, 20.0, 40.0, 30.0]
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i,
                    "category_id": c,
                    "bbox": box,
                    "area": 1200.0,
                    "iscrowd": 0,
                }
            )
    return make_coco(images, anns, NAMES, {"dataset": "t"})


# ---- the fast path is coco_metrics on the materialised replicate -----------------------


def test_resample_gives_fresh_unique_ids() -> None:
    gt = make_gt(0, n_images=5)
    res = noisy_predictions(gt, 0)
    sample = [0, 0, 3, 4, 4, 4]
    g2, r2 = resample(gt, res, sample)
    ids = [im["id"] for im in g2["images"]]
    assert ids == list(range(1, 7))
    assert [im["file_name"] for im in g2["images"]] == [
        gt["images"][i]["file_name"] for i in sample
    ]
    ann_ids = [a["id"] for a in g2["annotations"]]
    assert ann_ids == list(range(1, len(ann_ids) + 1))
    per_image = {
        im["id"]: sum(a["image_id"] == im["id"] for a in gt["annotations"]) for im in gt["images"]
    }
    assert len(ann_ids) == sum(per_image[gt["images"][i]["id"]] for i in sample)
    assert {r["image_id"] for r in r2} <= set(ids)
    assert len(r2) == sum(sum(r["image_id"] == gt["images"][i]["id"] for r in res) for i in sample)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("ties", [False, True])
def test_fast_path_equals_coco_metrics(seed: int, ties: bool) -> None:
    gt = make_gt(seed, n_images=25, crowd=True)
    res = noisy_predictions(gt, seed, ties=ties)
    ev = PerImageEval(gt, res)
    rng = np.random.default_rng(seed)
    samples = [None] + [rng.integers(0, 25, 25) for _ in range(4)]
    for sample in samples:
        fast = ev.metrics(sample, CRITICAL)
        g, r = (gt, res) if sample is None else resample(gt, res, np.sort(sample))
        ref = coco_metrics(g, r, CRITICAL)
        for key, value in fast.items():
            if ref[key] is None:
                assert value is None, key
            else:
                assert value == pytest.approx(ref[key], abs=1e-12), key


def test_tied_scores_take_the_exact_layout() -> None:
    # The tie case really is exercised by the test above (not only the weighted path).
    gt = make_gt(1, n_images=25)
    ev = PerImageEval(gt, noisy_predictions(gt, 1, ties=True))
    assert any(c.exact_layout for c in ev.per_class)
    ev = PerImageEval(gt, noisy_predictions(gt, 1, ties=False))
    assert not any(c.exact_layout for c in ev.per_class)


# ---- the bootstrap -------------------------------------------------------------------------


def test_known_difference_is_detected() -> None:
    gt = perfect_gt()
    half = {im["id"] for im in gt["images"][::2]}
    out = paired_bootstrap(
        gt, perfect(gt, half), perfect(gt), CRITICAL, n_boot=200, seed=0, progress=False
    )
    m = out["metrics"]
    assert m["map"]["value_b"] == pytest.approx(1.0)
    assert m["map"]["value_a"] == pytest.approx(0.5, abs=0.02)
    assert m["map"]["diff"] == pytest.approx(m["map"]["value_b"] - m["map"]["value_a"])
    for key in ("map", "critical_recall", "composite"):
        lo, hi = m[key]["ci95"]
        assert 0 < lo <= m[key]["boot_mean_diff"] <= hi, key
        assert m[key]["diff"] > 0.3
        assert m[key]["frac_b_gt_a"] == 1.0
        assert m[key]["n_valid"] == 200
    assert m["critical_recall"]["value_a"] == pytest.approx(0.5)


def test_identical_models_differ_by_exactly_zero() -> None:
    gt = make_gt(3)
    res = noisy_predictions(gt, 3, ties=True)
    out = paired_bootstrap(gt, res, list(res), CRITICAL, n_boot=100, seed=1, progress=False)
    for key, m in out["metrics"].items():
        if m["value_a"] is None:
            continue
        assert m["diff"] == 0.0, key
        assert m["ci95"] == [0.0, 0.0], key
        assert m["boot_mean_diff"] == 0.0
        assert m["frac_b_gt_a"] == 0.0


def test_a_worse_model_b_gives_a_negative_interval() -> None:
    gt = perfect_gt()
    half = {im["id"] for im in gt["images"][::2]}
    out = paired_bootstrap(
        gt, perfect(gt), perfect(gt, half), CRITICAL, n_boot=100, seed=0, progress=False
    )
    lo, hi = out["metrics"]["map"]["ci95"]
    assert lo <= hi < 0
    assert out["metrics"]["map"]["frac_b_gt_a"] == 0.0


def write_case(tmp_path: Path, seed: int = 5) -> tuple[Path, Path, Path]:
    gt = make_gt(seed)
    data = atomic_write_json(tmp_path / "annotations" / "test.json", gt)
    a = atomic_write_json(tmp_path / "a.json", noisy_predictions(gt, seed))
    b = atomic_write_json(tmp_path / "b.json", noisy_predictions(gt, seed + 1))
    return a, b, data


def test_deterministic_for_a_seed(tmp_path: Path) -> None:
    a, b, data = write_case(tmp_path)
    r1 = compare_files(a, b, data, tmp_path / "c1.json", n_boot=50, seed=7)
    compare_files(a, b, data, tmp_path / "c2.json", n_boot=50, seed=7)
    r3 = compare_files(a, b, data, tmp_path / "c3.json", n_boot=50, seed=8)
    assert (tmp_path / "c1.json").read_bytes() == (tmp_path / "c2.json").read_bytes()
    assert r1["metrics"]["map"]["ci95"] != r3["metrics"]["map"]["ci95"]
    assert r1["metrics"]["map"]["diff"] == r3["metrics"]["map"]["diff"]  # full set: no resampling
    saved = json.loads((tmp_path / "c1.json").read_text())
    assert saved["n_boot"] == 50 and saved["seed"] == 7 and saved["critical_classes"] == CRITICAL
    assert set(saved["metrics"]) >= {"map", "critical_recall", "composite"}


def test_full_set_values_are_coco_metrics(tmp_path: Path) -> None:
    a, b, data = write_case(tmp_path)
    out = compare_files(a, b, data, tmp_path / "c.json", n_boot=5)
    gt = json.loads(data.read_text())
    for path, side in ((a, "value_a"), (b, "value_b")):
        ref = coco_metrics(gt, json.loads(path.read_text()), CRITICAL)
        for key in ("map", "critical_recall", "composite"):
            assert out["metrics"][key][side] == pytest.approx(ref[key], abs=1e-12)


def test_metrics_files_are_followed(tmp_path: Path) -> None:
    """A metrics file of `evaluate` names its predictions and its critical classes."""
    a, b, data = write_case(tmp_path)
    for name, pred in (("ma", a), ("mb", b)):
        # A relative path from another working directory: found beside the metrics file.
        atomic_write_json(
            tmp_path / f"{name}.json",
            {
                "predictions": f"elsewhere/{pred.name}",
                "critical_classes": [2, 3],
                "composite_weights": {"map": 1.0},
            },
        )
    out = compare_files(
        tmp_path / "ma.json", tmp_path / "mb.json", data, tmp_path / "c.json", n_boot=5
    )
    direct = compare_files(a, b, data, tmp_path / "d.json", n_boot=5)
    assert out["critical_classes"] == [2, 3] and direct["critical_classes"] == CRITICAL
    assert out["metrics"]["map"]["diff"] == direct["metrics"]["map"]["diff"]
    assert out["metrics"]["composite"]["value_a"] == out["metrics"]["map"]["value_a"]


def test_config_overrides_metrics_files(tmp_path: Path) -> None:
    from defectfusion.config import load_config

    a, b, data = write_case(tmp_path)
    cfg = load_config(None, ["data.critical_classes=[5]"])
    out = compare_files(a, b, data, tmp_path / "c.json", n_boot=5, config=cfg)
    assert out["critical_classes"] == [5]


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b, data = write_case(tmp_path)
    argv = [
        "compare",
        "--a",
        str(a),
        "--b",
        str(b),
        "--data",
        str(data),
        "--out",
        str(tmp_path / "c.json"),
    ]
    assert cli.main([*argv, "--n-boot", "20"]) == 0
    assert json.loads((tmp_path / "c.json").read_text())["n_boot"] == 20
    bad = tmp_path / "bad.json"
    atomic_write_json(
        bad, [{"image_id": 999, "category_id": 0, "bbox": [0, 0, 1, 1], "score": 0.5}]
    )
    capsys.readouterr()
    argv[2] = str(bad)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "image_id 999" in err


def test_bad_inputs_are_one_line_user_errors(tmp_path: Path) -> None:
    a, _, data = write_case(tmp_path)
    atomic_write_json(tmp_path / "x.json", {"map": 0.5})
    with pytest.raises(UserError, match="predictions"):
        compare_files(tmp_path / "x.json", a, data, tmp_path / "c.json", n_boot=5)
    with pytest.raises(UserError, match="class id 9"):
        compare_files(a, a, data, tmp_path / "c.json", n_boot=5, config=_cfg(critical=[9]))
    with pytest.raises(UserError, match="folder"):
        compare_files(a, a, tmp_path, tmp_path / "c.json", n_boot=5)
    assert not (tmp_path / "c.json").exists()


@pytest.mark.parametrize(
    "field, value",
    [
        ("score", float("nan")),
        ("score", float("inf")),
        ("score", True),
        ("bbox", [0, 0, float("nan"), 4]),
    ],
)
def test_a_non_finite_prediction_is_refused_not_ranked(
    tmp_path: Path, field: str, value: object
) -> None:
    """A NaN score used to rank silently: rc 0 and a plausible, wrong mAP (issue 27)."""
    from defectfusion.evaluation.metrics import check_results

    gt = make_gt(0, n_images=4)
    results = noisy_predictions(gt, 0)
    results[0][field] = value
    with pytest.raises(UserError, match=f"record 0: {field} must"):
        check_results(gt, results)


def _cfg(critical: list[int]):
    from defectfusion.config import load_config

    return load_config(None, [f"data.critical_classes={critical}"])


@pytest.mark.parametrize(
    "field, value, word",
    [
        ("predictions", 7, "'predictions' is 7"),
        ("predictions", ["a.json"], "'predictions' is"),
        ("critical_classes", 3, "critical_classes 3"),
        ("composite_weights", {"map": "high"}, "composite_weights"),
    ],
)
def test_a_metrics_file_with_values_of_the_wrong_type_is_one_line(
    tmp_path: Path, field: str, value: object, word: str
) -> None:
    """An integer where a path is expected ended in `TypeError` (issue 27); its neighbours,
    a metrics file's critical classes and weights, are held to the checkpoint meta's rule."""
    a, _, data = write_case(tmp_path)
    metrics = {"predictions": a.name, "critical_classes": [2], "composite_weights": {"map": 1}}
    metrics[field] = value
    atomic_write_json(tmp_path / "m.json", metrics)
    with pytest.raises(UserError, match=word) as e:
        compare_files(tmp_path / "m.json", a, data, tmp_path / "c.json", n_boot=5)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "c.json").exists()
