"""What both phases set up before the loop: the dataset splits, the checkpoint's meta, the
optimiser's parameter groups and the val evaluator (the loop itself is `engine`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from defectfusion.config import Config, check_classes
from defectfusion.core.version import __version__
from defectfusion.data import coco
from defectfusion.data.loader import make_loader
from defectfusion.evaluation.evaluate import predict
from defectfusion.evaluation.metrics import coco_metrics
from defectfusion.model.models import backbone_module, count_parameters, norm_for


def param_groups(
    model: nn.Module, lr: float, backbone_lr_mult: float, weight_decay: float
) -> list[dict[str, Any]]:
    """Backbone at a lower lr; no weight decay on norms and biases (as DEIMv2 trains)."""
    backbone = {id(p) for p in backbone_module(model).parameters()}
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:  # tied weights appear twice
            continue
        seen.add(id(p))
        no_decay = p.ndim <= 1 or name.endswith(".bias")
        groups.setdefault((id(p) in backbone, no_decay), []).append(p)
    return [
        {
            "params": ps,
            "lr": lr * (backbone_lr_mult if bb else 1.0),
            "weight_decay": 0.0 if nd else weight_decay,
        }
        for (bb, nd), ps in sorted(groups.items())
    ]


def make_evaluator(cfg: Config, val_json: Path, loader: Any = None):
    """A function model -> val metrics, reused by both phases (``loader``: the val batches,
    e.g. Phase 2's cached features; default: the val images)."""

    gt = coco.load_json(val_json)
    loader = (
        loader
        if loader is not None
        else make_loader(
            val_json,
            cfg.data.image_size,
            cfg.eval.batch_size,
            train=False,
            normalize=cfg.data.normalize,
        )
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def evaluate(model: nn.Module) -> dict[str, Any]:
        results = predict(model, loader, device=device, progress=False)
        metrics = coco_metrics(gt, results, cfg.data.critical_classes, cfg.eval.composite_weights)
        return {**metrics, "predictions": results}  # the engine keeps some epochs' predictions

    return evaluate


def dataset_splits(cfg: Config) -> tuple[Path, Path, list[str]]:
    root = Path(cfg.data.dir)
    train_json, val_json = coco.split_path(root, "train"), coco.split_path(root, "val")
    for p in (train_json, val_json):
        if not p.is_file():
            from defectfusion.core.errors import UserError

            raise UserError(
                f"{p}: dataset split not found; prepare data.dir={root} first (defectfusion data synth|import-neu|import-coco)"
            )
    names = coco.category_names(coco.load_json(train_json), train_json)

    check_classes(cfg, names, "config")  # critical classes within this dataset
    return train_json, val_json, names


def model_meta(cfg: Config, class_names: list[str], phase: int, model: nn.Module) -> dict[str, Any]:
    return {
        "phase": phase,
        "preset": cfg.model.preset,
        "norm": norm_for(cfg.model.init),  # a CNN backbone's BatchNorm (models.norm_for)
        "class_names": class_names,
        "image_size": cfg.data.image_size,
        "normalize": cfg.data.normalize,
        "critical_classes": cfg.data.critical_classes,
        "composite_weights": cfg.eval.composite_weights,
        "parameters": count_parameters(model),
        "config": cfg.to_dict(),
        "defectfusion_version": __version__,
    }
