"""The fused low-rank update of the tensor adapters (kron_kernel.KronLowRank, csrc/kron_lowrank.cpp)
against the update written out with the factors materialised, and the model with it."""
import pytest
import torch

from conftest import adapted, batch, on_one_and_several_threads
from tensorpoly import kron_kernel
from tensorpoly.tensor_product import kron_rows

needs_kernel = pytest.mark.skipif(kron_kernel.extension() is None,
                                  reason=f"the fused kernel could not be built here: {kron_kernel._STATE.failed}")


def factor_rows(side, d, mixed):
    """Independent computation: every expert's (or task's) Kronecker rows, cut to d, scaled and mixed
    term by term, then the affine part: W (mixture - m) + sigma beta."""
    c, P, Q, W, beta, m, sigma = side
    products = kron_rows(P, Q)[..., :d]  # [S or U, R, d]
    if mixed:
        rows = torch.einsum("usr,srd->urd", c if c.dim() == 3 else c.unsqueeze(-1).expand(*c.shape, P.shape[1]),
                            products)
    elif c is None:
        rows = products
    else:
        rows = products * (c[:, 0] if c.dim() == 3 else c).unsqueeze(-1)
    if m is not None:
        rows = rows - m.unsqueeze(-1)
    if W is not None:
        rows = W[:, :d] * rows + sigma[:, None, None] * beta[:, :d]
    return rows


def update_written_out(x, out, task, rank, A, B, mixed):
    """out + (1/rank) (x A_u) B_u with A_u, B_u materialised and gathered per example."""
    d_in, d_out = x.shape[-1], out.shape[-1]
    At, Bt = factor_rows(A, d_in, mixed)[task], factor_rows(B, d_out, mixed)[task]  # [n, R, d]
    h = torch.einsum("ntd,nrd->ntr", x, At) / rank
    return out + torch.einsum("ntr,nrd->ntd", h, Bt)


def side(mixed, U, S, R, p, q, dtype, g, coefficient="task", affine_rows=None):
    """One side's 7 entries. coefficient: "task" (c [U, S]: TensorPoly-I's w; plain: none), "row"
    (c [U, S, R]; plain: [U, 1, R]). affine_rows: None, the rows of W and beta (1 or R), or "shift"
    (m only: an identity affine)."""
    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_()

    experts = S if mixed else U
    P, Q = rand(experts, R, p), rand(experts, R, q)
    if coefficient == "row":
        c = rand(U, S if mixed else 1, R)
    else:
        c = torch.softmax(torch.randn(U, S, generator=g, dtype=dtype), -1).requires_grad_() if mixed else None
    affine = (None,) * 4
    if affine_rows == "shift":
        affine = (None, None, rand(U, R), None)
    elif affine_rows:
        affine = (rand(affine_rows, p * q), rand(affine_rows, p * q), rand(U, R), rand(U))
    return (c, P, Q, *affine)


# (n, T, d_in, d_out, R, S, U, (p, q) of A, (p, q) of B): d not a multiple of the lanes, p*q > d (a cut),
# rank below, at, between and above whole vectors, one task for all examples, T5-small's shapes,
SHAPES = [(5, 7, 37, 53, 5, 3, 3, (7, 6), (6, 9)), (3, 3, 20, 20, 17, 2, 1, (5, 4), (4, 5)),
          (4, 9, 33, 17, 40, 2, 4, (6, 6), (5, 4)), (6, 5, 16, 48, 16, 4, 2, (4, 4), (7, 7)),
          (3, 12, 512, 1024, 16, 8, 3, (21, 25), (41, 25)),
          # chunks of 1 to 5 vectors (q 5, 21, 41, 70: the row builder's unrolled and general cases) and
          # order 4's long p (chunks built eight at a time, with a remainder)
          (2, 3, 512, 150, 16, 8, 2, (103, 5), (3, 70)), (2, 2, 40, 123, 3, 2, 2, (2, 21), (3, 41))]
