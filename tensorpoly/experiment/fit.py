"""The optimisation loop shared by multi-task training and few-shot fine-tuning.

Optimizer steps are counted by us: micro-batch i comes from StepBatches (deterministic in i), gradients
are accumulated by hand (no DDP sync but on the last micro-batch), clipped, and stepped with the
scheduler once per optimizer step, whatever the number of processes. That is what makes a resumed run
equal an uninterrupted one and N processes equal one process with an N-times larger batch.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
from tqdm.auto import tqdm

from ..data import Collator
from .batches import StepBatches
from .runtime import frozen_gc


def fit(accelerator, model, optimizer, scheduler, features: list[dict], loss_fn: Callable, recipe, seed: int,
        pad_id: int, start_step: int = 0, after_step: Callable | None = None, desc: str = "train",
        step_context: Callable[[int], contextlib.AbstractContextManager] | None = None) -> dict:
    """Train from start_step to recipe.steps; after_step(step, metrics) may return "stop" (checkpointing,
    validation and logging live there); step_context(step) wraps the forward and backward passes of
    optimizer step `step` (0-based). Returns the last step's metrics."""
    with frozen_gc():
        return _fit(accelerator, model, optimizer, scheduler, features, loss_fn, recipe, seed, pad_id, start_step,
                    after_step, desc, step_context)


def _fit(accelerator, model, optimizer, scheduler, features, loss_fn, recipe, seed, pad_id, start_step, after_step,
         desc, step_context) -> dict:
    ga, steps = int(recipe.grad_accum), int(recipe.steps)
    batches = StepBatches(len(features), int(recipe.batch_size), seed, accelerator.process_index,
                          accelerator.num_processes)
    collate = Collator(pad_id)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    model.train()
    metrics = {}
    bar = tqdm(range(start_step, steps), initial=start_step, total=steps, desc=desc,
               disable=not accelerator.is_main_process, dynamic_ncols=True)
    for step in bar:
        parts_sum, loss_sum = {}, 0.0
        with step_context(step) if step_context is not None else contextlib.nullcontext():
            for micro in range(ga):
                batch = collate([features[i] for i in batches.indices(step * ga + micro)])
                batch = {k: v.to(accelerator.device) for k, v in batch.items()}
                sync = contextlib.nullcontext() if micro == ga - 1 else accelerator.no_sync(model)
                with sync, accelerator.autocast():
                    loss, parts = loss_fn(model, batch)
                    accelerator.backward(loss / ga)
                loss_sum += loss.detach() / ga
                for k, v in parts.items():
                    parts_sum[k] = parts_sum.get(k, 0.0) + v / ga
        grad_norm = accelerator.clip_grad_norm_(params, float(recipe.clip))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        reduced = accelerator.reduce(torch.stack([loss_sum, *parts_sum.values()]).float(), reduction="mean")
        metrics = {"loss": reduced[0].item(), **{k: reduced[i + 1].item() for i, k in enumerate(parts_sum)},
                   "grad_norm": float(grad_norm), "lr": scheduler.get_last_lr()[0]}
        bar.set_postfix(loss=f"{metrics['loss']:.3f}")
        if after_step is not None and after_step(step + 1, metrics) == "stop":
            break
    bar.close()
    return metrics


@torch.no_grad()
def params_checksum(params) -> torch.Tensor:
    """[sum, sum of squares] of the trainable parameters, in float64: equal across ranks iff in sync."""
    flat = torch.cat([p.detach().double().flatten() for p in params])
    return torch.stack([flat.sum(), flat.square().sum()])
