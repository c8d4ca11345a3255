"""Check a dataset in the layout of `coco.py` and summarise it.

`validate_path` never stops at the first problem: it collects one line per problem,
each naming the file and the record (image id, annotation id, or list index when the
id itself is bad), so a user can fix a dataset in one pass. Importers use
`raise_if_invalid` to turn a failed report into a `UserError`.

`check_coco` also runs in a lenient mode (``layout=False``) for third-party COCO files:
there category ids may be any integers and ``area``/``iscrowd`` may be absent.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from defectfusion.core.errors import UserError, is_int, is_number
from defectfusion.data import coco

# A box may stick out of its image by this much (pixels, or a fraction of the side when
# larger): annotation tools round corners, and 200.0004 on a 200-px image is not a bug.
BOX_TOL_PX = 1.0
BOX_TOL_REL = 1e-3

# COCO's absolute size classes (AP_s / AP_m / AP_l), on sqrt(area) in pixels.
COCO_SIZE_EDGES = (32.0, 96.0)
# Relative size classes, on sqrt(box area / image area).
REL_SIZE_EDGES = (0.1, 0.3)

MAX_ERRORS_SHOWN = 50


@dataclass
class SplitStats:
    """What one split JSON holds."""

    split: str
    file: str
    images: int = 0
    annotations: int = 0
    empty_images: int = 0
    boxes_per_class: dict[str, int] = field(default_factory=dict)  # name -> count, in id order
    sqrt_area: tuple[float, float, float] | None = None  # min, median, max in pixels
    coco_sizes: dict[str, int] = field(default_factory=dict)  # small / medium / large
    rel_sizes: dict[str, int] = field(default_factory=dict)  # <0.1 / 0.1-0.3 / >=0.3


@dataclass
class ValidationReport:
    path: str
    errors: list[str] = field(default_factory=list)
    splits: dict[str, SplitStats] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors

    def summary(self) -> str:
        lines = [f"dataset: {self.path}"]
        if self.splits:
            lines += _stats_table(list(self.splits.values()))
        if self.ok:
            lines.append("OK: no problems found")
        else:
            lines.append(f"INVALID: {len(self.errors)} error(s)")
            lines += [f"  {e}" for e in self.errors[:MAX_ERRORS_SHOWN]]
            if len(self.errors) > MAX_ERRORS_SHOWN:
                lines.append(f"  ... and {len(self.errors) - MAX_ERRORS_SHOWN} more")
        return "\n".join(lines)


def raise_if_invalid(report: ValidationReport) -> None:
    """Raise one `UserError` line ("N errors; first: ...") if the report has errors."""
    if not report.ok:
        n = len(report.errors)
        raise UserError(f"{n} error{'s' if n > 1 else ''}; first: {report.errors[0]}")


def validate_path(path: str | Path, check_images: bool = True) -> ValidationReport:
    """Validate a dataset folder (``DIR/annotations/{train,val,test}.json``) or one split JSON.

    A missing path, or a folder without any split JSON, raises `UserError`; everything
    wrong inside the files (including an empty or malformed JSON) is an error line of
    the report.
    """
    path = Path(path)
    if path.is_dir():
        files = {s: coco.split_path(path, s) for s in coco.SPLITS}
        files = {s: f for s, f in files.items() if f.is_file()}
        if not files:
            raise UserError(f"{path}: no annotations/{{train,val,test}}.json in this folder")
    elif path.is_file():
        files = {path.stem: path}
    else:
        raise UserError(f"{path}: no such file or folder")

    report = ValidationReport(path=str(path))
    loaded: dict[str, dict[str, Any]] = {}
    for split, file in files.items():
        try:
            data = coco.load_json(file)
        except UserError as e:
            report.errors.append(_one_line(str(e)))
            continue
        errors, stats = check_coco(
            data, file, coco.images_dir(coco.dataset_root(file)), check_images, split=split
        )
        report.errors += errors
        if stats is not None:
            report.splits[split] = stats
            loaded[split] = data
    report.errors += _cross_split_errors(loaded, files)
    # Nothing to train or evaluate on is not "OK" (a tiny import may leave one split empty;
    # training and evaluation refuse an empty split they read).
    if loaded and all(d.get("images") == [] for d in loaded.values()):
        report.errors.append(f"{path}: holds no images in any split")
    return report


def check_coco(
    data: Any,
    file: str | Path,
    images_root: Path | None,
    check_images: bool = True,
    layout: bool = True,
    split: str = "",
) -> tuple[list[str], SplitStats | None]:
    """All problems of one COCO object read from `file`, and its statistics.

    `layout=True` checks the project's conventions (contiguous category ids 0..K-1,
    image ids >= 1, ``area``/``iscrowd`` present); `layout=False` only what any COCO
    detection file needs. Stats are None when the top-level structure is unusable.
    """
    errs: list[str] = []

    def err(record: str, msg: str) -> None:
        errs.append(_one_line(f"{file}: {record}: {msg}"))

    if not isinstance(data, dict):
        return [f"{file}: top level is {type(data).__name__}, expected a COCO object"], None
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            got = "missing" if key not in data else f"a {type(data[key]).__name__}"
            err(f"key '{key}'", f"{got}, expected a list")
    if errs:
        return errs, None

    cats = _check_categories(data["categories"], layout, err)
    images = _check_images(data["images"], layout, err)
    # Ids of image records that are present but broken (already reported): their
    # annotations are skipped silently rather than reported as pointing nowhere.
    broken = {i.get("id") for i in data["images"] if isinstance(i, dict)} - set(images)
    broken = {i for i in broken if isinstance(i, int)}
    n_per_image, sizes = _check_annotations(data["annotations"], images, broken, cats, layout, err)
    if check_images and images_root is not None:
        _check_image_files(images, images_root, err)

    per_class = Counter(sizes["cat"])
    stats = SplitStats(
        split=split or Path(file).stem,
        file=str(file),
        images=len(images),
        annotations=len(sizes["cat"]),
        empty_images=sum(1 for i in images if n_per_image[i] == 0),
        boxes_per_class={cats[c]: per_class[c] for c in sorted(cats)},
    )
    if sizes["side"]:
        side, rel = np.array(sizes["side"]), np.array(sizes["rel"])
        stats.sqrt_area = (float(side.min()), float(np.median(side)), float(side.max()))
        stats.coco_sizes = _bucket(side, COCO_SIZE_EDGES, ("small", "medium", "large"))
        stats.rel_sizes = _bucket(rel, REL_SIZE_EDGES, ("<0.1", "0.1-0.3", ">=0.3"))
    return errs, stats


# ---- the checks run where data is used ----------------------------------------------------


def check_loadable(data: Any, file: str | Path) -> None:
    """The cheap subset of `check_coco` that training and evaluation run on every split they
    load (no image files opened): a usable structure, integer ids, contiguous category ids,
    at least one image, file names inside the images folder, finite positive boxes inside
    their image. Raises one `UserError` line: the first problem and how many there are.
    """
    if not isinstance(data, dict):
        raise UserError(f"{file}: top level is {type(data).__name__}, expected a COCO object")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise UserError(f"{file}: not COCO detection JSON (no '{key}' list)")
    errs: list[str] = []

    def err(record: str, msg: str) -> None:
        errs.append(_one_line(f"{file}: {record}: {msg}"))

    ids = [c.get("id") if isinstance(c, dict) else None for c in data["categories"]]
    names = [c.get("name") if isinstance(c, dict) else None for c in data["categories"]]
    if not ids:
        err("categories", "empty list, expected at least one category")
    elif not all(is_int(i) for i in ids) or sorted(ids) != list(range(len(ids))):
        err("categories", f"ids {ids[:10]} are not the integers 0..{len(ids) - 1}")
    elif not all(isinstance(n, str) and n for n in names):
        err("categories", "every category needs a non-empty string name")
    k = len(ids)
    if not data["images"]:
        err("images", "empty list; a split to train or evaluate on needs at least one image")
    sizes: dict[int, tuple[float, float]] = {}
    for i, im in enumerate(data["images"]):
        rec = _record("image", im, i, "images")
        if not isinstance(im, dict) or not is_int(im.get("id")):
            err(rec, "not an object with an integer id")
            continue
        name, w, h = im.get("file_name"), im.get("width"), im.get("height")
        if im["id"] in sizes:
            err(rec, "duplicate image id")
        elif not isinstance(name, str) or not name or "\0" in name:
            err(rec, f"file_name {name!r} is not a non-empty string")
        elif PurePosixPath(name).is_absolute() or ".." in PurePosixPath(name).parts:
            err(rec, f"file_name {name!r} must be relative to the images folder, without '..'")
        elif not all(is_number(v) and float(v).is_integer() and v > 0 for v in (w, h)):
            err(rec, f"width {w!r} and height {h!r} must be positive integers")
        else:
            sizes[im["id"]] = (float(w), float(h))
    for i, a in enumerate(data["annotations"]):
        rec = _record("annotation", a, i, "annotations").replace("annotation id", "annotation")
        if not isinstance(a, dict) or not is_int(a.get("id")):
            err(rec, "not an object with an integer id")
            continue
        if not is_int(a.get("image_id")) or a["image_id"] not in sizes:
            err(rec, f"image_id {a.get('image_id')!r} is not in 'images'")
            continue
        cat = a.get("category_id")
        if not is_int(cat) or not 0 <= cat < k:
            err(rec, f"category_id {cat!r} is not in 0..{k - 1}")
            continue
        box = a.get("bbox")
        if not (isinstance(box, list) and len(box) == 4 and all(is_number(v) for v in box)):
            err(rec, f"bbox {box!r} is not 4 finite numbers [x, y, w, h]")
            continue
        x, y, bw, bh = (float(v) for v in box)
        W, H = sizes[a["image_id"]]
        tx, ty = max(BOX_TOL_PX, BOX_TOL_REL * W), max(BOX_TOL_PX, BOX_TOL_REL * H)
        if bw <= 0 or bh <= 0:
            err(rec, f"bbox {box} has non-positive width or height")
        elif x < -tx or y < -ty or x + bw > W + tx or y + bh > H + ty:
            err(rec, f"bbox {box} lies outside image id {a['image_id']} ({W:g}x{H:g})")
    if errs:
        more = f" ({len(errs)} problems in all)" if len(errs) > 1 else ""
        root = coco.dataset_root(file)
        raise UserError(f"{errs[0]}{more}; `defectfusion data validate {root}` lists them all")


def image_too_large(width: int | None, height: int | None) -> str | None:
    """Why an image of this size is refused before decoding (None: it is not); sizes None:
    PIL itself refused the header as a decompression bomb."""
    if width is None or height is None or width * height > coco.MAX_IMAGE_PIXELS:
        size = f"{width}x{height} pixels is" if width is not None else "image is"
        return (
            f"{size} over the {coco.MAX_IMAGE_PIXELS / 1e6:g} Mpx limit "
            "(a decompression bomb, or a scan to downscale before use)"
        )
    return None


# ---- record checks ----------------------------------------------------------------------


def _check_categories(cats: list[Any], layout: bool, err) -> dict[int, str]:
    out: dict[int, str] = {}
    for i, c in enumerate(cats):
        rec = _record("category", c, i, "categories")
        if not isinstance(c, dict):
            err(rec, "not an object")
            continue
        if _missing(c, ("id", "name"), rec, err):
            continue
        if not is_int(c["id"]):
            err(rec, f"id {c['id']!r} is not an integer")
        elif not isinstance(c["name"], str) or not c["name"]:
            err(rec, f"name {c['name']!r} is not a non-empty string")
        elif c["id"] in out:
            err(rec, "duplicate category id")
        else:
            out[c["id"]] = c["name"]
    dup_names = [n for n, k in Counter(out.values()).items() if k > 1]
    if dup_names:
        err("categories", f"duplicate names {sorted(dup_names)}")
    if layout and out and sorted(out) != list(range(len(out))):
        err("categories", f"ids {sorted(out)} are not contiguous 0..{len(out) - 1}")
    if not cats:
        err("categories", "empty list, expected at least one category")
    return out


def _check_images(images: list[Any], layout: bool, err) -> dict[int, dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {}
    seen_names: dict[str, int] = {}
    for i, im in enumerate(images):
        rec = _record("image", im, i, "images")
        if not isinstance(im, dict):
            err(rec, "not an object")
            continue
        if _missing(im, ("id", "file_name", "width", "height"), rec, err):
            continue
        iid, name, w, h = im["id"], im["file_name"], im["width"], im["height"]
        if not is_int(iid) or (layout and iid < 1):
            err(
                rec,
                f"id {iid!r} is not an integer >= 1" if layout else f"id {iid!r} is not an integer",
            )
            continue
        rec = f"image id {iid} ({name})"
        if iid in out:
            err(rec, "duplicate image id")
            continue
        bad = False
        for key, v in (("width", w), ("height", h)):
            if not (is_number(v) and float(v).is_integer() and v > 0):
                err(rec, f"{key} {v!r} is not a positive integer")
                bad = True
        if not isinstance(name, str) or not name:
            err(rec, f"file_name {name!r} is not a non-empty string")
            bad = True
        elif PurePosixPath(name).is_absolute() or ".." in PurePosixPath(name).parts:
            err(rec, "file_name must be relative to the images folder, without '..'")
            bad = True
        elif name in seen_names:
            err(rec, f"same file_name as image id {seen_names[name]}")
        else:
            seen_names[name] = iid
        if not bad:
            out[iid] = im
    return out


def _check_annotations(
    anns: list[Any],
    images: dict[int, dict[str, Any]],
    broken: set[int],
    cats: dict[int, str],
    layout: bool,
    err,
) -> tuple[Counter, dict[str, list]]:
    n_per_image: Counter = Counter()
    sizes: dict[str, list] = {"cat": [], "side": [], "rel": []}
    seen: set[int] = set()
    required = ("id", "image_id", "category_id", "bbox")
    if layout:
        required += ("area", "iscrowd")
    for i, a in enumerate(anns):
        rec = _record("annotation", a, i, "annotations")
        if not isinstance(a, dict):
            err(rec, "not an object")
            continue
        if _missing(a, required, rec, err):
            continue
        if not is_int(a["id"]):
            err(rec, f"id {a['id']!r} is not an integer")
            continue
        if a["id"] in seen:
            err(rec, "duplicate annotation id")
            continue
        seen.add(a["id"])
        if a["image_id"] in broken:
            continue
        if a["image_id"] not in images:
            err(rec, f"image_id {a['image_id']!r} is not an image of this file")
            continue
        if a["category_id"] not in cats:
            err(rec, f"category_id {a['category_id']!r} is not a category of this file")
            continue
        box = a["bbox"]
        if not (isinstance(box, list) and len(box) == 4 and all(is_number(v) for v in box)):
            err(rec, f"bbox {box!r} is not 4 finite numbers [x, y, w, h]")
            continue
        x, y, w, h = (float(v) for v in box)
        im = images[a["image_id"]]
        W, H = float(im["width"]), float(im["height"])
        if w <= 0 or h <= 0:
            err(rec, f"bbox {box} has non-positive width or height")
            continue
        tx, ty = max(BOX_TOL_PX, BOX_TOL_REL * W), max(BOX_TOL_PX, BOX_TOL_REL * H)
        if x < -tx or y < -ty or x + w > W + tx or y + h > H + ty:
            err(rec, f"bbox {box} lies outside image id {im['id']} ({W:g}x{H:g})")
            continue
        if layout:
            area = a["area"]
            if not is_number(area) or not math.isclose(area, w * h, rel_tol=1e-3, abs_tol=1e-2):
                err(rec, f"area {area!r} is not bbox w*h = {w * h:g}")
            if a["iscrowd"] != 0:
                err(rec, f"iscrowd {a['iscrowd']!r}, this layout has only iscrowd 0")
        n_per_image[a["image_id"]] += 1
        sizes["cat"].append(a["category_id"])
        sizes["side"].append(math.sqrt(w * h))
        sizes["rel"].append(math.sqrt(w * h / (W * H)))
    return n_per_image, sizes


def _check_image_files(images: dict[int, dict[str, Any]], root: Path, err) -> None:
    # tqdm(disable=None) shows a bar on a terminal only, so logs and tests stay clean.
    for iid, im in tqdm(images.items(), desc="checking images", unit="img", disable=None):
        rec = f"image id {iid} ({im['file_name']})"
        path = root / im["file_name"]
        if not path.is_file():
            err(rec, f"image file {path} not found")
            continue
        try:
            # verify() checks the structure (e.g. PNG checksums) but must be the last call on
            # its object; load() then decodes every pixel, which catches truncated JPEGs.
            with Image.open(path) as f:
                too_large = image_too_large(*f.size)
                if too_large is None:
                    f.verify()
            if too_large is not None:
                err(rec, f"image file {path}: {too_large}")
                continue
            with Image.open(path) as f:
                f.load()
                size = f.size
        except Image.DecompressionBombError:
            err(rec, f"image file {path}: {image_too_large(None, None)}")
            continue
        except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError...)
            err(rec, f"image file {path} is unreadable ({e.__class__.__name__}: {e})")
            continue
        if size != (int(im["width"]), int(im["height"])):
            err(
                rec,
                f"JSON says {int(im['width'])}x{int(im['height'])} but {path} is "
                f"{size[0]}x{size[1]}",
            )


def _cross_split_errors(loaded: dict[str, dict[str, Any]], files: dict[str, Path]) -> list[str]:
    """Splits must share their categories and must not share images (a leak)."""
    errs: list[str] = []
    if len(loaded) < 2:
        return errs
    first, *rest = loaded

    def cat_list(d: dict[str, Any]) -> list[str]:
        # repr() so that malformed ids or names (already reported) cannot break the sort
        return sorted(
            repr((c.get("id"), c.get("name"))) for c in d["categories"] if isinstance(c, dict)
        )

    for s in rest:
        if cat_list(loaded[s]) != cat_list(loaded[first]):
            errs.append(f"{files[s]}: categories differ from those of {files[first]}")
    owner: dict[str, tuple[str, Any]] = {}
    for s, d in loaded.items():
        for im in d["images"]:
            if not isinstance(im, dict) or not isinstance(im.get("file_name"), str):
                continue
            name = im["file_name"]
            if name in owner and owner[name][0] != s:
                other, oid = owner[name]
                errs.append(
                    f"{files[s]}: image id {im.get('id')} ({name}): also in {files[other]} "
                    f"as image id {oid} (splits must not share images)"
                )
            else:
                owner.setdefault(name, (s, im.get("id")))
    return errs


# ---- helpers ----------------------------------------------------------------------------


def _record(kind: str, rec: Any, index: int, list_name: str) -> str:
    """'annotation id 7' when the record has a usable id, else 'annotations[3]'."""
    if isinstance(rec, dict) and is_int(rec.get("id")):
        return f"{kind} id {rec['id']}"
    return f"{list_name}[{index}]"


def _missing(rec: dict[str, Any], keys: tuple[str, ...], name: str, err) -> bool:
    missing = [k for k in keys if k not in rec]
    if missing:
        err(name, f"missing required key(s) {', '.join(missing)}")
    return bool(missing)


def _one_line(msg: str) -> str:
    return " ".join(msg.split())


def _bucket(values: np.ndarray, edges: tuple[float, float], names: tuple[str, ...]) -> dict:
    idx = np.searchsorted(np.asarray(edges), values, side="right")
    return {n: int((idx == i).sum()) for i, n in enumerate(names)}


def _stats_table(stats: list[SplitStats]) -> list[str]:
    names = list(dict.fromkeys(n for s in stats for n in s.boxes_per_class))
    labels = ["empty images"] + [f"{i} {n}" for i, n in enumerate(names)]
    width = max(len(label) for label in labels)
    head = "".join(f"{s.split:>9}" for s in stats) + f"{'total':>9}"

    def row(label: str, values: list[int]) -> str:
        return f"  {label:<{width}}" + "".join(f"{v:>9}" for v in values) + f"{sum(values):>9}"

    lines = [f"  {'':<{width}}{head}"]
    lines.append(row("images", [s.images for s in stats]))
    lines.append(row("empty images", [s.empty_images for s in stats]))
    lines.append(row("boxes", [s.annotations for s in stats]))
    lines.append(f"boxes per class ({len(names)} classes):")
    for i, n in enumerate(names):
        lines.append(row(f"{i} {n}", [s.boxes_per_class.get(n, 0) for s in stats]))
    lines.append("box size, sqrt(area) in pixels (min / median / max):")
    for s in stats:
        if s.sqrt_area:
            lo, med, hi = s.sqrt_area
            lines.append(f"  {s.split:<8} {lo:.1f} / {med:.1f} / {hi:.1f}")
    lines.append(
        f"COCO size classes (small < {COCO_SIZE_EDGES[0]:g} px <= medium < "
        f"{COCO_SIZE_EDGES[1]:g} px <= large) and relative size sqrt(box / image area):"
    )
    for s in stats:
        if s.coco_sizes:
            abs_part = ", ".join(f"{k} {v}" for k, v in s.coco_sizes.items())
            rel_part = ", ".join(f"{k} {v}" for k, v in s.rel_sizes.items())
            lines.append(f"  {s.split:<8} {abs_part} | relative {rel_part}")
    return lines
