"""Training losses: the LM loss of multi-task training and the T-Few losses of few-shot fine-tuning.

T-Few (Liu et al. 2022), as the paper code computes them (reference-code.md §4.2), with
ℓ = per-token log-probabilities of every answer choice (encoder run once):
  lm  = token-mean cross-entropy of the gold choice over the batch
  mc  = cross-entropy of the gold label under softmax over choices of the mean token log-likelihood
  ul  = mean over tokens of wrong choices of -log(1 - p + 0.01)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..scoring import IGNORE, choice_token_log_probs

UNLIKELIHOOD_EPS = 0.01


def lm_loss(model, batch) -> torch.Tensor:
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                task_ids=batch["task_ids"])
    return out.loss


def masked_choices(batch) -> torch.Tensor:
    """The collator pads choice ids with the pad id (plus a mask); scoring wants -100 padding."""
    return batch["choice_ids"].masked_fill(batch["choice_mask"].eq(0), IGNORE)


def tfew_losses(model, batch, mc_weight: float = 1.0, ul_weight: float = 1.0) -> tuple[torch.Tensor, dict]:
    choices = masked_choices(batch)
    logp = choice_token_log_probs(model, batch["input_ids"], batch["attention_mask"], choices, batch["task_ids"])
    mask = batch["choice_mask"].to(logp.dtype)                                # [B, C, Lc]
    valid = batch["choice_valid"]                                             # [B, C]
    gold = F.one_hot(batch["label"], logp.shape[1]).bool()                    # [B, C]
    lm = -(logp * mask)[gold].sum() / mask[gold].sum()
    mean_ll = (logp * mask).sum(-1) / mask.sum(-1).clamp_min(1)
    mc = F.cross_entropy(mean_ll.masked_fill(~valid, float("-inf")), batch["label"])
    wrong = (valid & ~gold).unsqueeze(-1) & batch["choice_mask"].bool()
    ul = -torch.log1p(-logp.exp() + UNLIKELIHOOD_EPS)[wrong].sum() / wrong.sum().clamp_min(1)
    loss = lm + mc_weight * mc + ul_weight * ul
    return loss, {"lm": lm.detach(), "mc": mc.detach(), "ul": ul.detach()}
