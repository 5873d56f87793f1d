"""Dev-set evaluation during training (sharded across processes, gathered for metrics)."""

from __future__ import annotations

import torch

from ..metrics import compute_metrics
from .loop import model_inputs


@torch.no_grad()
def predict_label_ids(model, processor, batch: dict, mode: str) -> torch.Tensor:
    """Class ids: 'head' = the EmoQ-Former classifier (stage 1); 'score' = LLM label scoring (stage 2)."""
    inputs = {k: v for k, v in model_inputs(batch).items() if k not in ("labels", "emotion_labels")}
    if mode == "head":
        return model(**{k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}).emotion_logits.argmax(-1)
    scores = model.score_labels(
        inputs["input_ids"], inputs["attention_mask"], inputs["input_features"], processor.label_candidates(),
        inputs.get("feature_attention_mask"), inputs.get("transcript_ids"), inputs.get("transcript_attention_mask"),
    )
    return scores.argmax(-1)


def evaluate_loader(accelerator, model, processor, loader, labels: list[str], mode: str) -> dict:
    model.eval()
    unwrapped = accelerator.unwrap_model(model)
    golds, preds = [], []
    for batch in loader:
        pred = predict_label_ids(unwrapped, processor, batch, mode)
        pred, gold = accelerator.gather_for_metrics((pred, batch["emotion_labels"].to(pred.device)))
        preds += pred.tolist()
        golds += gold.tolist()
    return compute_metrics([labels[i] for i in golds], [labels[i] for i in preds], labels)
