"""Tests of defectfusion.model.losses: the focal loss against a hand computation, the auxiliary
pairing of layers, and the upstream (transformers 5.23) defects they replace: when a
`test_upstream_*` test fails, upstream changed and the workaround may be dropped."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.loss import loss_deimv2
from transformers.loss.loss_deimv2 import Deimv2Loss

from common import NAMES, TINY
from defectfusion.model import losses
from defectfusion.model.losses import DetectionCriterion, install_loss
from defectfusion.model.models import build_config, build_model

# Two queries, three classes; query 0 is matched to the one box, of class 2.
LOGITS = [[1.0, -1.0, 0.5], [-2.0, 0.0, 3.0]]
MATCHED_QUERY, MATCHED_CLASS = 0, 2


def tiny_case() -> tuple[dict, list[dict], list[tuple[torch.Tensor, torch.Tensor]]]:
    outputs = {"logits": torch.tensor([LOGITS])}
    targets = [
        {
            "class_labels": torch.tensor([MATCHED_CLASS]),
            "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]]),
        }
    ]
    indices = [(torch.tensor([MATCHED_QUERY]), torch.tensor([0]))]
    return outputs, targets, indices


def focal_by_hand(alpha: float, gamma: float) -> float:
    """FL = -alpha_t (1 - p_t)^gamma log(p_t), summed over the 2 x 3 (query, class) pairs."""
    total = 0.0
    for q, row in enumerate(LOGITS):
        for k, x in enumerate(row):
            p = 1 / (1 + math.exp(-x))
            positive = q == MATCHED_QUERY and k == MATCHED_CLASS
            p_t = p if positive else 1 - p
            alpha_t = alpha if positive else 1 - alpha
            total += -alpha_t * (1 - p_t) ** gamma * math.log(p_t)
    return total


def test_focal_hand_numbers() -> None:
    """The six terms at alpha 0.25, gamma 2, worked out by hand (p = sigmoid(x)):

    matched (q0, class 2): x 0.5, p 0.622459: -0.25 (1 - p)^2 ln p        = 0.0168934
    negatives: -0.75 p^2 ln(1 - p) with x = 1 (p 0.731059)                = 0.5264012
                                        x = -1 (p 0.268941)               = 0.0169935
                                        x = -2 (p 0.119203)               = 0.0013527
                                        x = 0 (p 0.5): 0.75 * 0.25 ln 2   = 0.1299651
                                        x = 3 (p 0.952574)                = 2.0747103
    """
    assert 0.75 * 0.25 * math.log(2) == pytest.approx(0.1299651, abs=1e-7)
    terms = [0.0168934, 0.5264012, 0.0169935, 0.0013527, 0.1299651, 2.0747103]
    assert focal_by_hand(0.25, 2.0) == pytest.approx(sum(terms), abs=1e-6)  # 2.7663162


@pytest.mark.parametrize(
    ("alpha", "gamma", "num_boxes"), [(0.25, 2.0, 1.0), (0.75, 2.0, 1.0), (0.25, 1.0, 2.0)]
)
def test_focal_loss_equals_the_hand_computation(
    alpha: float, gamma: float, num_boxes: float
) -> None:
    criterion = DetectionCriterion(build_config(TINY, NAMES[:3]), "focal", alpha, gamma)
    got = criterion.loss_labels_focal(*tiny_case(), num_boxes)["loss_focal"]
    # Normalised like MAL/VFL: the sum over queries and classes, per target box.
    assert got.item() == pytest.approx(focal_by_hand(alpha, gamma) / num_boxes, rel=1e-6)


def test_focal_loss_matches_the_hand_numbers_directly() -> None:
    criterion = DetectionCriterion(build_config(TINY, NAMES[:3]), "focal", 0.25, 2.0)
    got = criterion.loss_labels_focal(*tiny_case(), 1.0)["loss_focal"]
    assert got.item() == pytest.approx(2.7663162, abs=1e-6)


def test_focal_criterion_weights_and_uses_the_focal_term() -> None:
    config = build_config(TINY, NAMES[:3])
    criterion = DetectionCriterion(config, "focal")
    assert criterion.losses[0] == "focal" and "mal" not in criterion.losses
    assert criterion.weight_dict["loss_focal"] == config.weight_loss_mal
    assert DetectionCriterion(config, "mal").losses == Deimv2Loss(config).losses
    with pytest.raises(ValueError, match="cls_loss"):
        DetectionCriterion(config, "vfl")


def test_upstream_focal_loss_is_broken() -> None:
    """transformers 5.23: RTDetrLoss.loss_labels_focal passes alpha where `num_boxes` belongs
    and an int64 target to BCE (it raises), and Deimv2Loss has no weight for loss_focal (it
    would be dropped). DetectionCriterion replaces it."""
    config = build_config(TINY, NAMES[:3])
    upstream = Deimv2Loss(config)
    with pytest.raises(RuntimeError, match="Long"):
        upstream.loss_labels_focal(*tiny_case(), 1.0)
    assert "loss_focal" not in upstream.weight_dict


# ---- auxiliary pairing -----------------------------------------------------------------------


def labels() -> list[dict[str, torch.Tensor]]:
    return [
        {
            "class_labels": torch.tensor([2, 3]),
            "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.1]]),
        },
        {"class_labels": torch.tensor([5]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.3]])},
    ]


def training_forward(monkeypatch: pytest.MonkeyPatch, criterion_cls: type, cls_loss: str | None):
    """One training forward of the tiny model; returns (model, its output, what the
    criterion's forward received)."""
    torch.manual_seed(0)
    model = build_model(TINY, NAMES)
    if cls_loss is not None:
        install_loss(model, cls_loss)
    captured: dict = {}
    real = criterion_cls.forward

    def spy(self, outputs, targets):
        captured.update(outputs)
        return real(self, outputs, targets)

    monkeypatch.setattr(criterion_cls, "forward", spy)
    model.train()
    x = torch.rand(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    out = model(pixel_values=x, labels=labels())
    return model, out, captured


def layer_logits(model, out, j: int, corners: torch.Tensor, n_dn: int) -> torch.Tensor:
    """Decoder layer j's final logits, recomputed from its hidden state and `corners`."""
    hidden = out.intermediate_hidden_states[j][:, n_dn:]  # (L, B, Q, D) stacked
    with torch.no_grad():
        scores = model.model.decoder.class_embed[j](hidden)
        return model.model.decoder.lqe_layers[j](scores, corners)


@pytest.mark.parametrize("cls_loss", ["mal", "focal"])
def test_aux_entries_pair_each_layers_logits_with_its_corners(monkeypatch, cls_loss: str) -> None:
    model, out, seen = training_forward(monkeypatch, DetectionCriterion, cls_loss)
    n_layers = model.config.decoder_layers
    n_dn = out.denoising_meta_values["dn_num_split"][0]
    corners = out.intermediate_predicted_corners[:, :, n_dn:]  # (B, L, Q, 4 * (bins + 1))
    aux = seen["auxiliary_outputs"]
    assert len(aux) == (n_layers - 1) + 1 + 1  # layers 0..L-2, the pre-head, the encoder
    layers = [*aux[: n_layers - 1], seen]  # the main output is the last layer
    for j, entry in enumerate(layers):
        assert torch.equal(entry["pred_corners"], corners[:, j])
        assert torch.allclose(
            entry["logits"], layer_logits(model, out, j, corners[:, j], n_dn), atol=1e-6
        )
        assert torch.equal(entry["teacher_corners"], corners[:, -1])
    pre, enc = aux[n_layers - 1], aux[n_layers]
    assert "pred_corners" not in pre and "pred_corners" not in enc
    hidden0 = out.intermediate_hidden_states[0][:, n_dn:]
    with torch.no_grad():
        assert torch.allclose(pre["logits"], model.model.decoder.class_embed[0](hidden0), atol=1e-6)
    assert torch.equal(enc["logits"], out.enc_topk_logits)
    assert len(seen["dn_auxiliary_outputs"]) == n_layers + 1  # every layer and the pre-head
    # The last layer now has its FGL term (DDF is zero there: it is its own teacher).
    assert "loss_fgl" in out.loss_dict and out.loss_dict["loss_ddf"].item() == 0.0


def test_upstream_aux_pairing_is_shifted(monkeypatch) -> None:
    """transformers 5.23 zips L+1 logits (pre-head first) with L corner sets: auxiliary entry
    k holds layer k-1's logits with layer k's corners."""
    model, out, seen = training_forward(monkeypatch, Deimv2Loss, None)
    n_dn = out.denoising_meta_values["dn_num_split"][0]
    corners = out.intermediate_predicted_corners[:, :, n_dn:]
    entry = seen["auxiliary_outputs"][1]
    assert torch.equal(entry["pred_corners"], corners[:, 1])
    own = layer_logits(model, out, 1, corners[:, 1], n_dn)
    previous = layer_logits(model, out, 0, corners[:, 0], n_dn)
    assert not torch.allclose(entry["logits"], own, atol=1e-4)
    assert torch.allclose(entry["logits"], previous, atol=1e-6)
    assert "pred_corners" not in seen  # and the last layer gets no FGL term


def test_install_loss_replaces_the_upstream_function() -> None:
    model = build_model(TINY, NAMES)
    install_loss(model, "focal")
    assert model.loss_function is not loss_deimv2.Deimv2ForObjectDetectionLoss
    out = model.train()(pixel_values=torch.rand(2, 3, 96, 96), labels=labels())
    assert "loss_focal" in out.loss_dict and "loss_mal" not in out.loss_dict
    assert torch.isfinite(out.loss)
    assert callable(losses.make_loss_function("mal"))
