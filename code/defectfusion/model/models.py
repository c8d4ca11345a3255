"""Detector presets -> `transformers.Deimv2ForObjectDetection`, and loading pretrained weights.

The detector is transformers' DEIMv2, never a re-implementation. This module only
chooses sizes (presets), builds the config, loads weights from a hub id or a local
path, and works around what transformers 5.23 leaves to the caller (see `freeze`).

Pretrained weights a user with internet can name (``model.init`` / ``model.weights``):

- ``backbone`` on the DINOv3 presets that use ViT-S/16 (``deimv2-dinov3-m``):
  ``facebook/dinov3-vits16-pretrain-lvd1689m`` (gated on the hub: accept its licence, then
  ``hf auth login``), or the folder ``hf download`` wrote.
- ``backbone`` on ``deimv2-resnet``: ``microsoft/resnet-18``; on ``deimv2-efficientnet``:
  the timm name ``efficientnet_b0.ra_in1k``.
- ``detector``: any DEIMv2 checkpoint in transformers format (``save_pretrained`` folder
  or hub id), e.g. one of this project's Phase 1 exports; class heads are re-initialised
  when its class count differs.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from torch import nn
from transformers import (
    Deimv2Config,
    Deimv2ForObjectDetection,
    DINOv3ViTConfig,
    ResNetConfig,
    TimmBackboneConfig,
)

from defectfusion.core.errors import UserError


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    image_size: int  # default input side
    backbone: dict[str, Any]  # {"kind": "dinov3" | "resnet" | "timm", ...config kwargs}
    detector: dict[str, Any]  # Deimv2Config kwargs (besides backbone and labels)


def _dinov3(hidden: int, layers: int, heads: int, mlp: int, out: list[int]) -> dict[str, Any]:
    return dict(
        kind="dinov3",
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=mlp,
        patch_size=16,
        num_register_tokens=4,
        out_indices=out,
    )


# DEIMv2's sampling points per feature level (configs/base/deimv2.yml, num_points) on the GPU
# presets; the CPU presets keep transformers' default 4 at every level.
DEIMV2_POINTS = [3, 6, 3]


def _head(d: int, ffn: int, layers: int, **extra: Any) -> dict[str, Any]:
    """The DEIMv2 encoder+decoder sized like the paper's DINOv3 variants (RepNCSPELAN5)."""
    base = dict(
        d_model=d,
        encoder_hidden_dim=d,
        decoder_in_channels=[d, d, d],
        encoder_ffn_dim=ffn,
        decoder_ffn_dim=ffn,
        decoder_layers=layers,
        hidden_expansion=0.34,
        depth_mult=0.67,
        encoder_has_trailing_conv=False,
        spatial_tuning_adapter_inplanes=16,
    )
    base.update(extra)
    return base


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset(
            "deimv2-dinov3-tiny",
            "CPU-sized DINOv3-style ViT + DEIMv2 head: the embedded default",
            192,
            _dinov3(96, 4, 3, 192, [2, 3, 4]),
            _head(
                64,
                128,
                3,
                encoder_attention_heads=4,
                decoder_attention_heads=4,
                spatial_tuning_adapter_inplanes=8,
                num_queries=100,
                num_denoising=50,
                decoder_n_points=[4, 4, 4],
            ),
        ),
        Preset(
            "deimv2-dinov3-s",
            "faithful DEIMv2-S: distilled DINOv3 ViT-Tiny (192-d), d_model 192, 4 decoder layers",
            640,
            _dinov3(192, 12, 3, 768, [5, 8, 11]),
            _head(192, 512, 4, decoder_n_points=DEIMV2_POINTS),
        ),
        Preset(
            "deimv2-dinov3-m",
            "the thesis's configuration: DINOv3 ViT-S/16 (384-d) under DEIMv2-M's head (d_model "
            "256 = D_v, 4 decoder layers); not DEIMv2-M itself, whose backbone is a distilled "
            "ViT-Tiny+ (256-d)",
            640,
            _dinov3(384, 12, 6, 1536, [5, 8, 11]),
            _head(
                256, 512, 4, depth_mult=1.0, hidden_expansion=0.67, decoder_n_points=DEIMV2_POINTS
            ),
        ),
        Preset(
            "deimv2-resnet",
            "CNN baseline: ResNet-18 backbone, same DEIMv2 head as deimv2-dinov3-s",
            640,
            dict(
                kind="resnet",
                layer_type="basic",
                hidden_sizes=[64, 128, 256, 512],
                depths=[2, 2, 2, 2],
            ),
            _head(192, 512, 4, encoder_has_trailing_conv=True, decoder_n_points=DEIMV2_POINTS),
        ),
        Preset(
            "deimv2-resnet-tiny",
            "CPU-sized ResNet baseline under the tiny DEIMv2 head",
            192,
            dict(
                kind="resnet",
                layer_type="basic",
                embedding_size=24,
                hidden_sizes=[24, 48, 96, 128],
                depths=[1, 1, 1, 1],
            ),
            _head(
                64,
                128,
                3,
                encoder_attention_heads=4,
                decoder_attention_heads=4,
                num_queries=100,
                num_denoising=50,
                encoder_has_trailing_conv=True,
            ),
        ),
        Preset(
            "deimv2-efficientnet",
            "CNN baseline: EfficientNet-B0 backbone (timm), same DEIMv2 head as deimv2-dinov3-s",
            640,
            dict(kind="timm", backbone="efficientnet_b0"),
            _head(192, 512, 4, encoder_has_trailing_conv=True, decoder_n_points=DEIMV2_POINTS),
        ),
        Preset(
            "deimv2-efficientnet-tiny",
            "CPU-sized EfficientNet-family baseline (timm tinynet_e) under the tiny DEIMv2 head",
            192,
            dict(kind="timm", backbone="tinynet_e"),
            _head(
                64,
                128,
                3,
                encoder_attention_heads=4,
                decoder_attention_heads=4,
                num_queries=100,
                num_denoising=50,
                encoder_has_trailing_conv=True,
            ),
        ),
    ]
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise UserError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name]


