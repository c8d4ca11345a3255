"""Import third-party datasets into the one layout of `coco.py`.

Both importers read everything first (so bad input fails before anything is written),
build the dataset in a hidden folder beside `out`, validate it with `validate.py`, and
only then move it into place: a failed import leaves no half-made dataset behind.

Boxes are stored as pixel floats rounded to 3 decimals (`_round`), so the same boxes
read from different formats give byte-identical JSON.
"""

from __future__ import annotations

import re
import shutil
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from PIL import Image
from tqdm import tqdm

from defectfusion.core.errors import UserError
from defectfusion.core.fsutil import staged_dir, swap_dir
from defectfusion.data import coco
from defectfusion.data.validate import (
    ValidationReport,
    check_coco,
    image_too_large,
    raise_if_invalid,
    validate_path,
)

NEU_CLASSES: tuple[str, ...] = (
    "crazing",
    "inclusion",
    "patches",
    "pitted_surface",
    "rolled-in_scale",
    "scratches",
)
FRACTIONS: tuple[float, float, float] = (0.7, 0.15, 0.15)
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"}
# Normalised YOLO coordinates may overshoot [0, 1] by float printing noise, no more.
YOLO_EPS = 1e-6
# Pixel boxes may overshoot the image by this much (rounded corners); they are clipped.
PIXEL_TOL = 1.0
_VOC_TAGS = ("xmin", "ymin", "xmax", "ymax")

BOX_CONVENTION = (
    "bbox [x, y, w, h] in pixels, rounded to 3 decimals; VOC xmin/ymin/xmax/ymax are taken "
    "as continuous corner coordinates (x = xmin, w = xmax - xmin), the convention of the "
    "YOLO redistribution of NEU-DET"
)


@dataclass
class _Image:
    """One image to write: where to copy it from and its boxes (class index, xywh pixels)."""

    src: Path
    file_name: str
    source_file: str
    width: int
    height: int
    boxes: list[tuple[int, list[float]]] = field(default_factory=list)


# ---- NEU-DET ----------------------------------------------------------------------------


def import_neu(src: str | Path, out: str | Path, seed: int = 0) -> dict[str, Any]:
    """Import NEU-DET from its original Pascal VOC layout or its YOLO layout.

    VOC: ``src/ANNOTATIONS/*.xml`` (pixel ``xmin ymin xmax ymax``, ``<name>`` the class)
    and ``src/IMAGES/*.jpg``. YOLO: ``src/images/*.jpg`` and ``src/labels/*.txt``
    (``class cx cy w h`` normalised). Both layouts of the same data give byte-identical
    JSON. Images are sorted by file name (ids 1..N over the whole dataset) and split
    0.7/0.15/0.15, stratified by the class in the file name (``crazing_12.jpg``) or, when
    the name has none, by the image's majority class.
    """
    src, out = Path(src), Path(out)
    _check_inputs_outside(out, [src])
    _check_out(out)
    if not src.is_dir():
        raise UserError(f"{src}: NEU-DET folder not found")
    if (src / "labels").is_dir() and (src / "images").is_dir():
        layout, images = "yolo", _read_neu_yolo(src / "images", src / "labels")
    elif (ann := _child_dir(src, "annotations")) and (img := _child_dir(src, "images")):
        layout, images = "voc", _read_neu_voc(img, ann)
    else:
        raise UserError(
            f"{src}: not a NEU-DET folder: expected ANNOTATIONS/ + IMAGES/ (Pascal VOC) "
            "or images/ + labels/ (YOLO)"
        )
    if not images:
        raise UserError(f"{src}: no images found")
    split_of = coco.stratified_split([_neu_key(im) for im in images], FRACTIONS, seed)
    info = {
        "dataset": "neu-det",
        "importer": "defectfusion data import-neu",
        "seed": seed,
        "fractions": list(FRACTIONS),
        "split_key": "class in the file name (majority class if none)",
        "box_convention": BOX_CONVENTION,
    }
    result = _write_dataset(out, images, split_of, NEU_CLASSES, info)
    return {"layout": layout, **result}


