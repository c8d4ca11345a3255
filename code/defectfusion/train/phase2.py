"""Phase 2: residual vision-language fusion on top of a Phase 1 checkpoint.

The thesis's ``train_auto_phase2``: load Phase 1, attach the fusion, evaluate once
before any update (epoch 0), then train only the fusion and the class heads with
focal loss at a low learning rate, selecting and early-stopping on the composite score.
The config picks the variant (each a one-switch control of the adopted zero_start):
``fusion.init`` (zero_start | naive), ``fusion.alpha`` (learned | frozen0), ``fusion.loss``
(focal | mal: Phase 1's loss), ``fusion.bn`` (eval | train), ``fusion.start`` (ema | raw: Phase 1's EMA
weights, which Phase 1 reports, or its raw weights of the same epoch, ``best_raw.pt``),
``fusion.fuse_encoder_head``, ``data.normalize`` (imagenet | clip | siglip | none) and
``data.image_size`` (Phase 2's input side, which may differ from Phase 1's: see
`check_resizable`).

Epoch 0 (before any update) is evaluated and logged but never selected; the eval weights of
epoch 1 (``epoch1.pt``) and of the last epoch (``final.pt``) and the val predictions of
epochs 0, 1 and the last are kept for the post-mortem's drift.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from defectfusion.config import Config
from defectfusion.core.errors import UserError
from defectfusion.model.cache import phase2_inputs
from defectfusion.model.checkpoint import (
    check_compatible,
    load_checkpoint,
    load_model_state,
    normalize_of,
)
from defectfusion.model.fusion import attach_fusion, set_trainable
from defectfusion.model.losses import install_loss
from defectfusion.model.models import (
    build_model,
    check_image_size,
    count_parameters,
    norm_of_checkpoint,
    set_train_mode,
)
from defectfusion.model.text import embed_prompts, load_embeddings
from defectfusion.train.common import dataset_splits, make_evaluator, model_meta, param_groups
from defectfusion.train.engine import Job, fit


def text_embeddings(
    cfg: Config, class_names: list[str], path: str | Path | None = None
) -> dict[str, Any]:
    """T of the class prompts: read from ``path`` (what `defectfusion text embed` wrote: the
    pipeline encodes once for every run) when given, else encoded now. A file made from
    other prompts, another encoder or other classes is refused."""
    if path is None:
        return embed_prompts(cfg.text.prompts, cfg.text.encoder, cfg.text.weights, class_names)
    import hashlib


    emb, info = load_embeddings(path)
    prompts_sha = hashlib.sha256(Path(cfg.text.prompts).read_bytes()).hexdigest()
    mismatch = [
        what
        for what, ok in (
            ("prompts", info.get("prompt_sha256") == prompts_sha),
            ("encoder", info.get("encoder") == cfg.text.encoder),
            ("classes", list(info.get("class_names") or []) == list(class_names)),
            ("shape", emb.ndim == 2 and emb.shape[0] == len(class_names)),
        )
        if not ok
    ]
    if mismatch:
        raise UserError(
            f"{path}: text embeddings of other {', '.join(mismatch)} than this run's "
            f"({cfg.text.prompts}, {cfg.text.encoder}); rerun `defectfusion text embed`"
        )
    return {"embeddings": emb, "info": info}


def build_phase2_model(
    cfg: Config, phase1: str | Path, class_names: list[str], text_path: str | Path | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """Phase 1 weights + fusion with the configured init and trainable set."""
    ckpt = load_checkpoint(phase1)
    meta1 = ckpt["meta"]
    if meta1.get("phase") != 1:
        from defectfusion.core.errors import UserError

        raise UserError(f"{phase1}: expected a Phase 1 checkpoint, got phase {meta1.get('phase')}")
    check_compatible(phase1, meta1, cfg.model.preset, class_names)
    norm = norm_of_checkpoint(meta1, ckpt["model"])  # Phase 1's BatchNorm
    model = build_model(meta1["preset"], class_names, init="scratch", norm=norm)  # weights follow
    load_model_state(model, ckpt["model"], phase1)
    check_resizable(model, meta1["image_size"], cfg.data.image_size, phase1)
    # What Phase 2 records of its start (its meta: "phase1_image_size", "phase1_normalize").
    model._defectfusion_phase1 = {
        "image_size": meta1["image_size"],
        "normalize": normalize_of(meta1),
        "norm": norm,
    }
    text = text_embeddings(cfg, class_names, text_path)
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
        cfg.fusion.loss,
        cfg.fusion.focal_alpha,
        cfg.fusion.focal_gamma,
        mal_gamma=cfg.phase1.mal_gamma,  # "the Phase 1 loss" is Phase 1's MAL, its gamma too
    )
    return model, text["info"]


def check_resizable(model: nn.Module, trained: int, size: int, path: str | Path) -> None:
    """Phase 2 at another input side than Phase 1's (the res_256 variant) runs the Phase 1
    weights as they are, with no resampling of any weight: nothing in the model is tied to
    the size it was trained at (DEIMv2 itself trains one set of weights on several sizes).

    - The DINOv3 ViT backbone has no learned position table to interpolate: its positions are
      rotary (RoPE), computed each forward from the patch grid, with patch centres normalised
      to [-1, 1] (transformers' ``DINOv3ViTRopePositionEmbedding``). At 256 px the same
      extent holds 16 x 16 patches instead of 12 x 12. Phase 1 trained the backbone with
      DINOv3's RoPE rescaling on (``pos_embed_rescale`` 2.0: coordinates scaled by 1/2..2 in
      train mode), so a patch spacing of 192/256 of the one it was evaluated at is inside what
      it saw. DEIMv2's DINOv3 adapter resizes the ViT's maps to sizes computed from the input.
      The CNN backbones (ResNet, EfficientNet) are convolutional.
    - The hybrid encoder's sine position embeddings and the decoder's anchors are computed
      from each input's feature maps while ``eval_size`` and ``anchor_image_size`` are unset
      (no preset sets them); a config that fixes either has size-bound buffers, refused here
      rather than run at the wrong size.

    What the variant changes is then the input's scale alone: defects span 256/192 times more
    pixels and patches than Phase 1 saw, the resolution analogue of a preprocessing mismatch.
    """
    if size == trained:
        return
    fixed = {
        k: getattr(model.config, k, None)
        for k in ("eval_size", "anchor_image_size")
        if getattr(model.config, k, None)
    }
    if fixed:
        from defectfusion.core.errors import UserError

        raise UserError(
            f"{path}: the model fixes its input size ({fixed}); Phase 2 cannot run it at "
            f"data.image_size={size} (Phase 1 trained at {trained}): use {trained}"
        )


def start_checkpoint(cfg: Config, phase1: str | Path) -> Path:
    """The Phase 1 weights Phase 2 starts from: ``phase1`` (best.pt, the EMA weights Phase 1
    reports) or, with ``fusion.start=raw``, the raw weights of the same epoch beside it."""
    phase1 = Path(phase1)
    if cfg.fusion.start == "ema":
        return phase1
    raw = phase1.with_name("best_raw.pt")
    if not raw.is_file():
        from defectfusion.core.errors import UserError

        raise UserError(
            f"{raw}: not found; fusion.start=raw needs the raw weights Phase 1 writes beside "
            f"{phase1.name} (retrain Phase 1 with this version)"
        )
    return raw


def train_phase2(
    cfg: Config,
    phase1: str | Path,
    out: str | Path,
    resume: bool = False,
    restart: bool = False,
    text: str | Path | None = None,
) -> dict[str, Any]:
    out = Path(out)
    train_json, val_json, names = dataset_splits(cfg)
    check_image_size(cfg.model.preset, cfg.data.image_size, "config")
    phase1 = start_checkpoint(cfg, phase1)
    model, text_info = build_phase2_model(cfg, phase1, names, text)
    tc = cfg.phase2
    start = model._defectfusion_phase1
    # image_size and normalize (model_meta) are Phase 2's own, which evaluation, prediction
    # and export use; Phase 1's are recorded beside them.
    meta = model_meta(cfg, names, 2, model)
    meta.update(
        {
            "phase1_checkpoint": str(phase1),
            "phase1_image_size": start["image_size"],
            "phase1_normalize": start["normalize"],
            "norm": start["norm"],  # the model's BatchNorm is Phase 1's, whatever the config
            "text": {k: v for k, v in text_info.items() if k != "cosine"},
            "text_shape": list(model.fusion.text.shape),
            "tau_init": cfg.fusion.tau_init,
            "fuse_encoder_head": cfg.fusion.fuse_encoder_head,
            "variant": {
                **{k: getattr(cfg.fusion, k) for k in ("init", "alpha", "loss", "bn", "start")},
                "normalize": cfg.data.normalize,
                "image_size": cfg.data.image_size,
            },
            "trainable_parameters": count_parameters(model, trainable_only=True),
        }
    )
    # The frozen backbone + encoder's output, cached and shared by runs (defectfusion.model.cache).
    inputs = phase2_inputs(cfg, model, train_json, val_json)
    job = Job(
        phase="phase2",
        model=model,
        param_groups=param_groups(model, tc.lr, tc.backbone_lr_mult, tc.weight_decay),
        cfg=cfg,
        train=tc,
        meta=meta,
        out=out,
        train_json=train_json,
        val_json=val_json,
        set_mode=lambda m, train: set_train_mode(m, train, cfg.fusion.bn),
        evaluate=make_evaluator(cfg, val_json, loader=inputs.val_loader),
        train_loader=inputs.train_loader,
        step_extras=lambda m: m.fusion.stats(),
        epoch_extras=lambda m: m.fusion.stats(),
        eval_before_training=True,
        keep_epochs=(1,),
        keep_final=True,
        save_val_predictions=True,
        notes=[
            f"variant: {meta['variant']}",
            f"input: {cfg.data.image_size} px, {cfg.data.normalize} normalisation (Phase 1: "
            f"{start['image_size']} px, {start['normalize']})",
            f"trainable parameters: {meta['trainable_parameters']:,} of {count_parameters(model):,}",
            f"text: {text_info['encoder']} ({text_info['weights']}), D_t={text_info['dim']}",
            *inputs.notes,
        ],
    )
    return fit(job, resume=resume, restart=restart)
