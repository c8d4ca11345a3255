"""The detection loss, with what transformers 5.23 gets wrong put right.

We keep transformers' DEIMv2 criterion (matcher, MAL, box, FGL/DDF losses, dense
one-to-one matching) and replace only two things, by installing our own function as
``model.loss_function``:

1. Auxiliary pairing. The decoder returns L+1 class/box predictions (index 0 is the
   pre-refinement head of layer 0) but only L corner/reference predictions. Upstream
   zips them as they are, so auxiliary entry k pairs the logits and boxes of layer k-1
   with the corners of layer k, drops layer L-2, and never computes FGL on the last
   layer. Here each layer's logits, boxes, corners and references stay together, the
   pre-refinement head is its own auxiliary entry (classification and boxes only, as in
   the original DEIMv2), and the last layer gets its FGL term (DDF is zero there).
2. Focal loss. Upstream's focal path passes alpha where ``num_boxes`` belongs, feeds an
   int64 target to BCE and is missing from the weight dict. Phase 2 uses
   ``torchvision.ops.sigmoid_focal_loss`` instead, normalised like the other terms.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss
from transformers.loss.loss_deimv2 import Deimv2Loss


class DetectionCriterion(Deimv2Loss):
    """DEIMv2's criterion with a working focal classification loss (``cls_loss='focal'``)."""

    def __init__(
        self,
        config: Any,
        cls_loss: str = "mal",
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        mal_gamma: float = 1.5,
    ):
        super().__init__(config)
        if cls_loss not in ("mal", "focal"):
            raise ValueError(f"cls_loss must be 'mal' or 'focal', got {cls_loss!r}")
        self.cls_loss = cls_loss
        # MAL's gamma: upstream takes config.focal_loss_gamma (2.0); DEIMv2's configs use 1.5.
        self.gamma = mal_gamma
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        if cls_loss == "focal":
            self.losses = ["focal", "boxes", "local"]
            self.weight_dict["loss_focal"] = config.weight_loss_mal  # same slot, same weight

    def loss_labels_focal(self, outputs, targets, indices, num_boxes):  # noqa: D401
        logits = outputs["logits"]
        idx = self._get_source_permutation_idx(indices)
        matched = torch.cat(
            [t["class_labels"][i] for t, (_, i) in zip(targets, indices, strict=True)]
        )
        classes = torch.full(
            logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device
        )
        classes[idx] = matched
        target = F.one_hot(classes, num_classes=self.num_classes + 1)[..., :-1].to(logits.dtype)
        loss = sigmoid_focal_loss(
            logits, target, alpha=self.focal_alpha, gamma=self.focal_gamma, reduction="none"
        )
        # Same normalisation as upstream's MAL/VFL: (mean over queries) * Q summed, i.e. the
        # sum over queries and classes, per target box.
        return {"loss_focal": loss.mean(1).sum() * logits.shape[1] / num_boxes}

    def _get_dense_o2o_indices(self, indices, indices_aux_list):
        go = super()._get_dense_o2o_indices(indices, indices_aux_list)
        self._local_go = float(sum(len(x[0]) for x in go))  # for the DDP normalisation
        return go

    def forward(self, outputs, targets):
        losses = super().forward(outputs, targets)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            losses = self._global_normalisation(losses, outputs, targets)
        return losses

    def _global_normalisation(self, losses, outputs, targets):
        """As DEIMv2 does under DDP: each term is divided by the mean box count over the
        processes, not the local one, so averaged gradients equal one process's on the global
        batch. Upstream divides by local counts: rescale by local / mean, with the count each
        term used (the dense one-to-one union for boxes and FGL, the matched boxes for the
        class terms and every denoising term); DDF is not box-normalised and is left as is.
        """
        device = outputs["logits"].device  # NCCL reduces device tensors only
        local = float(sum(len(t["class_labels"]) for t in targets))
        counts = torch.tensor([local, getattr(self, "_local_go", local)], device=device)
        torch.distributed.all_reduce(counts)
        mean = (counts / torch.distributed.get_world_size()).clamp(min=1.0).tolist()
        ratio = max(local, 1.0) / mean[0]
        ratio_go = max(getattr(self, "_local_go", local), 1.0) / mean[1]
        out = {}
        for k, v in losses.items():
            if k.startswith("loss_ddf"):
                out[k] = v
            elif "_dn_" not in k and k.startswith(("loss_bbox", "loss_giou", "loss_fgl")):
                out[k] = v * ratio_go
            else:
                out[k] = v * ratio
        return out

    def get_loss(self, loss, outputs, targets, indices, num_boxes):
        if loss == "focal":
            return self.loss_labels_focal(outputs, targets, indices, num_boxes)
        return super().get_loss(loss, outputs, targets, indices, num_boxes)


