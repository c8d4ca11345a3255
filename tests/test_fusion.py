"""Tests of the Phase 2 fusion (defectfusion.model.fusion): zero-start, gate gradients, the trainable
set, frozen statistics, the controls (naive init, alpha frozen at 0) and checkpoints."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from common import NAMES, TINY
from defectfusion.core.errors import UserError
from defectfusion.evaluation import evaluate as ev
from defectfusion.model.checkpoint import load_detector, load_model_state, save_checkpoint
from defectfusion.model.fusion import attach_fusion, class_heads, set_trainable
from defectfusion.model.losses import install_loss
from defectfusion.model.models import build_model, count_parameters, set_train_mode
from defectfusion.train.common import param_groups

SIZES = [(64, 96), (96, 128), (192, 160)]  # (h, w), multiples of 32 with >= 100 anchors


def phase1_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = build_model(TINY, NAMES)
    install_loss(model, "mal")
    return model


def text(d_t: int = 32, seed: int = 1) -> torch.Tensor:
    """Fake class-prompt embeddings (K x D_t): the fusion only needs their shape."""
    return torch.randn(len(NAMES), d_t, generator=torch.Generator().manual_seed(seed))


def phase2_model(base: nn.Module, init: str = "zero_start", alpha: str = "learned") -> nn.Module:
    model = copy.deepcopy(base)
    attach_fusion(model, text(), init)
    set_trainable(model, alpha)
    install_loss(model, "focal")
    return model


def images(h: int = 96, w: int = 96, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))


def labels(batch: int = 2) -> list[dict[str, torch.Tensor]]:
    return [
        {
            "class_labels": torch.tensor([2, 3, 5])[: 1 + i % 3],
            "boxes": torch.tensor(
                [[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.1], [0.5, 0.5, 0.4, 0.3]]
            )[: 1 + i % 3],
        }
        for i in range(batch)
    ]


def predict(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """The evaluation path (`evaluate.predict`): raw logits and boxes, and the COCO records."""
    captured = []
    handle = model.register_forward_hook(lambda m, i, out: captured.append(out))
    targets = [{"image_id": i + 1, "orig_size": tuple(x.shape[2:])} for i in range(len(x))]
    try:
        records = ev.predict(model, [(x, targets)], progress=False)
    finally:
        handle.remove()
    return captured[0].logits, captured[0].pred_boxes, records


def train_loss(model: nn.Module, bn: str = "eval", seed: int = 0) -> torch.Tensor:
    set_train_mode(model, True, bn)
    torch.manual_seed(seed)  # DEIMv2's denoising queries are random
    return model(pixel_values=images(seed=seed), labels=labels()).loss


def adamw(model: nn.Module, lr: float = 1e-3) -> torch.optim.Optimizer:
    return torch.optim.AdamW(param_groups(model, lr, 1.0, 1e-4), lr=lr)


def train_steps(model: nn.Module, n: int, bn: str = "eval") -> None:
    opt = adamw(model)
    for step in range(n):
        train_loss(model, bn, seed=step).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


# ---- zero-start: epoch 0 is Phase 1 --------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
def test_zero_start_is_bit_identical_to_phase1(size: tuple[int, int]) -> None:
    base = phase1_model()
    fused = phase2_model(base)
    x = images(*size)
    logits, boxes, records = predict(base, x)
    f_logits, f_boxes, f_records = predict(fused, x)
    assert torch.equal(f_logits, logits) and torch.equal(f_boxes, boxes)
    assert f_records == records
    # Not vacuous: the hooks do run, and an open gate changes the detections.
    with torch.no_grad():
        fused.fusion.alpha.fill_(1.0)
    assert not torch.equal(predict(fused, x)[0], logits)


def test_predict_restores_requires_grad_and_ignores_it() -> None:
    """PyTorch picks some matmul kernels by the weights' requires_grad flag, even under
    no_grad: `evaluate.predict` clears the flags so that a mostly frozen Phase 2 model and
    the all-trainable Phase 1 model give the same bits, and restores them afterwards."""
    model = phase2_model(phase1_model())
    flags = [p.requires_grad for p in model.parameters()]
    assert any(flags) and not all(flags)
    x = images(64, 96)
    first = predict(model, x)
    assert [p.requires_grad for p in model.parameters()] == flags
    for p in model.parameters():
        p.requires_grad_(True)
    again = predict(model, x)
    assert torch.equal(again[0], first[0]) and again[2] == first[2]


def test_zero_start_adds_exactly_nothing_to_the_training_loss() -> None:
    base = phase1_model()
    fused = phase2_model(base)
    install_loss(fused, "mal")  # the same loss as Phase 1: only the fusion differs
    # Same requires_grad flags (they select kernels, see above), same train mode.
    trainable = dict(fused.named_parameters())
    for name, p in base.named_parameters():
        p.requires_grad_(trainable[name].requires_grad)
    assert torch.equal(train_loss(fused, "train"), train_loss(base, "train"))
    with torch.no_grad():
        fused.fusion.alpha.fill_(0.5)
    assert not torch.equal(train_loss(fused, "train"), train_loss(base, "train"))


def test_attach_refuses_embeddings_of_another_class_count() -> None:
    with pytest.raises(UserError, match="5 classes"):
        attach_fusion(phase1_model(), torch.randn(5, 32))


# ---- gradient dynamics of the gate -------------------------------------------------------


def test_step_zero_only_the_gate_gets_a_gradient() -> None:
    model = phase2_model(phase1_model())
    f = model.fusion
    train_loss(model).backward()
    assert f.alpha.grad is not None and f.alpha.grad.item() != 0.0
    for p in (f.proj.weight, f.proj.bias, f.log_tau):
        assert p.grad is not None and torch.count_nonzero(p.grad) == 0  # exactly zero
    # The class heads learn from step 0 (they are Phase 1's and get the loss directly).
    assert all(torch.count_nonzero(h.weight.grad) > 0 for h in class_heads(model))

    opt = adamw(model)
    opt.step()
    opt.zero_grad(set_to_none=True)
    assert f.alpha.item() != 0.0  # the gate opened by about lr
    train_loss(model, seed=1).backward()
    for p in (f.proj.weight, f.proj.bias, f.log_tau):
        assert torch.count_nonzero(p.grad) > 0


def test_alpha_frozen0_stays_exactly_zero() -> None:
    model = phase2_model(phase1_model(), alpha="frozen0")
    f = model.fusion
    assert not f.alpha.requires_grad
    heads_before = [h.weight.detach().clone() for h in class_heads(model)]
    train_steps(model, 3)
    assert f.alpha.item() == 0.0 and f.alpha.grad is None
    assert all(
        not torch.equal(h.weight, w) for h, w in zip(class_heads(model), heads_before, strict=True)
    )


def test_naive_init_changes_the_detections() -> None:
    base = phase1_model()
    naive = phase2_model(base, init="naive")
    assert naive.fusion.alpha.item() == pytest.approx(0.1)
    x = images()
    assert not torch.equal(predict(naive, x)[0], predict(base, x)[0])
    assert naive.fusion.proj.weight.std() > 5 * phase2_model(base).fusion.proj.weight.std()


# ---- what trains: the thesis's ~140k parameters --------------------------------------------


def test_thesis_configuration_trains_139296_parameters() -> None:
    """deimv2-dinov3-m: D_v = d_model = 256, 4 decoder layers, D_t = 512, K = 6.

    proj 256*512 + 512, tau, alpha = 131,586; 4 class heads + the encoder score head,
    5 * (256*6 + 6) = 7,710: 139,296 ("about 140,000" in the thesis)."""
    torch.manual_seed(0)
    model = build_model("deimv2-dinov3-m", NAMES)
    assert model.config.d_model == 256 and model.config.decoder_layers == 4
    attach_fusion(model, torch.randn(6, 512))
    set_trainable(model)
    assert count_parameters(model, trainable_only=True) == 139296
    expected = {id(p) for m in (model.fusion, *class_heads(model, True)) for p in m.parameters()}
    assert {id(p) for p in model.parameters() if p.requires_grad} == expected
    assert len(class_heads(model, False)) == 4


def test_trainable_set_and_frozen_marks_on_the_tiny_model() -> None:
    model = phase2_model(phase1_model())
    heads = {id(p) for m in (model.fusion, *class_heads(model, True)) for p in m.parameters()}
    assert {id(p) for p in model.parameters() if p.requires_grad} == heads
    # Every module with weights or statistics but nothing trainable in its subtree lies in a
    # subtree marked frozen (so set_train_mode keeps it in eval mode)...
    frozen = [m for m in model.modules() if getattr(m, "_defectfusion_frozen", False)]
    under = {id(s) for m in frozen for s in m.modules()}
    for name, m in model.named_modules():
        state = [*m.parameters(), *m.buffers()]
        if state and not any(p.requires_grad for p in m.parameters()):
            assert id(m) in under, name
    # ...and no marked subtree holds a trainable parameter.
    assert not any(p.requires_grad for m in frozen for p in m.parameters())


# ---- frozen BatchNorm statistics -----------------------------------------------------------


def bn_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{k}": v.clone()
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        for k, v in m.named_buffers()
    }


@pytest.mark.parametrize("bn", ["eval", "train"])
def test_phase2_keeps_frozen_batchnorm_statistics(bn: str) -> None:
    model = phase2_model(phase1_model())
    bns = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    frozen = {n for n, m in model.named_modules() if getattr(m, "_defectfusion_frozen", False)}
    assert bns and all(any(b.startswith(f + ".") for f in frozen) for b in bns)  # all frozen
    before = bn_buffers(model)
    train_steps(model, 2, bn)
    after = bn_buffers(model)
    if bn == "eval":
        assert all(torch.equal(after[k], before[k]) for k in before)
    else:  # the fusion.bn=train control: "frozen" modules' statistics drift
        stats = [k for k in before if k.endswith(("running_mean", "running_var"))]
        changed = [k for k in stats if not torch.equal(after[k], before[k])]
        assert len(changed) == len(stats)


# ---- checkpoints -------------------------------------------------------------------------


def test_phase1_state_dict_loads_into_a_fused_model() -> None:
    base = phase1_model()
    state = base.state_dict()
    fused = phase1_model(seed=5)  # other weights, then the Phase 1 ones are loaded
    attach_fusion(fused, text())
    keys = set(fused.state_dict())
    assert {k for k in keys if not k.startswith("fusion.")} == set(state)
    assert {k for k in keys if k.startswith("fusion.")} == {
        "fusion.text",
        "fusion.log_tau",
        "fusion.alpha",
        "fusion.proj.weight",
        "fusion.proj.bias",
    }
    load_model_state(fused, state, "phase1.pt", allow_missing=("fusion.",))
    x = images(96, 128)
    assert torch.equal(predict(fused, x)[0], predict(base, x)[0])
    with pytest.raises(UserError, match="fusion"):
        load_model_state(fused, state, "phase1.pt")  # strict: the fusion's weights are missing


def test_phase2_checkpoint_round_trip(tmp_path: Path) -> None:
    model = phase2_model(phase1_model())
    with torch.no_grad():  # a trained-looking fusion: the reload must restore it
        model.fusion.alpha.fill_(0.3)
        model.fusion.log_tau.fill_(-1.0)
    meta = {
        "phase": 2,
        "preset": TINY,
        "class_names": NAMES,
        "image_size": 96,
        "text_shape": list(model.fusion.text.shape),
        "tau_init": 0.07,
        "fuse_encoder_head": True,
    }
    save_checkpoint(tmp_path / "p2.pt", model.state_dict(), meta)
    loaded, _ = load_detector(tmp_path / "p2.pt")
    x = images(96, 96)
    assert torch.equal(predict(loaded, x)[0], predict(model, x)[0])
    assert torch.equal(loaded.fusion.text, model.fusion.text)


def test_deepcopy_rebinds_the_hooks_to_the_copy() -> None:
    """EMA (AveragedModel) deep-copies the model: the copy must use its own fusion weights."""
    model = phase2_model(phase1_model())
    x = images()
    before = predict(model, x)[0]
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.fusion.alpha.fill_(1.0)
    assert not torch.equal(predict(twin, x)[0], before)
    assert torch.equal(predict(model, x)[0], before)
