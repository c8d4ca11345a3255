"""validate.py: every kind of broken dataset is caught in one line naming file and record."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from defectfusion import cli
from defectfusion.core.errors import UserError
from defectfusion.data import coco
from defectfusion.data.validate import raise_if_invalid, validate_path

NAMES = ["crack", "scratch", "stain"]
W, H = 64, 48


def _image(path: Path, size: tuple[int, int] = (W, H), seed: int = 0) -> None:
    # Noise, so that a JPEG is large enough for truncation to cut into the pixel data.
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=95)


def make_dataset(root: Path) -> Path:
    """A valid dataset: train has 3 images (one empty), val has 1; 3 classes."""
    files = {"train": ["a.jpg", "sub/b.jpg", "c.jpg"], "val": ["d.jpg"]}
    boxes = {  # file -> [(category, [x, y, w, h])]
        "a.jpg": [(0, [1.0, 2.0, 10.0, 20.0]), (1, [30.0, 5.0, 34.0, 43.0])],
        "sub/b.jpg": [(2, [0.0, 0.0, 64.0, 48.0])],
        "c.jpg": [],
        "d.jpg": [(0, [5.0, 5.0, 8.0, 8.0]), (2, [20.0, 10.0, 4.0, 30.0])],
    }
    image_id = ann_id = 0
    for split, names in files.items():
        images, anns = [], []
        for name in names:
            image_id += 1
            _image(coco.images_dir(root) / name, seed=image_id)
            images.append(
                {"id": image_id, "file_name": name, "width": W, "height": H, "source_file": name}
            )
            for cat, box in boxes[name]:
                ann_id += 1
                anns.append(
                    {
                        "id": ann_id,
                        "image_id": image_id,
                        "category_id": cat,
                        "bbox": box,
                        "area": box[2] * box[3],
                        "iscrowd": 0,
                    }
                )
        info = {"dataset": "tiny", "split": split}
        coco.write_split(root, split, coco.make_coco(images, anns, NAMES, info))
    return root


def _edit(root: Path, split: str, change: Callable[[dict[str, Any]], None]) -> None:
    path = coco.split_path(root, split)
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _ann(data: dict[str, Any], ann_id: int) -> dict[str, Any]:
    return next(a for a in data["annotations"] if a["id"] == ann_id)


def _img(data: dict[str, Any], image_id: int) -> dict[str, Any]:
    return next(i for i in data["images"] if i["id"] == image_id)


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    return make_dataset(tmp_path / "ds")


def test_valid_dataset_passes_with_class_counts(dataset: Path) -> None:
    report = validate_path(dataset)
    assert report.ok, report.errors
    assert report.splits["train"].images == 3
    assert report.splits["train"].empty_images == 1
    assert report.splits["train"].boxes_per_class == {"crack": 1, "scratch": 1, "stain": 1}
    assert report.splits["val"].boxes_per_class == {"crack": 1, "stain": 1, "scratch": 0}
    text = report.summary()
    lines = text.splitlines()
    row = next(line for line in lines if line.strip().startswith("0 crack"))
    assert row.split()[2:] == ["1", "1", "2"]  # train, val, total
    assert any(line.strip().startswith("2 stain") for line in lines)
    assert "OK" in text
    raise_if_invalid(report)  # does not raise


def test_single_split_json_resolves_images(dataset: Path) -> None:
    report = validate_path(coco.split_path(dataset, "val"))
    assert report.ok, report.errors
    assert list(report.splits) == ["val"]
    (dataset / "images" / "d.jpg").unlink()
    report = validate_path(coco.split_path(dataset, "val"))
    assert not report.ok and "d.jpg" in report.errors[0]


def test_box_overshoot_within_tolerance_passes(dataset: Path) -> None:
    def change(d):
        _ann(d, 2)["bbox"] = [30.0, 5.0, 34.5, 43.5]
        _ann(d, 2)["area"] = 34.5 * 43.5

    _edit(dataset, "train", change)
    assert validate_path(dataset).ok


def _corrupt(root: Path) -> None:
    (root / "images" / "c.jpg").write_bytes(b"this is not a jpeg at all")


def _truncate(root: Path) -> None:
    path = root / "images" / "c.jpg"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _missing_image(root: Path) -> None:
    (root / "images" / "sub" / "b.jpg").unlink()


def _wrong_size(root: Path) -> None:
    _image(root / "images" / "c.jpg", size=(W, H + 1))


def _json(split: str, change: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    return lambda root: _edit(root, split, change)


def _set(getter, key, value):
    def change(d):
        getter(d)[key] = value

    return change


def _del(getter, key):
    def change(d):
        del getter(d)[key]

    return change


def _dup_image(d):
    d["images"][2]["id"] = d["images"][0]["id"]  # c.jpg has no boxes: no follow-on errors


def _dup_ann(d):
    d["annotations"][1]["id"] = d["annotations"][0]["id"]


def _gap_categories(root: Path) -> None:
    def change(d):  # consistently in every split and annotation: the only fault is the gap
        d["categories"][2]["id"] = 5
        for a in d["annotations"]:
            a["category_id"] = 5 if a["category_id"] == 2 else a["category_id"]

    _edit(root, "train", change)
    _edit(root, "val", change)


def _leak(d):
    d["images"][0]["file_name"] = "a.jpg"


def _rename_category(d):
    d["categories"][1]["name"] = "dent"


# (how to break the dataset, file the error must name, record, words of the message)
CASES: dict[str, tuple[Callable[[Path], None], str, str, str]] = {
    "corrupt image": (_corrupt, "train.json", "image id 3 (c.jpg)", "unreadable"),
    "truncated image": (_truncate, "train.json", "image id 3 (c.jpg)", "unreadable"),
    "missing image": (_missing_image, "train.json", "image id 2 (sub/b.jpg)", "not found"),
    "size mismatch": (_wrong_size, "train.json", "image id 3 (c.jpg)", "64x48 but"),
    "box outside": (
        _json("train", _set(lambda d: _ann(d, 2), "bbox", [40.0, 5.0, 34.0, 43.0])),
        "train.json",
        "annotation id 2",
        "outside image id 1",
    ),
    "box zero width": (
        _json("train", _set(lambda d: _ann(d, 1), "bbox", [1.0, 2.0, 0.0, 20.0])),
        "train.json",
        "annotation id 1",
        "non-positive",
    ),
    "bbox 3 numbers": (
        _json("train", _set(lambda d: _ann(d, 1), "bbox", [1.0, 2.0, 10.0])),
        "train.json",
        "annotation id 1",
        "not 4 finite numbers",
    ),
    "bbox strings": (
        _json("val", _set(lambda d: _ann(d, 4), "bbox", ["5", 5, 8, 8])),
        "val.json",
        "annotation id 4",
        "not 4 finite numbers",
    ),
    "unknown category": (
        _json("train", _set(lambda d: _ann(d, 3), "category_id", 7)),
        "train.json",
        "annotation id 3",
        "category_id 7",
    ),
    "duplicate image id": (
        _json("train", _dup_image),
        "train.json",
        "image id 1 (c.jpg)",
        "duplicate image id",
    ),
    "duplicate annotation id": (
        _json("train", _dup_ann),
        "train.json",
        "annotation id 1",
        "duplicate annotation id",
    ),
    "annotation to unknown image": (
        _json("val", _set(lambda d: _ann(d, 5), "image_id", 99)),
        "val.json",
        "annotation id 5",
        "image_id 99",
    ),
    "annotation missing bbox": (
        _json("train", _del(lambda d: _ann(d, 2), "bbox")),
        "train.json",
        "annotation id 2",
        "missing required key(s) bbox",
    ),
    "image missing width": (
        _json("val", _del(lambda d: _img(d, 4), "width")),
        "val.json",
        "image id 4",
        "missing required key(s) width",
    ),
    "annotation without id": (
        _json("train", _del(lambda d: _ann(d, 3), "id")),
        "train.json",
        "annotations[2]",
        "missing required key(s) id",
    ),
    "no images key": (
        _json("val", lambda d: d.pop("images")),
        "val.json",
        "key 'images'",
        "missing",
    ),
    "categories not contiguous": (
        _gap_categories,
        "train.json",
        "categories",
        "not contiguous",
    ),
    "empty file": (
        lambda root: coco.split_path(root, "val").write_text("  \n"),
        "val.json",
        "empty file",
        "",
    ),
    "malformed json": (
        lambda root: coco.split_path(root, "train").write_text('{"images": [,]}'),
        "train.json",
        "line 1",
        "malformed JSON",
    ),
    "image in two splits": (
        _json("val", _leak),
        "val.json",
        "image id 4 (a.jpg)",
        "also in",
    ),
    "categories differ between splits": (
        _json("val", _rename_category),
        "val.json",
        "categories differ",
        "train.json",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_error_kind_is_one_line_naming_file_and_record(dataset: Path, case: str) -> None:
    breaker, file, record, words = CASES[case]
    assert validate_path(dataset).ok  # the fixture is valid before we break it
    breaker(dataset)
    report = validate_path(dataset)
    assert not report.ok
    assert all("\n" not in e for e in report.errors)
    hits = [e for e in report.errors if file in e and record in e and words in e]
    assert hits, report.errors
    # One fault, one line per file it is in: no follow-on errors drown it.
    n = 2 if case == "categories not contiguous" else 1
    assert len(report.errors) == n, report.errors
    with pytest.raises(UserError) as exc:
        raise_if_invalid(report)
    assert "\n" not in str(exc.value)
    assert str(exc.value).startswith(f"{n} error{'s' if n > 1 else ''}; first:")
    assert hits[0] in report.summary()


def test_skip_images_does_not_open_files(dataset: Path) -> None:
    _corrupt(dataset)
    assert validate_path(dataset, check_images=False).ok
    assert not validate_path(dataset, check_images=True).ok


def test_several_errors_are_all_reported(dataset: Path) -> None:
    _missing_image(dataset)
    _edit(dataset, "train", _set(lambda d: _ann(d, 3), "category_id", 9))
    report = validate_path(dataset)
    assert len(report.errors) == 2
    with pytest.raises(UserError, match=r"^2 errors; first: "):
        raise_if_invalid(report)


def test_missing_path_or_folder_without_splits_raises(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such file"):
        validate_path(tmp_path / "nope")
    with pytest.raises(UserError, match="no annotations"):
        validate_path(tmp_path)


def test_cli_exit_codes_and_no_traceback(dataset: Path, capsys) -> None:
    assert cli.main(["data", "validate", str(dataset)]) == 0
    assert "OK" in capsys.readouterr().out

    _edit(dataset, "train", _set(lambda d: _ann(d, 1), "category_id", 42))
    assert cli.main(["data", "validate", str(dataset)]) == 1
    out = capsys.readouterr().out
    assert "annotation id 1" in out and "category_id 42" in out

    coco.split_path(dataset, "val").write_text("{not json")
    proc = subprocess.run(
        [sys.executable, "-m", "defectfusion.cli", "data", "validate", str(dataset)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    assert "val.json: malformed JSON" in proc.stdout

    proc = subprocess.run(
        [sys.executable, "-m", "defectfusion.cli", "data", "validate", str(dataset / "x")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_a_split_with_no_images_is_not_ok(dataset: Path) -> None:
    """`data validate` of a dataset with zero images once said "OK: no problems found"."""

    def empty(d: dict[str, Any]) -> None:
        d["images"], d["annotations"] = [], []

    _edit(dataset, "val", empty)
    assert validate_path(dataset).ok  # one empty split (a tiny import) is not an error here
    _edit(dataset, "train", empty)
    report = validate_path(dataset)
    assert not report.ok and any("holds no images in any split" in e for e in report.errors)
    assert "OK: no problems found" not in report.summary()
