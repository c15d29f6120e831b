"""TLoRA: a dense LoRA whose factor rows are entangled tensors (see tensor_product.py).

    A[:, i] = TLoRA-row(u_{1,i}, ..., u_{N,i}; d_in),   B[i, :] = TLoRA-row(v_{1,i}, ..., v_{N,i}; d_out)

`TensorFactors` holds the leaves and pair norms of both sides; TensorPoly-I and -II reuse it
with an extra expert axis.
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import AdapterConfig
from .. import kron_kernel
from ..tensor_product import (StackedNorms, build_rows, kron_chain, kron_rows, last_product, leaf_length,
                              make_pair_norms, mix_kron_chain, norm_signature, row_factors)
from .base import AdapterLinear, Factors, factor_pair, paper_uniform_


class TensorFactors(AdapterLinear):
    """Leaves [N, *experts, r, l] for A (l = leaf(d_in)) and B (l = leaf(d_out)), plus pair norms."""

    expert_axes = 0
    mixes_experts = False  # whether a task's rows mix the experts' rows (TensorPoly-I)
    paper_init = "uniform"  # the paper code: uniform for TensorPoly-I, xavier for TensorPoly-II

    def __init__(self, base_layer: nn.Linear, config: AdapterConfig):
        super().__init__(base_layer, config)
        self.order = config.order
        self.leaf_A, self.leaf_B = leaf_length(self.in_features, self.order), leaf_length(self.out_features, self.order)
        experts = (config.n_experts,) * self.expert_axes
        kw = dict(device=base_layer.weight.device, dtype=base_layer.weight.dtype)
        self.leaves_A = nn.Parameter(torch.empty(self.order, *experts, self.rank, self.leaf_A, **kw))
        self.leaves_B = nn.Parameter(torch.empty(self.order, *experts, self.rank, self.leaf_B, **kw))
        norm_kw = dict(scope=config.norm, shared=config.share_norm, eps=config.norm_eps,
                       affine_trainable=config.norm_affine_trainable,
                       over_padding=config.norm_over_padding, **kw)
        self.norms_A = make_pair_norms(self.order, self.rank, self.leaf_A, **norm_kw)
        self.norms_B = make_pair_norms(self.order, self.rank, self.leaf_B, **norm_kw)
        self.reset_parameters(config)

    def reset_parameters(self, config: AdapterConfig) -> None:
        for leaves in (self.leaves_A, self.leaves_B):
            if self.paper_init == "xavier":
                nn.init.xavier_uniform_(leaves)
            else:
                # The paper code bounds the B leaves by d_in too.
                paper_uniform_(leaves, self.in_features)
        if config.init == "zero_b":
            # One zero leaf makes every B row zero while every leaf still gets gradient.
            with torch.no_grad():
                self.leaves_B[self.order - 1].zero_()

    def extra_repr(self) -> str:
        return super().extra_repr() + f", order={self.order}, leaves=({self.leaf_A}, {self.leaf_B})"

    @property
    def probe(self) -> torch.Tensor:
        return self.leaves_A

    def group_key(self) -> tuple:
        return (type(self), self.in_features, self.out_features, tuple(self.leaves_A.shape), tuple(self.leaves_B.shape),
                norm_signature(self.norms_A), norm_signature(self.norms_B))

    @staticmethod
    def stacked_leaves(members, side: str) -> torch.Tensor:
        """Leaves [G, N, *experts, r, l] of one factor side of every member, stacked."""
        return torch.stack([getattr(m, f"leaves_{side}") for m in members])

    @classmethod
    def stacked(cls, members, side: str, lead: int):
        """Leaves [G, N, *experts, r, l] and norms of one factor side of every member, stacked."""
        leaves = cls.stacked_leaves(members, side)
        norms = getattr(members[0], f"norms_{side}")
        if len(norms):
            norms = StackedNorms([getattr(m, f"norms_{side}") for m in members], lead)
        return leaves, norms

    @classmethod
    def build_group(cls, members, weights, whole: bool = True):
        """Per member, its Factors (A [U, d_in, r], B [U, r, d_out]).

        whole=True, from order 3 on: every member's factors are built at once, in a few batched
        operations over the group's stacked leaves (for a T5 tens of layers), and each member gets
        views of them; the backward pass runs through the same batched operations. Per-layer work
        is what made the routed tensor types slower than LoRA on a CPU: a few small operations and
        their autograd nodes per layer, each with a fixed cost much larger than its arithmetic.
        Below order 3 the leaf pair is the whole row and its LayerNorm runs over row-sized tensors
        (TensorPoly-I: every expert's rows), so the group's temporaries would be tens of MB; there,
        as for whole=False, each member builds its own (measured: scripts/bench_adapters.py).

        whole=False (recompute_factors in training): only what is much smaller than the factors is
        built for the group (routing, mixed leaves, from order 3 on the normalised leaf pairs); each
        member finishes its own factors from those pieces in its forward pass, so that the backward
        pass can rebuild them from the pieces instead of keeping them.
        """
        first = members[0]
        d_in, d_out = first.in_features, first.out_features
        if first.order >= GROUP_PAIRS_FROM_ORDER:
            A = contiguous_operands(cls.group_operands(members, "A", d_in, weights))
            B = contiguous_operands(cls.group_operands(members, "B", d_out, weights))
            if whole and not kron_kernel.low_rank_usable(*(t for t in A + B if t is not None)):
                return [Factors(factor_pair, pair) for pair in zip(group_members(*A, d_in, True),
                                                                   group_members(*B, d_out, False))]
            return KronFactors.of_group(A[0] is not None, bare_side(*A), bare_side(*B), d_in, d_out)
        if first.order == 2 and kron_kernel.low_rank_usable(first.leaves_A) and folds_norm(first):
            # A leaf pair is the whole row: with the fused update, its norm folds into the coefficients.
            A, B = (folded_pair_norm(*cls.leaf_pair(members, side, weights), stacked_norm(members, side))
                    for side in ("A", "B"))
            return KronFactors.of_group(cls.mixes_experts, A, B, d_in, d_out)
        A = cls.own_side_rows(members, "A", d_in, weights)
        B = cls.own_side_rows(members, "B", d_out, weights)
        return [Factors(both_sides(make_A, len(pieces_A), make_B), (*pieces_A, *pieces_B))
                for (make_A, pieces_A), (make_B, pieces_B) in zip(A, B)]

    @classmethod
    def group_operands(cls, members, side: str, d: int, weights) -> tuple:
        """The operands (w, P, Q) of the last Kronecker product of one factor side of every member:
        rows[g, u, r] = sum_s w[g, u, s] P[g, s, r] ⊗ Q[g, s, r] (w [G, U, S]: TensorPoly-I) or
        P[g, u, r] ⊗ Q[g, u, r] (w None), P cut to the entries that reach the first d (see group_members)."""
        raise NotImplementedError

    @classmethod
    def leaf_pair(cls, members, side: str, weights) -> tuple:
        """Order 2: (a, b, w) of one side of every member, the row of task u being sum_s w[g, u, s]
        LN(a[g, s] ⊗ b[g, s]) (mixes_experts) or LN(a[g, u] ⊗ b[g, u]) (w None); a, b [G, E, r, l]."""
        raise NotImplementedError

    @classmethod
    def own_side_rows(cls, members, side: str, d: int, weights) -> list[tuple]:
        """Per member (make, pieces): make(*pieces) -> its rows [U, r, d] of one factor side, below
        GROUP_PAIRS_FROM_ORDER, where a leaf pair is a whole row: each member builds its rows from its own
        leaves (and routing weights). Every tensor that make uses and that needs a gradient is a piece or
        a parameter of the member."""
        raise NotImplementedError


def folds_norm(member) -> bool:
    """Whether an order-2 member's pair norm can be folded (folded_pair_norm): statistics over all of
    the pair's entries, which is what sums of the leaves give."""
    norms = [n for side in ("A", "B") for n in getattr(member, f"norms_{side}")]
    return all(n.over_padding for n in norms)


def stacked_norm(members, side: str):
    """(scope, eps, W [G, r or 1, l^2], beta) of every member's (only) pair norm of one side, or None;
    W and beta None where every affine is frozen at the identity."""
    norms = [getattr(m, f"norms_{side}") for m in members]
    if not len(norms[0]):
        return None
    first = norms[0][0]
    if all(n[0].frozen_identity() for n in norms):
        return first.scope, first.eps, None, None
    W = torch.stack([n[0].weight for n in norms])
    beta = torch.stack([n[0].bias for n in norms])
    L = W.shape[-1]
    return first.scope, first.eps, W.reshape(len(members), -1, L), beta.reshape(len(members), -1, L)


def contiguous_operands(operands: tuple) -> tuple:
    """The group's (w, P, Q), each made contiguous once, so that every member's slice is."""
    return tuple(None if t is None else t.contiguous() for t in operands)


class KronFactors(Factors):
    """A member's factors as the inputs of both sides' rows, (c, P, Q, W, beta, m, sigma) per side
    (kron_kernel.low_rank; None where absent): from order 3 on the operands of the last Kronecker
    product (c: TensorPoly-I's routing weights), at order 2 the leaf pairs with their LayerNorm
    folded in (folded_pair_norm). Where the fused kernel runs, the layer's update is computed from
    them and the factors are never stored; elsewhere they are materialised (side_rows)."""

    __slots__ = ("mixed", "dims", "_layout")

    def __init__(self, mixed: bool, A: tuple, B: tuple, d_in: int, d_out: int):
        self.mixed, self.dims = mixed, (d_in, d_out)
        self._layout = tuple(t is not None for t in A + B)
        # Factors' pieces: the tensors only (TaskLowRank rebuilds the factors from them).
        super().__init__(self._make, tuple(t for t in A + B if t is not None))

    def sides(self, pieces: tuple | None = None) -> tuple[tuple, tuple]:
        present = iter(self.pieces if pieces is None else pieces)
        entries = [next(present) if there else None for there in self._layout]
        return tuple(entries[:7]), tuple(entries[7:])

    def _make(self, *pieces):
        A, B = self.sides(pieces)
        return side_rows(A, self.dims[0], self.mixed).transpose(-1, -2), side_rows(B, self.dims[1], self.mixed)

    def low_rank(self, x, out, inverse, rank):
        # The pieces share one dtype and device (built from one member's leaves): the first stands for all.
        if not kron_kernel.low_rank_usable(x, out, self.pieces[0]):
            return None
        return kron_kernel.low_rank(x, out, inverse, rank, self.mixed, *self.sides())

    @classmethod
    def of_group(cls, mixed: bool, A: tuple, B: tuple, d_in: int, d_out: int) -> list["KronFactors"]:
        """Per member, its KronFactors from the group's sides (every entry with a leading group axis)."""
        def split(side):
            parts = [None if t is None else t.contiguous().unbind(0) for t in side]
            return [tuple(None if p is None else p[g] for p in parts) for g in range(len(parts[1]))]
        return [cls(mixed, a, b, d_in, d_out) for a, b in zip(split(A), split(B))]


def bare_side(w, P, Q) -> tuple:
    """The 7 entries of a side that is only a last Kronecker product (order 3 and up)."""
    return (w, P, Q, None, None, None, None)


def side_rows(side: tuple, d: int, mixed: bool) -> torch.Tensor:
    """A side's rows [U, r, d] with PyTorch ops (and the construction kernel where it runs): what the
    fused update computes without storing them."""
    c, P, Q, W, beta, m, sigma = side
    if W is None and m is None and (c is None or (mixed and c.dim() == 2)):
        return member_rows(c, P, Q, d)
    products = kron_rows(P, Q, d)  # [S or U, r, d]
    if mixed:
        c = c if c.dim() == 3 else c.unsqueeze(-1)
        rows = (c.unsqueeze(-1) * products).sum(1)  # [U, S, r, d] summed over the experts
    else:
        rows = products if c is None else products * (c[:, 0] if c.dim() == 3 else c).unsqueeze(-1)
    if W is not None:
        rows = torch.addcmul(sigma[:, None, None] * beta[:, :d], W[:, :d], rows - m.unsqueeze(-1))
    elif m is not None:
        rows = rows - m.unsqueeze(-1)
    return rows


def folded_pair_norm(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor | None, norm) -> tuple:
    """The side whose rows are sum_s c_s LN(a_s ⊗ b_s) W + beta (mixed: c [G, U, S]) or LN(a_u ⊗ b_u)
    W + beta (c None): the LayerNorm's statistics folded into the coefficients, as LN(z) W + beta =
    W (rstd z - rstd mean) + beta, so that no pair product is ever built. a, b [G, E, r, l] (E: the
    experts or the tasks). norm: (scope, eps, W [G, r or 1, l^2], beta), or None for no norm; W and beta
    None: the affine is the identity, and the rows are sum_s c_s rstd_s (a_s ⊗ b_s) - m. The
    statistics run over all l^2 entries (norm_over_padding), from the leaves' own: over the entries
    a_i b_j of a row, the mean is mean(a) mean(b) and the variance mean(a)^2 var(b) + mean(b)^2 var(a)
    + var(a) var(b) (a sum of non-negative terms: no cancellation); joint, the mean of the rows' variances
    plus the variance of their means."""
    if norm is None:
        return (c, a, b, None, None, None, None)
    scope, eps, W, beta = norm
    rstd, shift = pair_stats(a, b, scope, eps)  # [G, E, r]
    if c is None:
        sigma = None if W is None else torch.ones(rstd.shape[:2], dtype=a.dtype)
        return (rstd.unsqueeze(2), a, b, W, beta, shift.expand(rstd.shape), sigma)
    coef = c.unsqueeze(-1) * rstd.unsqueeze(1)  # [G, U, S, r]
    m = torch.einsum("gus,gsr->gur", c, shift.expand(rstd.shape))
    return (coef, a, b, W, beta, m, None if W is None else c.sum(-1))


def pair_stats(a: torch.Tensor, b: torch.Tensor, scope: str, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rstd, mean * rstd) [..., r] of the LayerNorm over the entries of a ⊗ b (scope "row": each row,
    "joint": a block's r rows together, repeated per row), from the leaves' statistics as folded_pair_norm
    says: by the kernel where it runs (one call each way instead of a dozen small ops), else by these."""
    if kron_kernel.usable(a, b):
        return kron_kernel.pair_stats(a, b, scope, eps)
    mean_a, mean_b = a.mean(-1), b.mean(-1)
    var_a, var_b = (a - mean_a.unsqueeze(-1)).square().mean(-1), (b - mean_b.unsqueeze(-1)).square().mean(-1)
    mean = mean_a * mean_b
    var = mean_a.square() * var_b + mean_b.square() * var_a + var_a * var_b
    if scope == "joint":
        row_means, mean = mean, mean.mean(-1, keepdim=True)
        var = var.mean(-1, keepdim=True) + (row_means - mean).square().mean(-1, keepdim=True)
    rstd = torch.rsqrt(var + eps).expand(mean_a.shape)
    return rstd, mean * rstd


def group_members(w, P, Q, d: int, transpose: bool) -> tuple:
    """Each member's rows [U, r, d] ([U, d, r] with transpose) from the operands of the group's last
    product: by the fused CPU kernel where it runs (kron_kernel.KronRows), else by PyTorch ops into
    uncut rows [G, U, r, >= d] that MemberRows hands out."""
    if kron_kernel.usable(P, Q, *(() if w is None else (w,))):
        return kron_kernel.KronRows.apply(w, P, Q, d, transpose)
    rows = kron_chain([P, Q], d, cut=False) if w is None else mix_kron_chain(w, [P, Q], d, cut=False)
    return MemberRows.apply(rows, d, transpose)


def member_rows(w, P, Q, d: int) -> torch.Tensor:
    """One member's rows [U, r, d] from its operands of the last product (w [U, S], P [S, r, p], Q [S, r, q];
    w None: P [U, r, p], Q [U, r, q]), by the fused kernel where it runs."""
    if kron_kernel.usable(P, Q, *(() if w is None else (w,))):
        return kron_kernel.KronRows.apply(None if w is None else w[None], P[None], Q[None], d, False)[0]
    return kron_chain([P, Q], d) if w is None else mix_kron_chain(w, [P, Q], d)


class MemberRows(torch.autograd.Function):
    """Each member's rows [U, r, d] (transpose: [U, d, r]) as views of the group's uncut rows
    [G, U, r, L >= d]: apply(rows, d, transpose) -> G tensors.

    The backward pass writes the members' gradients straight into one buffer laid out as the rows:
    autograd's own way (stack the members' gradients, then a zero-filled copy for the cut) makes two
    more passes over factor-sized memory, each into fresh memory, which on a CPU costs page faults.
    """

    @staticmethod
    def forward(ctx, rows, d: int, transpose: bool):
        ctx.set_materialize_grads(False)
        ctx.d, ctx.transpose = d, transpose
        # Only the layout is kept (a meta tensor holds no memory), not the rows.
        ctx.layout, ctx.dtype, ctx.device = torch.empty_like(rows, device="meta"), rows.dtype, rows.device
        cut = rows[..., :d] if rows.shape[-1] > d else rows
        return tuple(m.transpose(-1, -2) if transpose else m for m in cut.unbind(0))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        layout, d = ctx.layout, ctx.d
        grad = torch.empty_strided(layout.shape, layout.stride(), dtype=ctx.dtype, device=ctx.device)
        if layout.shape[-1] > d:
            grad[..., d:].zero_()
        for g, member in enumerate(grads):
            target = grad[g, ..., :d]
            if member is None:
                target.zero_()
            else:
                target.copy_(member.transpose(-1, -2) if ctx.transpose else member)
        return grad, None, None


# From this order on a leaf pair (l^2 entries, l = d^(1/N)) is much shorter than a row, and the
# pairs of a whole group are built in one go; below it the pair is the row.
GROUP_PAIRS_FROM_ORDER = 3


def own_rows(member, side: str, d: int):
    """make(leaves) -> rows [1, r, d] with the member's own norms (orders below GROUP_PAIRS_FROM_ORDER)."""
    norms = getattr(member, f"norms_{side}")
    return lambda leaves: build_rows(leaves, d, norms).unsqueeze(0)


