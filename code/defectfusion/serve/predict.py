"""Use a trained detector on any images: `defectfusion predict` and `defectfusion.load`.

``defectfusion.load(path)`` takes a checkpoint (``best.pt``, Phase 1 or Phase 2) or a folder
written by ``defectfusion export --format hf`` and returns a `Detector`;
``Detector.predict(images)`` takes image files, PIL images or arrays and returns, per image, a
list of ``{"category_id", "label", "score", "box": [x0, y0, x1, y1]}`` (pixels of the image as
given, best first).

Preprocessing is the evaluation's (data/loader.py with ``train=False``): the image as 8-bit
RGB, resized to the checkpoint's ``image_size`` square with torchvision's antialiased
bilinear resize (no padding), scaled to [0, 1] and normalised with the mean/std of the
checkpoint's ``data.normalize`` (ImageNet's by default).
Boxes come back through `evaluate.postprocess`, scaled by each image's own width and height.

Images of any mode are brought to 8-bit RGB first: grey and palette images are expanded,
RGBA loses its alpha channel (as in evaluation), and 16-bit images are scaled by 255/65535
(not clipped, which would turn everything above 255 white). 32-bit integer and float images
are stretched from their minimum to their maximum. EXIF orientation is applied, so the boxes
match the image as a viewer shows it (transformers' pipeline does the same).
"""

from __future__ import annotations

import glob as globlib
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError
from torch import nn
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F
from tqdm import tqdm

from defectfusion.core.errors import UserError, is_number
from defectfusion.core.fsutil import atomic_write, atomic_write_json
from defectfusion.core.jsonio import load_json
from defectfusion.data.validate import image_too_large
from defectfusion.evaluation.evaluate import BOX_DECIMALS, SCORE_DECIMALS, postprocess
from defectfusion.model.checkpoint import input_mean_std, operating_point

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".pgm", ".ppm")
RESULTS_FILE = "predictions.json"
IMAGES_FILE = "images.json"  # the image list: ids to files, and what predict wrote it with
DRAWN_DIR = "drawn"

Detection = dict[str, Any]
ImageInput = str | Path | Image.Image | np.ndarray


# ---- reading images ---------------------------------------------------------------------


def to_rgb8(im: Image.Image) -> Image.Image:
    """Any PIL image -> 8-bit RGB, scaling high bit depths instead of clipping them."""
    im = ImageOps.exif_transpose(im)
    if im.mode in ("RGB",):
        return im
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        a = np.asarray(im).astype(np.float64)
        if im.mode.startswith("I;16") or (im.mode == "I" and a.min() >= 0 and a.max() <= 65535):
            # A 16-bit image (Pillow opens some 16-bit PNGs as "I"): full range to 0..255.
            a = a * (255.0 / 65535.0)
        else:  # unknown range (32-bit int, float): stretch min..max
            lo, hi = float(a.min()), float(a.max())
            a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
        grey = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    # L, LA, P, PA, RGBA, CMYK, YCbCr, 1, ...: Pillow's conversion (alpha dropped, as the
    # evaluation's `im.convert("RGB")` does).
    return im.convert("RGB")


def read_image(path: str | Path) -> Image.Image:
    """Open an image file as 8-bit RGB; an unreadable file is the user's error, in one line."""

    path = Path(path)
    try:
        with Image.open(path) as im:
            # the size from the header, before a pixel is decoded
            if why := image_too_large(im.width, im.height):
                raise UserError(f"{path}: {why}")
            im.load()
            return to_rgb8(im)
    except FileNotFoundError:
        raise UserError(f"{path}: image file not found") from None
    except Image.DecompressionBombError:  # PIL's own guard (its error is an Exception)
        raise UserError(f"{path}: {image_too_large(None, None)}") from None
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise UserError(f"{path}: cannot read image ({e.__class__.__name__}: {e})") from None


