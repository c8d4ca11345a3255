"""The data layer: every importer writes the COCO layout of `coco.py`; every reader reads it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from defectfusion.config import DATASET_KINDS
from defectfusion.core.errors import UserError


def prepare(dataset: dict[str, Any], image_size: int, out: str | Path) -> dict[str, Any]:
    """Make the pipeline's dataset folder from ``pipeline.dataset`` (the `data` stage).

    ``kind`` picks the maker: ``synth`` (generated), ``neu`` (NEU-DET folder ``src``) or
    ``coco`` (images folder ``src`` + one ``annotations`` JSON, split here).
    """

    kind = dataset.get("kind")
    if kind not in DATASET_KINDS:
        raise UserError(f"pipeline.dataset.kind={kind!r} must be one of {list(DATASET_KINDS)}")
    for key in DATASET_KINDS[kind]:
        if not dataset.get(key):
            what = f"the {kind} source folder" if key == "src" else "the COCO JSON"
            raise UserError(f"pipeline.dataset.{key}: {what} is not set")
    # Deferred: the CLI's start-up does not pay for PIL and numpy.
    from defectfusion.data.importers import MAKERS  # deferred: loads PIL

    return MAKERS[kind](dataset, image_size, out)
