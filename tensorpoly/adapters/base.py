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
        self._group = None  # the FactorGroup of TaskRouting that builds this layer's factors, if any
        self._group_index = -1

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

    def factor_parameters(self) -> list[torch.Tensor]:
        """Everything the factors are built from (not the frozen base layer)."""
        return [p for n, p in self.named_parameters() if not n.startswith("base_layer.")]

    @property
    def probe(self) -> torch.Tensor:
        """One factor parameter, whose dtype and device stand for the layer's."""
        return self.factor_parameters()[0]

    # ---- grouping: layers whose factors one batched computation builds -------------------------
    def group_key(self) -> tuple | None:
        """Layers of one side with equal keys build their factors together (None: never grouped)."""
        return None

    @classmethod
    def group_factors(cls, members: list["AdapterLinear"], weights: torch.Tensor | None):
        """The factors of G members of one group, as rows: (A^T [G, U, r, >= d_in], B [G, U, r, >= d_out]),
        for routing weights [G, U, splits, S] (None if dense: U = 1). Rows may run past d (the
        tensor types leave the final cut to split_group). Subclasses batch it; this default loops."""
        pairs = [m.factors(None if weights is None else weights[g]) for g, m in enumerate(members)]
        return torch.stack([a for a, _ in pairs]).transpose(-1, -2), torch.stack([b for _, b in pairs])

    @classmethod
    def build_group(cls, members: list["AdapterLinear"], weights: torch.Tensor | None) -> list:
        """[(A [U, d_in, r], B [U, r, d_out])] per member, from one batched group_factors call."""
        first = members[0]
        A_rows, B = cls.group_factors(members, weights)
        As = CutAndSplit.apply(A_rows, first.in_features)
        Bs = CutAndSplit.apply(B, first.out_features)
        return [(a.transpose(-1, -2), b) for a, b in zip(As, Bs)]

    # ---- forward ------------------------------------------------------------------------------
    def _task_factors(self, n_rows: int):
        """This layer's factors on its own (no grouping, no cache): the simple path."""
        if not self.routed:
            A, B = self.factors(None)
            return A, B, None
        weights_ids, inverse = self._routing.rows(self._side, n_rows, self.router)
        A, B = self.factors(self.router(weights_ids))
        return A, B, inverse

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        routing = self._routing
        if routing is not None and routing.groups_active(self):
            A, B, inverse = routing.factors(self, x.shape[0])  # built with the layer's group, or cached
        else:
            A, B, inverse = self._task_factors(x.shape[0])
        return add_low_rank(x, out, A.to(x.dtype), B.to(x.dtype), inverse, self.rank)
    @torch.no_grad()
    def delta_weight(self, weights: torch.Tensor | None) -> torch.Tensor:
        """The update (1/r) (A B)^T in nn.Linear's [d_out, d_in] layout, for one routing row."""
        A, B = self.factors(weights)
        return (A[0] @ B[0]).T / self.rank


class CutAndSplit(torch.autograd.Function):
    """x [G, ..., d'] -> the G views x[g, ..., :d]. Its backward writes the members' gradients
    into one buffer (zeros only past d), where slicing and unbinding would each make a full copy."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, d: int):
        ctx.layout = (x.shape, x.stride(), x.dtype, x.device, d)
        return tuple(x[g, ..., :d] for g in range(x.shape[0]))

    @staticmethod
    def backward(ctx, *grads):
        shape, stride, dtype, device, d = ctx.layout
        grad = torch.empty_strided(shape, stride, dtype=dtype, device=device)
        if d < shape[-1]:
            grad[..., d:].zero_()
        for g, member in enumerate(grads):
            if member is None:
                grad[g, ..., :d].zero_()
            else:
                grad[g, ..., :d].copy_(member)
        return grad, None


def add_low_rank(x: torch.Tensor, out: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                 inverse: torch.Tensor | None, rank: int) -> torch.Tensor:
    """out + (1/r) (x A_t) B_t for factors A [U, d_in, r], B [U, r, d_out], row b using task inverse[b].

    One task: two plain matmuls over all rows, the second fused with the addition (addmm). Several:
    the task factors gathered per row and two batched matmuls (baddbmm fuses the addition). The
    1/r scale is applied to the rank-r intermediate, the smallest tensor on the way.
    """
    if A.shape[0] == 1:
        h = x.reshape(-1, x.shape[-1]) @ A[0]
        return torch.addmm(out.reshape(-1, out.shape[-1]), h / rank, B[0]).view(out.shape)
    if inverse is not None:
        A, B = A[inverse], B[inverse]
    n = x.shape[0]
    h = torch.bmm(x.reshape(n, -1, x.shape[-1]), A)
    return torch.baddbmm(out.reshape(n, -1, out.shape[-1]), h / rank, B).view(out.shape)


def check_positive_dims(name: str, d_in: int, d_out: int) -> None:
    if d_in < 1 or d_out < 1:
        raise ConfigError(f"layer {name} has empty dimensions {d_in}->{d_out}")