def _layer_outputs(cls, box, corners, refs) -> tuple[dict, list[dict], dict]:
    """Split stacked decoder predictions into (last layer, aligned aux layers, pre-head).

    cls, box: (B, L+1, Q, *), index 0 the pre-refinement head; corners, refs: (B, L, Q, *).
    """
    teacher_corners, teacher_logits = corners[:, -1], cls[:, -1]

    def entry(j: int) -> dict[str, torch.Tensor]:  # decoder layer j
        return {
            "logits": cls[:, j + 1],
            "pred_boxes": box[:, j + 1],
            "pred_corners": corners[:, j],
            "ref_points": refs[:, j],
            "teacher_corners": teacher_corners,
            "teacher_logits": teacher_logits,
        }

    n_layers = corners.shape[1]
    last = entry(n_layers - 1)
    aux = [entry(j) for j in range(n_layers - 1)]
    pre = {"logits": cls[:, 0], "pred_boxes": box[:, 0]}
    return last, aux, pre


def make_loss_function(
    cls_loss: str = "mal",
    focal_alpha: float = 0.25,
    focal_gamma: float = 2.0,
    mal_gamma: float = 1.5,
) -> Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor], list[dict]]]:
    """A drop-in for ``Deimv2ForObjectDetection.loss_function`` (same call signature).

    The criterion (matcher included) is built on the first call, for the model's config and
    device, and reused.
    """
    built: dict[tuple[int, str], DetectionCriterion] = {}

    def loss_function(
        logits,
        labels,
        device,
        pred_boxes,
        config,
        outputs_class=None,
        outputs_coord=None,
        enc_topk_logits=None,
        enc_topk_bboxes=None,
        denoising_meta_values=None,
        predicted_corners=None,
        initial_reference_points=None,
        **kwargs,
    ):
        key = (id(config), str(device))
        if key not in built:
            built[key] = DetectionCriterion(
                config, cls_loss, focal_alpha, focal_gamma, mal_gamma
            ).to(device)
        criterion = built[key]
        box = outputs_coord.clamp(min=0, max=1)
        cls, corners, refs = outputs_class, predicted_corners, initial_reference_points
        dn = None
        if denoising_meta_values is not None:
            # Training logits carry the denoising queries first: split them off.
            split = denoising_meta_values["dn_num_split"]
            dn_cls, cls = torch.split(cls, split, dim=2)
            dn_box, box = torch.split(box, split, dim=2)
            dn_corners, corners = torch.split(corners, split, dim=2)
            dn_refs, refs = torch.split(refs, split, dim=2)
            dn = (dn_cls, dn_box, dn_corners, dn_refs)

        outputs, aux, pre = _layer_outputs(cls, box, corners, refs)
        if config.auxiliary_loss:
            enc = {"logits": enc_topk_logits, "pred_boxes": enc_topk_bboxes.clamp(min=0, max=1)}
            outputs["auxiliary_outputs"] = [*aux, pre, enc]
            if dn is not None:
                dn_last, dn_aux, dn_pre = _layer_outputs(*dn)
                outputs["dn_auxiliary_outputs"] = [*dn_aux, dn_last, dn_pre]
                outputs["denoising_meta_values"] = denoising_meta_values
        loss_dict = criterion(outputs, labels)
        return sum(loss_dict.values()), loss_dict, outputs.get("auxiliary_outputs")

    return loss_function


def install_loss(
    model: torch.nn.Module,
    cls_loss: str = "mal",
    focal_alpha: float = 0.25,
    focal_gamma: float = 2.0,
    mal_gamma: float = 1.5,
) -> None:
    model.loss_function = make_loss_function(cls_loss, focal_alpha, focal_gamma, mal_gamma)
