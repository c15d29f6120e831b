"""The fused CPU kernel for the last Kronecker product of a layer group's factor rows.

A group's rows are, per member g, task u and rank row r, either a mixture over the experts s
(TensorPoly-I) or one product (TLoRA, TensorPoly-II) of two short factors:

    mixed:  rows[g, u, r] = sum_s w[g, u, s] P[g, s, r] ⊗ Q[g, s, r]
    plain:  rows[g, u, r] = P[g, u, r] ⊗ Q[g, u, r]

`KronRows` computes them in one C++ call (csrc/kron_rows.cpp) and hands each member its view,
cut to d; its backward pass reads every member's gradient in place, once. With PyTorch ops the
same is a batched matmul over the experts (hundreds of tiny products) or an outer product whose
backward makes product-sized temporaries, plus a copy of the members' gradients into one buffer.

The extension is compiled with torch.utils.cpp_extension the first time it is needed (about 30 s,
then cached under TORCH_EXTENSIONS_DIR, by default ~/.cache/torch_extensions). Without a C++
compiler, on a GPU, for other dtypes, or with TENSORPOLY_FUSED_KERNELS=0, the PyTorch ops run
instead: the two give equal results (tests/test_kron_kernel.py).
"""
from __future__ import annotations

import hashlib
import math
import os
import platform
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

SOURCES = [Path(__file__).parent / "csrc" / name for name in ("kron_rows.cpp", "kron_lowrank.cpp")]
FUSED_DTYPES = (torch.float32, torch.float64)


class _State:
    enabled = os.environ.get("TENSORPOLY_FUSED_KERNELS", "1") not in ("0", "false", "False")
    low_rank = True  # with enabled: the tensor adapters' update by KronLowRank, factors never stored
    module = None
    failed: str | None = None


_STATE = _State()


def _cpu_signature() -> str:
    """The build uses -march=native: key the build by the CPU so a shared cache never runs code built
    for another one."""
    flags = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "model name")):
                flags += line
    except OSError:
        pass
    return hashlib.sha1(flags.encode()).hexdigest()[:8]


def _ninja_on_path() -> None:
    """cpp_extension runs `ninja` from PATH; the pip package's binary sits in the environment's bin
    folder, which is not on PATH when the interpreter is called by its path (.venv/bin/python)."""
    if shutil.which("ninja"):
        return
    try:
        import ninja
    except ImportError:
        return
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def extension():
    """The compiled module, building it on first use; None (with one warning) if it cannot be built."""
    if _STATE.module is None and _STATE.failed is None:
        try:
            from torch.utils.cpp_extension import load

            _ninja_on_path()
            _STATE.module = load(name=f"tensorpoly_kron_rows_{_cpu_signature()}", sources=[str(s) for s in SOURCES],
                                 extra_cflags=["-O3", "-march=native", "-fopenmp-simd"], verbose=False)
        except Exception as error:  # no compiler, no headers, a failed build: the PyTorch ops still work
            _STATE.failed = f"{type(error).__name__}: {error}"
            warnings.warn(f"tensorpoly: the fused CPU kernel could not be built, using PyTorch ops instead "
                          f"(set TENSORPOLY_FUSED_KERNELS=0 to skip the attempt): {_STATE.failed}", stacklevel=2)
    return _STATE.module


def usable(*tensors: torch.Tensor) -> bool:
    """Whether KronRows can run on these operands (and the kernel is switched on and built)."""
    from .tensor_product import _COMPILE

    if not _STATE.enabled or _COMPILE.enabled:
        return False
    if not all(t.device.type == "cpu" and t.dtype == tensors[0].dtype for t in tensors):
        return False
    return tensors[0].dtype in FUSED_DTYPES and extension() is not None


def low_rank_usable(*tensors: torch.Tensor) -> bool:
    """Whether KronLowRank can compute an update from these tensors (input, output, operands)."""
    return _STATE.low_rank and usable(*tensors)


@contextmanager
def fused_kernels(enabled: bool = True, low_rank: bool | None = None):
    """Switch the fused kernels on or off within the context (the benchmark's A/B; tests). low_rank
    (default: as enabled) switches only the fused low-rank update: off, the factors are materialised
    by the construction kernels and multiplied by PyTorch's matmuls."""
    saved = _STATE.enabled, _STATE.low_rank
    _STATE.enabled, _STATE.low_rank = enabled, enabled if low_rank is None else low_rank
    try:
        yield
    finally:
        _STATE.enabled, _STATE.low_rank = saved


