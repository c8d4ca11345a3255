"""Tests of defectfusion.model.models (presets, weights) and config validation, plus the upstream
transformers 5.23 defects the code works around: when a `test_upstream_*` test fails,
upstream changed and the workaround may be dropped."""

from __future__ import annotations

from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
from transformers import AutoBackbone, Deimv2ForObjectDetection

from common import NAMES, TINY
from defectfusion.cli import main
from defectfusion.config import load_config
from defectfusion.core.errors import UserError
from defectfusion.data.loader import CocoDetection
from defectfusion.model import models
from defectfusion.model.losses import install_loss
from defectfusion.model.models import (
    PRESETS,
    backbone_module,
    build_model,
    count_parameters,
    freeze,
    set_train_mode,
)


def one_line_error(excinfo: pytest.ExceptionInfo) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg and "Traceback" not in msg
    return msg


def labels_for(batch: int) -> list[dict[str, torch.Tensor]]:
    return [
        {
            "class_labels": torch.tensor([1, 3]),
            "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.1]]),
        }
        for _ in range(batch)
    ]


def state_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], keys=None) -> bool:
    keys = list(a) if keys is None else keys
    return all(torch.equal(a[k], b[k]) for k in keys)


# ---- presets ---------------------------------------------------------------------------


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_builds_and_detects(preset: str) -> None:
    torch.manual_seed(0)
    model = build_model(preset, NAMES).eval()
    assert isinstance(model, Deimv2ForObjectDetection)
    assert model.config.num_labels == len(NAMES)
    assert model.config.id2label == dict(enumerate(NAMES))
    assert count_parameters(model) > 0
    # 128 px: the smallest multiple of 32 with enough anchors for 300 queries.
    with torch.no_grad():
        out = model(pixel_values=torch.randn(1, 3, 128, 128))
    q = model.config.num_queries
    assert out.logits.shape == (1, q, len(NAMES))
    assert out.pred_boxes.shape == (1, q, 4)


def test_dinov3_s_has_the_papers_parameter_count() -> None:
    # DEIMv2-S: 9.71 M in the paper's table; transformers' port adds the STA/fusion layers.
    n = count_parameters(build_model("deimv2-dinov3-s", NAMES))
    assert abs(n - 9.73e6) <= 0.01e6, n


def test_count_parameters_counts_tied_weights_once() -> None:
    model = build_model(TINY, NAMES)
    # transformers ties the decoder's class/box heads to the top-level ones.
    assert model.class_embed[0].weight is model.model.decoder.class_embed[0].weight
    unique = {id(p): p.numel() for p in model.parameters()}
    assert count_parameters(model) == sum(unique.values())
    fixed = sum(p.numel() for p in model.parameters() if not p.requires_grad)  # reg_scale, up
    freeze(backbone_module(model))
    frozen = sum(p.numel() for p in backbone_module(model).parameters())
    assert count_parameters(model, trainable_only=True) == sum(unique.values()) - frozen - fixed


