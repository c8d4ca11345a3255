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

from defectfusion.config import NORMALIZE_CHOICES, EvalSection, weights_ok
from defectfusion.core.errors import (  # noqa: F401  (the limits: checkpoint.MAX_* too)
    MAX_CLASSES,
    MAX_IMAGE_SIZE,
    MAX_TEXT_DIM,
    UserError,
    is_int,
    is_number,
)
from defectfusion.core.fsutil import atomic_write_bytes, os_error_message

FORMAT = "defectfusion-checkpoint-v1"


def save_checkpoint(
    path: str | Path, model_state: dict[str, torch.Tensor], meta: dict[str, Any], **state: Any
) -> Path:
    """Write {format, meta, model, **state} atomically (``state``: optimizer, scheduler, rng...)."""
    buf = io.BytesIO()
    torch.save({"format": FORMAT, "meta": meta, "model": model_state, **state}, buf)
    return atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint and check it before anything is built from it.

    Refused in one line: unreadable files, other formats, a malformed or out-of-limits
    ``meta``, a ``model`` that is not a dict of tensors, and non-finite (NaN/inf) weights.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as e:
        raise UserError(os_error_message(e, path)) from None
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's bad input
        raise UserError(
            f"{path}: not a readable defectfusion checkpoint ({e.__class__.__name__})"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(f"{path}: not a defectfusion checkpoint (expected format {FORMAT})")
    check_meta(path, ckpt.get("meta"))
    check_state(path, ckpt.get("model"), ckpt["meta"])
    return ckpt


_FIX = {
    "checkpoint": "restore it (e.g. `dvc checkout`) or retrain",
    "export": "restore it or export the checkpoint again",
}


def _bad(path: str | Path, what: str, kind: str = "checkpoint") -> UserError:
    return UserError(
        f"{path}: malformed {kind} meta: {what}; the file is corrupt or was not written "
        f"by defectfusion: {_FIX[kind]}"
    )


def check_meta(path: str | Path, meta: Any, kind: str = "checkpoint") -> None:
    """Types and sane limits of every ``meta`` value that sizes or drives something (a
    checkpoint's, or an export folder's record: ``kind`` only changes the advice)."""
    from defectfusion.model.models import NORMS, PRESETS  # deferred: loads transformers

    def bad(path: str | Path, what: str) -> UserError:
        return _bad(path, what, kind)

    if not isinstance(meta, dict):
        raise bad(path, f"meta is {type(meta).__name__}, expected a mapping")
    if meta.get("phase") not in (1, 2) or isinstance(meta.get("phase"), bool):
        raise bad(path, f"phase {meta.get('phase')!r} is not 1 or 2")
    if not isinstance(meta.get("preset"), str) or meta["preset"] not in PRESETS:
        raise bad(path, f"preset {meta.get('preset')!r} is not one of {sorted(PRESETS)}")
    names = meta.get("class_names")
    if (
        not isinstance(names, list)
        or not 1 <= len(names) <= MAX_CLASSES
        or not all(isinstance(n, str) and n for n in names)
        or len(set(names)) != len(names)
    ):
        shown = f"{len(names)} entries" if isinstance(names, list) else repr(names)[:60]
        raise bad(
            path, f"class_names ({shown}) must be 1..{MAX_CLASSES} distinct non-empty strings"
        )
    size = meta.get("image_size")
    if not is_int(size) or not 32 <= size <= MAX_IMAGE_SIZE or size % 32:
        raise bad(path, f"image_size {size!r} is not a multiple of 32 in 32..{MAX_IMAGE_SIZE}")
    check_normalize(path, meta, kind)
    check_mean_std(path, meta, kind)
    if "norm" in meta and meta["norm"] not in NORMS:
        raise bad(path, f"norm {meta['norm']!r} is not one of {list(NORMS)}")
    if "critical_classes" in meta:
        crit = meta["critical_classes"]
        if not (
            isinstance(crit, list) and crit and all(is_int(c) and 0 <= c < len(names) for c in crit)
        ):
            raise bad(path, f"critical_classes {crit!r} are not class indices 0..{len(names) - 1}")
    if "composite_weights" in meta:
        w = meta["composite_weights"]
        if not (w and weights_ok(w)):
            raise bad(path, f"composite_weights {w!r} are not non-negative numbers by name")
    if meta["phase"] == 2:
        shape = meta.get("text_shape")
        if not (
            isinstance(shape, list | tuple)
            and len(shape) == 2
            and all(is_int(v) for v in shape)
            and shape[0] == len(names)
            and 1 <= shape[1] <= MAX_TEXT_DIM
        ):
            raise bad(
                path,
                f"text_shape {shape!r} is not [{len(names)} classes, 1..{MAX_TEXT_DIM} dims]",
            )
        tau = meta.get("tau_init", 0.07)
        if not is_number(tau) or tau <= 0:
            raise bad(path, f"tau_init {tau!r} is not a positive number")
        if not isinstance(meta.get("fuse_encoder_head", True), bool):
            raise bad(path, f"fuse_encoder_head {meta.get('fuse_encoder_head')!r} is not a bool")


def check_mean_std(path: str | Path, meta: dict[str, Any], kind: str = "checkpoint") -> None:
    """``mean``/``std`` (a transformers folder's image processor): three finite numbers each,
    every std positive (a zero divides the image into infinities)."""
    if "mean" not in meta and "std" not in meta:
        return
    mean, std = meta.get("mean"), meta.get("std")
    for name, v in (("mean", mean), ("std", std)):
        if not (isinstance(v, list) and len(v) == 3 and all(is_number(x) for x in v)):
            raise _bad(path, f"{name} {v!r} is not three finite numbers", kind)
    if not all(x > 0 for x in std):  # type: ignore[union-attr]
        raise _bad(path, f"std {std!r} has a value that is not positive", kind)


def check_normalize(path: str | Path, meta: dict[str, Any], kind: str = "checkpoint") -> None:
    """``normalize``: a `data.normalize` name; absent only in a checkpoint that predates it.

    The key came after the format (``defectfusion-checkpoint-v1`` did not change): the first
    version wrote no ``normalize`` and no ``data.normalize`` in the config it records, and its
    loader had ImageNet's constants only. So a checkpoint without the key is that version's
    when its config lacks the setting too (`normalize_of` then reads imagenet, what it was
    trained with); one whose config has the setting has lost the key, and is refused rather
    than evaluated with constants it may not have been trained with.
    """

    if "normalize" in meta:
        if not isinstance(meta["normalize"], str) or meta["normalize"] not in NORMALIZE_CHOICES:
            raise _bad(
                path,
                f"normalize {meta['normalize']!r} is not one of {list(NORMALIZE_CHOICES)}",
                kind,
            )
        return
    config = meta.get("config")
    data = config.get("data") if isinstance(config, dict) else None
    if isinstance(data, dict) and "normalize" in data:
        raise _bad(
            path,
            f"no normalize, though its config has data.normalize={data['normalize']!r}",
            kind,
        )


def normalize_of(meta: dict[str, Any]) -> str:
    """The `data.normalize` a checkpoint's model was trained with (`check_normalize` has
    checked it): imagenet for a checkpoint from before the key, the only one there was."""
    return meta.get("normalize", "imagenet")


def input_mean_std(meta: dict[str, Any]) -> tuple[list[float], list[float]]:
    """(mean, std) of a model's input: ``meta``'s own ``mean``/``std`` (a transformers folder's
    image processor, `export._meta_from_transformers`), else its ``normalize`` name's."""
    from defectfusion.data.loader import normalization  # deferred: loads PIL

    if meta.get("mean") is not None and meta.get("std") is not None:
        return [float(v) for v in meta["mean"]], [float(v) for v in meta["std"]]
    mean, std = normalization(normalize_of(meta))
    return list(mean), list(std)


def operating_point(meta: dict[str, Any]) -> float:
    """The score threshold a model was evaluated at (its config's ``eval.score_threshold``),
    else the evaluation's default (a plain transformers folder records none): the one default
    of ``defectfusion predict``, ``Detector.predict`` and the model card."""

    config = meta.get("config")
    ev = config.get("eval") if isinstance(config, dict) else None
    t = ev.get("score_threshold") if isinstance(ev, dict) else None
    return float(t) if is_number(t) and 0.0 <= t <= 1.0 else EvalSection().score_threshold


def check_state(path: str | Path, state: Any, meta: dict[str, Any]) -> None:
    """The weights: a dict of finite tensors whose class heads and text buffer fit `meta`."""
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise UserError(f"{path}: malformed checkpoint: 'model' is not a dict of tensors")
    k = len(meta["class_names"])
    for key in ("model.enc_score_head.weight", "model.decoder.class_embed.0.weight"):
        if key in state and (state[key].dim() != 2 or state[key].shape[0] != k):
            raise UserError(
                f"{path}: weights do not fit the checkpoint's meta: {key} has shape "
                f"{list(state[key].shape)}, meta lists {k} classes"
            )
    text = state.get("fusion.text")
    if meta["phase"] == 2 and text is not None and list(text.shape) != list(meta["text_shape"]):
        raise UserError(
            f"{path}: weights do not fit the checkpoint's meta: fusion.text has shape "
            f"{list(text.shape)}, meta says {list(meta['text_shape'])}"
        )
    bad = [
        name
        for name, t in state.items()
        if t.is_floating_point() and not bool(torch.isfinite(t).all())
    ]
    if bad:
        raise UserError(
            f"{path}: {len(bad)} weight tensor(s) hold NaN or infinite values (e.g. {bad[0]}); "
            "the run diverged or the file is corrupt: lower the learning rate and retrain, or "
            "restore the file"
        )


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


def state_problem(
    model: nn.Module, state: dict[str, torch.Tensor], allow_missing: tuple[str, ...] = ()
) -> str | None:
    """Why `state` does not fit `model` (a tensor of another shape, missing keys outside the
    `allow_missing` prefixes, unexpected keys), found before anything is loaded; None when
    it fits. torch's own check comes after it has copied the tensors that do fit."""
    mine = model.state_dict()
    wrong = [k for k, v in state.items() if k in mine and v.shape != mine[k].shape]
    if wrong:
        k = wrong[0]
        return f"{k} has shape {list(state[k].shape)}, the model's {list(mine[k].shape)}"
    missing = [k for k in mine if k not in state and not k.startswith(allow_missing)]
    unexpected = [k for k in state if k not in mine]
    if missing or unexpected:
        return f"missing {missing[:3]}, unexpected {unexpected[:3]}"
    return None


def load_model_state(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    path: str | Path,
    allow_missing: tuple[str, ...] = (),
) -> None:
    """Load weights strictly, except for missing keys under the `allow_missing` prefixes;
    weights that do not fit are one line, and nothing is loaded (`state_problem`)."""
    problem = state_problem(model, state, allow_missing)
    if problem:
        raise UserError(f"{path}: weights do not fit the model ({problem})")
    model.load_state_dict(state, strict=False)


def load_detector(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model a checkpoint describes (Phase 1 or Phase 2) and load its weights."""
    from defectfusion.model.models import (  # deferred: loads transformers
        build_model,
        norm_of_checkpoint,
    )

    ckpt = load_checkpoint(path)
    meta = ckpt["meta"]
    norm = norm_of_checkpoint(meta, ckpt["model"])  # as it was trained
    model = build_model(meta["preset"], meta["class_names"], init="scratch", norm=norm)
    if meta.get("phase") == 2:
        from defectfusion.model.fusion import attach_fusion_from_meta

        attach_fusion_from_meta(model, meta)
    load_model_state(model, ckpt["model"], path)
    model.to(device).eval()
    return model, meta