class KronRows(torch.autograd.Function):
    """apply(w, P, Q, d, transpose) -> G member tensors [U, r, d] ([U, d, r] with transpose), views of
    one buffer of uncut rows [G, U, r, p*q]. w [G, U, S] with P [G, S, r, p], Q [G, S, r, q] (mixed),
    or w None with P [G, U, r, p], Q [G, U, r, q] (plain); p*q >= d."""

    @staticmethod
    def forward(ctx, w, P, Q, d: int, transpose: bool):
        ext = extension()
        P, Q = P.contiguous(), Q.contiguous()
        if w is None:
            rows = ext.plain_kron_forward(P, Q)
        else:
            w = w.contiguous()
            rows = ext.mixed_kron_forward(w, P, Q)
        ctx.set_materialize_grads(False)
        ctx.transpose, ctx.mixed = transpose, w is not None
        ctx.save_for_backward(*((w, P, Q) if w is not None else (P, Q)))
        cut = rows[..., :d] if rows.shape[-1] > d else rows
        return tuple(m.transpose(-1, -2) if transpose else m for m in cut.unbind(0))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        saved = ctx.saved_tensors
        P = saved[-2]
        empty = P.new_empty(0)
        rows = []
        for g in grads:
            if g is None:
                rows.append(empty)
                continue
            g = g.transpose(-1, -2) if ctx.transpose else g  # [U, r, d]
            rows.append(g if g.stride(-1) == 1 and g.dtype == P.dtype else g.to(P.dtype).contiguous())
        ext = extension()
        if ctx.mixed:
            grad_w, grad_P, grad_Q = ext.mixed_kron_backward(*saved, rows)
            return grad_w, grad_P, grad_Q, None, None
        grad_P, grad_Q = ext.plain_kron_backward(*saved, rows)
        return None, grad_P, grad_Q, None, None


SCOPES = {"none": 0, "joint": 1, "row": 2}


def normed_pair(a: torch.Tensor, b: torch.Tensor, used: int, scope: str, eps: float,
                weight: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    """pair_norm(kron_rows(a, b), used, ...) of tensor_product in one kernel call: a [*lead, r, la] and
    b [*lead, r, lb] -> [*lead, r, la*lb]. weight and bias as pair_norm takes them: the norm's own shape
    ([r, L] joint, [L] row), or with one leading axis of layers over lead[0] (StackedNorms); None for no
    affine (scope "none": no norm)."""
    *lead, R, la = a.shape
    L = la * b.shape[-1]
    B = math.prod(lead)
    W = beta = None
    if scope != "none" and weight is not None:
        own = 2 if scope == "joint" else 1
        layers = weight.shape[0] if weight.dim() > own else 1
        W, beta = weight.reshape(layers, -1, L), bias.reshape(layers, -1, L)
    y = PairNorm.apply(a.reshape(B, R, la), b.reshape(B, R, b.shape[-1]), W, beta, SCOPES[scope], min(used, L), eps)
    return y.view(*lead, R, L)


class PairNorm(torch.autograd.Function):
    """apply(a [B, r, la], b [B, r, lb], W, beta [Gw, 1 or r, la*lb] or None, scope, used, eps) -> [B, r, la*lb]."""

    @staticmethod
    def forward(ctx, a, b, W, beta, scope: int, used: int, eps: float):
        a, b = a.contiguous(), b.contiguous()
        if W is not None:
            W, beta = W.contiguous(), beta.contiguous()
        y, mean, rstd = extension().pair_norm_forward(a, b, W, beta, scope, used, eps)
        ctx.scope, ctx.used = scope, used
        ctx.save_for_backward(a, b, W, mean, rstd)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        a, b, W, mean, rstd = ctx.saved_tensors
        affine_grad = W is not None and (ctx.needs_input_grad[2] or ctx.needs_input_grad[3])
        ga, gb, gW, gbeta = extension().pair_norm_backward(a, b, W, mean, rstd, grad.contiguous(), ctx.scope,
                                                           ctx.used, affine_grad)
        return ga, gb, gW if affine_grad else None, gbeta if affine_grad else None, None, None, None


def pair_stats(a: torch.Tensor, b: torch.Tensor, scope: str, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rstd, mean * rstd) [*lead, r] of the LayerNorm over the entries of a ⊗ b (a [*lead, r, la],
    b [*lead, r, lb]; scope "row": each row, "joint": the r rows of a block together, repeated per row),
    from the leaves' own statistics (csrc/kron_rows.cpp pair_stats_forward)."""
    *lead, R, la = a.shape
    n = math.prod(lead)
    rstd, shift = PairStats.apply(a.reshape(n, R, la), b.reshape(n, R, b.shape[-1]), SCOPES[scope], eps)
    return rstd.view(*lead, R), shift.view(*lead, R)


class PairStats(torch.autograd.Function):
    """apply(a [N, r, la], b [N, r, lb], scope, eps) -> (rstd, shift) [N, r], see pair_stats."""

    @staticmethod
    def forward(ctx, a, b, scope: int, eps: float):
        a, b = a.contiguous(), b.contiguous()
        rstd, shift = extension().pair_stats_forward(a, b, scope, eps)
        ctx.scope = scope
        ctx.save_for_backward(a, b, rstd)
        return rstd, shift

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_rstd, g_shift):
        a, b, rstd = ctx.saved_tensors
        ga, gb = extension().pair_stats_backward(a, b, rstd, g_rstd.contiguous(), g_shift.contiguous(), ctx.scope)
        return ga, gb, None, None