def _backbone_config(spec: dict[str, Any]) -> tuple[Any, list[int]]:
    """The backbone config and the channel count of each of its three output maps."""
    spec = dict(spec)
    kind = spec.pop("kind")
    if kind == "dinov3":
        cfg = DINOv3ViTConfig(**spec)
        d = spec["hidden_size"]
        return cfg, [d, d, d]
    if kind == "resnet":
        cfg = ResNetConfig(out_features=["stage2", "stage3", "stage4"], **spec)
        return cfg, list(spec["hidden_sizes"][1:])
    if kind == "timm":
        import timm

        cfg = TimmBackboneConfig(
            backbone=spec["backbone"], out_indices=(2, 3, 4), use_pretrained_backbone=False
        )
        probe = timm.create_model(
            spec["backbone"], pretrained=False, features_only=True, out_indices=(2, 3, 4)
        )
        return cfg, list(probe.feature_info.channels())
    raise ValueError(f"unknown backbone kind {kind}")


# "frozen-legacy": how a checkpoint from before the choice was recorded was built: every
# backbone BatchNorm swapped by transformers for a frozen copy, timm's BatchNormAct2d losing
# its activation with it. Never chosen for training; rebuilt only to compute what was trained.
NORMS = ("frozen", "trainable", "frozen-legacy")


def norm_for(init: str) -> str:
    """A CNN backbone's BatchNorm: "frozen" (DEIMv2's choice for pretrained weights: fixed
    statistics and affine) when the model starts from weights, "trainable" when it starts
    from random ones, whose statistics and affine nobody has learned (frozen, each layer is
    an identity: 12 in ResNet-tiny, 30 in EfficientNet-tiny). A ViT backbone has none."""
    return "trainable" if init == "scratch" else "frozen"


# Where the backbone's weights are in the detector's state dict (`backbone_module`).
_BACKBONE_KEYS = ("model.conv_encoder.model.", "model.conv_encoder.backbone.")


def norm_of_state(state: dict[str, Any]) -> str:
    """The BatchNorm a checkpoint's backbone was trained with: a trainable BatchNorm counts
    its batches (``num_batches_tracked``), a frozen one does not (for a checkpoint from
    before the choice was recorded; the encoder's own BatchNorm always counts)."""
    return (
        "trainable"
        if any(k.startswith(_BACKBONE_KEYS) and k.endswith("num_batches_tracked") for k in state)
        else "frozen"
    )


def norm_of_checkpoint(meta: dict[str, Any], state_keys: Any) -> str:
    """The BatchNorm to rebuild a checkpoint's model with: its meta's ``norm``, else (older
    checkpoints) what its weights show, the legacy build for a frozen timm backbone."""
    if meta.get("norm"):
        return str(meta["norm"])
    norm = norm_of_state(dict.fromkeys(state_keys))
    if norm == "frozen" and get_preset(meta["preset"]).backbone["kind"] == "timm":
        return "frozen-legacy"
    return norm


