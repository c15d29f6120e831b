"""The TLoRA construction: factor rows as truncated Kronecker products of short leaves.

A factor with r rows of length d is stored as N leaves per row, each of length
l = ceil(d^(1/N)). Row i is

    N = 1:  u1                                      (no product, no norm: plain LoRA)
    N = 2:  LN(u1 ⊗ u2)[:d]
    N = 4:  (LN(u1 ⊗ u2) ⊗ LN(u3 ⊗ u4))[:d]
    N = 3:  (LN(u1 ⊗ u2) ⊗ u3)[:d]                  (odd N: the last leaf stays unpaired)

i.e. leaves are paired left to right, each leaf pair's product is normalised (the paper
code's LayerNorm over [r, l^2]), and the normalised pairs (plus an unpaired last leaf for
odd N) are multiplied without further normalisation. Because the Kronecker product is
associative, how those higher products are bracketed does not change the result; for
N in {1, 2, 4} this is exactly the paper code's balanced tree, and it extends it to every N.
⊗ is the flattened outer product with the first factor as the major index.
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from . import kron_kernel


def integer_root_ceil(d: int, n: int) -> int:
    """Smallest integer l with l**n >= d (exact; float roots can under-round)."""
    if d < 1 or n < 1:
        raise ValueError(f"need d >= 1 and n >= 1, got d={d}, n={n}")
    guess = max(1, round(d ** (1.0 / n)))
    while guess**n < d:
        guess += 1
    while guess > 1 and (guess - 1) ** n >= d:
        guess -= 1
    return guess


def leaf_length(d: int, order: int) -> int:
    return integer_root_ceil(d, order)


def n_leaf_pairs(order: int) -> int:
    return order // 2


class PairNorm(nn.Module):
    """LayerNorm of one leaf-pair product, of shape [..., r, l^2].

    "joint" pools the statistics over all r rows and l^2 entries (the paper code's
    nn.LayerNorm([r, l^2])); "row" normalises every row on its own.
    """

    def __init__(self, rank: int, pair_len: int, scope: str, eps: float, affine_trainable: bool,
                 over_padding: bool = True, **factory):
        super().__init__()
        self.scope, self.eps, self.over_padding = scope, eps, over_padding
        shape = (rank, pair_len) if scope == "joint" else (pair_len,)
        self.weight = nn.Parameter(torch.ones(shape, **factory), requires_grad=affine_trainable)
        self.bias = nn.Parameter(torch.zeros(shape, **factory), requires_grad=affine_trainable)

    def frozen_identity(self) -> bool:
        """Whether the affine is frozen at weight 1, bias 0 (the paper's setting), so that it can be left
        out; checked again only when a parameter changes (its version counter or storage)."""
        if self.weight.requires_grad or self.bias.requires_grad:
            return False
        key = (self.weight._version, self.bias._version, self.weight.data_ptr(), self.bias.data_ptr())
        cached = self.__dict__.get("_identity")
        if cached is None or cached[0] != key:
            cached = self.__dict__["_identity"] = (key, bool((self.weight == 1).all() and (self.bias == 0).all()))
        return cached[1]

    def forward(self, z: torch.Tensor, used: int | None = None) -> torch.Tensor:
        """Normalise z; with over_padding=False the statistics use only its first `used` entries,
        the ones that survive truncation to d (the rest are dropped after the product anyway)."""
        return pair_norm(z, used, self.scope, self.eps, self.over_padding, self.weight, self.bias)


def pair_norm(z: torch.Tensor, used: int | None, scope: str, eps: float, over_padding: bool,
              weight: torch.Tensor, bias: torch.Tensor, fused: bool = True) -> torch.Tensor:
    """PairNorm's computation. fused=False takes weight and bias of any shape that broadcasts
    against z (one affine per layer of a stacked group) instead of exactly the norm's shape.
    weight and bias None: no affine (one frozen at the identity)."""
    shape = tuple(z.shape[-2:]) if scope == "joint" else tuple(z.shape[-1:])
    if over_padding or used is None or used >= z.shape[-1]:
        if fused or weight is None:
            return F.layer_norm(z, shape, weight, bias, eps)
        return torch.addcmul(bias, F.layer_norm(z, shape, None, None, eps), weight)
    dims = (-2, -1) if scope == "joint" else (-1,)
    kept = z[..., :used]
    mean = kept.mean(dims, keepdim=True)
    var = kept.var(dims, unbiased=False, keepdim=True)
    normed = (z - mean) * torch.rsqrt(var + eps)
    return normed if weight is None else normed * weight + bias


class StackedNorms:
    """The pair norms of G layers of one group, applied at once to stacked pair products.

    Acts like the ModuleList `build_rows` expects: norms[p](z, used) normalises
    z [G, *lead, r, l^2] with layer g's affine on z[g]. `lead` is the number of axes between
    the layer axis and the norm's own shape (experts or tasks).
    """

    def __init__(self, lists: list[nn.ModuleList], lead: int):
        self.count = len(lists[0])
        self.norms = []
        for p in range(self.count):
            first = lists[0][p]
            if all(norms[p].frozen_identity() for norms in lists):
                # Every affine is the identity: no stacked copies, no affine pass.
                self.norms.append((first.scope, first.eps, first.over_padding, None, None))
                continue
            weight = torch.stack([norms[p].weight for norms in lists])
            bias = torch.stack([norms[p].bias for norms in lists])
            own = tuple(weight.shape[1:])  # [r, l^2] (joint) or [l^2] (row); z is [G, *lead, r, l^2]
            view = (weight.shape[0],) + (1,) * (lead + 2 - len(own)) + own
            self.norms.append((first.scope, first.eps, first.over_padding, weight.view(view), bias.view(view)))

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, p: int):
        scope, eps, over_padding, weight, bias = self.norms[p]
        return lambda z, used=None: pair_norm(z, used, scope, eps, over_padding, weight, bias, fused=False)


def norm_signature(norms: nn.ModuleList) -> tuple:
    """What must agree for layers' norms to be stacked: count, scope, eps, padding rule, shape."""
    return tuple((n.scope, n.eps, n.over_padding, tuple(n.weight.shape)) for n in norms)


def make_pair_norms(order: int, rank: int, leaf: int, scope: str, shared: bool, eps: float,
                    affine_trainable: bool, over_padding: bool = True, **factory) -> nn.ModuleList:
    """The norms of one factor side: one per leaf pair, or one shared by all pairs."""
    pairs = n_leaf_pairs(order)
    if scope == "none" or pairs == 0:
        return nn.ModuleList()
    count = 1 if shared else pairs
    return nn.ModuleList(PairNorm(rank, leaf * leaf, scope, eps, affine_trainable, over_padding, **factory)
                         for _ in range(count))


def kron_rows(a: torch.Tensor, b: torch.Tensor, keep: int | None = None, cut: bool = True) -> torch.Tensor:
    """Row-wise Kronecker product of [..., r, p] and [..., r, q] -> [..., r, p*q] (first `keep`).
    cut=False: entries that cannot reach the first `keep` are still never computed, but the result
    may run past `keep` (to the next multiple of q)."""
    if keep is not None:
        # Entries past `keep` only come from rows of `a` past ceil(keep / q): drop them first.
        a = a[..., : math.ceil(keep / b.shape[-1])]
    out = (a.unsqueeze(-1) * b.unsqueeze(-2)).flatten(-2)
    return out if keep is None or not cut or out.shape[-1] <= keep else out[..., :keep]


def entries_reaching_output(lengths: list[int], p: int, d: int) -> int:
    """How many leading entries of factor p appear in the first d entries of the product.

    Entry i of the product has digit (i // R) mod lengths[p] in factor p, R = product of the
    later lengths, so over i < d the digits 0 .. ceil(d / R) - 1 occur (all of them if d is large).
    """
    later = math.prod(lengths[p + 1:])
    return min(lengths[p], math.ceil(d / later))


def build_rows(leaves: torch.Tensor, d: int, norms, cut: bool = True) -> torch.Tensor:
    """Factor rows from leaves [..., N, r, l] -> [..., r, d].

    `norms` holds one PairNorm per leaf pair, one shared by all pairs, or none (or a StackedNorms).
    cut=False: [..., r, L >= d], the rows before their cut to d (see kron_chain).
    """
    if _COMPILE.enabled:
        return _compiled("build_rows")(leaves, d, norm_specs(norms), cut)
    return _build_rows(leaves, d, norm_specs(norms), cut)


def _build_rows(leaves: torch.Tensor, d: int, specs: tuple, cut: bool = True) -> torch.Tensor:
    return _kron_chain(_row_factors(leaves, d, specs), d, cut)


def row_factors(leaves: torch.Tensor, d: int, norms) -> list[torch.Tensor]:
    """The factors whose Kronecker product is a row: the normalised leaf pairs, then the unpaired
    last leaf for odd N: [..., r, l^2] each, and [..., r, l]."""
    if _COMPILE.enabled:
        return _compiled("row_factors")(leaves, d, norm_specs(norms))
    return _row_factors(leaves, d, norm_specs(norms))


def norm_specs(norms) -> tuple:
    """The pair norms (a ModuleList of PairNorm, or a StackedNorms) as plain data, one
    (scope, eps, over_padding, weight, bias, fused) per norm: what `pair_norm` takes."""
    if isinstance(norms, StackedNorms):
        return tuple(spec + (False,) for spec in norms.norms)
    return tuple((n.scope, n.eps, n.over_padding, n.weight, n.bias, True) for n in norms)


def _row_factors(leaves: torch.Tensor, d: int, specs: tuple) -> list[torch.Tensor]:
    order, leaf = leaves.shape[-3], leaves.shape[-1]
    lengths = [leaf * leaf] * n_leaf_pairs(order) + [leaf] * (order % 2)
    factors = []
    fused = kron_kernel.usable(leaves, *(t for spec in specs for t in spec[3:5] if t is not None))
    for p in range(n_leaf_pairs(order)):
        first, second = leaves[..., 2 * p, :, :], leaves[..., 2 * p + 1, :, :]
        if fused:  # product and norm in one kernel call each way (kron_kernel.PairNorm)
            scope, eps, over_padding, weight, bias, _ = specs[min(p, len(specs) - 1)] if len(specs) else (
                "none", 0.0, True, None, None, True)
            used = leaf * leaf if over_padding else entries_reaching_output(lengths, p, d)
            factors.append(kron_kernel.normed_pair(first, second, used, scope, eps, weight, bias))
            continue
        pair = kron_rows(first, second)
        if len(specs):
            scope, eps, over_padding, weight, bias, fused = specs[min(p, len(specs) - 1)]
            pair = pair_norm(pair, entries_reaching_output(lengths, p, d), scope, eps, over_padding, weight, bias,
                             fused)
        factors.append(pair)
    if order % 2:
        factors.append(leaves[..., order - 1, :, :])
    return factors


def kron_chain(factors: list[torch.Tensor], d: int | None = None, cut: bool = True) -> torch.Tensor:
    """Row-wise Kronecker product of factors [..., r, len_i], cut to its first d entries (None: all).

    cut=False leaves the last cut to the caller: the entries that cannot reach the first d are still
    never computed, but the result may be longer than d (its first d entries are the product's)."""
    if _COMPILE.enabled:
        return _compiled("kron_chain")(list(factors), d, cut)
    return _kron_chain(factors, d, cut)


def _kron_chain(factors: list[torch.Tensor], d: int | None = None, cut: bool = True) -> torch.Tensor:
    out = factors[0]
    later = math.prod([f.shape[-1] for f in factors[1:]])
    for f in factors[1:]:
        later //= f.shape[-1]
        # Only the first ceil(d / later) entries of the product with f can reach the first d. The
        # last product is where the rows reach d: cut=False leaves that cut (a zero-filled copy of
        # the gradient in the backward pass) to the caller.
        out = kron_rows(out, f, keep=None if d is None else math.ceil(d / later), cut=cut or later > 1)
    return out if d is None or not cut or out.shape[-1] <= d else out[..., :d]


def last_product(factors: list[torch.Tensor], d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, Q) with kron_chain(factors, d) == kron_rows(P, Q)[..., :d]: P is the product of all factors but
    the last, cut to the entries that reach the first d, and Q the last factor."""
    Q = factors[-1]
    return kron_chain(list(factors[:-1]), math.ceil(d / Q.shape[-1])), Q


def mix_kron_chain(w: torch.Tensor, factors: list[torch.Tensor], d: int, cut: bool = True) -> torch.Tensor:
    """sum_s w[*, u, s] kron_chain(factors[s])[:d] for experts' factors [*, S, r, len_i] and weights
    [*, U, S] -> [*, U, r, d] (* : optional leading axes, e.g. the layers of a group), without
    building the S experts' rows when there are two factors or more.

    The mixed row is, as a [p, q] matrix, sum_s w[u, s] P_s^T Q_s with P the first factor and Q the
    product of the others: one batched matmul over the rows, contracting the experts.
    cut=False: [*, U, r, L >= d], as kron_chain.
    """
    if _COMPILE.enabled:
        return _compiled("mix_kron_chain")(w, list(factors), d, cut)
    return _mix_kron_chain(w, factors, d, cut)


def _mix_kron_chain(w: torch.Tensor, factors: list[torch.Tensor], d: int, cut: bool = True) -> torch.Tensor:
    if len(factors) == 1:
        *lead, S, r, full = factors[0].shape
        rows = torch.matmul(w, factors[0].reshape(*lead, S, r * full)).view(*lead, -1, r, full)
        return rows[..., :d] if cut and full > d else rows
    Q = _kron_chain(factors[1:])  # [*, S, r, q]
    *lead, S, r, q = Q.shape
    P = factors[0][..., : math.ceil(d / q)]  # [*, S, r, p]: only these entries reach the first d
    U, p, n = w.shape[-2], P.shape[-1], math.prod(lead)
    # P laid out [n, r, p, S] first: the product then comes out contiguous, and the copy that the bmm's
    # view would otherwise make is of P, not of the U times larger product.
    Pw = P.reshape(n, S, r, p).permute(0, 2, 3, 1).contiguous().unsqueeze(2) * w.reshape(n, 1, U, 1, S)  # [n, r, U, p, S]
    Qr = Q.reshape(n, S, r, q).transpose(1, 2).reshape(n * r, S, q)
    out = torch.bmm(Pw.reshape(n * r, U * p, S), Qr)  # [n r, U p, q]
    out = out.view(*lead, r, U, p * q)
    return (out[..., :d] if cut and p * q > d else out).transpose(-3, -2)  # [*, U, r, d]


# ---- optional torch.compile of the factor construction ---------------------------------------------
class _CompileState:
    enabled = False
    dynamic: bool | None = False
    functions: dict = {}


_COMPILE = _CompileState()
_IMPLEMENTATIONS = {"build_rows": _build_rows, "row_factors": _row_factors, "kron_chain": _kron_chain,
                    "mix_kron_chain": _mix_kron_chain}


def _compiled(name: str):
    key = (name, _COMPILE.dynamic)
    fn = _COMPILE.functions.get(key)
    if fn is None:
        fn = _COMPILE.functions[key] = torch.compile(_IMPLEMENTATIONS[name], dynamic=_COMPILE.dynamic)
    return fn


@contextmanager
def compiled_factors(enabled: bool = True, dynamic: bool | None = False, recompile_limit: int = 256):
    """Within this context, build_rows / row_factors / kron_chain / mix_kron_chain run through
    torch.compile (Inductor). With dynamic=False each function is compiled once per distinct set of
    shapes, dtypes, grad mode and Python arguments: every layer group, factor side, number of distinct
    tasks and adapter type costs one compilation the first time it is seen (tens of graphs for a T5,
    hence the raised recompile limit; past it Dynamo runs the function eagerly). The backward pass of
    what was built inside the context runs the compiled backward wherever it is called. Off by default
    (TaskRouting.compile_factors turns it on for a model's calls); nesting restores the outer setting."""
    import torch._dynamo

    config = torch._dynamo.config
    names = [n for n in ("recompile_limit", "accumulated_recompile_limit") if hasattr(config, n)] or ["cache_size_limit"]
    saved = (_COMPILE.enabled, _COMPILE.dynamic, {n: getattr(config, n) for n in names})
    _COMPILE.enabled, _COMPILE.dynamic = enabled, dynamic
    if enabled:
        for n in names:
            setattr(config, n, max(saved[2][n], recompile_limit * (4 if n.startswith("accumulated") else 1)))
    try:
        yield
    finally:
        _COMPILE.enabled, _COMPILE.dynamic = saved[0], saved[1]
        for n, value in saved[2].items():
            setattr(config, n, value)