def _read_neu_yolo(images_dir: Path, labels_dir: Path) -> list[_Image]:
    files = _image_files(images_dir)
    labels = {p.stem: p for p in labels_dir.glob("*.txt")}
    orphans = sorted(set(labels) - set(files))
    if orphans:
        raise UserError(f"{labels[orphans[0]]}: labels file without an image in {images_dir}")
    out = []
    for stem, path in tqdm(sorted(files.items()), desc="reading NEU-DET (YOLO)", disable=None):
        if stem not in labels:
            raise UserError(f"{path}: missing labels file {labels_dir / (stem + '.txt')}")
        w, h = _image_size(path)
        im = _Image(path, path.name, path.name, w, h)
        text = labels[stem].read_text(encoding="utf-8", errors="replace")
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                im.boxes.append(_parse_yolo_line(labels[stem], lineno, line, w, h))
        out.append(im)
    return out


def _parse_yolo_line(path: Path, lineno: int, line: str, width: int, height: int):
    where = f"{path}: line {lineno}"
    fields = line.split()
    if len(fields) != 5:
        raise UserError(f"{where}: expected 5 fields 'class cx cy w h', got {len(fields)}")
    try:
        cls = int(fields[0])
        cx, cy, w, h = (float(v) for v in fields[1:])
    except ValueError:
        raise UserError(f"{where}: not numbers: {line.strip()!r}") from None
    if not 0 <= cls < len(NEU_CLASSES):
        raise UserError(f"{where}: class {cls} is not in 0..{len(NEU_CLASSES) - 1}")
    x1, y1, x2, y2 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
    values = (cx, cy, w, h, x1, y1, x2, y2)
    if not all(-YOLO_EPS <= v <= 1 + YOLO_EPS for v in values):  # also rejects NaN
        raise UserError(f"{where}: box {fields[1:]} is not inside [0, 1]")
    if w <= 0 or h <= 0:
        raise UserError(f"{where}: box {fields[1:]} has non-positive width or height")
    corners = (_clip(x1, 1) * width, _clip(y1, 1) * height)
    corners += (_clip(x2, 1) * width, _clip(y2, 1) * height)
    return cls, _corners_to_xywh(*corners)


def _read_neu_voc(images_dir: Path, ann_dir: Path) -> list[_Image]:
    files = _image_files(images_dir)
    xmls = {p.stem: p for p in ann_dir.iterdir() if p.suffix.lower() == ".xml"}
    orphans = sorted(set(files) - set(xmls))
    if orphans:
        raise UserError(
            f"{files[orphans[0]]}: missing annotation file {orphans[0]}.xml in {ann_dir}"
        )
    by_name = {_norm(n): i for i, n in enumerate(NEU_CLASSES)}
    out = []
    for stem, xml in tqdm(sorted(xmls.items()), desc="reading NEU-DET (VOC)", disable=None):
        # The image is found by the XML's own name: NEU's <filename> fields are unreliable.
        if stem not in files:
            raise UserError(f"{xml}: no image {stem}.* in {images_dir}")
        path = files[stem]
        w, h = _image_size(path)
        im = _Image(path, path.name, path.name, w, h)
        try:
            root = ET.parse(xml).getroot()
        except (ET.ParseError, OSError) as e:
            raise UserError(f"{xml}: malformed XML ({e})") from None
        for k, obj in enumerate(root.iter("object"), 1):
            where = f"{xml}: object {k}"
            name = (obj.findtext("name") or "").strip()
            if _norm(name) not in by_name:
                raise UserError(f"{where}: unknown class {name!r}, expected one of {NEU_CLASSES}")
            try:
                x1, y1, x2, y2 = (float(obj.findtext(f"bndbox/{t}") or "") for t in _VOC_TAGS)
            except ValueError:
                raise UserError(f"{where}: bndbox needs numeric xmin, ymin, xmax, ymax") from None
            im.boxes.append((by_name[_norm(name)], _pixel_box(where, x1, y1, x2, y2, w, h)))
        out.append(im)
    return out


def _neu_key(im: _Image) -> Any:
    """NEU images are named after their class; fall back to the majority class of the boxes."""
    prefix = _norm(Path(im.file_name).stem.rsplit("_", 1)[0])
    for i, n in enumerate(NEU_CLASSES):
        if _norm(n) == prefix:
            return i
    return _majority_class(im)


def _majority_class(im: _Image) -> Any:
    counts = Counter(c for c, _ in im.boxes)
    if not counts:
        return "empty"
    return min(counts, key=lambda c: (-counts[c], c))


# ---- any COCO detection dataset ---------------------------------------------------------


