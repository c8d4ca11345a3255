"""Phase 1: the vision-only DEIMv2 detector (the thesis's baseline)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from defectfusion.config import Config
from defectfusion.model.checkpoint import check_compatible, load_checkpoint
from defectfusion.model.losses import install_loss
from defectfusion.model.models import (
    build_model,
    check_image_size,
    count_parameters,
    set_train_mode,
)
from defectfusion.train.common import dataset_splits, make_evaluator, model_meta, param_groups
from defectfusion.train.engine import Job, fit


def train_phase1(
    cfg: Config, out: str | Path, resume: bool = False, restart: bool = False
) -> dict[str, Any]:
    out = Path(out)
    train_json, val_json, names = dataset_splits(cfg)
    check_image_size(cfg.model.preset, cfg.data.image_size, "config")
    if resume and (out / "last.pt").exists():
        meta = load_checkpoint(out / "last.pt")["meta"]
        check_compatible(out / "last.pt", meta, cfg.model.preset, names)
    torch.manual_seed(cfg.seed)  # the random init of a scratch model
    model = build_model(cfg.model.preset, names, cfg.model.init, cfg.model.weights)
    install_loss(model, "mal", mal_gamma=cfg.phase1.mal_gamma)
    tc = cfg.phase1
    job = Job(
        phase="phase1",
        model=model,
        param_groups=param_groups(model, tc.lr, tc.backbone_lr_mult, tc.weight_decay),
        cfg=cfg,
        train=tc,
        meta=model_meta(cfg, names, 1, model),
        out=out,
        train_json=train_json,
        val_json=val_json,
        set_mode=lambda m, train: set_train_mode(m, train),
        evaluate=make_evaluator(cfg, val_json),
        notes=[f"parameters: {count_parameters(model):,}", f"classes: {names}"],
    )
    return fit(job, resume=resume, restart=restart)