def test_models_list_prints_every_preset_with_its_size(capsys: pytest.CaptureFixture) -> None:
    assert main(["models", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for name, preset in PRESETS.items():
        (line,) = [ln for ln in lines if ln.split()[0] == name]
        n = count_parameters(build_model(name, NAMES))
        assert f"{n / 1e6:.2f}M" in line
        assert str(preset.image_size) in line.split()


def test_unknown_preset_is_a_user_error() -> None:
    with pytest.raises(UserError) as e:
        build_model("deimv2-dinov9", NAMES)
    assert "deimv2-dinov3-tiny" in one_line_error(e)  # lists the known ones


# ---- input size ------------------------------------------------------------------------


@pytest.mark.parametrize("size", [100, 200, 0, -32])
def test_input_side_not_a_multiple_of_32_is_refused(size: int, tiny_data: Path) -> None:
    with pytest.raises(UserError) as e:
        load_config(overrides=[f"data.image_size={size}"])
    assert "multiple of 32" in one_line_error(e)
    with pytest.raises(UserError) as e:
        CocoDetection(tiny_data / "annotations" / "train.json", size, train=False)
    assert "multiple of 32" in one_line_error(e)


def test_input_too_small_for_the_query_count_is_refused(tiny_cfg, tmp_path: Path) -> None:
    from defectfusion.train.phase1 import train_phase1

    models.check_image_size(TINY, 96, "x")  # 189 anchors >= 100 queries
    with pytest.raises(UserError) as e:
        models.check_image_size("deimv2-dinov3-s", 96, "x")  # 189 < 300
    assert "300 queries" in one_line_error(e)
    with pytest.raises(UserError) as e:
        train_phase1(tiny_cfg(**{"data.image_size": 64}), tmp_path / "run")
    assert "image_size=64" in one_line_error(e)
    assert not (tmp_path / "run" / "last.pt").exists()


def _norms_and_activations(preset: str, norm: str | None = None) -> tuple[dict[str, int], int, int]:
    backbone = backbone_module(build_model(preset, NAMES, norm=norm))
    norms: dict[str, int] = {}
    for m in backbone.modules():
        if "Norm" in type(m).__name__:
            norms[type(m).__name__] = norms.get(type(m).__name__, 0) + 1
    acts = sum(isinstance(m, torch.nn.SiLU | torch.nn.ReLU) for m in backbone.modules())
    trainable = sum(
        p.numel()
        for m in backbone.modules()
        if isinstance(m, torch.nn.BatchNorm2d)
        for p in m.parameters(recurse=False)
        if p.requires_grad
    )
    return norms, acts, trainable


@pytest.mark.parametrize(
    "preset",
    ["deimv2-resnet-tiny", "deimv2-efficientnet-tiny", "deimv2-resnet", "deimv2-efficientnet"],
)
def test_scratch_cnn_baselines_train_their_batchnorm(preset: str) -> None:
    """A CNN backbone started from random weights (the default's baselines, and configs/neu's
    full-size ones) had its BatchNorm layers frozen as identities (12 in ResNet-tiny, 30 in
    EfficientNet-tiny, issue 24); now they learn. With pretrained weights they stay frozen."""
    norms, _, trainable = _norms_and_activations(preset)
    assert not any("Frozen" in n for n in norms) and trainable > 0, norms
    assert models.norm_for("scratch") == "trainable" and models.norm_for("backbone") == "frozen"


def test_a_checkpoint_is_rebuilt_with_the_batchnorm_it_trained_with(tmp_path: Path) -> None:
    """Rebuilt from its meta's norm, or, for a checkpoint from before it was recorded, from
    its weights (trainable BatchNorm counts its batches)."""
    from defectfusion.model.checkpoint import load_detector, save_checkpoint

    for norm in ("frozen", "trainable"):  # what training chooses (models.norm_for)
        model = build_model("deimv2-resnet-tiny", NAMES, norm=norm)
        assert models.norm_of_state(model.state_dict()) == norm
        meta = {"phase": 1, "preset": "deimv2-resnet-tiny", "class_names": NAMES,
                "image_size": 96, "normalize": "imagenet"}  # fmt: skip
        for recorded in (meta, {**meta, "norm": norm}):
            save_checkpoint(tmp_path / "c.pt", model.state_dict(), recorded)
            loaded, _ = load_detector(tmp_path / "c.pt")
            assert models.norm_of_state(loaded.state_dict()) == norm
    # An EfficientNet checkpoint from before the choice was recorded was trained with
    # transformers' freezing, which dropped its activations: it is rebuilt that way.
    legacy = build_model("deimv2-efficientnet-tiny", NAMES, norm="frozen-legacy")
    meta = {"phase": 1, "preset": "deimv2-efficientnet-tiny", "class_names": NAMES,
            "image_size": 96, "normalize": "imagenet"}  # fmt: skip
    assert models.norm_of_checkpoint(meta, legacy.state_dict()) == "frozen-legacy"
    save_checkpoint(tmp_path / "old.pt", legacy.state_dict(), meta)
    loaded, _ = load_detector(tmp_path / "old.pt")
    acts = sum(isinstance(m, torch.nn.SiLU) for m in backbone_module(loaded).modules())
    assert acts == sum(isinstance(m, torch.nn.SiLU) for m in backbone_module(legacy).modules())


def test_frozen_efficientnet_keeps_its_activations() -> None:
    """transformers' BatchNorm freezing swapped timm's BatchNormAct2d (norm + SiLU) for a
    plain frozen norm, dropping 30 of EfficientNet-tiny's 40 activations; timm's own
    converter keeps them (FrozenBatchNormAct2d)."""
    norms, acts, trainable = _norms_and_activations("deimv2-efficientnet", "frozen")
    assert set(norms) == {"FrozenBatchNormAct2d"} and trainable == 0
    fresh = timm.create_model("efficientnet_b0", features_only=True, out_indices=(2, 3, 4))
    assert acts == sum(isinstance(m, torch.nn.SiLU | torch.nn.ReLU) for m in fresh.modules())
    assert _norms_and_activations("deimv2-resnet", "frozen")[0] == {"Deimv2FrozenBatchNorm2d": 20}


# ---- pretrained weights ----------------------------------------------------------------


@pytest.mark.parametrize("preset", ["deimv2-dinov3-tiny", "deimv2-resnet-tiny"])
def test_backbone_init_loads_a_saved_backbone(preset: str, tmp_path: Path) -> None:
    config = backbone_module(build_model(preset, NAMES)).config
    torch.manual_seed(123)
    src = AutoBackbone.from_config(config)
    src.save_pretrained(tmp_path)
    scratch = backbone_module(build_model(preset, NAMES)).state_dict()
    loaded = backbone_module(build_model(preset, NAMES, "backbone", str(tmp_path))).state_dict()
    theirs = src.state_dict()
    # The detector's ResNet uses frozen BatchNorm (no num_batches_tracked): compare its keys.
    assert set(loaded) <= set(theirs)
    assert state_equal(loaded, theirs)
    assert not state_equal(loaded, scratch)  # the weights did change


def test_backbone_init_loads_a_timm_weights_file(tmp_path: Path) -> None:
    src = timm.create_model(
        "tinynet_e", pretrained=False, features_only=True, out_indices=(2, 3, 4)
    )
    with torch.no_grad():
        for p in src.parameters():
            p.add_(0.01)  # make it differ from any fresh init
    path = tmp_path / "tinynet_e.safetensors"
    safetensors.torch.save_file(src.state_dict(), path)
    model = build_model("deimv2-efficientnet-tiny", NAMES, "backbone", str(path))
    assert state_equal(backbone_module(model)._backbone.state_dict(), src.state_dict())


def test_backbone_of_another_size_is_refused(tmp_path: Path) -> None:
    AutoBackbone.from_config(
        backbone_module(build_model("deimv2-resnet-tiny", NAMES)).config
    ).save_pretrained(tmp_path)
    with pytest.raises(UserError) as e:
        build_model("deimv2-resnet", NAMES, "backbone", str(tmp_path))
    assert "do not fit preset 'deimv2-resnet'" in one_line_error(e)


def test_detector_init_loads_a_saved_detector(tmp_path: Path) -> None:
    torch.manual_seed(7)
    src = build_model(TINY, NAMES)
    src.save_pretrained(tmp_path)
    loaded = build_model(TINY, NAMES, "detector", str(tmp_path))
    a, b = loaded.state_dict(), src.state_dict()
    assert set(a) == set(b) and state_equal(a, b)
    assert loaded.config.id2label == dict(enumerate(NAMES))


def test_detector_init_from_a_trained_run(tiny_run: Path, tmp_path: Path) -> None:
    from defectfusion.model.checkpoint import load_detector

    trained, meta = load_detector(tiny_run / "best.pt")
    trained.save_pretrained(tmp_path)  # what a Phase 1 export to transformers format is
    loaded = build_model(meta["preset"], meta["class_names"], "detector", str(tmp_path))
    a, b = loaded.state_dict(), trained.state_dict()
    assert set(a) == set(b) and state_equal(a, b)


def test_detector_init_with_fewer_classes_reinitialises_only_class_heads(tmp_path: Path) -> None:
    torch.manual_seed(7)
    src = build_model(TINY, NAMES)
    src.save_pretrained(tmp_path)
    loaded = build_model(TINY, NAMES[:4], "detector", str(tmp_path))
    assert loaded.config.num_labels == 4 and loaded.config.id2label == dict(enumerate(NAMES[:4]))
    a, b = loaded.state_dict(), src.state_dict()
    resized = {k for k in a if a[k].shape != b[k].shape}
    assert resized and all(any(h in k for h in models._CLASS_HEADS) for k in resized)
    assert state_equal(a, b, [k for k in a if k not in resized])


def test_detector_weights_of_another_preset_are_refused(tmp_path: Path) -> None:
    build_model(TINY, NAMES).save_pretrained(tmp_path)
    for preset in ("deimv2-resnet-tiny", "deimv2-dinov3-s"):
        with pytest.raises(UserError) as e:
            build_model(preset, NAMES, "detector", str(tmp_path))
        assert f"do not fit preset {preset!r}" in one_line_error(e)


@pytest.mark.parametrize("init", ["backbone", "detector"])
def test_missing_local_weights_say_what_to_do(init: str, tmp_path: Path) -> None:
    with pytest.raises(UserError) as e:
        build_model(TINY, NAMES, init, str(tmp_path / "nowhere"))
    msg = one_line_error(e)
    assert "nowhere" in msg and "no such file or folder" in msg and "hf download" in msg


@pytest.mark.parametrize(
    ("preset", "init", "hub_id"),
    [
        ("deimv2-dinov3-m", "backbone", "facebook/dinov3-vits16-pretrain-lvd1689m"),
        ("deimv2-resnet-tiny", "backbone", "microsoft/resnet-18"),
        ("deimv2-efficientnet-tiny", "backbone", "tinynet_e.in1k"),
        (TINY, "detector", "defectfusion-tests/no-such-detector"),
    ],
)
def test_unreachable_hub_weights_say_what_to_do(
    preset: str, init: str, hub_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import
    with pytest.raises(UserError) as e:
        build_model(preset, NAMES, init, hub_id)
    msg = one_line_error(e)
    assert hub_id in msg and "hf download" in msg and "model.weights" in msg


# ---- config validation -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        ("epochz: 3\n", "unknown key(s) ['epochz']"),
        ("phase1:\n  epochz: 3\n", "config phase1: unknown key(s) ['epochz']"),
        ("model:\n  init: pretrained\n", "model.init='pretrained' must be one of"),
        ("fusion:\n  bn: frozen\n", "fusion.bn='frozen' must be one of"),
        ("phase1:\n  epochs: many\n", "phase1.epochs: expected int"),
        ("phase1:\n  select_metric: loss\n", "phase1.select_metric must be"),
        ("model:\n  init: backbone\n", "needs model.weights"),
    ],
)
def test_config_errors_are_one_line_naming_the_file(
    yaml_text: str, expected: str, tmp_path: Path
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(UserError) as e:
        load_config([path])
    msg = one_line_error(e)
    assert expected in msg and str(path) in msg


def test_config_overlays_and_overrides_merge() -> None:
    cfg = load_config(overrides=["phase1.epochs=3", "model.preset=deimv2-resnet-tiny"])
    assert cfg.phase1.epochs == 3 and cfg.model.preset == "deimv2-resnet-tiny"
    assert cfg.phase1.batch_size == 4  # untouched default (params.yaml's)


# ---- upstream defects and their workarounds --------------------------------------------


def test_upstream_freeze_backbone_raises_attribute_error() -> None:
    """transformers 5.23: Deimv2Model.freeze_backbone() looks for `self.backbone`, which DEIMv2
    keeps under `conv_encoder`; models.freeze is the replacement."""
    model = build_model(TINY, NAMES)
    with pytest.raises(AttributeError, match="backbone"):
        model.model.freeze_backbone()


def _bn_stats(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        k: v.clone()
        for k, v in module.state_dict().items()
        if k.endswith(("running_mean", "running_var"))
    }


def _train_step(model: torch.nn.Module) -> None:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    out = model(pixel_values=torch.randn(2, 3, 96, 96), labels=labels_for(2))
    out.loss.backward()
    opt.step()


@pytest.mark.parametrize("frozen_bn", ["eval", "train"])
def test_freeze_keeps_frozen_batchnorm_statistics(frozen_bn: str) -> None:
    """The DINOv3 path's spatial-tuning adapter uses plain BatchNorm2d: requires_grad=False
    alone does not stop its running statistics in train mode."""
    torch.manual_seed(0)
    model = build_model(TINY, NAMES)
    install_loss(model)
    frozen = model.model.conv_encoder  # DINOv3 ViT + adapter (with BatchNorm) + projection
    freeze(frozen)
    before_frozen, before_params = (
        _bn_stats(frozen),
        {k: v.clone() for k, v in frozen.named_parameters()},
    )
    before_head = _bn_stats(model.model.encoder)
    assert before_frozen and before_head
    set_train_mode(model, True, frozen_bn=frozen_bn)
    _train_step(model)
    after_frozen = _bn_stats(frozen)
    assert state_equal(dict(frozen.named_parameters()), before_params)
    assert not state_equal(_bn_stats(model.model.encoder), before_head)  # trained parts move
    if frozen_bn == "eval":
        assert state_equal(after_frozen, before_frozen)
    else:  # the `fusion.bn=train` control lets them drift
        assert not state_equal(after_frozen, before_frozen)


def test_upstream_frozen_batchnorm_drifts_under_plain_train_mode() -> None:
    """Why set_train_mode exists: model.train() after freezing moves the frozen statistics."""
    torch.manual_seed(0)
    model = build_model(TINY, NAMES)
    install_loss(model)
    freeze(model.model.conv_encoder)
    before = _bn_stats(model.model.conv_encoder)
    model.train()
    _train_step(model)
    assert not state_equal(_bn_stats(model.model.conv_encoder), before)


def test_set_train_mode_eval_puts_everything_in_eval() -> None:
    model = build_model(TINY, NAMES)
    freeze(model.model.conv_encoder)
    set_train_mode(model, True)
    assert model.training and model.model.encoder.training
    assert not any(m.training for m in model.model.conv_encoder.modules())
    set_train_mode(model, False)
    assert not any(m.training for m in model.modules())


def test_upstream_training_logits_carry_denoising_queries_first() -> None:
    """In train mode with labels, `logits`/`pred_boxes` hold [denoising | matching] queries
    (dn_num_split); in eval mode only the Q matching queries."""
    torch.manual_seed(0)
    model = build_model(TINY, NAMES)
    install_loss(model)
    model.train()
    out = model(pixel_values=torch.randn(2, 3, 96, 96), labels=labels_for(2))
    n_dn, q = out.denoising_meta_values["dn_num_split"]
    assert q == model.config.num_queries and n_dn > 0
    assert out.logits.shape == (2, n_dn + q, len(NAMES))
    assert out.pred_boxes.shape == (2, n_dn + q, 4)
    model.eval()
    with torch.no_grad():
        assert model(pixel_values=torch.randn(2, 3, 96, 96)).logits.shape == (2, q, len(NAMES))


def test_loss_function_splits_denoising_queries_with_dn_num_split() -> None:
    """Perturbing the denoising part of the logits changes only the *_dn_* terms, and
    perturbing the matching part changes only the others: the split is in the right place."""
    torch.manual_seed(0)
    model = build_model(TINY, NAMES)
    install_loss(model)
    captured: dict = {}
    inner = model.loss_function

    def spy(*args, **kwargs):
        captured.update(args=args, kwargs=kwargs)
        return inner(*args, **kwargs)

    model.loss_function = spy
    model.train()
    model(pixel_values=torch.randn(2, 3, 96, 96), labels=labels_for(2))
    args, kwargs = captured["args"], captured["kwargs"]
    n_dn, _ = kwargs["denoising_meta_values"]["dn_num_split"]

    def terms(outputs_class: torch.Tensor) -> dict[str, float]:
        a = list(args)
        a[5] = outputs_class  # (logits, labels, device, pred_boxes, config, outputs_class, ...)
        a[0] = outputs_class[:, -1]
        with torch.no_grad():
            _, loss_dict, _ = inner(*a, **kwargs)
        return {k: float(v) for k, v in loss_dict.items()}

    cls = args[5].detach()
    base = terms(cls)
    assert any("_dn_" in k for k in base) and any("_dn_" not in k for k in base)
    noise = torch.randn_like(cls)
    dn_only, match_only = noise.clone(), noise.clone()
    dn_only[:, :, n_dn:] = 0
    match_only[:, :, :n_dn] = 0
    after_dn, after_match = terms(cls + dn_only), terms(cls + match_only)
    assert all(after_dn[k] == base[k] for k in base if "_dn_" not in k)
    assert any(after_dn[k] != base[k] for k in base if "_dn_" in k and "mal" in k)
    assert all(after_match[k] == base[k] for k in base if "_dn_" in k)
    assert any(after_match[k] != base[k] for k in base if "_dn_" not in k and "mal" in k)
