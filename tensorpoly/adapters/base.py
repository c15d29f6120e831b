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
        """(A [G, U, d_in, r], B [G, U, r, d_out]) of G members of one group, for routing weights
        [G, U, splits, S] (None if dense: U = 1). Subclasses batch it; this default loops."""
        pairs = [m.factors(None if weights is None else weights[g]) for g, m in enumerate(members)]
        return torch.stack([a for a, _ in pairs]), torch.stack([b for _, b in pairs])

    @classmethod
    def build_group(cls, members: list["AdapterLinear"], weights: torch.Tensor | None,
                    whole: bool = True) -> list["Factors"]:
        """Per member, its Factors; here all of them from one batched group_factors call. whole=False
        asks for small pieces that each member finishes itself, when a type has such pieces (the
        tensor types: see TensorFactors.build_group); others ignore it."""
        A, B = cls.group_factors(members, weights)
        return [Factors(factor_pair, pair) for pair in zip(A.unbind(0), B.unbind(0))]

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
            factors, inverse = routing.factors(self, x.shape[0])  # from the layer's group, or cached
            if isinstance(factors, Factors):
                fused = factors.low_rank(x, out, inverse, self.rank)
                if fused is not None:
                    return fused
                if routing.recompute_factors and torch.is_grad_enabled():
                    # Kept for the backward pass: the pieces only; the factors are rebuilt from them.
                    return TaskLowRank.apply(x, out, inverse, self.rank, factors.make, *factors.pieces)
                A, B = factors.materialize()
                if inverse is not None and torch.is_grad_enabled():
                    # Kept: the task factors, not copies gathered per row as autograd would keep.
                    return TaskLowRank.apply(x, out, inverse, self.rank, None, A, B)
            else:
                A, B = factors
        else:
            A, B, inverse = self._task_factors(x.shape[0])
        return add_low_rank(x, out, A.to(x.dtype), B.to(x.dtype), inverse, self.rank)

    @torch.no_grad()
    def delta_weight(self, weights: torch.Tensor | None) -> torch.Tensor:
        """The update (1/r) (A B)^T in nn.Linear's [d_out, d_in] layout, for one routing row."""
        A, B = self.factors(weights)
        return (A[0] @ B[0]).T / self.rank


class Factors:
    """A layer's factors as `make(*pieces)` -> (A [U, d_in, r], B [U, r, d_out]): the pieces are what the
    group built for it (small tensors, or the factors themselves), make finishes them."""

    __slots__ = ("make", "pieces")

    def __init__(self, make, pieces: tuple):
        self.make, self.pieces = make, tuple(pieces)

    def materialize(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.make(*self.pieces)

    def low_rank(self, x: torch.Tensor, out: torch.Tensor, inverse: torch.Tensor | None,
                 rank: int) -> torch.Tensor | None:
        """out + (1/rank) (x A_t) B_t computed without materialising the factors, where a kind of
        Factors knows how (KronFactors); None: materialise them."""
        return None


def factor_pair(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return A, B


class TaskLowRank(torch.autograd.Function):
    """y = out + (1/r) (x A_t) B_t, as add_low_rank, with a hand-written backward that keeps only x,
    the rank-r intermediate and the pieces: never the per-row gathered factors, and with `make`
    given, not the factors either (they are rebuilt from the pieces in the backward pass).

    apply(x, out, inverse, rank, make, *pieces): make(*pieces) -> (A, B); make=None: pieces are (A, B).
    """

    @staticmethod
    def forward(ctx, x, out, inverse, rank, make, *pieces):
        A, B = make(*pieces) if make is not None else pieces
        A, B = A.to(x.dtype), B.to(x.dtype)
        y, h = low_rank_forward(x, out, A, B, inverse, rank)
        ctx.rank, ctx.make, ctx.inverse = rank, make, inverse
        ctx.save_for_backward(x, h, *pieces)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        x, h, *pieces = ctx.saved_tensors
        needs = ctx.needs_input_grad
        if ctx.make is None:
            inputs = pieces
            A, B = pieces
        else:
            with torch.enable_grad():
                inputs = [p.detach().requires_grad_(need) for p, need in zip(pieces, needs[5:])]
                A, B = ctx.make(*inputs)
        grad_x, grad_A, grad_B = low_rank_backward(grad_y, x, h, A.to(x.dtype), B.to(x.dtype), ctx.inverse, ctx.rank,
                                                   needs[0])
        grad_A, grad_B = grad_A.to(A.dtype), grad_B.to(B.dtype)
        if ctx.make is None:
            grads = (grad_A, grad_B)
        else:
            # Through the rebuilt graph: into the pieces (returned below) and into any parameter that
            # make reads directly, such as trainable norm affines (accumulated in place).
            outputs = [(t, g) for t, g in ((A, grad_A), (B, grad_B)) if t.requires_grad]
            if outputs:
                torch.autograd.backward([t for t, _ in outputs], [g for _, g in outputs])
            grads = tuple(p.grad if p.requires_grad else None for p in inputs)
        return (grad_x, grad_y, None, None, None) + tuple(grads)


def low_rank_forward(x, out, A, B, inverse, rank):
    """(y, h / r) of add_low_rank."""
    d_in, d_out = x.shape[-1], out.shape[-1]
    if A.shape[0] == 1:
        h = (x.reshape(-1, d_in) @ A[0]) / rank
        return torch.addmm(out.reshape(-1, d_out), h, B[0]).view(out.shape), h
    if inverse is not None:
        A, B = A[inverse], B[inverse]
    n = x.shape[0]
    h = torch.bmm(x.reshape(n, -1, d_in), A) / rank
    return torch.baddbmm(out.reshape(n, -1, d_out), h, B).view(out.shape), h


def low_rank_backward(grad_y, x, h, A, B, inverse, rank, need_x: bool):
    """(grad x, grad A [U, d_in, r], grad B [U, r, d_out]) of low_rank_forward, given h / r."""
    d_in, d_out = x.shape[-1], grad_y.shape[-1]
    # grad A is written in A's own memory layout: rows of A^T stored contiguously (the tensor types)
    # or A itself (LoRA, Poly), so that what the factors were built from needs no copy of it.
    rows_first = A.stride(-2) == 1 and A.stride(-1) != 1
    if A.shape[0] == 1:
        g = grad_y.reshape(-1, d_out)
        x2 = x.reshape(-1, d_in)
        grad_h = (g @ B[0].T) / rank
        grad_B = (h.T @ g).unsqueeze(0)
        grad_A = ((grad_h.T @ x2).T if rows_first else x2.T @ grad_h).unsqueeze(0)
        grad_x = (grad_h @ A[0].T).view(x.shape) if need_x else None
        return grad_x, grad_A, grad_B
    n = x.shape[0]
    Ag, Bg = (A[inverse], B[inverse]) if inverse is not None else (A, B)
    g = grad_y.reshape(n, -1, d_out)
    grad_h = torch.bmm(g, Bg.transpose(1, 2)) / rank
    grad_B = torch.bmm(h.transpose(1, 2), g)
    x3 = x.reshape(n, -1, d_in)
    grad_A = torch.bmm(grad_h.transpose(1, 2), x3).transpose(1, 2) if rows_first else torch.bmm(x3.transpose(1, 2), grad_h)
    grad_x = torch.bmm(grad_h, Ag.transpose(1, 2)).view(x.shape) if need_x else None
    if inverse is not None:
        grad_A = torch.zeros_like(A).index_add_(0, inverse, grad_A)
        grad_B = torch.zeros_like(B).index_add_(0, inverse, grad_B)
    return grad_x, grad_A, grad_B


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
