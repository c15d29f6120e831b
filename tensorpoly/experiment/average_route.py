"""Training the zero-shot route: on a seeded fraction of optimizer steps, every example of the step goes
through the uniform average router that held-out tasks get at evaluation (`train.average_route_prob`).

Why: routed adapters are evaluated zero-shot under an average router they never saw in training. On the
embedded benchmark the learnt skills collapse there to one constant answer per template (README, "What
the default run measures"); training that route on some steps keeps them. The paper does not do this;
its recipes leave the probability at 0. Dense adapters (LoRA, TLoRA) have no router and are unaffected.
"""
from __future__ import annotations

import random
from contextlib import contextmanager, nullcontext

from ..config import ConfigError
from ..data.mixture import stable_seed


def check_average_route_prob(recipe) -> float:
    prob = recipe.get("average_route_prob", 0.0)
    try:
        prob = float(prob)
    except (TypeError, ValueError):
        prob = float("nan")
    if not 0.0 <= prob <= 1.0:
        raise ConfigError(f"train.average_route_prob={recipe.get('average_route_prob')!r}: a probability in [0, 1] "
                          f"(the fraction of steps trained through the average router; 0 = the paper)")
    return prob


def average_route_draw(seed: int, step: int, prob: float) -> bool:
    """Whether optimizer step `step` trains the average route: a function of (seed, step) only, so every
    process draws the same and a resumed run draws what the uninterrupted one did."""
    return prob > 0 and random.Random(stable_seed(seed, "average-route", step)).random() < prob


def average_route_steps(model, prob: float, seed: int):
    """A per-step context for `fit`: the drawn steps run with `use_average_routing("uniform")`, and the
    learned routing is back in place when the step's backward passes are done."""
    @contextmanager
    def switched():
        model.use_average_routing("uniform")
        try:
            yield
        finally:
            model.use_learned_routing()

    def context(step: int):
        return switched() if model.config.routed and average_route_draw(seed, step, prob) else nullcontext()

    return context
