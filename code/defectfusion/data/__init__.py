"""The data layer: every importer writes the COCO layout of `coco.py`; every reader reads it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from defectfusion.errors import UserError


def prepare(dataset: dict[str, Any], image_size: int, out: str | Path) -> dict[str, Any]:
    """Make the pipeline's dataset folder from ``pipeline.dataset`` (the `data` stage).

    ``kind`` picks the maker: ``synth`` (generated), ``neu`` (NEU-DET folder ``src``) or
    ``coco`` (images folder ``src`` + one ``annotations`` JSON, split here).
    """
    kind = dataset.get("kind")
    seed = int(dataset.get("seed", 0))
    if kind == "synth":
        from defectfusion.data.synth import SynthSpec, generate

        spec = SynthSpec(
            seed=seed,
            n_train=int(dataset["n_train"]),
            n_val=int(dataset["n_val"]),
            n_test=int(dataset["n_test"]),
            image_size=image_size,
        )
        return generate(out, spec)
    if kind in ("neu", "coco") and not dataset.get("src"):
        raise UserError(f"pipeline.dataset.src: the {kind} source folder is not set")
    if kind == "neu":
        from defectfusion.data.importers import import_neu

        return import_neu(dataset["src"], out, seed=seed)
    if kind == "coco":
        from defectfusion.data.importers import import_coco

        if not dataset.get("annotations"):
            raise UserError("pipeline.dataset.annotations: the COCO JSON is not set")
        return import_coco(dataset["src"], [dataset["annotations"]], out, seed=seed, splits=None)
    raise UserError(f"pipeline.dataset.kind={kind!r} must be one of ['synth', 'neu', 'coco']")
