"""The residual vision-language fusion of Phase 2 (the thesis's MultimodalFusionModule).

    V' = V W_proj + b                       V: decoder query features (N x D_v)
    S  = cos(V', T) / tau                   T: frozen class-prompt embeddings (K x D_t)
    L_final = L_base + alpha * S            alpha: learnable scalar gate

It is attached with forward hooks on the Linear layers that produce DEIMv2's class
logits (every decoder layer's ``class_embed``, and optionally the encoder's
``enc_score_head``): the hook sees the head's input V and output L_base and returns
L_final. No transformers code is copied, the base model's state-dict keys and weight
tying stay as they are (a Phase 1 checkpoint loads as is), and the fusion's own
weights live under ``fusion.*``. With alpha = 0 the output is bit-identical to Phase 1.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from defectfusion.model.models import freeze


class MultimodalFusionModule(nn.Module):
    def __init__(
        self,
        text_embeddings: torch.Tensor,
        d_visual: int,
        tau_init: float = 0.07,
        init: str = "zero_start",
    ):
        super().__init__()
        k, d_text = text_embeddings.shape
        # Frozen text anchors, stored with the model so a checkpoint is self-contained.
        self.register_buffer("text", F.normalize(text_embeddings.float(), dim=-1))
        self.proj = nn.Linear(d_visual, d_text)
        # tau is learned through its log, which keeps it positive.
        self.log_tau = nn.Parameter(torch.tensor(math.log(tau_init)))
        self.alpha = nn.Parameter(torch.tensor(0.0))
        self.reset(init)

    def reset(self, init: str) -> None:
        with torch.no_grad():
            if init == "zero_start":
                # Epoch 0 is exactly Phase 1: alpha = 0 and a small projection.
                nn.init.normal_(self.proj.weight, mean=0.0, std=0.01)
                self.alpha.fill_(0.0)
            elif init == "naive":
                # The thesis's first attempt: full-scale projection, gate open at 0.1.
                nn.init.xavier_uniform_(self.proj.weight)
                self.alpha.fill_(0.1)
            else:
                raise ValueError(f"unknown fusion init {init!r}")
            nn.init.zeros_(self.proj.bias)

    @property
    def tau(self) -> torch.Tensor:
        return self.log_tau.exp()

    def similarity(self, visual: torch.Tensor) -> torch.Tensor:
        v = F.normalize(self.proj(visual), dim=-1)
        return v @ self.text.to(v.dtype).T / self.tau.to(v.dtype)

    def forward(self, visual: torch.Tensor, base_logits: torch.Tensor) -> torch.Tensor:
        return base_logits + self.alpha.to(base_logits.dtype) * self.similarity(visual)

    def hook(
        self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor
    ) -> torch.Tensor:
        """Forward hook on a class head: its input is V, its output L_base.

        A bound method, not a closure over the model: ``copy.deepcopy`` (EMA's
        AveragedModel) then rebinds the copy's hooks to the copy's own fusion.
        """
        return self(inputs[0], output)

    def stats(self) -> dict[str, float]:
        return {
            "alpha": float(self.alpha.detach()),
            "tau": float(self.tau.detach()),
            "w_proj_norm": float(self.proj.weight.detach().norm()),
        }


def class_heads(model: nn.Module, encoder_head: bool = True) -> list[nn.Linear]:
    """The Linear layers whose outputs are DEIMv2's class logits (the ones actually called)."""
    heads = list(model.model.decoder.class_embed)
    if encoder_head:
        heads.append(model.model.enc_score_head)
    return heads


def attach_fusion(
    model: nn.Module,
    text_embeddings: torch.Tensor,
    init: str = "zero_start",
    tau_init: float = 0.07,
    encoder_head: bool = True,
) -> MultimodalFusionModule:
    if text_embeddings.shape[0] != model.config.num_labels:
        from defectfusion.core.errors import UserError

        raise UserError(
            f"text embeddings have {text_embeddings.shape[0]} classes, the detector has {model.config.num_labels}"
        )
    fusion = MultimodalFusionModule(text_embeddings, model.config.d_model, tau_init, init)
    model.fusion = fusion  # registered: its weights are saved under fusion.*

    heads = class_heads(model, encoder_head)
    model._fusion_hooks = [h.register_forward_hook(fusion.hook) for h in heads]
    model._fusion_encoder_head = encoder_head
    return fusion


def attach_fusion_from_meta(model: nn.Module, meta: dict[str, Any]) -> MultimodalFusionModule:
    """Rebuild the fusion a Phase 2 checkpoint describes (its weights are loaded afterwards)."""
    shape = meta["text_shape"]
    return attach_fusion(
        model,
        torch.zeros(shape),
        "zero_start",
        meta.get("tau_init", 0.07),
        meta.get("fuse_encoder_head", True),
    )


def set_trainable(model: nn.Module, alpha: str = "learned", encoder_head: bool = True) -> None:
    """Phase 2's progressive setting: only the fusion and the class heads learn.

    Everything else (backbone, encoder, the rest of the decoder) is frozen, and marked so
    that `models.set_train_mode` keeps it in eval mode (BatchNorm statistics frozen).
    """
    for p in model.parameters():
        p.requires_grad_(False)
    trainable: list[nn.Module] = [model.fusion, *class_heads(model, True)]
    for m in trainable:
        for p in m.parameters():
            p.requires_grad_(True)
    if alpha == "frozen0":
        model.fusion.alpha.requires_grad_(False)  # the control: text branch off for good
    # Mark the largest fully frozen subtrees (so their BatchNorms stay in eval mode).
    _mark_frozen(model)


def _mark_frozen(module: nn.Module) -> bool:
    """Mark frozen subtrees; return True when `module` has no trainable parameter."""
    children = list(module.children())
    child_frozen = [_mark_frozen(c) for c in children]
    own = [p for p in module.parameters(recurse=False)]
    frozen = all(child_frozen) and not any(p.requires_grad for p in own)
    if not frozen:
        for c, f in zip(children, child_frozen, strict=True):
            if f:
                freeze(c)
    return frozen