def as_rgb8(image: ImageInput) -> Image.Image:
    if isinstance(image, Image.Image):
        return to_rgb8(image)
    if isinstance(image, np.ndarray):
        a = image
        if a.ndim == 3 and a.shape[-1] == 1:
            a = a[..., 0]
        if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)):
            raise UserError(f"image array of shape {a.shape}: expected HxW, HxWx3 or HxWx4")
        if a.dtype == np.uint16:
            a = a.astype(np.float64) * (255.0 / 65535.0)
            a = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        elif a.dtype != np.uint8:
            raise UserError(f"image array of dtype {a.dtype}: expected uint8 or uint16")
        return Image.fromarray(np.ascontiguousarray(a)).convert("RGB")
    return read_image(image)


def find_images(spec: str | Path) -> tuple[list[Path], Path]:
    """A folder (its image files, not recursive), a glob or one file -> sorted paths and the
    folder their names in the results are relative to."""
    text = str(spec)
    path = Path(text)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and _is_image_name(p))
        if not files:
            raise UserError(f"{path}: no image files in this folder ({', '.join(IMAGE_SUFFIXES)})")
        return files, path
    if path.is_file():
        return [path], path.parent
    if not globlib.has_magic(text):
        raise UserError(f"{text}: no such file or folder")
    files = sorted(
        Path(p)
        for p in globlib.glob(text, recursive=True)
        if Path(p).is_file() and _is_image_name(Path(p))
    )
    if not files:
        raise UserError(f"{text}: no image files matched")
    parts = []  # the glob's fixed leading folders are the root
    for part in Path(text).parts:
        if globlib.has_magic(part):
            break
        parts.append(part)
    root = Path(*parts) if parts else Path(".")
    return files, root


