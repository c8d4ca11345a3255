"""Stand-ins for what users bring and CI cannot download: pretrained weights (random, in the
formats users download, in a local Hugging Face hub cache that the GPU profiles' own weight
names resolve to offline) and small datasets in the profiles' formats (COCO, NEU-DET).

    python tests/standins.py DIR        # then HF_HUB_CACHE=DIR HF_HUB_OFFLINE=1 ...

The GPU profiles (configs/thesis.yaml, configs/neu.yaml) name hub weights that cannot be
downloaded here. Rather than pointing them at other paths (which would test other loading
code), this writes each repository as the hub cache holds it (``models--ORG--NAME/refs/main``
and ``snapshots/REV/FILES``), with the files each library's own writer produces:

==========================================  =========================================================
``facebook/dinov3-vits16-pretrain-lvd1689m``  transformers ``DINOv3ViTModel.save_pretrained`` (ViT-S/16)
``microsoft/resnet-18``                       transformers ``ResNetForImageClassification`` (ResNet-18)
``timm/efficientnet_b0.ra_in1k``              timm's hub format (``model.safetensors``, ``config.json``)
``timm/vit_base_patch32_clip_224.openai``     open_clip ViT-B-32 (``open_clip_model.safetensors``)
==========================================  =========================================================

so `models._load_backbone`, timm's and open_clip's hub loaders and the Snakefile's preflight
(`workflow.preflight.weights_problem`, which asks the cache) run exactly as they will with the real
files. Weights are random (seeded) and stored in float16 to halve the disk; every loader
casts them to the model's float32.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

REVISION = "0" * 40  # the snapshot's commit hash (refs/main points at it)
DINOV3 = "facebook/dinov3-vits16-pretrain-lvd1689m"
RESNET = "microsoft/resnet-18"
EFFICIENTNET = "timm/efficientnet_b0.ra_in1k"
OPEN_CLIP = "timm/vit_base_patch32_clip_224.openai"


def snapshot(cache: Path, repo: str) -> Path:
    """The snapshot folder of `repo` in the hub cache at `cache` (made, with refs/main)."""
    root = cache / ("models--" + repo.replace("/", "--"))
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(REVISION)
    snap = root / "snapshots" / REVISION
    snap.mkdir(parents=True, exist_ok=True)
    return snap


def _half(state: dict) -> dict:
    return {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in state.items()}


def write_dinov3(cache: Path) -> None:
    import torch
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    from defectfusion.model.models import get_preset

    spec = dict(get_preset("deimv2-dinov3-m").backbone)  # the thesis's ViT-S/16
    spec.pop("kind")
    spec.pop("out_indices")
    torch.manual_seed(0)
    model = DINOv3ViTModel(DINOv3ViTConfig(**spec))
    model.half().save_pretrained(snapshot(cache, DINOV3), safe_serialization=True)


def write_resnet(cache: Path) -> None:
    import torch
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    cfg = ResNetConfig(layer_type="basic", hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2])
    model = ResNetForImageClassification(cfg)
    model.half().save_pretrained(snapshot(cache, RESNET), safe_serialization=True)


def write_efficientnet(cache: Path) -> None:
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model("efficientnet_b0", pretrained=False)
    snap = snapshot(cache, EFFICIENTNET)
    save_file(_half(model.state_dict()), str(snap / "model.safetensors"))
    cfg = {"architecture": "efficientnet_b0", "num_classes": 1000, "num_features": 1280,
           "pretrained_cfg": {"tag": "ra_in1k", "input_size": [3, 224, 224]}}  # fmt: skip
    (snap / "config.json").write_text(json.dumps(cfg))


def write_open_clip(cache: Path) -> None:
    import open_clip
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None)
    snap = snapshot(cache, OPEN_CLIP)
    save_file(_half(model.state_dict()), str(snap / "open_clip_model.safetensors"))
    (snap / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"embed_dim": 512}}))


# ---- datasets in the profiles' formats ------------------------------------------------------


def _images(n: int, n_classes: int, seed: int) -> list[tuple[Any, list[tuple]]]:
    """Grey textured 200 px images, each with one or two bright boxes (class, x, y, w, h)."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        im = Image.fromarray(rng.integers(90, 140, size=(200, 200, 3), dtype=np.uint8))
        draw = ImageDraw.Draw(im)
        boxes = []
        for _ in range(1 + i % 2):
            c = int(i % n_classes)
            w, h = (int(v) for v in rng.integers(30, 80, size=2))
            x, y = (int(v) for v in rng.integers(0, 200 - 80, size=2))
            draw.rectangle([x, y, x + w, y + h], fill=(220 - 20 * c, 60 + 25 * c, 40))
            boxes.append((c, x, y, w, h))
        out.append((im, boxes))
    return out


def tiny_coco(root: Path, class_names: list[str], n: int = 36) -> tuple[Path, Path]:
    """A COCO dataset (an images folder and one annotations JSON), as configs/thesis.yaml reads."""
    images = root / "images"
    images.mkdir(parents=True)
    coco: dict = {"images": [], "annotations": [],
                  "categories": [{"id": i + 1, "name": n} for i, n in enumerate(class_names)]}  # fmt: skip
    for i, (im, boxes) in enumerate(_images(n, len(class_names), seed=0), 1):
        im.save(images / f"part_{i:03d}.png")
        coco["images"].append({"id": i, "file_name": f"part_{i:03d}.png", "width": 200,
                               "height": 200})  # fmt: skip
        for c, x, y, w, h in boxes:
            coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": i,
                                        "category_id": c + 1, "bbox": [x, y, w, h],
                                        "area": w * h, "iscrowd": 0})  # fmt: skip
    ann = root / "annotations.json"
    ann.write_text(json.dumps(coco))
    return images, ann


def tiny_neu(root: Path, class_names: list[str], n: int = 36) -> Path:
    """A NEU-DET folder in its YOLO layout (images/CLASS_N.jpg, labels/CLASS_N.txt)."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for i, (im, boxes) in enumerate(_images(n, len(class_names), seed=1)):
        stem = f"{class_names[boxes[0][0]]}_{i + 1}"
        im.save(root / "images" / f"{stem}.jpg")
        lines = [f"{c} {(x + w / 2) / 200:.6f} {(y + h / 2) / 200:.6f} {w / 200:.6f} {h / 200:.6f}"
                 for c, x, y, w, h in boxes]  # fmt: skip
        (root / "labels" / f"{stem}.txt").write_text("\n".join(lines) + "\n")
    return root


WRITERS = {DINOV3: write_dinov3, RESNET: write_resnet, EFFICIENTNET: write_efficientnet,
           OPEN_CLIP: write_open_clip}  # fmt: skip


def make(cache: str | Path, repos: list[str] | None = None) -> Path:
    """Write the stand-ins (all, or `repos`) under `cache`; an existing snapshot is kept."""
    cache = Path(cache)
    for repo in repos or list(WRITERS):
        marker = snapshot(cache, repo) / ".standin"
        if not marker.is_file():
            WRITERS[repo](cache)
            marker.write_text("random weights, tests/standins.py\n")
    return cache


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("cache", help="the hub cache folder to write (HF_HUB_CACHE)")
    ap.add_argument("--repo", action="append", choices=list(WRITERS), help="only these")
    args = ap.parse_args()
    make(args.cache, args.repo)
    print(f"stand-in weights in {args.cache}: HF_HUB_CACHE={args.cache} HF_HUB_OFFLINE=1")
    return 0


if __name__ == "__main__":
    sys.exit(main())
