"""Task-level routers (Polytropon) and which adapted linears share one.

A router maps task ids to mixing weights over S experts, once per split:
    w[t, k, s] = sigmoid(Z[t, k, s]) / (sum_s' sigmoid(Z[t, k, s']) + 1e-12)
(optionally a RelaxedBernoulli(T=1) sample instead of the sigmoid while training).
Routing depends on the task, never on the token.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from .config import ConfigError

NORMALISE_EPS = 1e-12
AVERAGE_KINDS = ("uniform", "mean_of_tasks")

_T5_NAME = re.compile(r"^(?P<coder>encoder|decoder)\.block\.(?P<block>\d+)\.layer\.(?P<layer>\d+)\.")


def granularity_key(layer_name: str, granularity: str) -> str:
    """The name of the router an adapted linear uses; linears with equal keys share it.

    finegrained: one router per adapted linear (the paper's); layer: per attention/FF sub-layer
    (`encoder.block.3.layer.1`); block: per transformer block; coder: encoder vs decoder;
    model: one for the whole model.
    """
    if granularity == "finegrained":
        return layer_name
    if granularity == "model":
        return "model"
    match = _T5_NAME.match(layer_name)
    if match is None:
        raise ConfigError(f"granularity {granularity!r} needs T5 layer names like "
                          f"'encoder.block.0.layer.0.SelfAttention.q', got {layer_name!r}; "
                          f"use granularity='finegrained' or 'model' for other layouts")
    coder, block, layer = match.group("coder", "block", "layer")
    return {"coder": coder, "block": f"{coder}.block.{block}",
            "layer": f"{coder}.block.{block}.layer.{layer}"}[granularity]


class Router(nn.Module):
    """A routing-logit table Z of shape [n_tasks, n_splits * n_experts].

    mode "learned" uses Z; mode "average" serves unseen tasks (zero-shot): "uniform" gives
    every expert 1/S (the paper code's AverageSelector), "mean_of_tasks" the mean of the
    learned task distributions.
    """

    def __init__(self, n_tasks: int, n_splits: int, n_experts: int, relaxed_bernoulli: bool = False):
        super().__init__()
        self.n_splits, self.n_experts = n_splits, n_experts
        self.relaxed_bernoulli = relaxed_bernoulli
        self.logits = nn.Parameter(torch.empty(n_tasks, n_splits * n_experts))
        self.average: str | None = None
        self.reset_logits(n_tasks)

    @property
    def n_tasks(self) -> int:
        return self.logits.shape[0]

    def reset_logits(self, n_tasks: int) -> None:
        """Fresh U(-1e-3, 1e-3) logits for n_tasks rows (old rows are discarded)."""
        with torch.no_grad():
            self.logits.data = torch.empty(n_tasks, self.n_splits * self.n_experts,
                                           device=self.logits.device, dtype=self.logits.dtype)
            if self.logits.device.type != "meta":
                self.logits.uniform_(-1e-3, 1e-3)

    @property
    def stochastic(self) -> bool:
        """True when every call draws fresh weights (so examples of one task differ)."""
        return self.relaxed_bernoulli and self.training and self.average is None

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        if self.stochastic:
            return torch.distributions.RelaxedBernoulli(torch.tensor(1.0, device=logits.device),
                                                        logits=logits).rsample()
        return torch.sigmoid(logits)

    @staticmethod
    def normalise(p: torch.Tensor) -> torch.Tensor:
        return p / (p.sum(-1, keepdim=True) + NORMALISE_EPS)

    def forward(self, task_ids: torch.Tensor) -> torch.Tensor:
        """Weights [len(task_ids), n_splits, n_experts]; rows sum to 1 over experts."""
        shape = (task_ids.shape[0], self.n_splits, self.n_experts)
        if self.average == "uniform":
            return self.logits.new_full(shape, 1.0 / self.n_experts)
        if self.average == "mean_of_tasks":
            table = self.normalise(torch.sigmoid(self.logits.view(-1, self.n_splits, self.n_experts)))
            return table.mean(0).expand(shape)
        rows = self.logits[task_ids].view(shape)
        return self.normalise(self.probabilities(rows))
