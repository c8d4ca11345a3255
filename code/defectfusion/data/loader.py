"""Read a COCO split (the layout of `coco.py`) into the batches DEIMv2 trains on.

A sample is ``(pixel_values, target)``: the image resized to a square ``S x S`` and normalised
with the backbone's mean/std, and ``target = {"class_labels", "boxes", "image_id", "orig_size"}``
with boxes in normalised ``(cx, cy, w, h)`` of the network input, as
``Deimv2ForObjectDetection(labels=...)`` expects.

Non-square images are resized to the square, not padded: simple, and the boxes scale exactly
(a normalised box does not change under a resize, so the boxes are normalised by the canvas
before the image is resized and never go through a float32 scale factor).

Training augmentations (`AugmentConfig`) move the boxes with the image through
`torchvision.transforms.v2` and `tv_tensors.BoundingBoxes`, in float64 pixels:

- horizontal and vertical flips (a steel strip has no up or down);
- scale jitter, `RandomScaleCrop`: a factor ``s`` drawn uniformly from ``scale_jitter``;
  ``s > 1`` crops a random ``H/s x W/s`` window (zoom in), ``s < 1`` pastes the image at a random
  place on a ``H/s x W/s`` canvas filled with the mean colour (zoom out). Boxes are clipped to the
  crop; a box that keeps less than ``min_visible`` (default half) of its area is dropped with its
  label, as its defect is mostly gone. A crop that would drop every box is redrawn (10 tries,
  then no crop), so a defect image is not turned into a "background" image;
- photometric: brightness/contrast/saturation jitter and a small hue shift, and optional
  gaussian noise.

Randomness comes from torch's global RNG, so a sample is deterministic given its state.
`make_loader` goes further: its sampler gives each sample its own seed, drawn from a seeded
`torch.Generator`, so order and augmentations depend on the seed alone (not on the number of
workers, nor on the caller's RNG, which is left untouched).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import tv_tensors
from torchvision.ops import box_convert
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F
from torchvision.transforms.v2._utils import get_bounding_boxes, query_size

# The normalisation constants live in config.py (torch-free: the config's choices and the
# report's dose-response read them too); named here for the loader and its importers.
from defectfusion.config import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    NORMALIZATIONS,
)
from defectfusion.core.errors import UserError
from defectfusion.data import coco
from defectfusion.data.validate import check_loadable, image_too_large


def normalization(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of a ``data.normalize`` name; an unknown name is one UserError."""
    if name not in NORMALIZATIONS:
        raise UserError(f"data.normalize={name!r} must be one of {list(NORMALIZATIONS)}")
    return NORMALIZATIONS[name]


# DEIMv2's backbone and hybrid encoder go down to stride 32.
STRIDE = 32

Target = dict[str, Any]


