"""What the two published baselines (Qieemo, Patamia et al. 2023) share with each other and with EmoQ.

The contract that lets one training loop and one evaluation drive every system:

* a `transformers.PreTrainedModel` with its own config (``id2label`` inside, so evaluation maps through the trained order);
* ``forward(input_features, feature_attention_mask, emotion_labels=None, text_input_ids=None,
  text_attention_mask=None, mocap=None, mocap_mask=None, **ignored) -> BaselineOutput`` with
  ``loss`` (MAL: focal + optional SupCon, with the settings of ``model.loss_config`` exactly as EmoQ's stage 1),
  ``emotion_logits`` (what dev evaluation's "head" mode reads) and ``contrastive_features``;
* frozen encoders by default (kept in eval mode while the model trains, as `SpeechEncoder` does).

Unknown keyword inputs (``input_ids``, ``labels``, ``transcript_ids`` from the EmoQ collator ...) are
accepted and ignored, so the shared ``model_inputs(batch)`` can be splatted into any system.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from ...config import LossConfig
from ..losses import MALoss, heads_outside_loss


@dataclass
class BaselineOutput(ModelOutput):
    """`loss` = focal_weight * focal_loss + supcon_weight * supcon_loss (terms present); None without labels."""

    loss: torch.Tensor | None = None
    focal_loss: torch.Tensor | None = None
    supcon_loss: torch.Tensor | None = None
    emotion_logits: torch.Tensor | None = None
    contrastive_features: torch.Tensor | None = None
    pooled: torch.Tensor | None = None


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of `x` [B, T, D] over the valid steps of `mask` [B, T] (a row with no valid step gives zeros)."""
    if mask is None:
        return x.mean(1)
    weights = mask.to(x.dtype)[..., None]
    return (x * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def contrastive_head(d_in: int, d_out: int) -> nn.Module:
    """Projection head for the supervised contrastive loss (the SimCLR / EmoQ habit: Linear-GELU-Linear)."""
    return nn.Sequential(nn.Linear(d_in, d_in), nn.GELU(), nn.Linear(d_in, d_out))


def num_labels_of(config) -> int:
    if not config.id2label:
        raise ValueError(f"{type(config).__name__}: id2label is required (the label order the model is trained with)")
    return len(config.id2label)


class BaselinePreTrainedModel(PreTrainedModel):
    """Shared plumbing: weight init of the trainable parts, MAL loss, frozen sub-modules kept in eval mode."""

    main_input_name = "input_features"
    supports_gradient_checkpointing = False
    _supports_sdpa = True
    #: names of child modules that are frozen encoders (set by the subclass at construction)
    _frozen_children: tuple[str, ...] = ()

    def _init_weights(self, module):
        # encoders bring their own weights (from_components / from_pretrained); this only shapes fresh heads
        std = getattr(self.config, "initializer_range", 0.02)
        if isinstance(module, nn.Linear):
            module.weight.data.normal_(0.0, std)
            if module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.LayerNorm):
            module.weight.data.fill_(1.0)
            module.bias.data.zero_()

    def _setup_loss_config(self) -> None:
        # the MAL settings are the run config's `loss:` section, set by the recipe and not saved; lm is unused
        self.loss_config = LossConfig()

    def train(self, mode: bool = True):
        super().train(mode)
        for name in self._frozen_children:
            child = getattr(self, name, None)
            if child is not None and not any(p.requires_grad for p in child.parameters()):
                child.eval()  # a frozen encoder never runs dropout / layer-drop
        return self

    def modules_outside_loss(self, loss: LossConfig) -> dict[str, list[nn.Parameter]]:
        """Parameters no term of the loss reaches under these settings (the contrastive head without SupCon,
        the classifier without focal loss); they must not be trainable (DDP stops on them)."""
        return heads_outside_loss(loss, self.classifier, self.contrastive_head)

    @property
    def head_dtype(self) -> torch.dtype:
        return self.classifier[-1].weight.dtype

    def compute_loss(self, logits, features, labels) -> tuple[torch.Tensor | None, ...]:
        """(loss, focal, supcon) from the MAL terms (focal on logits, SupCon on the projected features)."""
        if labels is None:
            return None, None, None
        mal = MALoss.from_config(self.loss_config, lm_weight=0.0)(
            logits=logits, labels=labels.to(logits.device), features=features)
        return mal.loss, mal.focal, mal.supcon

    def output(self, pooled: torch.Tensor, emotion_labels: torch.Tensor | None) -> BaselineOutput:
        logits, features = self.classifier(pooled), self.contrastive_head(pooled)
        loss, focal, supcon = self.compute_loss(logits, features, emotion_labels)
        return BaselineOutput(
            loss=loss, focal_loss=focal, supcon_loss=supcon,
            emotion_logits=logits, contrastive_features=features, pooled=pooled,
        )


def reject_cached_frames(name: str, kwargs: dict) -> None:
    if kwargs.get("encoder_frames") is not None:
        raise ValueError(
            f"{name} needs the raw encoder inputs (input_features), not cached encoder frames; "
            "disable the frame cache for this system"
        )


__all__ = [
    "BaselineOutput",
    "BaselinePreTrainedModel",
    "contrastive_head",
    "masked_mean",
    "num_labels_of",
    "reject_cached_frames",
]
