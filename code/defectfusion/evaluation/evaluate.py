"""Evaluation: a checkpoint on a split -> COCO results -> the metrics file.

Prediction and post-processing (`predict`, `postprocess`) need torch and live here; the
metrics themselves are `defectfusion.evaluation.metrics` (torch-free), whose docstring gives the
metrics-file schema. `evaluate_checkpoint` writes ``OUT`` (the metrics, the confusion matrix,
``checkpoint``, ``data``, ``predictions``, ``preset``, ``parameters``), ``OUT`` with suffix
``.predictions.json`` (the COCO results list, boxes rounded to 5 decimals and scores to 6 so
the files are stable across runs) and, when asked, the headline numbers (`dvc metrics show`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import cache
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn
from torchvision.ops import box_convert
from tqdm import tqdm

from defectfusion.config import EvalSection
from defectfusion.core.errors import UserError
from defectfusion.core.fsutil import atomic_write_json
from defectfusion.data.coco import category_names, load_split
from defectfusion.data.loader import CocoDetection, make_loader, normalization
from defectfusion.evaluation.metrics import Results, coco_metrics, confusion_matrix
from defectfusion.model.cache import (
    CachedSplit,
    frozen_weights_sha256,
    install,
    make_cached_loader,
    make_spec,
)
from defectfusion.model.checkpoint import load_detector, normalize_of

BOX_DECIMALS = 5
SCORE_DECIMALS = 6


# ---- model outputs -> detections ---------------------------------------------------------


@cache
def _processor() -> Any:
    # transformers maps DEIMv2 to the RT-DETR image processor (image_processing_auto.py);
    # its post-processing is the one of the RT-DETR / D-FINE / DEIM papers.
    from transformers import RTDetrImageProcessor

    return RTDetrImageProcessor()


def postprocess(
    logits: torch.Tensor,
    pred_boxes: torch.Tensor,
    orig_sizes: Sequence[Sequence[int]] | torch.Tensor,
    max_dets: int = 300,
) -> list[dict[str, torch.Tensor]]:
    """Raw DEIMv2 outputs -> per-image ``{"scores", "labels", "boxes"}``, best first.

    ``logits`` [B,Q,K] are pre-sigmoid class logits (focal style, no background class),
    ``pred_boxes`` [B,Q,4] normalised ``(cx, cy, w, h)``, ``orig_sizes`` the ``(h, w)`` of each
    original image. Scores are ``sigmoid(logits)`` and the top ``Q`` (query, class) pairs are
    kept, so one query may give several classes, as in RT-DETR/DEIM; then the best
    ``max_dets``. No score threshold: COCO AP needs the whole ranking. Boxes are ``xyxy``
    pixels of the original image (the loader resizes without padding, so normalised boxes
    scale back by the original width and height).
    """
    outputs = SimpleNamespace(
        logits=logits.detach().float().cpu(), pred_boxes=pred_boxes.detach().float().cpu()
    )
    sizes = torch.as_tensor(orig_sizes, dtype=torch.float32).reshape(-1, 2)
    # threshold -1 keeps every top-k pair (sigmoid scores are >= 0).
    dets = _processor().post_process_object_detection(
        outputs, threshold=-1.0, target_sizes=sizes, use_focal_loss=True
    )
    return [{k: v[:max_dets] for k, v in d.items()} for d in dets]


def _records(image_id: int, det: dict[str, torch.Tensor]) -> Results:
    xywh = box_convert(det["boxes"].double(), "xyxy", "xywh").tolist()
    return [
        {
            "image_id": int(image_id),
            "category_id": int(label),
            "bbox": [round(v, BOX_DECIMALS) for v in box],
            "score": round(float(score), SCORE_DECIMALS),
        }
        for score, label, box in zip(
            det["scores"].tolist(), det["labels"].tolist(), xywh, strict=True
        )
    ]


def predict(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, list[dict[str, Any]]]],
    device: str | torch.device = "cpu",
    max_dets: int = 300,
    progress: bool = True,
) -> Results:
    """Run `model` (already on `device`) over `loader`; return COCO results records.

    The model runs in eval mode without gradients; each module's train/eval flag and each
    parameter's requires_grad flag are restored afterwards (a training loop's frozen modules
    may deliberately be in eval mode).
    """
    modes = {m: m.training for m in model.modules()}
    # PyTorch picks some matmul kernels by the weights' requires_grad flag even under no_grad
    # (at::matmul folds a non-contiguous 3-D input when a gradient may be needed), so equal
    # weights gave logits differing in the last bits between a Phase 1 model (all trainable)
    # and a Phase 2 one (mostly frozen). With every flag off during prediction, Phase 2's
    # epoch 0 reproduces the Phase 1 evaluation bit for bit.
    grads = {p: p.requires_grad for p in model.parameters()}
    model.eval()
    for p in grads:
        p.requires_grad_(False)
    records: Results = []
    try:
        with torch.no_grad():
            for pixel_values, targets in tqdm(
                loader, desc="predict", unit="batch", disable=None if progress else True
            ):
                out = model(pixel_values=pixel_values.to(device))
                sizes = [t["orig_size"] for t in targets]
                dets = postprocess(out.logits, out.pred_boxes, sizes, max_dets)
                for t, det in zip(targets, dets, strict=True):
                    records.extend(_records(t["image_id"], det))
    finally:
        for m, training in modes.items():
            m.training = training
        for p, flag in grads.items():
            p.requires_grad_(flag)
    return records


# ---- the `defectfusion evaluate` command ------------------------------------------------


def predictions_path(out: str | Path) -> Path:
    """Where the predictions of metrics file `out` go: ``m.json`` -> ``m.predictions.json``."""
    return Path(out).with_suffix(".predictions.json")


HEADLINE = ("map", "map50", "map75", "critical_recall", "critical_recall50", "composite")


def headline(metrics: dict[str, Any]) -> dict[str, Any]:
    """The numbers `dvc metrics show` lists for one model: a few columns instead of every
    per-class value (those stay in the metrics file)."""
    return {k: metrics.get(k) for k in (*HEADLINE, "n_images")}


def cached_test_loader(
    model: torch.nn.Module, meta: dict[str, Any], data: Path, config: Any, device: str
) -> Any:
    """A loader of the frozen part's cached output for a Phase 2 checkpoint (or None).

    Phase 2's checkpoints share their backbone and encoder with the Phase 1 model they
    started from; `defectfusion.model.cache` keys entries by those frozen weights (hashed from this
    checkpoint), the image and the preprocessing, so the 27 Phase 2 checkpoints of a default
    run read one cache of the split instead of running the frozen detector 27 x 3 times. The
    model runs in eval mode, so the cached output is what the live forward computes.
    """
    if config is None or meta.get("phase") != 2 or not config.phase2.cache:
        return None

    mean, std = normalization(normalize_of(meta))
    ds = CocoDetection(data, meta["image_size"], False, mean=mean, std=std)
    dev = torch.device(device)
    weights = frozen_weights_sha256(model.state_dict())
    spec = make_spec(config.phase2.cache_dir, weights, ds, config.phase2.cache_dtype, False, dev)
    split = CachedSplit(ds, spec, 0)
    split.build(model, dev, config.eval.batch_size, False, None)
    install(model, split.shapes)
    return make_cached_loader(split, config.eval.batch_size, train=False)


def evaluate_checkpoint(
    checkpoint: Path, data: Path, out: Path, config: Any = None, headline_out: Path | None = None
) -> dict[str, Any]:
    """Evaluate `checkpoint` on split JSON `data`; write the metrics `out`, the predictions
    and, when asked, the headline numbers `headline_out` (the pipeline puts them in one
    folder, results/metrics/, which dvc.yaml declares as its metrics).

    Critical classes and composite weights come from `config` when given (``data`` and
    ``eval`` sections), else from the checkpoint; the input size and normalisation always from
    the checkpoint (a Phase 2 checkpoint records its own, which a variant may change).
    """

    checkpoint, data, out = Path(checkpoint), Path(data), Path(out)
    gt = load_split(data)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, meta = load_detector(checkpoint, device=device)
    names = category_names(gt, data)
    if config is not None:  # the checkpoint's own critical classes are checked on loading
        from defectfusion.config import check_classes

        check_classes(config, names, "config")
    if names != list(meta["class_names"]):
        raise UserError(
            f"{data}: dataset classes {names} differ from the classes of checkpoint "
            f"{checkpoint}: {list(meta['class_names'])}"
        )
    ev_cfg = config.eval if config is not None else EvalSection()
    critical = config.data.critical_classes if config is not None else meta["critical_classes"]
    weights = ev_cfg.composite_weights if config is not None else meta["composite_weights"]
    workers = config.data.num_workers if config is not None else 0

    loader = cached_test_loader(model, meta, data, config, device)
    if loader is None:
        loader = make_loader(
            data,
            meta["image_size"],
            ev_cfg.batch_size,
            train=False,
            num_workers=workers,
            normalize=normalize_of(meta),  # as the model was trained (Phase 2: its variant's)
        )
    results = predict(model, loader, device=device)
    metrics = coco_metrics(gt, results, critical, weights)
    metrics["confusion"] = confusion_matrix(gt, results, ev_cfg.iou_match, ev_cfg.score_threshold)
    pred_path = predictions_path(out)
    metrics.update(
        checkpoint=str(checkpoint),
        data=str(data),
        predictions=str(pred_path),
        preset=meta.get("preset"),
        parameters=meta.get("parameters"),
        # Phase 2: the parameters it trained (the fusion and the heads); Phase 1: null
        trainable_parameters=meta.get("trainable_parameters"),
    )
    # Predictions first: the metrics file is what marks the evaluation as done.
    atomic_write_json(pred_path, results, indent=None)
    if headline_out is not None:
        atomic_write_json(headline_out, headline(metrics))
    atomic_write_json(out, metrics)
    return metrics