def build_config(
    preset: str | Preset, class_names: list[str], norm: str = "frozen"
) -> Deimv2Config:
    p = get_preset(preset) if isinstance(preset, str) else preset
    backbone, channels = _backbone_config(p.backbone)
    return Deimv2Config(
        backbone_config=backbone,
        encoder_in_channels=channels,
        num_labels=len(class_names),
        id2label=dict(enumerate(class_names)),
        label2id={n: i for i, n in enumerate(class_names)},
        # transformers' freezing swaps every BatchNorm2d for a frozen copy; timm's
        # BatchNormAct2d (EfficientNet) is a BatchNorm2d that also holds the activation, which
        # that swap silently drops. timm backbones are frozen by timm instead (freeze_norms).
        freeze_backbone_batch_norms=(
            norm == "frozen-legacy" or (norm == "frozen" and p.backbone["kind"] != "timm")
        ),
        **p.detector,
    )


def freeze_norms(
    model: Deimv2ForObjectDetection, preset: Preset, norm: str
) -> Deimv2ForObjectDetection:
    """A timm backbone's frozen BatchNorm, by timm's own converter (`freeze_batch_norm_2d`
    keeps BatchNormAct2d's activation: FrozenBatchNormAct2d); others are done by the config."""
    if norm == "frozen" and preset.backbone["kind"] == "timm":
        from timm.utils.model import freeze_batch_norm_2d

        target = backbone_module(model)
        target._backbone = freeze_batch_norm_2d(target._backbone)
    return model


