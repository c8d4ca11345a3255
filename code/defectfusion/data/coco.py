"""The one on-disk dataset layout of the project, and box conversions.

A prepared dataset is a folder::

    DIR/images/<file_name>              the images (file_name may contain sub-folders)
    DIR/annotations/{train,val,test}.json

Each JSON is plain COCO detection format with these conventions:

- ``categories``: ids are contiguous ``0..K-1`` (the detector's class index), each with
  its ``name``; every split lists all K categories, in id order.
- ``images``: ids start at 1; ``file_name`` is relative to ``DIR/images``; ``width`` and
  ``height`` in pixels; ``source_file`` keeps the name the image had in its source;
  ``sha256`` of the image file, so a split's JSON changes exactly when its images do (DVC's
  training stages depend on the train/val JSONs, not on the whole image folder).
- ``annotations``: ids start at 1 (pycocotools treats id 0 as "unmatched"),
  ``bbox`` is ``[x, y, w, h]`` in pixels, ``area = w * h``, ``iscrowd = 0``.
- ``info``: ``dataset`` (its name), ``split``, and how it was made.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from defectfusion.core.errors import UserError
from defectfusion.core.fsutil import atomic_write_json
from defectfusion.core.jsonio import load_json

SPLITS: tuple[str, ...] = ("train", "val", "test")


def split_path(root: str | Path, split: str) -> Path:
    return Path(root) / "annotations" / f"{split}.json"


def images_dir(root: str | Path) -> Path:
    return Path(root) / "images"


def dataset_root(split_json: str | Path) -> Path:
    """The dataset folder that holds `split_json` (``DIR/annotations/x.json`` -> ``DIR``)."""
    return Path(split_json).resolve().parent.parent


# Pixels an image may have before it is decoded (a decompression bomb decodes a small file
# into gigabytes); 8k x 6k is far above any inspection camera in use here.
MAX_IMAGE_PIXELS = 50_000_000


def load_split(path: str | Path) -> dict[str, Any]:
    """A split's COCO JSON (what `evaluate` and `compare` are given); a folder, the usual slip
    (the dataset root), is refused with the file to pass instead."""
    path = Path(path)
    if path.is_dir():
        raise UserError(
            f"{path}: is a folder; pass a split JSON, e.g. {path}/annotations/test.json"
        )
    return load_json(path)


# Written last into every dataset a defectfusion writer makes: the files it made. A runner may
# delete the split JSONs before it reruns the writer (Snakemake removes a job's outputs), so
# the images they listed are recognised as ours by this list too.
MANIFEST = ".defectfusion-files.json"


def write_manifest(root: str | Path, writer: str) -> Path:
    """List every file under `root` (relative paths) as made by `writer` (e.g. "synth")."""
    root = Path(root)
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    return atomic_write_json(root / MANIFEST, {"writer": writer, "files": files}, indent=None)


def manifest_writer(root: str | Path) -> str | None:
    """The writer named by `root`'s manifest, if it has a readable one."""
    try:
        data = load_json(Path(root) / MANIFEST)
    except UserError:
        return None
    return data.get("writer") if isinstance(data, dict) else None


def foreign_files(root: str | Path) -> list[Path]:
    """Files under dataset folder `root` that it does not own: neither a split JSON, nor an
    image a split JSON lists, nor a file its manifest lists (our own stale temporaries count
    as owned). Sorted."""
    root = Path(root)
    if not root.is_dir():
        return []
    owned: set[Path] = set()
    for split in SPLITS:
        f = split_path(root, split)
        if not f.is_file():
            continue
        try:
            data = load_json(f)
        except UserError:
            continue  # unreadable: its images count as foreign, so nothing is deleted
        owned.add(f)
        for im in data.get("images", []) if isinstance(data, dict) else []:
            name = im.get("file_name") if isinstance(im, dict) else None
            if isinstance(name, str):
                owned.add(images_dir(root) / name)
    if (root / MANIFEST).is_file():
        try:
            listed = load_json(root / MANIFEST).get("files", [])
        except (UserError, AttributeError):
            listed = []
        owned.add(root / MANIFEST)
        owned.update(root / f for f in listed if isinstance(f, str))
    return sorted(
        p
        for p in root.rglob("*")
        if (p.is_file() or p.is_symlink())
        and p not in owned
        and not (p.name.startswith(".") and p.name.endswith(".tmp"))
    )


