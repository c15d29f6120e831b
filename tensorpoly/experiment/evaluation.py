"""Held-out evaluation by rank classification.

Per example: the encoder runs once, the decoder scores every answer choice, the prediction is the
choice with the highest log-likelihood (mean over its tokens with length_norm, the paper / T-Few; sum
without, T0). Per task, protocol "random" (one seeded template per example, the paper code) reports
accuracy over examples; protocol "all" (every original-task template) reports the median over
templates of the per-template accuracies (T0's number). Both also keep the per-template accuracies.
"""
from __future__ import annotations

import statistics
from collections import defaultdict

import torch
from tqdm.auto import tqdm

from ..data import Collator
from ..data import benchmark as B
from ..scoring import choice_log_likelihoods
from .data import eval_examples, tokenize
from .losses import masked_choices

PROTOCOLS = ("random", "all")


@torch.no_grad()
def predict(model, features: list[dict], pad_id: int, batch_size: int, length_norm: bool,
            progress: str | None = None) -> list[int]:
    """Predicted choice index per feature; batches are formed in length order (less padding)."""
    order = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]))
    collate, device = Collator(pad_id, with_choices=True), model.device
    preds = [0] * len(features)
    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc=progress, disable=progress is None, leave=False):
        idx = order[start: start + batch_size]
        batch = {k: v.to(device) for k, v in collate([features[i] for i in idx]).items()}
        scores = choice_log_likelihoods(model, batch["input_ids"], batch["attention_mask"], masked_choices(batch),
                                        batch["task_ids"], length_norm=length_norm)
        scores = scores.masked_fill(~batch["choice_valid"], float("-inf"))
        for i, p in zip(idx, scores.argmax(-1).tolist()):
            preds[i] = p
    return preds


def task_accuracy(examples, preds: list[int], protocol: str) -> dict:
    per_template = defaultdict(list)
    for e, p in zip(examples, preds):
        per_template[e.template].append(p == e.label)
    acc = {t: sum(v) / len(v) for t, v in sorted(per_template.items())}
    overall = sum(p == e.label for e, p in zip(examples, preds)) / len(examples)
    value = statistics.median(acc.values()) if protocol == "all" else overall
    return {"accuracy": value, "per_template": acc, "n": len(examples),
            "chance": statistics.mean(1 / len(e.answer_choices) for e in examples)}


def evaluate_heldout(model, tokenizer, data_cfg, eval_cfg, tasks: list[str], task_ids: dict[str, int] | None = None,
                     progress: bool = True) -> dict:
    """{"tasks": {task: {...}}, "average": mean accuracy, "chance": mean chance}.

    task_ids: the routing row of each task (few-shot fine-tuned rows); None = whatever routing the model
    currently has (the average router for zero-shot).
    """
    if eval_cfg.protocol not in PROTOCOLS:
        from ..config import ConfigError

        raise ConfigError(f"eval.protocol={eval_cfg.protocol!r}; choose one of {PROTOCOLS}")
    was_training = model.training
    model.eval()
    results = {}
    for task in tasks:
        examples = eval_examples(data_cfg, task, eval_cfg.protocol, int(eval_cfg.seed))
        if eval_cfg.get("limit"):
            examples = examples[: int(eval_cfg.limit)]
        features = tokenize(examples, tokenizer, {task: (task_ids or {}).get(task, 0)}, data_cfg)
        preds = predict(model, features, tokenizer.pad_token_id, int(eval_cfg.batch_size), bool(eval_cfg.length_norm),
                        progress=f"eval {task}" if progress else None)
        results[task] = task_accuracy(examples, preds, eval_cfg.protocol)
    model.train(was_training)
    out = summarize(results)
    if data_cfg.source == "benchmark":
        kinds = B.heldout_transfer()
        out["groups"] = {kind: summarize({t: r for t, r in results.items() if kinds[t] == kind})
                         for kind in B.TRANSFER_KINDS if any(kinds[t] == kind for t in results)}
    return out


def heldout_metrics(heldout: dict) -> dict:
    """The flat numbers a results file and a log line carry: the average and chance over all held-out
    tasks, and per transfer group (embedded benchmark: composition, rewording) its own pair."""
    metrics = {"zero_shot_average": heldout["average"], "chance": heldout["chance"]}
    for kind, group in heldout.get("groups", {}).items():
        metrics[f"zero_shot_{kind}"], metrics[f"chance_{kind}"] = group["average"], group["chance"]
    return metrics


def describe(metrics: dict) -> str:
    groups = [k.removeprefix("zero_shot_") for k in metrics if k.startswith("zero_shot_") and k != "zero_shot_average"]
    parts = [f"{g} {metrics[f'zero_shot_{g}']:.3f} (chance {metrics[f'chance_{g}']:.3f})" for g in groups]
    head = f"zero-shot held-out accuracy {metrics['zero_shot_average']:.3f} (chance {metrics['chance']:.3f})"
    return head + (f"; {', '.join(parts)}" if parts else "")


def summarize(results: dict) -> dict:
    return {"tasks": results,
            "average": statistics.mean(r["accuracy"] for r in results.values()),
            "chance": statistics.mean(r["chance"] for r in results.values())}
