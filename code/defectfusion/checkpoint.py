"""Checkpoints: atomic saves, safe loads, and refusal of a checkpoint from another model.

A checkpoint is one file written with ``torch.save`` and always read back with
``torch.load(weights_only=True)``: checkpoints pulled from a shared DVC remote are
untrusted, and ``weights_only`` refuses to unpickle anything but tensors and plain
containers. Its ``meta`` dict (JSON-compatible) says what model it is: preset, class
names, input size, phase, the run's config.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from torch import nn

from defectfusion.errors import UserError
from defectfusion.fsutil import atomic_write_bytes

FORMAT = "defectfusion-checkpoint-v1"


def save_checkpoint(
    path: str | Path, model_state: dict[str, torch.Tensor], meta: dict[str, Any], **state: Any
) -> Path:
    """Write {format, meta, model, **state} atomically (``state``: optimizer, scheduler, rng...)."""
    buf = io.BytesIO()
    torch.save({"format": FORMAT, "meta": meta, "model": model_state, **state}, buf)
    return atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's bad input
        raise UserError(
            f"{path}: not a readable defectfusion checkpoint ({e.__class__.__name__})"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(f"{path}: not a defectfusion checkpoint (expected format {FORMAT})")
    return ckpt


def check_compatible(
    path: str | Path, meta: dict[str, Any], preset: str | None, class_names: list[str] | None
) -> None:
    """Refuse a checkpoint made for another preset or another class list, in one line."""
    if preset is not None and meta.get("preset") != preset:
        raise UserError(
            f"{path}: checkpoint is for preset {meta.get('preset')!r}, this run uses {preset!r}"
        )
    if class_names is not None and list(meta.get("class_names", [])) != list(class_names):
        theirs = meta.get("class_names", [])
        raise UserError(
            f"{path}: checkpoint was trained on {len(theirs)} classes {theirs}, "
            f"this dataset has {len(class_names)} classes {list(class_names)}"
        )


def load_model_state(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    path: str | Path,
    allow_missing: tuple[str, ...] = (),
) -> None:
    """Load weights strictly, except for missing keys under the `allow_missing` prefixes."""
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(allow_missing)]
    if missing or result.unexpected_keys:
        raise UserError(
            f"{path}: weights do not fit the model (missing {missing[:3]}, unexpected {result.unexpected_keys[:3]})"
        )


def load_detector(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model a checkpoint describes (Phase 1 or Phase 2) and load its weights."""
    from defectfusion.models import build_model

    ckpt = load_checkpoint(path)
    meta = ckpt["meta"]
    model = build_model(meta["preset"], meta["class_names"], init="scratch")  # weights follow
    if meta.get("phase") == 2:
        from defectfusion.fusion import attach_fusion_from_meta

        attach_fusion_from_meta(model, meta)
    load_model_state(model, ckpt["model"], path)
    model.to(device).eval()
    return model, meta
