"""Evaluation metrics. Perplexity counts reference tokens only (labels != -100)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .data import IGNORE


@torch.no_grad()
def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """Summed next-token negative log-likelihood over labelled positions, and their count."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE,
                          reduction="sum")
    return nll.item(), int((labels != IGNORE).sum())


@torch.no_grad()
def perplexity(model, batches, device="cpu") -> float:
    """exp(mean NLL per reference token) of a causal LM (or any callable giving .logits) over batches."""
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    total, count = 0.0, 0
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        nll, n = token_nll(logits, batch["labels"])
        total, count = total + nll, count + n
    if was_training:
        model.train()
    if count == 0:
        raise ValueError("no reference tokens to score: every label is masked")
    return math.exp(total / count)
