"""The process side of a run: Accelerate, precision, threads, seeding, broadcasting rank 0's choices."""
from __future__ import annotations

import gc
import random
from contextlib import contextmanager

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, broadcast_object_list

from ..config import ConfigError

PRECISIONS = ("auto", "fp32", "bf16")


def mixed_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ConfigError(f"precision={precision!r}; choose one of {PRECISIONS}")
    if precision == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return "no" if precision == "fp32" else "bf16"


def make_accelerator(recipe) -> Accelerator:
    if recipe.get("threads"):
        torch.set_num_threads(int(recipe.threads))
    # Gradient accumulation is done by hand (no_sync on all but the last micro-batch), so the
    # optimizer-step count is ours, not the dataloader's.
    # cpu=True on GPU-less machines: without it Accelerate ignores torchrun's WORLD_SIZE and every
    # process would train alone (MULTI_CPU needs the flag).
    # Steps through the average router leave the routers' logits without a gradient, which DDP refuses
    # unless told to look for unused parameters (a graph walk per step, so only when such steps exist).
    unused = DistributedDataParallelKwargs(find_unused_parameters=True)
    handlers = [unused] if float(recipe.get("average_route_prob") or 0) > 0 else []
    return Accelerator(mixed_precision=mixed_precision(recipe.precision), cpu=not torch.cuda.is_available(),
                       kwargs_handlers=handlers)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def broadcast(accelerator: Accelerator, value):
    """Rank 0's value on every rank (run dirs, resume decisions)."""
    if accelerator.num_processes == 1:
        return value
    box = [value]
    broadcast_object_list(box, from_process=0)
    return box[0]


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextmanager
def frozen_gc():
    """Within the context, every Python object alive on entry (the model, the data) is out of the cyclic
    garbage collector's reach (gc.freeze). A training step makes thousands of short-lived objects
    (autograd nodes, tensors), and the collections they trigger otherwise walk all of the model's
    objects again: about 3 % of a TensorPoly step on a CPU (scripts/bench_adapters.py measures with it).
    Nothing is leaked: on exit the objects are handed back to the collector."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