@dataclass
class AugmentConfig:
    """Training augmentations; a probability of 0 (or ``scale_jitter`` of ``(1, 1)``) disables one.

    hflip, vflip, photometric, noise: probabilities. scale_jitter: range of the zoom factor
    (> 1 zooms in by cropping, < 1 zooms out by padding). min_visible: fraction of its area a
    box must keep inside a crop to stay a target.
    """

    hflip: float = 0.5
    vflip: float = 0.5
    scale_jitter: tuple[float, float] = (0.75, 1.25)
    photometric: float = 0.5
    noise: float = 0.0
    min_visible: float = 0.5

    @classmethod
    def from_config(cls, section: Any) -> AugmentConfig:
        """From a Config's ``data.augment`` section, field by field by name."""
        return cls(
            hflip=section.hflip,
            vflip=section.vflip,
            scale_jitter=tuple(section.scale_jitter),
            photometric=section.photometric,
        )

    def __post_init__(self) -> None:
        if not self.scale_jitter:  # 0 or None from a config file also means "off"
            self.scale_jitter = (1.0, 1.0)
        self.scale_jitter = tuple(float(v) for v in self.scale_jitter)  # type: ignore[assignment]
        for name in ("hflip", "vflip", "photometric", "noise", "min_visible"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise UserError(f"augment.{name}: must be a probability in [0, 1], got {v}")
        lo_hi = self.scale_jitter
        if len(lo_hi) != 2 or not 0.0 < lo_hi[0] <= lo_hi[1]:
            raise UserError(
                f"augment.scale_jitter: must be (low, high) with 0 < low <= high, got {lo_hi}"
            )

    @classmethod
    def off(cls) -> AugmentConfig:
        return cls(hflip=0.0, vflip=0.0, scale_jitter=(1.0, 1.0), photometric=0.0, noise=0.0)


# ---- boxes -----------------------------------------------------------------------------


def _as_boxes(boxes: Any) -> torch.Tensor:
    # Keep a floating tensor's dtype (float64 round-trips exactly); anything else -> float32.
    t = torch.as_tensor(boxes)
    return t if t.is_floating_point() else t.float()


def boxes_to_model(boxes_xywh_px: Any, w: float, h: float) -> torch.Tensor:
    """Pixel COCO ``(x, y, w, h)`` [n,4] -> normalised ``(cx, cy, w, h)`` of a ``w x h`` image."""
    b = _as_boxes(boxes_xywh_px).reshape(-1, 4)
    return box_convert(b, "xywh", "cxcywh") / b.new_tensor([w, h, w, h])


def boxes_from_model(boxes_cxcywh_norm: Any, w: float, h: float) -> torch.Tensor:
    """Normalised ``(cx, cy, w, h)`` [n,4] -> pixel COCO ``(x, y, w, h)`` of a ``w x h`` image."""
    b = _as_boxes(boxes_cxcywh_norm).reshape(-1, 4)
    return box_convert(b * b.new_tensor([w, h, w, h]), "cxcywh", "xywh")


def _visible_fraction(
    boxes_xyxy: torch.Tensor, top: int, left: int, h: int, w: int
) -> torch.Tensor:
    area = (boxes_xyxy[:, 2] - boxes_xyxy[:, 0]) * (boxes_xyxy[:, 3] - boxes_xyxy[:, 1])
    clipped = boxes_xyxy.clone()
    clipped[:, 0::2] = clipped[:, 0::2].clamp(left, left + w)
    clipped[:, 1::2] = clipped[:, 1::2].clamp(top, top + h)
    visible = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
    return torch.where(area > 0, visible / area.clamp(min=1e-12), torch.zeros_like(area))


# ---- augmentation ----------------------------------------------------------------------


class RandomScaleCrop(v2.Transform):
    """Zoom in (random crop) or out (random placement on a larger canvas) by ``s ~ U(lo, hi)``.

    Boxes are moved and clipped by torchvision; a box that keeps less than `min_visible` of its
    area is made empty here, for a following `v2.SanitizeBoundingBoxes` to drop with its label.
    """

    def __init__(
        self,
        scale_range: tuple[float, float],
        min_visible: float = 0.5,
        fill: Sequence[int] = (0, 0, 0),
        tries: int = 10,
    ) -> None:
        super().__init__()
        self.scale_range = scale_range
        self.min_visible = min_visible
        self.fill = tuple(fill)
        self.tries = tries

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = query_size(flat_inputs)
        lo, hi = self.scale_range
        s = lo + (hi - lo) * torch.rand(1).item()
        ch, cw = max(1, round(h / s)), max(1, round(w / s))
        if ch < h or cw < w:  # zoom in: crop, redrawing a crop that would lose every box
            ch, cw = min(ch, h), min(cw, w)
            boxes = F.convert_bounding_box_format(
                get_bounding_boxes(flat_inputs), new_format=tv_tensors.BoundingBoxFormat.XYXY
            ).as_subclass(torch.Tensor)
            for _ in range(self.tries):
                top = int(torch.randint(0, h - ch + 1, ()).item())
                left = int(torch.randint(0, w - cw + 1, ()).item())
                keep = _visible_fraction(boxes, top, left, ch, cw) >= self.min_visible
                if len(boxes) == 0 or bool(keep.any()):
                    return {"crop": (top, left, ch, cw), "keep": keep}
            return {}
        if ch > h or cw > w:  # zoom out: pad
            top = int(torch.randint(0, ch - h + 1, ()).item())
            left = int(torch.randint(0, cw - w + 1, ()).item())
            return {"pad": [left, top, cw - w - left, ch - h - top]}
        return {}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if "pad" in params:
            fill = self.fill if isinstance(inpt, tv_tensors.Image | Image.Image) else 0
            return F.pad(inpt, padding=params["pad"], fill=fill)
        if "crop" not in params:
            return inpt
        top, left, ch, cw = params["crop"]
        out = F.crop(inpt, top=top, left=left, height=ch, width=cw)
        if isinstance(out, tv_tensors.BoundingBoxes) and not bool(params["keep"].all()):
            fmt = out.format
            xyxy = F.convert_bounding_box_format(out, new_format=tv_tensors.BoundingBoxFormat.XYXY)
            xyxy[~params["keep"], 2] = xyxy[~params["keep"], 0]  # zero width: sanitised away
            out = F.convert_bounding_box_format(xyxy, new_format=fmt)
        return out


def geometric_transform(aug: AugmentConfig, fill: Sequence[int] = (0, 0, 0)) -> v2.Transform:
    """Flips and scale jitter on ``{"image", "boxes", "labels"}`` at the original resolution."""
    steps: list[v2.Transform] = []
    if aug.hflip > 0:
        steps.append(v2.RandomHorizontalFlip(p=aug.hflip))
    if aug.vflip > 0:
        steps.append(v2.RandomVerticalFlip(p=aug.vflip))
    if aug.scale_jitter != (1.0, 1.0):
        steps.append(RandomScaleCrop(aug.scale_jitter, min_visible=aug.min_visible, fill=fill))
        # Clamp (a source box may overhang the image) so that Sanitize drops only the emptied
        # boxes, with their labels.
        steps += [v2.ClampBoundingBoxes(), v2.SanitizeBoundingBoxes()]
    return v2.Compose(steps) if steps else v2.Identity()


def is_grey(image: torch.Tensor) -> bool:
    """An RGB ``[3,H,W]`` image whose three channels are equal (NEU-DET's, for instance)."""
    return (
        image.ndim == 3
        and image.shape[0] == 3
        and bool(torch.equal(image[0], image[1]) and torch.equal(image[1], image[2]))
    )


class GreyAwareColorJitter(v2.ColorJitter):
    """`v2.ColorJitter` that skips saturation and hue on a grey image.

    Neither changes a grey image (brightness and contrast keep it grey, in any order), but
    hue costs most of the jitter's time (an RGB -> HSV -> RGB round trip), and saturation's
    uint8 greyscale rounds down by one level. The parameters are still drawn, so the random
    stream, hence every later draw, is the same as for a colour image.
    """

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if isinstance(inpt, torch.Tensor) and is_grey(inpt):
            params = {**params, "saturation_factor": None, "hue_factor": None}
        return super().transform(inpt, params)


def photometric_transform(aug: AugmentConfig) -> v2.Transform:
    """Colour changes on the uint8 image; they never move a box."""
    steps: list[v2.Transform] = []
    if aug.photometric > 0:
        jitter = GreyAwareColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02)
        steps.append(v2.RandomApply([jitter], p=aug.photometric))
    if aug.noise > 0:
        noise = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.GaussianNoise(sigma=0.03)])
        steps.append(v2.RandomApply([noise], p=aug.noise))
    return v2.Compose(steps) if steps else v2.Identity()


