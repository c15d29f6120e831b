"""Examples -> token ids, with the length limits and EOS convention made explicit.

EOS convention (``eos=``):
  * ``"tfew"`` (default; T-Few and the paper's mttl code): EOS appended to the input *and* to the
    target and every answer choice.
  * ``"t0"`` (T0 training and its evaluation script): input without EOS; target/choices with EOS.
Truncation keeps the EOS: text is cut to ``max_len - 1`` tokens, then EOS is appended. Inputs and
targets have separate limits (256 each by default); mttl truncated both at the *input* limit.
"""
from __future__ import annotations

from dataclasses import dataclass

from .example import DataError, Example

EOS_CONVENTIONS = ("tfew", "t0")


@dataclass(frozen=True)
class TokenizeConfig:
    max_input_len: int = 256
    max_target_len: int = 256
    eos: str = "tfew"

    def __post_init__(self):
        if self.eos not in EOS_CONVENTIONS:
            raise DataError(f"eos must be one of {EOS_CONVENTIONS}, got {self.eos!r}")
        if self.max_input_len < 2 or self.max_target_len < 2:
            raise DataError("max_input_len and max_target_len must be >= 2 (one token + EOS)")


def _ids(tokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def _finish(ids: list[int], max_len: int, eos_id: int, add_eos: bool) -> list[int]:
    return ids[: max_len - 1] + [eos_id] if add_eos else ids[:max_len]


def encode(examples: list[Example], tokenizer, task2id: dict[str, int], cfg: TokenizeConfig = TokenizeConfig()) -> list[dict]:
    """Token ids per example: ``input_ids``, ``target_ids``, ``task_id``, and for examples with
    answer choices ``choice_ids`` (list of lists) and ``label``. Batched through the tokenizer."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError(f"tokenizer {type(tokenizer).__name__} has no EOS token")
    unknown = sorted({e.task for e in examples} - set(task2id))
    if unknown:
        raise DataError(f"tasks not in task2id: {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
    inputs = _ids(tokenizer, [e.input for e in examples])
    targets = _ids(tokenizer, [e.target for e in examples])
    flat = [c for e in examples for c in (e.answer_choices or [])]
    flat_ids = iter(_ids(tokenizer, flat)) if flat else iter(())
    out = []
    for e, x, y in zip(examples, inputs, targets):
        f = {"input_ids": _finish(x, cfg.max_input_len, eos, cfg.eos == "tfew"),
             "target_ids": _finish(y, cfg.max_target_len, eos, True), "task_id": task2id[e.task]}
        if e.answer_choices is not None:
            f["choice_ids"] = [_finish(next(flat_ids), cfg.max_target_len, eos, True) for _ in e.answer_choices]
            if e.label is not None and not 0 <= e.label < len(e.answer_choices):
                raise DataError(f"dataset {e.dataset!r}, template {e.template!r}, example {e.idx}: label {e.label} "
                                f"out of range for {len(e.answer_choices)} choices")
            f["label"] = -1 if e.label is None else e.label
        out.append(f)
    return out
