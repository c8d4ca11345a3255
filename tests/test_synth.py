"""The procedural metal-surface dataset: deterministic, in the layout of coco.py, tight boxes."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from defectfusion.cli import main
from defectfusion.core.errors import UserError
from defectfusion.data import coco, synth
from defectfusion.data.synth import CLASS_NAMES, SynthSpec, generate, render

SMALL = SynthSpec(seed=3, n_train=12, n_val=4, n_test=4, image_size=96)


def _files(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("synth") / "ds"
    return root, generate(root, SMALL)


def test_same_seed_gives_byte_identical_files_whatever_the_workers(small, tmp_path):
    root, _ = small
    again = tmp_path / "again"
    generate(again, SMALL, workers=2)
    first, second = _files(root), _files(again)
    assert sorted(first) == sorted(second)
    assert first == second
    # Exactly the dataset: no temporary files left behind by the atomic writes.
    n = SMALL.n_train + SMALL.n_val + SMALL.n_test
    assert len(first) == n + 3 + 1  # + the list of the files made (coco.MANIFEST)


def test_different_seed_gives_different_images(small, tmp_path):
    root, _ = small
    other = tmp_path / "other"
    generate(other, SynthSpec(**{**asdict(SMALL), "seed": SMALL.seed + 1}))
    a, b = _files(root), _files(other)
    pngs = [k for k in a if k.endswith(".png")]
    assert all(a[k] != b[k] for k in pngs)


@pytest.mark.parametrize("split", coco.SPLITS)
def test_split_follows_coco_layout(small, split):
    root, summary = small
    path = coco.split_path(root, split)
    data = json.loads(path.read_text())
    api = COCO(str(path))  # pycocotools must accept it as is

    assert [(c["id"], c["name"]) for c in data["categories"]] == list(enumerate(CLASS_NAMES))
    info = {"dataset": "synth", "split": split, "seed": 3, "image_size": SMALL.image_size}
    assert data["info"] == info
    n_images = {"train": 12, "val": 4, "test": 4}[split]
    assert [im["id"] for im in data["images"]] == list(range(1, n_images + 1))
    assert [a["id"] for a in data["annotations"]] == list(range(1, len(data["annotations"]) + 1))
    assert sorted(api.getImgIds()) == list(range(1, n_images + 1))

    for im in data["images"]:
        assert im["file_name"] == f"{split}/{im['id']:05d}.png"
        with Image.open(coco.images_dir(root) / im["file_name"]) as pil:
            assert pil.mode == "RGB"
            assert pil.size == (im["width"], im["height"]) == (96, 96)
        assert api.getAnnIds(imgIds=[im["id"]]), "every image holds at least one object"

    for a in data["annotations"]:
        x, y, w, h = a["bbox"]
        assert all(isinstance(v, float) for v in a["bbox"])
        assert w > 0 and h > 0
        assert x >= 0 and y >= 0 and x + w <= 96 and y + h <= 96
        assert a["area"] == pytest.approx(w * h)
        assert a["iscrowd"] == 0
        assert 0 <= a["category_id"] < len(CLASS_NAMES)

    counts = np.bincount([a["category_id"] for a in data["annotations"]], minlength=6)
    assert summary[split] == {
        "images": n_images,
        "boxes": dict(zip(CLASS_NAMES, counts.tolist(), strict=True)),
    }


def test_class_balance_follows_the_thesis():
    # Render in memory: the same function `generate` writes to disk.
    counts = np.zeros(len(CLASS_NAMES), int)
    for i in range(300):
        _, objects = render(np.random.default_rng([0, 0, i]), 96)
        for cls, _ in objects:
            counts[cls] += 1
    share = counts / counts.sum()
    assert (counts > 0).all(), counts
    majority = share[0] + share[1]  # normal and perforation
    assert majority > 0.5, share
    assert min(share[0], share[1]) > share[2:].max(), share
    assert (share[2:] > 0.06).all(), share  # the minority classes are not vanishingly rare


@pytest.mark.parametrize("size", [64, 96, 192])
def test_boxes_are_tight_around_what_is_drawn(size):
    """Diff against the same image with no object drawn: changes lie in boxes, boxes touch them."""
    for i in range(12):
        with_objects, objects = render(np.random.default_rng([7, size, i]), size)
        with mock.patch.object(synth, "_apply", lambda *a, **k: None):
            surface, same = render(np.random.default_rng([7, size, i]), size)
        assert same == objects  # drawing consumes no randomness: the surfaces match
        diff = np.abs(with_objects.astype(int) - surface.astype(int)).max(axis=-1)
        boxed = np.zeros(diff.shape, bool)
        for cls, (x, y, w, h) in objects:
            x0, y0, x1, y1 = int(x), int(y), int(x + w), int(y + h)
            assert (x0, y0, x1 - x0, y1 - y0) == (x, y, w, h)
            boxed[y0:y1, x0:x1] = True
            edges = [diff[y0, x0:x1], diff[y1 - 1, x0:x1], diff[y0:y1, x0], diff[y0:y1, x1 - 1]]
            # Every side of the box touches pixels the object visibly changed.
            assert min(e.max() for e in edges) >= 2, (CLASS_NAMES[cls], i)
        # Outside the boxes only faint halos (below the drawn threshold) remain.
        assert diff[~boxed].max(initial=0) <= round(synth.VISIBLE * 255) + 1


def test_boxes_do_not_overlap():
    for i in range(100):
        _, objects = render(np.random.default_rng([1, i]), 96)
        boxes = [b for _, b in objects]
        for j, (x, y, w, h) in enumerate(boxes):
            for x2, y2, w2, h2 in boxes[j + 1 :]:
                assert x + w <= x2 or x2 + w2 <= x or y + h <= y2 or y2 + h2 <= y


def test_regenerating_smaller_removes_stale_images(tmp_path):
    root = tmp_path / "ds"
    generate(root, SynthSpec(seed=0, n_train=5, n_val=2, n_test=2, image_size=64))
    generate(root, SynthSpec(seed=0, n_train=3, n_val=1, n_test=1, image_size=64))
    assert sorted(p.name for p in (root / "images" / "train").iterdir()) == [
        "00001.png",
        "00002.png",
        "00003.png",
    ]


def test_bad_input_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="n_val must be >= 1"):
        generate(tmp_path / "a", SynthSpec(n_val=0))
    with pytest.raises(UserError, match="seed must be >= 0"):
        generate(tmp_path / "s", SynthSpec(seed=-1))
    with pytest.raises(UserError, match="image_size must be >= 64"):
        generate(tmp_path / "b", SynthSpec(image_size=32))
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(UserError, match="not a folder"):
        generate(a_file, SMALL)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        generate(foreign, SMALL)
    assert (foreign / "notes.txt").read_text() == "mine"


def test_cli_writes_the_dataset(tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["data", "synth", "--out", str(out), "--seed", "5", "--n-train", "3"]
    args += ["--n-val", "2", "--n-test", "2", "--image-size", "64"]
    assert main(args) == 0
    train = json.loads(coco.split_path(out, "train").read_text())
    assert len(train["images"]) == 3
    assert train["info"]["seed"] == 5

    # A user error: one line on stderr, exit status 2, no traceback.
    assert main(["data", "synth", "--out", str(tmp_path / "bad"), "--n-test", "0"]) == 2
    err = capsys.readouterr().err
    assert "n_test must be >= 1" in err
    assert "Traceback" not in err


def test_a_larger_test_split_leaves_training_files_byte_identical(tmp_path):
    # DVC compares contents: growing the test split must not look like new training data.
    a, b = tmp_path / "a", tmp_path / "b"
    generate(a, SynthSpec(seed=3, n_train=3, n_val=2, n_test=2, image_size=96), workers=1)
    generate(b, SynthSpec(seed=3, n_train=3, n_val=2, n_test=4, image_size=96), workers=1)
    for split in ("train", "val"):
        assert coco.split_path(a, split).read_bytes() == coco.split_path(b, split).read_bytes()
        for img in sorted((coco.images_dir(a) / split).glob("*.png")):
            assert img.read_bytes() == (coco.images_dir(b) / split / img.name).read_bytes()
    assert coco.split_path(a, "test").read_bytes() != coco.split_path(b, "test").read_bytes()


def test_prepare_makes_the_dataset_the_pipeline_names(tmp_path):
    from defectfusion.data import prepare

    spec = {"kind": "synth", "seed": 1, "n_train": 2, "n_val": 1, "n_test": 1}
    summary = prepare(spec, 96, tmp_path / "d")
    assert summary["train"]["images"] == 2 and coco.split_path(tmp_path / "d", "test").is_file()
    with pytest.raises(UserError, match="pipeline.dataset.src"):
        prepare({"kind": "neu", "src": None}, 224, tmp_path / "n")
    with pytest.raises(UserError, match="pipeline.dataset.annotations"):
        prepare({"kind": "coco", "src": str(tmp_path)}, 224, tmp_path / "c")
    with pytest.raises(UserError, match="must be one of"):
        prepare({"kind": "imagenet"}, 224, tmp_path / "x")
