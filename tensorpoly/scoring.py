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


def token_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(label) per position (0 where the label is IGNORE), in at least fp32."""
    # bf16 log-probabilities are too coarse to rank close choices.
    logp = F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    logp = logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return logp * labels.ne(IGNORE)


def sequence_log_likelihood(logits: torch.Tensor, labels: torch.Tensor, length_norm: bool) -> torch.Tensor:
    """Sum (or per-token mean) of log p(label) over positions whose label is not IGNORE."""
    total = token_log_probs(logits, labels).sum(-1)
    return total / labels.ne(IGNORE).sum(-1).clamp_min(1) if length_norm else total


def choice_token_log_probs(model, input_ids, attention_mask, choice_ids, task_ids=None,
                           explicit_decoder_ids: bool = False) -> torch.Tensor:
    """[B, C, Lc] log p of every choice token (0 on padding); choice_ids [B, C, Lc] padded with -100.

    Goes through the model's forward (so a DDP wrapper syncs gradients of the T-Few losses).
    explicit_decoder_ids passes one task id per decoder row instead of relying on the
    contiguous-copies rule (both give the same result; the tests check it).
    """
    decoder_ids = None
    if explicit_decoder_ids and task_ids is not None:
        decoder_ids = torch.as_tensor(task_ids).repeat_interleave(choice_ids.shape[1])
    return model(input_ids=input_ids, attention_mask=attention_mask, choice_ids=choice_ids,
                 task_ids=task_ids, decoder_task_ids=decoder_ids)


def score_choices(hf_model, input_ids, attention_mask, choice_ids) -> torch.Tensor:
    """The body of TensorPolyModel.forward(choice_ids=...), run inside its routing context."""
    B, C, Lc = choice_ids.shape
    encoded = hf_model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    labels = choice_ids.reshape(B * C, Lc)
    out = hf_model(encoder_outputs=BaseModelOutput(last_hidden_state=encoded.repeat_interleave(C, 0)),
                   attention_mask=attention_mask.repeat_interleave(C, 0), labels=labels)
    return token_log_probs(out.logits, labels).view(B, C, Lc)


def choice_log_likelihoods(model, input_ids, attention_mask, choice_ids, task_ids=None,
                           length_norm: bool = True, explicit_decoder_ids: bool = False) -> torch.Tensor:
    """[B, C] scores: summed (or, with length_norm, mean) token log-likelihood of each choice."""
    logp = choice_token_log_probs(model, input_ids, attention_mask, choice_ids, task_ids, explicit_decoder_ids)
    total = logp.sum(-1)
    return total / choice_ids.ne(IGNORE).sum(-1).clamp_min(1) if length_norm else total
