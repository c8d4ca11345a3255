"""importers.py: NEU-DET (VOC and YOLO layouts) and any COCO dataset into the project layout."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import numpy as np
import pytest
from PIL import Image

from defectfusion.core.errors import UserError
from defectfusion.data import coco
from defectfusion.data.importers import NEU_CLASSES, import_coco, import_neu
from defectfusion.data.validate import validate_path

NEU = Path(__file__).parents[2] / "shared/datasets/neu-det"
requires_neu = pytest.mark.skipif(
    not (NEU / "labels").is_dir(), reason=f"NEU-DET not found at {NEU}"
)


# ---- helpers: build YOLO and VOC copies --------------------------------------------------


def _jpg(path: Path, size: tuple[int, int] = (200, 200), seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def _yolo_boxes(label: Path) -> list[tuple[int, list[float]]]:
    rows = [line.split() for line in label.read_text().splitlines() if line.strip()]
    return [(int(r[0]), [float(v) for v in r[1:]]) for r in rows]


def _write_voc(xml: Path, image: Path, boxes: list[tuple[int, list[float]]], names=NEU_CLASSES):
    """Pascal VOC from YOLO boxes: the inverse of the importer's reading (x = xmin)."""
    w, h = Image.open(image).size
    objects = []
    for cls, (cx, cy, bw, bh) in boxes:
        corners = [(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h]
        xmin, ymin, xmax, ymax = (round(v) for v in corners)
        objects.append(
            f"<object><name>{escape(names[cls])}</name><pose>Unspecified</pose>"
            f"<truncated>0</truncated><difficult>0</difficult><bndbox><xmin>{xmin}</xmin>"
            f"<ymin>{ymin}</ymin><xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox></object>"
        )
    xml.parent.mkdir(parents=True, exist_ok=True)
    xml.write_text(
        f"<annotation><folder>IMAGES</folder><filename>{image.name}</filename>"
        f"<size><width>{w}</width><height>{h}</height><depth>3</depth></size>"
        + "".join(objects)
        + "</annotation>"
    )


def _neu_subset(tmp: Path, per_class: int = 2) -> tuple[Path, Path]:
    """YOLO and VOC copies of the first `per_class` NEU-DET images of each class."""
    yolo, voc = tmp / "yolo", tmp / "voc"
    for name in NEU_CLASSES:
        for img in sorted((NEU / "images").glob(f"{name}_*.jpg"))[:per_class]:
            label = NEU / "labels" / f"{img.stem}.txt"
            for folder, src in (("images", img), ("labels", label)):
                (yolo / folder).mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, yolo / folder / src.name)
            (voc / "IMAGES").mkdir(parents=True, exist_ok=True)
            shutil.copyfile(img, voc / "IMAGES" / img.name)
            _write_voc(voc / "ANNOTATIONS" / f"{img.stem}.xml", img, _yolo_boxes(label))
    return yolo, voc


def _split_bytes(root: Path) -> dict[str, bytes]:
    return {s: coco.split_path(root, s).read_bytes() for s in coco.SPLITS}


def _load(root: Path, split: str) -> dict[str, Any]:
    return json.loads(coco.split_path(root, split).read_text())