def import_coco(
    images: str | Path,
    annotations: Sequence[str | Path],
    out: str | Path,
    seed: int = 0,
    splits: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Import COCO detection JSON(s) whose ``file_name``s are relative to `images`.

    One annotations file is split 0.7/0.15/0.15, stratified by each image's rarest class
    (fewest boxes in the file; "empty" for images without boxes). With `splits`, each file
    is taken as the split named at the same position. Category ids are remapped to
    0..K-1 in order of the original id, keeping names (``info.original_category_ids[k]``
    is the original id of class k); image and annotation ids are renumbered from 1.
    Crowd annotations (``iscrowd=1``) are dropped and counted: this layout has boxes
    only, and DETR-style training ignores crowd regions anyway. Boxes sticking out of
    their image by less than 1 px are clipped to it.
    """
    images, out = Path(images), Path(out)
    ann_files = [Path(a) for a in annotations]
    _check_inputs_outside(out, [images, *ann_files])
    _check_out(out)
    if not ann_files:
        raise UserError("import-coco: give at least one annotations file")
    if splits is None and len(ann_files) > 1:
        raise UserError("import-coco: several annotations files need a --split for each")
    if splits is not None:
        splits = list(splits)
        if len(splits) != len(ann_files):
            raise UserError(
                f"import-coco: {len(ann_files)} annotations files but {len(splits)} splits"
            )
        bad = [s for s in splits if s not in coco.SPLITS]
        if bad or len(set(splits)) != len(splits):
            raise UserError(f"import-coco: splits {splits} must be distinct names of {coco.SPLITS}")
    if not images.is_dir():
        raise UserError(f"{images}: images folder not found")

    loaded = []
    for f in ann_files:
        data = coco.load_json(f)
        errors, _ = check_coco(data, f, images, check_images=True, layout=False)
        raise_if_invalid(ValidationReport(str(f), errors))
        loaded.append(data)
    cats = {c["id"]: c["name"] for c in loaded[0]["categories"]}
    for f, d in zip(ann_files[1:], loaded[1:], strict=True):
        if {c["id"]: c["name"] for c in d["categories"]} != cats:
            raise UserError(f"{f}: categories differ from those of {ann_files[0]}")
    original_ids = sorted(cats)
    new_id = {o: k for k, o in enumerate(original_ids)}
    names = [cats[o] for o in original_ids]

    # Given splits are read in train/val/test order, so ids do not depend on argument order.
    order = (
        [0]
        if splits is None
        else sorted(range(len(ann_files)), key=lambda i: coco.SPLITS.index(splits[i]))
    )
    records: list[_Image] = []
    split_of: list[int] = []
    owner: dict[str, Path] = {}
    dropped = 0
    for i in order:
        recs, n_crowd = _coco_records(ann_files[i], loaded[i], images, new_id, owner)
        records += recs
        dropped += n_crowd
        if splits is not None:
            split_of += [coco.SPLITS.index(splits[i])] * len(recs)
    if dropped and not any(im.boxes for im in records):
        # Importing would silently give a dataset with no boxes at all.
        raise UserError(
            f"{ann_files[0]}: all {dropped} annotations are crowd regions (iscrowd=1), which "
            "this layout drops; nothing would be left to train on: set iscrowd to 0 for "
            "the boxes to keep"
        )
    if splits is None:
        totals = Counter(c for im in records for c, _ in im.boxes)
        keys = [
            min({c for c, _ in im.boxes}, key=lambda c: (totals[c], c), default="empty")
            for im in records
        ]
        split_of = coco.stratified_split(keys, FRACTIONS, seed)

    info = {
        "dataset": "coco-import",
        "importer": "defectfusion data import-coco",
        "source_annotations": [f.name for f in ann_files],
        "original_category_ids": original_ids,
        "dropped_crowd_annotations": dropped,
        "box_convention": "bbox [x, y, w, h] in pixels, rounded to 3 decimals, clipped to the image",
    }
    if splits is None:
        info |= {
            "seed": seed,
            "fractions": list(FRACTIONS),
            "split_key": "rarest class in the image",
        }
    else:
        info["splits_given"] = {f.name: s for f, s in zip(ann_files, splits, strict=True)}
    result = _write_dataset(out, records, split_of, names, info)
    return {**result, "original_category_ids": original_ids, "dropped_crowd": dropped}


def _coco_records(
    file: Path,
    data: dict[str, Any],
    images: Path,
    new_id: dict[int, int],
    owner: dict[str, Path],
) -> tuple[list[_Image], int]:
    """The images of one (already validated) COCO file, sorted by file name."""
    anns = defaultdict(list)
    dropped = 0
    for a in data["annotations"]:
        if a.get("iscrowd", 0):
            dropped += 1
        else:
            anns[a["image_id"]].append(a)
    out = []
    for im in sorted(data["images"], key=lambda im: im["file_name"]):
        name = PurePosixPath(im["file_name"]).as_posix()
        if name in owner:
            raise UserError(
                f"{file}: image id {im['id']} ({name}): also listed in {owner[name]}; "
                "an image can be in one split only"
            )
        owner[name] = file
        w, h = int(im["width"]), int(im["height"])
        rec = _Image(images / name, name, str(im.get("source_file", name)), w, h)
        for a in sorted(anns[im["id"]], key=lambda a: a["id"]):
            x, y, bw, bh = (float(v) for v in a["bbox"])
            where = f"{file}: annotation id {a['id']}"
            rec.boxes.append(
                (new_id[a["category_id"]], _pixel_box(where, x, y, x + bw, y + bh, w, h))
            )
        out.append(rec)
    return out, dropped


# ---- writing ----------------------------------------------------------------------------


def _write_dataset(
    out: Path,
    images: list[_Image],
    split_of: list[int],
    names: Sequence[str],
    info: dict[str, Any],
) -> dict[str, Any]:
    """Copy the images, write the split JSONs, validate, then move the folder to `out`.

    Image ids follow the order of `images` (1..N), annotation ids follow the images.
    """
    with staged_dir(out) as staging:
        per_split: dict[int, tuple[list, list]] = {k: ([], []) for k in range(len(coco.SPLITS))}
        ann_id = 0
        for image_id, (im, k) in enumerate(
            tqdm(list(zip(images, split_of, strict=True)), desc="copying images", disable=None),
            start=1,
        ):
            dst = coco.images_dir(staging) / im.file_name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(im.src, dst)
            imgs, anns = per_split[k]
            imgs.append(
                {
                    "id": image_id,
                    "file_name": im.file_name,
                    "width": im.width,
                    "height": im.height,
                    "source_file": im.source_file,
                }
            )
            for cls, box in im.boxes:
                ann_id += 1
                anns.append(
                    {
                        "id": ann_id,
                        "image_id": image_id,
                        "category_id": cls,
                        "bbox": box,
                        "area": _round(box[2] * box[3]),
                        "iscrowd": 0,
                    }
                )
        for k, split in enumerate(coco.SPLITS):
            imgs, anns = per_split[k]
            coco.write_split(
                staging, split, coco.make_coco(imgs, anns, names, {**info, "split": split})
            )
        report = validate_path(staging, check_images=True)
        report.errors = [e.replace(str(staging), str(out)) for e in report.errors]
        raise_if_invalid(report)
        coco.write_manifest(staging, str(info.get("importer", "import")))
        _publish(staging, out)
    return {
        "out": str(out),
        "categories": list(names),
        "images": {s: len(per_split[k][0]) for k, s in enumerate(coco.SPLITS)},
        "annotations": {s: len(per_split[k][1]) for k, s in enumerate(coco.SPLITS)},
        "empty_images": sum(1 for im in images if not im.boxes),
    }


def _is_dataset_dir(path: Path) -> bool:
    return path.is_dir() and {p.name for p in path.iterdir()} <= {
        "images",
        "annotations",
        coco.MANIFEST,
    }


def _check_out(out: Path) -> None:
    """`out` may be absent, empty, or an earlier dataset (replaced); anything else is refused.

    An earlier dataset is replaced only when it holds nothing but its split JSONs and the
    images they list: a file no split lists (a README, an unlabelled image) is not ours.
    """
    if out.exists() and not _is_dataset_dir(out):
        raise UserError(
            f"{out}: exists and is not a dataset folder; remove it or choose another --out"
        )
    foreign = coco.foreign_files(out)
    if foreign:
        raise UserError(
            f"{out}: holds {len(foreign)} file(s) that no split JSON lists, e.g. {foreign[0]}; "
            "the import would delete them: move them out or choose another --out"
        )


def _check_inputs_outside(out: Path, inputs: Sequence[Path]) -> None:
    """Refuse an `out` that is, or contains, one of the inputs: replacing it would delete them."""
    o = out.resolve()
    for p in inputs:
        r = Path(p).resolve()
        if r == o or o in r.parents:
            raise UserError(
                f"--out {out} contains the input {p}; the import replaces --out and would "
                "delete it: choose an --out outside the inputs"
            )


def _publish(staging: Path, out: Path) -> None:
    _check_out(out)
    swap_dir(staging, out)


# ---- helpers ----------------------------------------------------------------------------


def _round(v: float) -> float:
    # + 0.0 turns -0.0 into 0.0, which would otherwise print as "-0.0"
    return round(v, 3) + 0.0


def _clip(v: float, hi: float) -> float:
    return min(max(v, 0.0), hi)


def _corners_to_xywh(x1: float, y1: float, x2: float, y2: float) -> list[float]:
    # Round the corners first, then their difference: equal corners give equal boxes.
    x1, y1, x2, y2 = (_round(v) for v in (x1, y1, x2, y2))
    return [x1, y1, _round(x2 - x1), _round(y2 - y1)]


def _pixel_box(where: str, x1: float, y1: float, x2: float, y2: float, w: int, h: int):
    """Corners in pixels -> canonical xywh, clipping overshoots up to `PIXEL_TOL`."""
    if not (x1 < x2 and y1 < y2):
        raise UserError(
            f"{where}: box corners ({x1:g}, {y1:g}, {x2:g}, {y2:g}) have non-positive size"
        )
    if x1 < -PIXEL_TOL or y1 < -PIXEL_TOL or x2 > w + PIXEL_TOL or y2 > h + PIXEL_TOL:
        raise UserError(
            f"{where}: box ({x1:g}, {y1:g}, {x2:g}, {y2:g}) lies outside the {w}x{h} image"
        )
    x1, x2, y1, y2 = _clip(x1, w), _clip(x2, w), _clip(y1, h), _clip(y2, h)
    if not (x1 < x2 and y1 < y2):
        raise UserError(f"{where}: box lies outside the {w}x{h} image")
    return _corners_to_xywh(x1, y1, x2, y2)


def _norm(name: str) -> str:
    """'Rolled-in Scale' == 'rolled-in_scale' == 'rolled_in_scale'."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _child_dir(parent: Path, name: str) -> Path | None:
    """The sub-folder called `name`, in any letter case (VOC uses ANNOTATIONS/, IMAGES/)."""
    for p in sorted(parent.iterdir()):
        if p.is_dir() and p.name.lower() == name:
            return p
    return None


def _image_files(folder: Path) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in IMAGE_EXTS:
            if p.stem in files:
                raise UserError(f"{p}: two images named {p.stem}.* ({files[p.stem].name})")
            files[p.stem] = p
    return files


def _image_size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as im:
            size = im.size
    except Image.DecompressionBombError:
        raise UserError(f"{path}: {image_too_large(None, None)}") from None
    except Exception as e:  # PIL raises many types for a bad file
        raise UserError(f"{path}: unreadable image ({e.__class__.__name__}: {e})") from None
    too_large = image_too_large(*size)
    if too_large:
        raise UserError(f"{path}: {too_large}")
    return size


# The pipeline's makers: each kind of config.DATASET_KINDS and the function that makes its
# folder from ``pipeline.dataset`` (`data.prepare`). A new importer is a function above, its
# maker and its line here, plus its kind in config.DATASET_KINDS and its prompts/KIND.yaml.
def make_synth(dataset: dict[str, Any], image_size: int, out: str | Path) -> dict[str, Any]:
    from defectfusion.data.synth import SynthSpec, generate  # deferred: loads scipy

    spec = SynthSpec(
        seed=int(dataset.get("seed", 0)),
        n_train=int(dataset["n_train"]),
        n_val=int(dataset["n_val"]),
        n_test=int(dataset["n_test"]),
        image_size=image_size,
    )
    return generate(out, spec)


def make_neu(dataset: dict[str, Any], image_size: int, out: str | Path) -> dict[str, Any]:
    return import_neu(dataset["src"], out, seed=int(dataset.get("seed", 0)))


def make_coco(dataset: dict[str, Any], image_size: int, out: str | Path) -> dict[str, Any]:
    seed = int(dataset.get("seed", 0))
    return import_coco(dataset["src"], [dataset["annotations"]], out, seed=seed, splits=None)


MAKERS = {"synth": make_synth, "neu": make_neu, "coco": make_coco}
