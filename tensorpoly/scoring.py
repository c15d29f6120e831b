"""Rank classification: score every answer choice by its log-likelihood under the model.

The encoder runs once per example; its states are repeated per choice (contiguous copies,
`repeat_interleave`) and the decoder scores all B*C choices in one call. Routing follows
the copies: decoder layers receive each example's task id once per choice.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import BaseModelOutput

IGNORE = -100


def sequence_log_likelihood(logits: torch.Tensor, labels: torch.Tensor, length_norm: bool) -> torch.Tensor:
    """Sum (or per-token mean) of log p(label) over positions whose label is not IGNORE."""
    mask = labels.ne(IGNORE)
    # At least fp32: bf16 log-probabilities are too coarse to rank close choices.
    logp = F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1).gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    total = (logp * mask).sum(-1)
    return total / mask.sum(-1).clamp_min(1) if length_norm else total


def choice_log_likelihoods(model, input_ids, attention_mask, choice_ids, task_ids=None,
                           length_norm: bool = True, explicit_decoder_ids: bool = False) -> torch.Tensor:
    """[B, C] scores; choice_ids [B, C, Lc] are target token ids padded with -100.

    explicit_decoder_ids passes one task id per decoder row instead of relying on the
    contiguous-copies rule (both give the same result; the tests check it).
    """
    B, C, Lc = choice_ids.shape
    hf = model.model
    decoder_ids = None
    if explicit_decoder_ids and task_ids is not None:
        decoder_ids = torch.as_tensor(task_ids).repeat_interleave(C)
    with model.routing(task_ids, decoder_ids):
        encoded = hf.get_encoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        labels = choice_ids.reshape(B * C, Lc)
        out = hf(encoder_outputs=BaseModelOutput(last_hidden_state=encoded.repeat_interleave(C, 0)),
                 attention_mask=attention_mask.repeat_interleave(C, 0), labels=labels)
    return sequence_log_likelihood(out.logits, labels, length_norm).view(B, C)