def check_image_size(preset: str, image_size: int, where: str) -> None:
    """Refuse an input too small for the preset's query count, in one line.

    DEIMv2 selects its ``num_queries`` queries among the anchors of all feature levels; an
    input with fewer anchors fails deep inside transformers (``selected index k out of range``).
    """
    config = build_config(preset, ["x"])
    anchors = sum((image_size // s) ** 2 for s in config.feat_strides)
    if anchors < config.num_queries:
        raise UserError(
            f"{where}: data.image_size={image_size} is too small for preset {preset!r} "
            f"({anchors} anchors for {config.num_queries} queries); use a larger input size"
        )


def build_model(
    preset: str,
    class_names: list[str],
    init: str = "scratch",
    weights: str | None = None,
    norm: str | None = None,
) -> Deimv2ForObjectDetection:
    """Build a detector from a preset. Random weights only for ``init='scratch'``. ``norm``:
    a CNN backbone's BatchNorm (`norm_for` the init by default; a checkpoint being rebuilt
    passes the one it was trained with)."""
    norm = norm or norm_for(init)
    if norm not in NORMS:
        raise UserError(f"BatchNorm mode {norm!r} must be one of {list(NORMS)}")
    config = build_config(preset, class_names, norm)
    if init == "detector":
        return freeze_norms(_load_detector(weights, config, preset), get_preset(preset), norm)
    model = Deimv2ForObjectDetection(config)
    if init == "backbone":
        _load_backbone(model, weights, get_preset(preset))  # before freezing: real statistics
    elif init != "scratch":
        raise UserError(f"model.init={init!r} must be scratch, backbone or detector")
    return freeze_norms(model, get_preset(preset), norm)


@contextmanager
def bars_on_terminal_only() -> Iterator[None]:
    """transformers' own progress bars ("Loading weights") only on a terminal, as ours
    (tqdm's ``disable=None``): off a terminal each frame is a line of a log file."""
    from transformers.utils import logging as hf_logging

    if sys.stderr.isatty() or not hf_logging.is_progress_bar_enabled():
        yield
        return
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()


def _weights_error(what: str, weights: str | None, err: Exception) -> UserError:
    local = str(weights).startswith(("/", "./", "../", "~"))
    if local and not Path(str(weights)).expanduser().exists():  # hub errors would mislead here
        return UserError(
            f"model.weights {weights!r}: no such file or folder; point it at a folder written "
            "by `save_pretrained` / `hf download ID --local-dir DIR`, or at a hub id"
        )
    return UserError(
        f"cannot load {what} weights {weights!r} ({err.__class__.__name__}: {str(err).splitlines()[0] if str(err) else ''}). "
        "With internet, check the hub id (and accept the model's licence, then `hf auth login`); "
        "offline, download it elsewhere with `hf download ID --local-dir DIR` and set model.weights to DIR"
    )


# Heads whose shape follows the class count: re-initialised when the class count differs.
_CLASS_HEADS = ("class_embed", "enc_score_head", "denoising_class_embed")


def _load_detector(
    weights: str | None, config: Deimv2Config, preset: str
) -> Deimv2ForObjectDetection:
    try:
        # config=: the preset decides the architecture (checkpoints record the preset and are
        # rebuilt from it), and weights of another architecture are refused below.
        with bars_on_terminal_only():
            model, info = Deimv2ForObjectDetection.from_pretrained(
                weights,
                config=config,
                ignore_mismatched_sizes=True,
                use_safetensors=True,  # never unpickle weights from a remote
                output_loading_info=True,
            )
    except (OSError, ValueError, SafetensorError) as e:  # a corrupt file: one line
        raise _weights_error("detector", weights, e) from None
    mismatched = sorted(
        k for k, *_ in info["mismatched_keys"] if not any(h in k for h in _CLASS_HEADS)
    )
    missing = sorted(info["missing_keys"])
    if mismatched or missing:
        raise UserError(
            f"detector weights {weights!r} do not fit preset {preset!r} "
            f"(mismatched shapes: {mismatched[:3]}, missing: {missing[:3]})"
        )
    return model


def backbone_module(model: Deimv2ForObjectDetection) -> nn.Module:
    enc = model.model.conv_encoder
    return enc.backbone if hasattr(enc, "backbone") else enc.model


def _load_backbone(model: Deimv2ForObjectDetection, weights: str | None, preset: Preset) -> None:
    target = backbone_module(model)
    try:
        if preset.backbone["kind"] == "timm":
            import timm

            # A local file holds weights only: the architecture comes from the preset.
            local = Path(str(weights))
            name = preset.backbone["backbone"] if local.is_file() else weights
            name = f"local-dir:{local}" if local.is_dir() else name
            overlay = {"pretrained_cfg_overlay": {"file": str(local)}} if local.is_file() else {}
            src = timm.create_model(
                name, pretrained=True, features_only=True, out_indices=(2, 3, 4), **overlay
            )
            state = src.state_dict()
        else:
            # The concrete class, not AutoBackbone: in transformers 5.23 AutoBackbone asks the
            # hub whether the name exists first, so it rejects local folders and fails offline.
            with bars_on_terminal_only():
                src = type(target).from_pretrained(
                    weights, out_indices=target.config.out_indices, use_safetensors=True
                )
            state = src.state_dict()
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
        raise _weights_error("backbone", weights, e) from None
    own = (
        target.state_dict() if preset.backbone["kind"] != "timm" else target._backbone.state_dict()
    )
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if mismatched or not set(own) <= set(state) | {k for k in own if "num_batches_tracked" in k}:
        missing = sorted(set(own) - set(state))[:3]
        raise UserError(
            f"backbone weights {weights!r} do not fit preset {preset.name!r} "
            f"(mismatched shapes: {mismatched[:3]}, missing: {missing})"
        )
    dest = target if preset.backbone["kind"] != "timm" else target._backbone
    dest.load_state_dict(state, strict=False)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Parameters counted once even when tied (transformers ties the class and box heads)."""
    seen: set[int] = set()
    n = 0
    for p in model.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        n += p.numel()
    return n


def freeze(module: nn.Module) -> None:
    """Stop gradients AND BatchNorm statistics in `module`.

    transformers 5.23's ``Deimv2Model.freeze_backbone()`` raises AttributeError (it looks
    for ``self.backbone``, which DEIMv2 keeps under ``conv_encoder``), and the DINOv3 path
    uses plain BatchNorm2d whose running statistics keep moving in train mode even with
    ``requires_grad=False``. So freezing is two steps: no grads here, and `set_train_mode`
    keeps frozen modules in eval mode.
    """
    for p in module.parameters():
        p.requires_grad_(False)
    module._defectfusion_frozen = True  # read by set_train_mode


def set_train_mode(model: nn.Module, train: bool = True, frozen_bn: str = "eval") -> None:
    """`model.train(train)`, then put frozen submodules back in eval mode (unless the
    ``bn=train`` control asks to let their BatchNorm statistics drift)."""
    model.train(train)
    if train and frozen_bn == "eval":
        for m in model.modules():
            if getattr(m, "_defectfusion_frozen", False):
                m.eval()


def print_presets() -> None:
    """`defectfusion models list`: each preset with its parameter count and input size."""
    names = ["normal", "perforation", "fracture", "scratch", "dent", "contamination"]
    print(f"{'preset':26s} {'params':>10s} {'input':>6s}  description")
    for p in PRESETS.values():
        n = count_parameters(build_model(p.name, names))
        print(f"{p.name:26s} {n / 1e6:9.2f}M {p.image_size:6d}  {p.description}")