# ---- reading images (checked: size, pixel cap, bit depth) ----------------------------------

# Modes whose pixels are 16-bit grey (a 16-bit PNG or TIFF): PIL's convert("RGB") clips them
# at 255, which turns almost every pixel white, so they are scaled down here instead.
_GREY16_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


def to_rgb8(im: Image.Image, where: str) -> Image.Image:
    """`im` as 8-bit RGB: 16-bit grey scaled by 255/65535, floating-point images refused."""
    if im.mode in _GREY16_MODES:
        a = np.asarray(im)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise UserError(
                f"{where}: {im.mode} image with values outside 0..65535; save it as an 8- or "
                "16-bit PNG"
            )
        a8 = ((a.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(a8, mode="L").convert("RGB")
    if im.mode == "F":
        raise UserError(f"{where}: floating-point image; save it as an 8- or 16-bit PNG")
    return im.convert("RGB")


def read_image_rgb(path: Path, where: str, expect: tuple[int, int] | None = None) -> torch.Tensor:
    """An image file as uint8 RGB ``[3,H,W]``; its size (``expect``: the JSON's width and
    height) and pixel count are checked from the header, before anything is decoded."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            too_large = image_too_large(w, h)
            if too_large:
                raise UserError(f"{where}: {too_large}")
            if expect is not None and (w, h) != tuple(expect):
                raise UserError(
                    f"{where}: image is {w}x{h} but the JSON says {expect[0]}x{expect[1]}"
                )
            return F.pil_to_tensor(to_rgb8(im, where))
    except FileNotFoundError:
        raise UserError(f"{where}: image file not found") from None
    except UserError:
        raise
    except Image.DecompressionBombError:  # PIL's own, higher limit, hit while reading the header
        raise UserError(f"{where}: {image_too_large(None, None)}") from None
    except (
        OSError,
        UnidentifiedImageError,
        ValueError,
        SyntaxError,
    ) as e:
        raise UserError(f"{where}: cannot read image ({e.__class__.__name__}: {e})") from None


# ---- dataset ---------------------------------------------------------------------------


def view_seed(pool_seed: int, image_id: int, view: int) -> int:
    """The augmentation seed of view `view` of image `image_id` in a fixed pool of views.

    A hash, not the run's RNG: the pool depends on (pool_seed, image id, view) alone, so runs
    with other seeds or variants draw the same views (and can share their cached features).
    """
    digest = hashlib.sha256(f"{pool_seed}/{image_id}/{view}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 2  # < 2**62, like SeededSampler's seeds


class CocoDetection(Dataset):
    """One split of a prepared dataset; items are ``(pixel_values [3,S,S], target)``.

    ``dataset[i]`` uses torch's global RNG for augmentations; ``dataset[(i, seed)]`` (what
    `make_loader`'s sampler asks for) uses its own seed and leaves the global RNG untouched.
    With ``train=False`` there is no augmentation; with ``train=True`` and ``augment=None`` the
    defaults of `AugmentConfig` apply (pass ``AugmentConfig.off()`` for none).
    """

    def __init__(
        self,
        split_json: str | Path,
        image_size: int,
        train: bool,
        augment: AugmentConfig | None = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        views: int | None = None,
        view_seed: int = 0,
    ) -> None:
        if views is not None and views < 0:
            raise UserError(f"views={views}: must be None (fresh augmentations) or >= 0")
        if (
            isinstance(image_size, bool)
            or not isinstance(image_size, int)
            or image_size <= 0
            or image_size % STRIDE
        ):
            raise UserError(
                f"image_size={image_size}: must be a positive multiple of {STRIDE} "
                f"(DEIMv2's feature maps go down to stride {STRIDE}), e.g. 192, 224, 256 or 320"
            )
        self.split_json = Path(split_json)
        self.image_size = image_size
        self.train = train
        self.coco: dict[str, Any] = coco.load_json(self.split_json)
        check_loadable(self.coco, self.split_json)  # the validator's checks, where data is used
        for key in ("images", "annotations", "categories"):
            if not isinstance(self.coco, dict) or not isinstance(self.coco.get(key), list):
                raise UserError(f"{self.split_json}: not COCO detection JSON (no '{key}' list)")
        self.root = coco.images_dir(coco.dataset_root(self.split_json))
        self.class_names: list[str] = coco.category_names(self.coco)
        self.num_classes = len(self.class_names)
        self.images: list[dict[str, Any]] = sorted(self.coco["images"], key=lambda im: im["id"])
        self.image_ids: list[int] = [int(im["id"]) for im in self.images]
        self._anns: dict[int, list[dict[str, Any]]] = {i: [] for i in self.image_ids}
        for ann in self.coco["annotations"]:
            where = f"{self.split_json}: annotation {ann.get('id')}"
            if ann.get("image_id") not in self._anns:
                raise UserError(f"{where}: image_id {ann.get('image_id')} is not in 'images'")
            if not 0 <= ann.get("category_id", -1) < self.num_classes:
                raise UserError(
                    f"{where}: category_id {ann.get('category_id')} is not in 0..{self.num_classes - 1}"
                )
            self._anns[ann["image_id"]].append(ann)

        self.mean, self.std = list(mean), list(std)
        # views=N: a fixed pool of N augmented views per image (see `view_seed`); 0: none.
        self.views, self.view_seed = (views if train else None), view_seed
        if train and views == 0:
            augment = AugmentConfig.off()
        self.augment = (augment or AugmentConfig()) if train else None
        if self.augment is not None:
            # Zoom-out fills with the mean colour, i.e. zero after normalisation.
            fill = [round(255 * m) for m in self.mean]
            self.geometric = geometric_transform(self.augment, fill=fill)
            self.photometric = photometric_transform(self.augment)
        self.finish = v2.Compose(
            [v2.ToDtype(torch.float32, scale=True), v2.Normalize(self.mean, self.std)]
        )

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int | tuple[int, int]) -> tuple[torch.Tensor, Target]:
        if isinstance(index, tuple):
            i, seed = index
            if self.augment is None or self.views == 0:
                return self._item(i)
            if self.views is not None:  # the sample seed picks one view of the fixed pool
                seed = view_seed(self.view_seed, self.image_ids[i], seed % self.views)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return self._item(i)
        return self._item(index)

    def load_image(self, i: int) -> torch.Tensor:
        """The i-th image as uint8 RGB ``[3,H,W]``, checked against its record's size."""
        rec = self.images[i]
        path = self.root / rec["file_name"]
        where = f"{path} (image id {rec['id']})"
        return read_image_rgb(path, where, (rec["width"], rec["height"]))

    def raw_target(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The i-th image's pixel COCO boxes ``[n,4]`` (float64) and labels ``[n]`` (int64)."""
        anns = self._anns[self.image_ids[i]]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float64).reshape(-1, 4)
        labels = torch.tensor([a["category_id"] for a in anns], dtype=torch.int64)
        return boxes, labels

    def transform(
        self, image: torch.Tensor, boxes_xywh_px: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Augment (when training) and resize one sample.

        Takes a uint8 ``[3,H,W]`` image, its pixel COCO boxes ``[n,4]`` and labels ``[n]``;
        returns the uint8 ``[3,S,S]`` image, normalised ``(cx, cy, w, h)`` boxes in the dtype
        given (float64 in, float64 out: exact) and the labels of the boxes kept.
        """
        h, w = image.shape[-2:]
        image = tv_tensors.Image(image)
        boxes = tv_tensors.BoundingBoxes(boxes_xywh_px, format="XYWH", canvas_size=(h, w))
        if self.augment is not None:
            sample = self.geometric({"image": image, "boxes": boxes, "labels": labels})
            image, boxes, labels = sample["image"], sample["boxes"], sample["labels"]
        # Normalise by the (augmented) canvas, then resize only the image: exact for the boxes.
        ch, cw = boxes.canvas_size
        norm = boxes_to_model(boxes.as_subclass(torch.Tensor), cw, ch)
        image = F.resize(image, [self.image_size, self.image_size], antialias=True)
        if self.augment is not None:
            image = self.photometric(image)
        return image.as_subclass(torch.Tensor), norm, labels

    def _item(self, i: int) -> tuple[torch.Tensor, Target]:
        image = self.load_image(i)
        boxes_px, labels = self.raw_target(i)
        image_s, boxes, labels = self.transform(image, boxes_px, labels)
        target: Target = {
            "class_labels": labels,
            "boxes": boxes.to(torch.float32),
            "image_id": self.image_ids[i],
            "orig_size": (int(image.shape[-2]), int(image.shape[-1])),
        }
        return self.finish(image_s), target


# ---- loader ----------------------------------------------------------------------------


def collate(batch: Sequence[tuple[torch.Tensor, Target]]) -> tuple[torch.Tensor, list[Target]]:
    """Stack the images into ``[B,3,S,S]``; keep the targets as a list (their sizes differ)."""
    return torch.stack([x for x, _ in batch]), [t for _, t in batch]


class SeededSampler(Sampler[tuple[int, int]]):
    """Yields ``(index, sample_seed)``: a (shuffled) order and one augmentation seed per sample.

    Both come from `generator`, which advances every epoch, so epochs differ but a run is
    reproducible from the generator's seed, whatever the number of workers.
    """

    def __init__(self, n: int, shuffle: bool, generator: torch.Generator) -> None:
        self.n, self.shuffle, self.generator = n, shuffle, generator

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[tuple[int, int]]:
        g = self.generator
        order = torch.randperm(self.n, generator=g) if self.shuffle else torch.arange(self.n)
        seeds = torch.randint(0, 2**62, (self.n,), generator=g)
        yield from zip(order.tolist(), seeds.tolist(), strict=True)


def make_loader(
    split_json: str | Path,
    image_size: int,
    batch_size: int,
    train: bool,
    augment: AugmentConfig | None = None,
    num_workers: int = 0,
    seed: int = 0,
    drop_last: bool | None = None,
    normalize: str = "imagenet",
    views: int | None = None,
    view_seed: int = 0,
) -> DataLoader:
    """A loader of ``(pixel_values, targets)`` batches, reproducible for a fixed `seed`.

    ``train`` shuffles and augments. ``drop_last=None`` drops a last partial batch when
    training (steady batch statistics), unless the split is smaller than one batch.
    ``views``: None draws fresh augmentations every epoch; N >= 1 a fixed pool of N views per
    image (the sample seed picks one; see `view_seed`); 0 no augmentation.
    """
    mean, std = normalization(normalize)
    ds = CocoDetection(
        split_json, image_size, train, augment, mean, std, views=views, view_seed=view_seed
    )
    if drop_last is None:
        drop_last = train and len(ds) >= batch_size
    sampler = SeededSampler(len(ds), shuffle=train, generator=torch.Generator().manual_seed(seed))
    return DataLoader(
        ds,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate,
        drop_last=drop_last,
        # Workers' own seeds come from here, not from (and without consuming) the global RNG;
        # the augmentations do not use them, the per-sample seeds do.
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=num_workers > 0,
    )