def write_split(root: str | Path, split: str, coco: dict[str, Any]) -> Path:
    """Write a split JSON; each image record gets the ``sha256`` of its file (written first;
    a missing one is the validator's to report, with its own message)."""
    import hashlib

    for im in coco["images"]:
        path = images_dir(root) / im["file_name"]
        if path.is_file():
            im["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    return atomic_write_json(split_path(root, split), coco, indent=1)


def category_names(coco: Any, where: str | Path = "annotation file") -> list[str]:
    """Class names in id order (ids are 0..K-1 by this layout's convention).

    A file of another schema (the caller reads it before the loader validates it) is one
    `UserError` line, not a KeyError or TypeError deep in training.
    """
    cats = coco.get("categories") if isinstance(coco, dict) else None
    if not (
        isinstance(cats, list)
        and cats
        and all(
            isinstance(c, dict)
            and isinstance(c.get("id"), int)
            and not isinstance(c.get("id"), bool)
            and isinstance(c.get("name"), str)
            for c in cats
        )
    ):
        raise UserError(
            f"{where}: not COCO detection JSON in this project's layout: 'categories' must be "
            "a non-empty list of {id, name}; check it with `defectfusion data validate`"
        )
    return [c["name"] for c in sorted(cats, key=lambda c: c["id"])]


def make_categories(names: Sequence[str]) -> list[dict[str, Any]]:
    return [{"id": i, "name": n, "supercategory": "defect"} for i, n in enumerate(names)]


def make_coco(
    images: list[dict[str, Any]],
    annotations: list[dict[str, Any]],
    names: Sequence[str],
    info: dict[str, Any],
) -> dict[str, Any]:
    return {
        "info": info,
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": make_categories(names),
    }


def stratified_split(
    keys: Sequence[Hashable],
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
    seed: int = 0,
) -> list[int]:
    """Assign each item to a split index, stratified by its key (for example its class).

    Within each key the items are shuffled with `seed` and cut by `fractions` (rounded so
    that every split of a key with enough items gets at least one). Deterministic for a
    fixed seed and item order.
    """
    if not np.isclose(sum(fractions), 1.0):
        raise UserError(f"split fractions must sum to 1, got {list(fractions)}")
    groups: dict[Hashable, list[int]] = defaultdict(list)
    for i, k in enumerate(keys):
        groups[k].append(i)
    rng = np.random.default_rng(seed)
    out = [0] * len(keys)
    for k in sorted(groups, key=str):
        idx = groups[k]
        order = rng.permutation(len(idx))
        n = len(idx)
        cuts = np.round(np.cumsum(fractions)[:-1] * n).astype(int)
        for rank, j in enumerate(order):
            out[idx[j]] = int(np.searchsorted(cuts, rank, side="right"))
    return out


# ---- boxes -----------------------------------------------------------------------------
# DEIMv2 wants normalised (cx, cy, w, h); COCO stores pixel (x, y, w, h).


def xywh_to_cxcywh_norm(box: Sequence[float], width: float, height: float) -> list[float]:
    x, y, w, h = box
    return [(x + w / 2) / width, (y + h / 2) / height, w / width, h / height]


def cxcywh_norm_to_xywh(box: Sequence[float], width: float, height: float) -> list[float]:
    cx, cy, w, h = box
    return [(cx - w / 2) * width, (cy - h / 2) * height, w * width, h * height]