SIDE_FIELDS = ("c", "P", "Q", "W", "beta", "m", "sigma")


def low_rank(x: torch.Tensor, out: torch.Tensor, inverse: torch.Tensor | None, rank: int, mixed: bool,
             side_A: tuple, side_B: tuple) -> torch.Tensor:
    """out + (1/rank) (x A_t) B_t computed by the fused kernel without the factors ever being stored.
    Each side is (c, P, Q, W, beta, m, sigma), None where absent (csrc/kron_lowrank.cpp): a rank row is
    W (sum_s c[t, s] P[s] ⊗ Q[s] - m[t]) + sigma[t] beta, cut to d; mixed False: P, Q are per task and
    c (optional) [U, 1(, R)]. Row b of x uses task inverse[b] (None: task b, or the only task)."""
    U = side_A[0].shape[0] if mixed else side_A[1].shape[0]
    n = x.shape[0]
    if inverse is not None:
        task = inverse
    elif U == 1:
        task = torch.zeros(n, dtype=torch.long)
    else:
        task = torch.arange(n)
    return KronLowRank.apply(x, out, task, 1.0 / rank, mixed, *side_A, *side_B)


class KronLowRank(torch.autograd.Function):
    """apply(x [n, ..., d_in], out [n, ..., d_out], task [n], scale, mixed, *side_A, *side_B) -> out +
    scale (x A_u) B_u, each side the 7 entries of low_rank. Keeps for the backward pass x, the
    rank-sized intermediate and the sides' small tensors: never the factors, which the backward pass
    rebuilds in cache."""

    @staticmethod
    def forward(ctx, x, out, task, scale: float, mixed: bool, *sides):
        n = x.shape[0]
        x3 = x.reshape(n, -1, x.shape[-1]).contiguous()
        side_A, side_B = list(sides[:7]), list(sides[7:])
        y, h = extension().kron_lowrank_forward(x3, out.reshape(n, -1, out.shape[-1]).contiguous(), task, scale,
                                                mixed, side_A, side_B)
        ctx.scale, ctx.mixed, ctx.x_shape = scale, mixed, x.shape
        ctx.save_for_backward(x3, h, task, *sides)
        return y.view(out.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        x3, h, task, *sides = ctx.saved_tensors
        g = grad_y.reshape(x3.shape[0], -1, grad_y.shape[-1]).contiguous()
        gx, *grads = extension().kron_lowrank_backward(g, x3, h, task, ctx.scale, ctx.mixed, sides[:7], sides[7:],
                                                       ctx.needs_input_grad[0])
        grads = [gr if need else None for gr, need in zip(grads, ctx.needs_input_grad[5:])]
        return (None if gx is None else gx.view(ctx.x_shape)), grad_y, None, None, None, *grads