def _is_image_name(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")


# ---- the detector -----------------------------------------------------------------------


@dataclass
class Detector:
    """A loaded model and what it needs to predict: input size, normalisation, class names."""

    model: nn.Module
    meta: dict[str, Any]
    device: torch.device
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:

        # The checkpoint's data.normalize (a Phase 2 variant may change it), or the mean/std
        # of a transformers folder's image processor.
        mean, std = input_mean_std(self.meta)
        self.mean = list(self.mean or mean)
        self.std = list(self.std or std)
        # The evaluation's last two steps (loader.CocoDetection.finish), on a batch.
        self._finish = v2.Compose(
            [v2.ToDtype(torch.float32, scale=True), v2.Normalize(self.mean, self.std)]
        )
        self.model.to(self.device).eval()
        # As evaluate.predict does: some matmul kernels depend on requires_grad even under
        # no_grad; with every flag off, predictions equal the evaluation's bit for bit.
        for p in self.model.parameters():
            p.requires_grad_(False)

    @property
    def threshold(self) -> float:
        """The default score threshold: the operating point the model was evaluated at
        (`checkpoint.operating_point`), for ``predict``, the API and the model card alike."""

        return operating_point(self.meta)

    @property
    def class_names(self) -> list[str]:
        return list(self.meta["class_names"])

    @property
    def image_size(self) -> int:
        return int(self.meta["image_size"])

    @property
    def phase(self) -> int:
        return int(self.meta.get("phase", 1))

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """8-bit RGB images -> ``pixel_values`` [B,3,S,S], exactly as evaluation makes them."""
        s = self.image_size
        resized = [F.resize(F.pil_to_tensor(im), [s, s], antialias=True) for im in images]
        return self._finish(torch.stack(resized))

    @torch.no_grad()
    def predict_rgb(
        self, images: Sequence[Image.Image], threshold: float | None = None, max_dets: int = 300
    ) -> list[list[Detection]]:
        """One batch of 8-bit RGB images -> their detections with ``score >= threshold``
        (None: `threshold`, the model's operating point); boxes ``[x0, y0, x1, y1]`` pixels."""

        if not images:
            return []
        threshold = self.threshold if threshold is None else check_threshold(threshold)
        pixel_values = self.preprocess(images).to(self.device)
        out = self.model(pixel_values=pixel_values)
        sizes = [(im.height, im.width) for im in images]
        dets = postprocess(out.logits, out.pred_boxes, sizes, max_dets)
        names = self.class_names
        result = []
        for det in dets:
            keep = det["scores"] >= threshold
            result.append(
                [
                    {
                        "category_id": int(label),
                        "label": names[int(label)],
                        "score": float(score),
                        "box": [float(v) for v in box],
                    }
                    for score, label, box in zip(
                        det["scores"][keep].tolist(),
                        det["labels"][keep].tolist(),
                        det["boxes"][keep].tolist(),
                        strict=True,
                    )
                ]
            )
        return result

    def predict(
        self,
        images: ImageInput | Sequence[ImageInput],
        threshold: float | None = None,
        batch_size: int = 8,
        max_dets: int = 300,
        progress: bool = False,
    ) -> list[Detection] | list[list[Detection]]:
        """Detections of one image (a list) or of several (a list of lists), best first:
        ``{"category_id", "label", "score", "box"}`` with ``box`` = ``[x0, y0, x1, y1]`` in
        pixels of the original image (``predictions.json`` has COCO's ``[x, y, w, h]``).
        ``threshold`` None keeps the scores at or above the model's operating point
        (`Detector.threshold`, what ``defectfusion predict`` uses); 0 keeps all.

        An image is a file path, a PIL image or an array (HxW or HxWx3/4, uint8 or uint16).
        A folder or a glob pattern stands for its image files (sorted by name).
        """
        single = isinstance(images, str | Path | Image.Image | np.ndarray)
        if isinstance(images, str | Path) and not Path(images).is_file():
            images, _ = find_images(images)
            single = False
        items = [images] if single else list(images)  # type: ignore[list-item]
        out: list[list[Detection]] = []
        for batch in tqdm(
            list(_chunks(items, batch_size)),
            desc="predict",
            unit="batch",
            disable=None if progress else True,
        ):
            out += self.predict_rgb([as_rgb8(x) for x in batch], threshold, max_dets)
        return out[0] if single else out


def check_threshold(threshold: float) -> float:
    if not (is_number(threshold) and 0.0 <= threshold <= 1.0):
        raise UserError(f"threshold {threshold!r}: must be a number between 0 and 1")
    return float(threshold)


def _chunks(items: Sequence[Any], n: int) -> Iterator[Sequence[Any]]:
    if n < 1:
        raise UserError(f"batch size {n}: must be at least 1")
    for i in range(0, len(items), n):
        yield items[i : i + n]


def default_device(device: str | torch.device | None = None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise UserError(f"device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device!r}: CUDA is not available on this machine")
    return dev


def load(path: str | Path, device: str | torch.device | None = None) -> Detector:
    """A `Detector` from a checkpoint file or a folder of ``defectfusion export --format hf``."""
    path = Path(path)
    dev = default_device(device)
    if path.is_dir():
        from defectfusion.serve.export import load_exported

        model, meta = load_exported(path)
    else:
        from defectfusion.model.checkpoint import load_detector

        model, meta = load_detector(path)
    return Detector(model, meta, dev)


# ---- COCO results and drawings ----------------------------------------------------------


def coco_records(
    image_id: int, file_name: str, detections: Sequence[Detection]
) -> list[dict[str, Any]]:
    """Detections -> COCO results records (``bbox`` = ``[x, y, w, h]``), with the file name."""

    return [
        {
            "image_id": image_id,
            "file_name": file_name,
            "category_id": d["category_id"],
            "category_name": d["label"],
            "bbox": [
                round(v, BOX_DECIMALS)
                for v in (
                    d["box"][0],
                    d["box"][1],
                    d["box"][2] - d["box"][0],
                    d["box"][3] - d["box"][1],
                )
            ],
            "score": round(d["score"], SCORE_DECIMALS),
        }
        for d in detections
    ]


# Tableau 10: distinct, readable colours; a class keeps its colour across images.
PALETTE = [
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
]  # fmt: skip


def _text_colour(bg: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black or white, whichever contrasts more with `bg` (WCAG relative luminance)."""

    def lin(c: int) -> float:
        c /= 255.0
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    lum = 0.2126 * lin(bg[0]) + 0.7152 * lin(bg[1]) + 0.0722 * lin(bg[2])
    return (0, 0, 0) if (lum + 0.05) / 0.05 > 1.05 / (lum + 0.05) else (255, 255, 255)


def draw_detections(image: Image.Image, detections: Sequence[Detection]) -> Image.Image:
    """A copy of `image` with each box, its class name and score: the label is written on a
    filled box of the class colour in black or white (whichever contrasts more), so it reads
    on any background."""
    out = image.convert("RGB")
    draw = ImageDraw.Draw(out)
    side = max(out.width, out.height)
    line = max(1, round(side / 300))
    font_size = max(10, round(side / 40))
    try:
        font: Any = ImageFont.load_default(size=font_size)
    except (TypeError, OSError):  # a Pillow without FreeType: the fixed bitmap font
        font = ImageFont.load_default()
    # Worst first, so the best detection's label ends on top.
    for d in sorted(detections, key=lambda d: d["score"]):
        colour = PALETTE[d["category_id"] % len(PALETTE)]
        x0, y0, x1, y1 = d["box"]
        draw.rectangle([x0, y0, x1, y1], outline=colour, width=line)
        text = f"{d['label']} {d['score']:.2f}"
        left, t, r, b = draw.textbbox((0, 0), text, font=font)
        tw, th = r - left + 2 * line + 2, b - t + 2 * line + 2
        tx = min(max(0.0, x0), max(0.0, out.width - tw))
        ty = y0 - th if y0 - th >= 0 else min(y0, out.height - th)  # above the box, else inside
        draw.rectangle([tx, ty, tx + tw, ty + th], fill=colour)
        draw.text(
            (tx + line + 1 - left, ty + line + 1 - t), text, fill=_text_colour(colour), font=font
        )
    return out


def drawn_name(file_name: str) -> str:
    """Where the drawing of `file_name` goes under ``OUT/drawn``: PNG unless already JPEG/PNG."""
    return (
        file_name
        if Path(file_name).suffix.lower() in (".png", ".jpg", ".jpeg")
        else f"{file_name}.png"
    )


WRITTEN_BY = "defectfusion predict"


def _ours(path: Path) -> bool:
    """Whether `path` is an images.json that predict wrote (its marker), read with bounds."""

    try:
        data = load_json(path)
    except UserError:
        return False
    return isinstance(data, dict) and data.get("written_by") == WRITTEN_BY


def check_out(out: Path, files: list[Path], draw: bool) -> None:
    """`--out` is written only inside itself and never over what predict did not make: no
    link out of it, no predictions.json/images.json of someone else's, and (with --draw) no
    input image where the drawings go."""
    out_r = out.resolve()
    for p in (out / RESULTS_FILE, out / IMAGES_FILE, out / DRAWN_DIR):
        if p.is_symlink() or (p.exists() and not p.resolve().is_relative_to(out_r)):
            raise UserError(f"{p}: a link out of --out; predict writes only inside it: remove the "
                            "link or choose another --out")  # fmt: skip
    info = out / IMAGES_FILE
    if ((out / RESULTS_FILE).exists() or info.exists()) and not _ours(info):
        raise UserError(
            f"{out}: holds {RESULTS_FILE} or {IMAGES_FILE} that `defectfusion predict` did not "
            "write; choose another --out (nothing was changed)"
        )
    if draw:
        drawn = (out / DRAWN_DIR).resolve()
        for f in files:
            if f.resolve().is_relative_to(drawn):
                raise UserError(
                    f"{f}: an input image inside {out / DRAWN_DIR}, where the drawings go; "
                    "choose another --out"
                )


def drawn_path(out: Path, name: str) -> Path:
    """Where `name`'s drawing goes, refused unless it stays inside OUT/drawn and is not a
    link (a name outside the images' root, or a linked sub-folder, would write elsewhere)."""
    drawn = out / DRAWN_DIR
    path = drawn / drawn_name(name)
    if Path(name).is_absolute() or ".." in Path(name).parts:
        raise UserError(f"{name}: outside the images' folder; --draw writes only under {drawn}")
    if path.is_symlink() or not path.parent.resolve().is_relative_to(drawn.resolve()):
        raise UserError(f"{path}: a link out of {drawn}; remove it or choose another --out")
    return path


def _save_image(path: Path, image: Image.Image) -> None:
    fmt = "JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG"
    kwargs = {"quality": 95} if fmt == "JPEG" else {}
    atomic_write(path, lambda tmp: image.save(tmp, format=fmt, **kwargs))


def predict_files(
    checkpoint: str | Path,
    images: str | Path,
    out: str | Path,
    threshold: float | None = None,
    draw: bool = False,
    batch_size: int = 8,
    device: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """`defectfusion predict`: write ``OUT/predictions.json`` (COCO results, with file names)
    and, with `draw`, ``OUT/drawn/NAME``; return a summary.

    ``threshold`` None: the model's operating point (`Detector.threshold`). An image that
    cannot be read is skipped with a one-line warning on stderr, counted in the summary and
    listed in ``images.json`` (``skipped``); a run with no readable image is an error.
    """
    if threshold is not None:
        check_threshold(threshold)
    files, root = find_images(images)
    out = Path(out)
    check_out(out, files, draw)  # before minutes of loading and inference
    detector = load(checkpoint, device)
    threshold = detector.threshold if threshold is None else threshold
    records: list[dict[str, Any]] = []
    image_list: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    per_class = dict.fromkeys(detector.class_names, 0)
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: must be at least 1")
    image_id = 0
    with tqdm(
        total=len(files), desc="predict", unit="image", disable=None if progress else True
    ) as bar:
        for start in range(0, len(files), batch_size):
            chunk, batch, rgb = files[start : start + batch_size], [], []
            for p in chunk:
                try:
                    rgb.append(read_image(p))
                except UserError as e:
                    skipped.append({"file_name": _relative_name(p, root), "why": str(e)})
                    print(f"defectfusion: warning: skipped {e}", file=sys.stderr)
                    continue
                batch.append(p)
            dets = detector.predict_rgb(rgb, threshold)
            for path, im, det in zip(batch, rgb, dets, strict=True):
                image_id += 1
                name = _relative_name(path, root)
                image_list.append(
                    {"id": image_id, "file_name": name, "width": im.width, "height": im.height}
                )
                records += coco_records(image_id, name, det)
                for d in det:
                    per_class[d["label"]] += 1
                if draw:
                    _save_image(drawn_path(out, name), draw_detections(im, det))
            bar.update(len(chunk))
    if not image_list:
        raise UserError(
            f"{images}: none of its {len(files)} image(s) could be read, e.g. {skipped[0]['why']}"
        )
    atomic_write_json(out / RESULTS_FILE, records, indent=None)
    # The image list (COCO "images" records) lets the ids be mapped back to files, including
    # images with no detection.
    atomic_write_json(
        out / IMAGES_FILE,
        {
            "images": image_list,
            "categories": [{"id": i, "name": n} for i, n in enumerate(detector.class_names)],
            "threshold": threshold,
            "skipped": skipped,
            "checkpoint": str(checkpoint),
            "written_by": WRITTEN_BY,  # a later predict into this folder may replace it
        },
    )
    return {
        "images": len(image_list),
        "skipped": len(skipped),
        "threshold": threshold,
        "detections": len(records),
        "per_class": per_class,
        "results": str(out / RESULTS_FILE),
        "drawn": str(out / DRAWN_DIR) if draw else None,
    }


def _relative_name(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return path.as_posix()


def print_summary(summary: dict[str, Any]) -> None:
    found = ", ".join(f"{k} {v}" for k, v in summary["per_class"].items() if v) or "none"
    skipped = f" ({summary['skipped']} unreadable, skipped)" if summary["skipped"] else ""
    print(
        f"{summary['images']} images{skipped}, {summary['detections']} detections with score "
        f">= {summary['threshold']:g} ({found})"
    )
    print(f"wrote {summary['results']}" + (f" and {summary['drawn']}/" if summary["drawn"] else ""))
