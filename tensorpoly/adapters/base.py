"""The common shell of every adapter: a frozen nn.Linear plus a low-rank update

    y = x W^T + b + (1/r) (x A_t) B_t,    A_t in R^{d_in x r}, B_t in R^{r x d_out},

where (A_t, B_t) are the factors of the example's task t. Subclasses only say how the
factors are built from their parameters and the routing weights (`factors`); routing,
batching by task, merging and counting live here once.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..config import AdapterConfig, ConfigError

# The paper code's uniform bound for A (kaiming gain for leaky_relu(sqrt 5), used as a bound).
PAPER_GAIN = math.sqrt(1.0 / 3.0)


def paper_uniform_(tensor: torch.Tensor, d_in: int) -> torch.Tensor:
    bound = PAPER_GAIN / math.sqrt(d_in)
    return nn.init.uniform_(tensor, -bound, bound)


class AdapterLinear(nn.Module):
    """A frozen linear layer with a (possibly task-routed) low-rank update."""

    routed = False

    def __init__(self, base_layer: nn.Linear, config: AdapterConfig):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.rank = config.rank
        # Set by TensorPolyModel; kept out of the module tree so shared routers are saved once.
        self._router: tuple = ()
        self._routing = None
        self._side: str | None = None

    @classmethod
    def check_shape(cls, config: AdapterConfig, d_in: int, d_out: int, name: str) -> None:
        """Raise ConfigError if this layer cannot hold the adapter (called before building)."""

    @property
    def weight(self) -> torch.Tensor:
        # HF code reads e.g. `wo.weight.dtype` off the layers it calls.
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def router(self):
        return self._router[0] if self._router else None

    def factors(self, weights: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [U, d_in, r], B [U, r, d_out]) for U routing rows weights [U, splits, S] (U=1 if dense)."""
        raise NotImplementedError

    def reset_parameters(self, config: AdapterConfig) -> None:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"

    def _task_factors(self, n_rows: int):
        if not self.routed:
            A, B = self.factors(None)
            return A, B, None
        weights_ids, inverse = self._routing.rows(self._side, n_rows, self.router)
        A, B = self.factors(self.router(weights_ids))
        return A, B, inverse

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        A, B, inverse = self._task_factors(x.shape[0])
        A, B = A.to(x.dtype), B.to(x.dtype)
        if A.shape[0] == 1:
            delta = (x @ A[0]) @ B[0]
        else:
            # One factor pair per distinct task, gathered per example.
            flat = x.reshape(x.shape[0], -1, x.shape[-1])
            delta = torch.bmm(torch.bmm(flat, A[inverse]), B[inverse]).reshape(*x.shape[:-1], -1)
        return out + delta / self.rank

    @torch.no_grad()
    def delta_weight(self, weights: torch.Tensor | None) -> torch.Tensor:
        """The update (1/r) (A B)^T in nn.Linear's [d_out, d_in] layout, for one routing row."""
        A, B = self.factors(weights)
        return (A[0] @ B[0]).T / self.rank


def check_positive_dims(name: str, d_in: int, d_out: int) -> None:
    if d_in < 1 or d_out < 1:
        raise ConfigError(f"layer {name} has empty dimensions {d_in}->{d_out}")