# (coefficient, affine rows): order 3 and up (bare mixture), order 2 (LayerNorm'd pairs, joint or row scope).
FORMS = [("task", None), ("row", "R"), ("task", 1), ("row", "shift")]


@needs_kernel
@pytest.mark.parametrize("mixed", [True, False], ids=["mixed", "plain"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("form", FORMS, ids=["bare", "affine-rows", "affine-shared", "shift"])
def test_fused_update_equals_the_update_with_materialised_factors(mixed, dtype, shape, form):
    n, T, d_in, d_out, R, S, U, (pa, qa), (pb, qb) = shape
    coefficient, affine = form
    affine = R if affine == "R" else affine
    g = torch.Generator().manual_seed(n * T + R)
    A = side(mixed, U, S, R, pa, qa, dtype, g, coefficient, affine)
    B = side(mixed, U, S, R, pb, qb, dtype, g, coefficient, affine)
    x = torch.randn(n, T, d_in, generator=g, dtype=dtype).requires_grad_()
    out = torch.randn(n, T, d_out, generator=g, dtype=dtype).requires_grad_()
    task = torch.randint(0, U, (n,), generator=g)  # unsorted, repeated tasks
    want = update_written_out(x, out, task, R, A, B, mixed)
    got = kron_kernel.KronLowRank.apply(x, out, task, 1.0 / R, mixed, *A, *B)
    # float32 sums of hundreds of terms: compared against the size of the tensor's largest entry.
    eps = 1e-12 if dtype == torch.float64 else 3e-5

    def close(a, b):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert (a - b).abs().max() <= eps * b.abs().max(), (a - b).abs().max() / b.abs().max()

    close(got, want)
    inputs = [t for t in (x, out, *A, *B) if t is not None]
    grad = torch.randn(want.shape, generator=g, dtype=dtype)
    for a, b in zip(torch.autograd.grad(got, inputs, grad), torch.autograd.grad(want, inputs, grad)):
        close(a, b)


@needs_kernel
@pytest.mark.parametrize("mixed", [True, False], ids=["mixed", "plain"])
@pytest.mark.parametrize("form", FORMS, ids=["bare", "affine-rows", "affine-shared", "shift"])
def test_gradcheck_fused_update(mixed, form):
    g = torch.Generator().manual_seed(3)
    coefficient, affine = form
    affine = 3 if affine == "R" else affine
    A = side(mixed, 2, 3, 3, 3, 2, torch.float64, g, coefficient, affine)
    B = side(mixed, 2, 3, 3, 2, 3, torch.float64, g, coefficient, affine)
    x = torch.randn(3, 2, 5, generator=g, dtype=torch.float64).requires_grad_()
    out = torch.randn(3, 2, 6, generator=g, dtype=torch.float64).requires_grad_()
    task = torch.tensor([1, 0, 1])
    entries = [t is not None for t in A + B]
    inputs = [t for t in (x, out, *A, *B) if t is not None]

    def update(x, out, *present):
        present = iter(present)
        sides = [next(present) if there else None for there in entries]
        return kron_kernel.KronLowRank.apply(x, out, task, 1 / 3, mixed, *sides)

    assert torch.autograd.gradcheck(update, inputs)


@needs_kernel
def test_input_without_gradient_and_low_rank_helper_task_rows():
    """x that needs no gradient (the first adapted layer's input) gets none; low_rank maps rows to tasks
    by inverse, by position (one task per row) or to the only task."""
    g = torch.Generator().manual_seed(4)
    A, B = side(False, 3, 1, 4, 3, 3, torch.float64, g), side(False, 3, 1, 4, 3, 3, torch.float64, g)
    x = torch.randn(3, 2, 9, generator=g, dtype=torch.float64)
    out = torch.randn(3, 2, 9, generator=g, dtype=torch.float64)
    inverse = torch.tensor([2, 2, 0])
    for rows, got in ((inverse, kron_kernel.low_rank(x, out, inverse, 4, False, A, B)),
                      (torch.arange(3), kron_kernel.low_rank(x, out, None, 4, False, A, B))):
        torch.testing.assert_close(got, update_written_out(x, out, rows, 4, A, B, False), rtol=1e-12, atol=1e-12)
    one = tuple(None if t is None else t[:1] for t in A), tuple(None if t is None else t[:1] for t in B)
    got = kron_kernel.low_rank(x, out, None, 4, False, *one)
    torch.testing.assert_close(got, update_written_out(x, out, torch.zeros(3, dtype=torch.long), 4, *one, False))
    grads = torch.autograd.grad(got.sum(), [one[0][1], one[1][2]])
    assert all(torch.isfinite(t).all() and t.abs().sum() > 0 for t in grads)


@needs_kernel
def test_bad_inputs_are_refused_before_any_work():
    g = torch.Generator().manual_seed(5)
    A, B = side(True, 2, 3, 4, 3, 3, torch.float64, g), side(True, 2, 3, 4, 3, 3, torch.float64, g)
    x, out = torch.zeros(2, 1, 9, dtype=torch.float64), torch.zeros(2, 1, 9, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="task index out of range"):
        kron_kernel.KronLowRank.apply(x, out, torch.tensor([0, 2]), 0.25, True, *A, *B)
    short = (A[0], A[1][..., :2].contiguous(), *A[2:])
    with pytest.raises(RuntimeError, match="p\\*q = 6 is shorter than d = 9"):
        kron_kernel.KronLowRank.apply(x, out, torch.tensor([0, 1]), 0.25, True, *short, *B)
    with pytest.raises(RuntimeError, match="mixed operands need c"):
        kron_kernel.KronLowRank.apply(x, out, torch.tensor([0, 1]), 0.25, True, None, *A[1:], *B)


@needs_kernel
def test_several_threads_give_the_single_thread_results():
    """The backward pass splits the examples over threads, each with its own gradient sums."""
    g = torch.Generator().manual_seed(6)
    A, B = side(True, 3, 4, 5, 4, 3, torch.float64, g, "row", 5), side(True, 3, 4, 5, 3, 4, torch.float64, g, "row", 1)
    x = torch.randn(7, 3, 12, generator=g, dtype=torch.float64).requires_grad_()
    out = torch.randn(7, 3, 12, generator=g, dtype=torch.float64)
    task = torch.tensor([0, 2, 1, 0, 0, 2, 1])

    def run():
        y = kron_kernel.KronLowRank.apply(x, out, task, 0.2, True, *A, *B)
        return (y, *torch.autograd.grad((y ** 2).sum(), [t for t in (x, *A, *B) if t is not None]))

    one, several = on_one_and_several_threads(run)
    for a, b in zip(one, several):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)


def saved_bytes(model, task_ids) -> int:
    """Bytes of the tensors autograd keeps for the backward pass of one training forward."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    input_ids, labels = batch(len(task_ids))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=input_ids, labels=labels, task_ids=torch.tensor(task_ids)).loss
    return total


@needs_kernel
@pytest.mark.parametrize("module_type", ["tensorpoly1", "tensorpoly2"])
def test_fused_update_keeps_no_factors_for_the_backward_pass(module_type):
    model = adapted(module_type, order=4).train()
    task_ids = [2, 0, 3, 1]
    fused = saved_bytes(model, task_ids)
    with kron_kernel.fused_kernels(True, low_rank=False):
        materialised = saved_bytes(model, task_ids)
    layers = [m for m in model.modules() if hasattr(m, "leaves_A")]
    factors = sum(len(task_ids) * m.rank * (m.in_features + m.out_features) * 8 for m in layers)
    assert fused <= materialised - 0.9 * factors, (fused, materialised, factors)