def _synthetic_yolo(root: Path, n: int = 12, seed: int = 0) -> Path:
    """A YOLO-layout NEU look-alike with integer-pixel boxes, for tests without NEU-DET."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        name = f"{NEU_CLASSES[i % 6]}_{i}"
        _jpg(root / "images" / f"{name}.jpg", seed=i)
        lines = []
        for _ in range(int(rng.integers(1, 4))):
            x1, y1 = (int(v) for v in rng.integers(1, 150, 2))
            x2, y2 = x1 + int(rng.integers(5, 50)), y1 + int(rng.integers(5, 50))
            cx, cy, w, h = (x1 + x2) / 400, (y1 + y2) / 400, (x2 - x1) / 200, (y2 - y1) / 200
            lines.append(f"{i % 6} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}")
        (root / "labels").mkdir(parents=True, exist_ok=True)
        (root / "labels" / f"{name}.txt").write_text("\n".join(lines) + "\n")
    return root


def _voc_from_yolo(yolo: Path, voc: Path) -> Path:
    for img in sorted((yolo / "images").glob("*.jpg")):
        (voc / "IMAGES").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(img, voc / "IMAGES" / img.name)
        boxes = _yolo_boxes(yolo / "labels" / f"{img.stem}.txt")
        _write_voc(voc / "ANNOTATIONS" / f"{img.stem}.xml", img, boxes)
    return voc


# ---- NEU-DET: both layouts agree ---------------------------------------------------------


def test_voc_and_yolo_layouts_give_identical_json_synthetic(tmp_path: Path) -> None:
    yolo = _synthetic_yolo(tmp_path / "yolo")
    voc = _voc_from_yolo(yolo, tmp_path / "voc")
    a = import_neu(yolo, tmp_path / "out_yolo", seed=3)
    b = import_neu(voc, tmp_path / "out_voc", seed=3)
    assert (a["layout"], b["layout"]) == ("yolo", "voc")
    assert _split_bytes(tmp_path / "out_yolo") == _split_bytes(tmp_path / "out_voc")
    assert sum(a["images"].values()) == 12


@pytest.mark.neu
@requires_neu
def test_voc_and_yolo_layouts_give_identical_json_neu(tmp_path: Path) -> None:
    yolo, voc = _neu_subset(tmp_path)
    a = import_neu(yolo, tmp_path / "out_yolo")
    b = import_neu(voc, tmp_path / "out_voc")
    assert _split_bytes(tmp_path / "out_yolo") == _split_bytes(tmp_path / "out_voc")
    assert sum(a["images"].values()) == sum(b["images"].values()) == 12
    train = _load(tmp_path / "out_voc", "train")
    assert [c["name"] for c in train["categories"]] == list(NEU_CLASSES)
    assert all(im["source_file"] == im["file_name"] for im in train["images"])
    for im in train["images"]:
        assert (tmp_path / "out_voc" / "images" / im["file_name"]).read_bytes() == (
            NEU / "images" / im["source_file"]
        ).read_bytes()


def test_voc_class_names_match_case_insensitively(tmp_path: Path) -> None:
    yolo = _synthetic_yolo(tmp_path / "yolo", n=6)
    voc = tmp_path / "voc"
    names = ("Crazing", "INCLUSION", "patches", "Pitted Surface", "Rolled_in_Scale", "scratches")
    for img in sorted((yolo / "images").glob("*.jpg")):
        (voc / "IMAGES").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(img, voc / "IMAGES" / img.name)
        boxes = _yolo_boxes(yolo / "labels" / f"{img.stem}.txt")
        _write_voc(voc / "ANNOTATIONS" / f"{img.stem}.xml", img, boxes, names=names)
    import_neu(yolo, tmp_path / "a")
    import_neu(voc, tmp_path / "b")
    assert _split_bytes(tmp_path / "a") == _split_bytes(tmp_path / "b")


def test_same_seed_same_bytes_other_seed_other_split(tmp_path: Path) -> None:
    yolo = _synthetic_yolo(tmp_path / "yolo", n=30)
    import_neu(yolo, tmp_path / "a", seed=0)
    import_neu(yolo, tmp_path / "b", seed=0)
    import_neu(yolo, tmp_path / "c", seed=1)
    assert _split_bytes(tmp_path / "a") == _split_bytes(tmp_path / "b")
    assert _split_bytes(tmp_path / "a") != _split_bytes(tmp_path / "c")
    # re-importing over an earlier dataset replaces it
    import_neu(yolo, tmp_path / "a", seed=1)
    assert _split_bytes(tmp_path / "a") == _split_bytes(tmp_path / "c")


def test_image_without_boxes_is_kept_and_counted(tmp_path: Path) -> None:
    yolo = _synthetic_yolo(tmp_path / "yolo", n=6)
    (yolo / "labels" / "crazing_0.txt").write_text("")
    result = import_neu(yolo, tmp_path / "out")
    assert result["empty_images"] == 1
    assert sum(result["images"].values()) == 6


# ---- NEU-DET: bad input is one line naming file and line ---------------------------------


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ("0 0.5 0.5 0.2", "expected 5 fields"),
        ("0 0.5 0.5 0.2 0.2 0.1", "expected 5 fields"),
        ("0 0.5 abc 0.2 0.2", "not numbers"),
        ("1.5 0.5 0.5 0.2 0.2", "not numbers"),
        ("6 0.5 0.5 0.2 0.2", "class 6 is not in 0..5"),
        ("-1 0.5 0.5 0.2 0.2", "class -1"),
        ("0 1.2 0.5 0.2 0.2", "not inside [0, 1]"),
        ("0 0.95 0.5 0.2 0.2", "not inside [0, 1]"),
        ("0 0.5 0.5 nan 0.2", "not inside [0, 1]"),
        ("0 0.5 0.5 0.0 0.2", "non-positive"),
    ],
)
def test_malformed_label_line(tmp_path: Path, line: str, words: str) -> None:
    yolo = _synthetic_yolo(tmp_path / "yolo", n=6)
    label = yolo / "labels" / "patches_2.txt"
    label.write_text(label.read_text() + line + "\n")
    n = len(label.read_text().splitlines())
    with pytest.raises(UserError) as exc:
        import_neu(yolo, tmp_path / "out")
    msg = str(exc.value)
    assert "\n" not in msg and f"patches_2.txt: line {n}:" in msg and words in msg
    assert not (tmp_path / "out").exists()  # nothing half-made is left behind
    assert [p.name for p in tmp_path.iterdir()] == ["yolo"]


def test_missing_labels_file(tmp_path: Path) -> None:
    yolo = _synthetic_yolo(tmp_path / "yolo", n=6)
    (yolo / "labels" / "inclusion_1.txt").unlink()
    with pytest.raises(
        UserError, match=r"inclusion_1\.jpg: missing labels file .*inclusion_1\.txt"
    ):
        import_neu(yolo, tmp_path / "out")


def test_unknown_voc_class_and_malformed_xml(tmp_path: Path) -> None:
    voc = _voc_from_yolo(_synthetic_yolo(tmp_path / "yolo", n=6), tmp_path / "voc")
    xml = voc / "ANNOTATIONS" / "scratches_5.xml"
    xml.write_text(xml.read_text().replace("<name>scratches</name>", "<name>dent</name>", 1))
    with pytest.raises(UserError, match=r"scratches_5\.xml: object 1: unknown class 'dent'"):
        import_neu(voc, tmp_path / "out")
    xml.write_text("<annotation><object>")
    with pytest.raises(UserError, match=r"scratches_5\.xml: malformed XML"):
        import_neu(voc, tmp_path / "out")


def test_not_a_neu_folder_and_cli_exit_code(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not a NEU-DET folder"):
        import_neu(tmp_path, tmp_path / "out")
    proc = subprocess.run(
        [sys.executable, "-m", "defectfusion.cli", "data", "import-neu"]
        + ["--src", str(tmp_path), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


# ---- the full NEU-DET folder ---------------------------------------------------------------


@pytest.fixture(scope="module")
def neu_full(tmp_path_factory) -> Path:
    if not (NEU / "labels").is_dir():
        pytest.skip(f"NEU-DET not found at {NEU}")
    out = tmp_path_factory.mktemp("neu") / "neu"
    import_neu(NEU, out, seed=0)
    return out


@pytest.mark.neu
def test_full_neu_has_every_image_and_exactly_its_boxes(neu_full: Path) -> None:
    labels = {p.stem: _yolo_boxes(p) for p in (NEU / "labels").glob("*.txt")}
    assert len(labels) == 1440
    seen: dict[str, list[tuple[int, list[float]]]] = {}
    for split in coco.SPLITS:
        data = _load(neu_full, split)
        anns: dict[int, list] = {}
        for a in data["annotations"]:
            anns.setdefault(a["image_id"], []).append(a)
        for im in data["images"]:
            w, h = im["width"], im["height"]
            boxes = [
                (a["category_id"], coco.xywh_to_cxcywh_norm(a["bbox"], w, h))
                for a in anns.get(im["id"], [])
            ]
            seen[Path(im["file_name"]).stem] = boxes
    assert sorted(seen) == sorted(labels)
    assert sum(len(b) for b in seen.values()) == sum(len(b) for b in labels.values()) == 3346
    for stem, boxes in labels.items():
        got = sorted(seen[stem])
        want = sorted(boxes)
        assert [c for c, _ in got] == [c for c, _ in want], stem
        np.testing.assert_allclose([b for _, b in got], [b for _, b in want], atol=1e-6)
    assert validate_path(neu_full, check_images=False).ok


@pytest.mark.neu
def test_full_neu_split_is_stratified_per_class(neu_full: Path) -> None:
    per_split = {s: Counter() for s in coco.SPLITS}
    for s in coco.SPLITS:
        for im in _load(neu_full, s)["images"]:
            per_split[s][im["file_name"].rsplit("_", 1)[0]] += 1
    assert sorted(per_split["train"]) == sorted(NEU_CLASSES)
    for cls in NEU_CLASSES:
        n = sum(per_split[s][cls] for s in coco.SPLITS)
        for s, frac in zip(coco.SPLITS, (0.7, 0.15, 0.15), strict=True):
            assert abs(per_split[s][cls] - frac * n) <= 1, (cls, s, per_split[s][cls], n)


@pytest.mark.neu
def test_full_neu_is_deterministic(neu_full: Path, tmp_path: Path) -> None:
    import_neu(NEU, tmp_path / "again", seed=0)
    assert _split_bytes(tmp_path / "again") == _split_bytes(neu_full)


# ---- any COCO dataset ---------------------------------------------------------------------


def _coco_source(root: Path, n: int = 20) -> tuple[Path, Path]:
    """COCO JSON with category ids 1, 5, 7, images in a sub-folder, one crowd box."""
    images = root / "imgs"
    rng = np.random.default_rng(0)
    imgs, anns = [], []
    for i in range(n):
        name = f"part/{i:03d}.png"
        _jpg(images / name, size=(80, 60), seed=i)
        imgs.append({"id": 100 + i, "file_name": name, "width": 80, "height": 60})
        for k in range(1 + i % 2):
            cat = (1, 5, 7)[(i + k) % 3]
            x, y = (float(v) for v in rng.integers(0, 40, 2))
            anns.append(
                {"id": 1000 + 2 * i + k, "image_id": 100 + i, "category_id": cat}
                | {"bbox": [x, y, 20.5, 10.25], "area": 1.0, "iscrowd": 0}
            )
    anns[0]["iscrowd"] = 1
    cats = [{"id": 7, "name": "stain"}, {"id": 1, "name": "crack"}, {"id": 5, "name": "dent"}]
    ann_file = root / "instances.json"
    ann_file.write_text(json.dumps({"images": imgs, "annotations": anns, "categories": cats}))
    return images, ann_file


def test_import_coco_remaps_categories_and_splits_one_file(tmp_path: Path) -> None:
    images, ann_file = _coco_source(tmp_path)
    out = tmp_path / "out"
    result = import_coco(images, [ann_file], out, seed=0)
    assert result["original_category_ids"] == [1, 5, 7]
    assert result["dropped_crowd"] == 1
    data = {s: _load(out, s) for s in coco.SPLITS}
    assert data["train"]["categories"] == coco.make_categories(["crack", "dent", "stain"])
    assert data["train"]["info"]["original_category_ids"] == [1, 5, 7]
    all_images = [im for s in coco.SPLITS for im in data[s]["images"]]
    all_anns = [a for s in coco.SPLITS for a in data[s]["annotations"]]
    assert sorted(im["id"] for im in all_images) == list(range(1, 21))
    assert sorted(a["id"] for a in all_anns) == list(range(1, len(all_anns) + 1))
    assert len(all_anns) == 29  # 30 boxes less the crowd one
    assert {len(data[s]["images"]) for s in coco.SPLITS} != {0}
    source = json.loads(ann_file.read_text())
    name_of = {im["id"]: im["file_name"] for im in source["images"]}
    new_of = {1: 0, 5: 1, 7: 2}
    want = sorted(
        (name_of[a["image_id"]], new_of[a["category_id"]], a["bbox"])
        for a in source["annotations"]
        if not a["iscrowd"]
    )
    names = {im["id"]: im["file_name"] for im in all_images}
    got = sorted((names[a["image_id"]], a["category_id"], a["bbox"]) for a in all_anns)
    assert got == want
    for im in all_images:
        assert im["source_file"] == im["file_name"]
        assert (out / "images" / im["file_name"]).read_bytes() == (
            images / im["file_name"]
        ).read_bytes()
    assert validate_path(out).ok
    # deterministic
    import_coco(images, [ann_file], tmp_path / "again", seed=0)
    assert _split_bytes(out) == _split_bytes(tmp_path / "again")


def test_import_coco_honours_given_splits(tmp_path: Path) -> None:
    images, ann_file = _coco_source(tmp_path)
    source = json.loads(ann_file.read_text())
    first = {im["id"] for im in source["images"][:15]}
    parts = {}
    for name, keep in (
        ("a.json", first),
        ("b.json", {im["id"] for im in source["images"]} - first),
    ):
        part = dict(source)
        part["images"] = [im for im in source["images"] if im["id"] in keep]
        part["annotations"] = [a for a in source["annotations"] if a["image_id"] in keep]
        parts[name] = tmp_path / name
        parts[name].write_text(json.dumps(part))
    out = tmp_path / "out"
    result = import_coco(images, [parts["b.json"], parts["a.json"]], out, splits=["test", "train"])
    assert result["images"] == {"train": 15, "val": 0, "test": 5}
    train_names = {im["file_name"] for im in _load(out, "train")["images"]}
    assert train_names == {im["file_name"] for im in source["images"][:15]}
    assert sorted(im["id"] for im in _load(out, "train")["images"]) == list(range(1, 16))
    assert validate_path(out).ok


def _bad_input(tmp_path: Path, case: str) -> tuple[Path, list[Path], list[str] | None, str]:
    images, ann_file = _coco_source(tmp_path)
    data = json.loads(ann_file.read_text())
    files, splits = [ann_file], None
    if case == "box outside":
        data["annotations"][3]["bbox"] = [70.0, 10.0, 30.0, 5.0]
        expect = f"annotation id {data['annotations'][3]['id']}: bbox"
    elif case == "missing image":
        (images / "part/004.png").unlink()
        expect = "image id 104 (part/004.png): image file"
    elif case == "unknown category":
        data["annotations"][2]["category_id"] = 3
        expect = f"annotation id {data['annotations'][2]['id']}: category_id 3"
    elif case == "categories differ":
        other = tmp_path / "other.json"
        renamed = [c | {"name": "scratch"} if c["id"] == 5 else c for c in data["categories"]]
        other.write_text(json.dumps({"images": [], "annotations": [], "categories": renamed}))
        files, splits = [ann_file, other], ["train", "val"]
        expect = "other.json: categories differ"
    elif case == "splits mismatch":
        splits = ["train", "val"]
        expect = "1 annotations files but 2 splits"
    elif case == "malformed json":
        ann_file.write_text("{")
        return images, files, splits, "instances.json: malformed JSON"
    ann_file.write_text(json.dumps(data))
    return images, files, splits, expect


@pytest.mark.parametrize(
    "case",
    [
        "box outside",
        "missing image",
        "unknown category",
        "categories differ",
        "splits mismatch",
        "malformed json",
    ],
)
def test_import_coco_rejects_bad_input_in_one_line(tmp_path: Path, case: str) -> None:
    images, files, splits, expect = _bad_input(tmp_path, case)
    with pytest.raises(UserError) as exc:
        import_coco(images, files, tmp_path / "out", splits=splits)
    assert "\n" not in str(exc.value)
    assert expect in str(exc.value), str(exc.value)
    assert not (tmp_path / "out").exists()


def test_import_coco_of_zero_images_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    """Importing a COCO file with zero images used to exit 0 and print nothing (issue 27)."""
    images, ann_file = _coco_source(tmp_path)
    empty = {**json.loads(ann_file.read_text()), "images": [], "annotations": []}
    ann_file.write_text(json.dumps(empty))
    with pytest.raises(UserError, match="no images"):
        import_coco(images, [ann_file], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_every_dataset_kind_has_a_maker_and_every_maker_a_kind() -> None:
    """The kinds validation and the preflight know (config.DATASET_KINDS) are the kinds
    `data prepare` can make (data.importers.MAKERS): a new importer added to one only fails
    here, not in a user's run."""
    from defectfusion.config import DATASET_KINDS
    from defectfusion.data.importers import MAKERS

    assert list(MAKERS) == list(DATASET_KINDS)
