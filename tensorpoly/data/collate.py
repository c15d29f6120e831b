"""Padding and stacking, for language-model training and for rank classification.

Output of :class:`Collator` (all int64 unless said):
  input_ids, attention_mask  [B, Ls]   right-padded with the tokenizer's pad id (T5: 0)
  labels                     [B, Lt]   target ids, padding = -100 (ignored by the LM loss)
  task_ids                   [B]
and, when every example has answer choices (rank classification):
  choice_ids                 [B, C, Lc] padded with the *pad id* (so they can be fed as decoder
                                        labels after masking); use choice_mask, not the id, to
                                        find padding
  choice_mask                [B, C, Lc] 1 on real tokens (EOS included), 0 on padding
  choice_valid               [B, C] bool  False for the slots of examples with fewer than C choices
  label                      [B]       gold choice index (-1 if unknown)
Examples with different numbers of choices can share a batch (mttl raised instead); a scorer must
mask invalid slots (e.g. score = +inf) before the argmin.
"""
from __future__ import annotations

import torch

from .example import DataError


def _pad(seqs: list[list[int]], value: int) -> torch.Tensor:
    n = max((len(s) for s in seqs), default=0)
    return torch.tensor([s + [value] * (n - len(s)) for s in seqs], dtype=torch.long).reshape(len(seqs), n)


class Collator:
    def __init__(self, pad_id: int = 0, label_pad: int = -100, with_choices: bool | None = None):
        """``with_choices``: None = lay out choices when every example has them."""
        self.pad_id, self.label_pad, self.with_choices = pad_id, label_pad, with_choices

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        if not features:
            raise DataError("cannot collate an empty batch")
        inp = _pad([f["input_ids"] for f in features], self.pad_id)
        batch = {
            "input_ids": inp,
            "attention_mask": _pad([[1] * len(f["input_ids"]) for f in features], 0),
            "labels": _pad([f["target_ids"] for f in features], self.label_pad),
            "task_ids": torch.tensor([f["task_id"] for f in features], dtype=torch.long),
        }
        has = ["choice_ids" in f for f in features]
        want = all(has) if self.with_choices is None else self.with_choices
        if want:
            if not all(has):
                raise DataError("with_choices=True but some examples have no answer choices")
            c = max(len(f["choice_ids"]) for f in features)
            lc = max(len(x) for f in features for x in f["choice_ids"])
            ids = torch.full((len(features), c, lc), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(features), c, lc), dtype=torch.long)
            valid = torch.zeros((len(features), c), dtype=torch.bool)
            for b, f in enumerate(features):
                for j, x in enumerate(f["choice_ids"]):
                    ids[b, j, : len(x)] = torch.tensor(x, dtype=torch.long)
                    mask[b, j, : len(x)] = 1
                    valid[b, j] = True
            batch.update(choice_ids=ids, choice_mask=mask, choice_valid=valid,
                         label=torch.tensor([f.get("label", -1) for f in features], dtype=torch.long))
        return batch


def collate(features: list[dict], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Functional form of :class:`Collator` with the defaults."""
    return Collator(pad_id)(features)
