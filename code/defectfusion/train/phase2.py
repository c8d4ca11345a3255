"""Phase 2: residual vision-language fusion on top of a Phase 1 checkpoint.

The thesis's ``train_auto_phase2``: load Phase 1, attach the fusion, evaluate once
before any update (epoch 0), then train only the fusion and the class heads with
focal loss at a low learning rate, selecting and early-stopping on the composite score.
The config's ``fusion`` section picks the variant: ``init`` (zero_start | naive),
``alpha`` (learned | frozen0), ``loss`` (focal | deimv2), ``bn`` (eval | train).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from defectfusion.checkpoint import check_compatible, load_checkpoint, load_model_state
from defectfusion.config import Config
from defectfusion.fusion import attach_fusion, set_trainable
from defectfusion.losses import install_loss
from defectfusion.models import build_model, count_parameters, set_train_mode
from defectfusion.text import embed_prompts
from defectfusion.train.engine import Job, fit
from defectfusion.train.phase1 import dataset_splits, make_evaluator, model_meta, param_groups


def build_phase2_model(
    cfg: Config, phase1: str | Path, class_names: list[str]
) -> tuple[nn.Module, dict[str, Any]]:
    """Phase 1 weights + fusion with the configured init and trainable set."""
    ckpt = load_checkpoint(phase1)
    meta1 = ckpt["meta"]
    if meta1.get("phase") != 1:
        from defectfusion.errors import UserError

        raise UserError(f"{phase1}: expected a Phase 1 checkpoint, got phase {meta1.get('phase')}")
    check_compatible(phase1, meta1, cfg.model.preset, class_names)
    model = build_model(meta1["preset"], class_names, init="scratch")  # Phase 1 weights follow
    load_model_state(model, ckpt["model"], phase1)
    text = embed_prompts(cfg.text.prompts, cfg.text.encoder, cfg.text.weights, class_names)
    torch.manual_seed(cfg.seed)  # the projection's random init
    attach_fusion(
        model,
        text["embeddings"],
        cfg.fusion.init,
        cfg.fusion.tau_init,
        cfg.fusion.fuse_encoder_head,
    )
    set_trainable(model, cfg.fusion.alpha)
    install_loss(
        model,
        "focal" if cfg.fusion.loss == "focal" else "mal",
        cfg.fusion.focal_alpha,
        cfg.fusion.focal_gamma,
    )
    return model, text["info"]


def train_phase2(
    cfg: Config, phase1: str | Path, out: str | Path, resume: bool = False
) -> dict[str, Any]:
    out = Path(out)
    train_json, val_json, names = dataset_splits(cfg)
    model, text_info = build_phase2_model(cfg, phase1, names)
    tc = cfg.phase2
    meta = model_meta(cfg, names, 2, model)
    meta.update(
        {
            "phase1_checkpoint": str(phase1),
            "text": {k: v for k, v in text_info.items() if k != "cosine"},
            "text_shape": list(model.fusion.text.shape),
            "tau_init": cfg.fusion.tau_init,
            "fuse_encoder_head": cfg.fusion.fuse_encoder_head,
            "variant": {k: getattr(cfg.fusion, k) for k in ("init", "alpha", "loss", "bn")},
            "trainable_parameters": count_parameters(model, trainable_only=True),
        }
    )
    job = Job(
        phase="phase2",
        model=model,
        param_groups=param_groups(model, tc.lr, 1.0, tc.weight_decay),
        cfg=cfg,
        train=tc,
        meta=meta,
        out=out,
        train_json=train_json,
        val_json=val_json,
        set_mode=lambda m, train: set_train_mode(m, train, cfg.fusion.bn),
        evaluate=make_evaluator(cfg, val_json),
        step_extras=lambda m: m.fusion.stats(),
        epoch_extras=lambda m: m.fusion.stats(),
        eval_before_training=True,
        notes=[
            f"variant: {meta['variant']}",
            f"trainable parameters: {meta['trainable_parameters']:,} of {count_parameters(model):,}",
            f"text: {text_info['encoder']} ({text_info['weights']}), D_t={text_info['dim']}",
        ],
    )
    return fit(job, resume=resume)