def both_sides(make_A, n_A: int, make_B):
    """make(*pieces) -> (A [U, d_in, r], B [U, r, d_out]) from the two sides' row makers."""
    def make(*pieces):
        return make_A(*pieces[:n_A]).transpose(-1, -2), make_B(*pieces[n_A:])
    return make



class TLoRALinear(TensorFactors):
    def factors(self, weights):
        A = build_rows(self.leaves_A, self.in_features, self.norms_A)  # [r, d_in]
        B = build_rows(self.leaves_B, self.out_features, self.norms_B)  # [r, d_out]
        return A.T.unsqueeze(0), B.unsqueeze(0)

    @classmethod
    def group_operands(cls, members, side, d, weights):
        leaves, norms = cls.stacked(members, side, lead=0)  # [G, N, r, l]
        P, Q = last_product(row_factors(leaves, d, norms), d)  # [G, r, p], [G, r, q]
        return None, P.unsqueeze(1), Q.unsqueeze(1)

    @classmethod
    def own_side_rows(cls, members, side, d, weights):
        return [(own_rows(m, side, d), (getattr(m, f"leaves_{side}"),)) for m in members]

    @classmethod
    def leaf_pair(cls, members, side, weights):
        leaves = cls.stacked_leaves(members, side)  # [G, 2, r, l]
        return leaves[:, 0].unsqueeze(1), leaves[:, 1].unsqueeze(1), None
