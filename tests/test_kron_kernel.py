"""The fused CPU kernel of a group's last Kronecker product (tensorpoly/kron_kernel.py) against the
PyTorch ops it replaces, and the model with it against the model without it."""
import warnings

import pytest
import torch

from conftest import adapted, batch, on_one_and_several_threads
from tensorpoly import kron_kernel
from tensorpoly.kron_kernel import SCOPES
from tensorpoly.adapters.tlora import MemberRows, pair_stats
from tensorpoly.tensor_product import StackedNorms, kron_rows, make_pair_norms, pair_norm

needs_kernel = pytest.mark.skipif(kron_kernel.extension() is None,
                                  reason=f"the fused kernel could not be built here: {kron_kernel._STATE.failed}")


def torch_members(w, P, Q, d, transpose):
    """Independent computation: the mixture written out expert by expert, then cut to d."""
    if w is None:
        rows = kron_rows(P, Q)  # [G, U, r, p*q]
    else:
        experts = kron_rows(P, Q)  # [G, S, r, p*q]
        rows = torch.einsum("gus,gsrl->gurl", w, experts)
    return MemberRows.apply(rows, d, transpose)


def operands(mixed, G, U, S, r, p, q, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    experts = S if mixed else U
    w = torch.rand(G, U, S, generator=g, dtype=dtype).requires_grad_() if mixed else None
    P = torch.randn(G, experts, r, p, generator=g, dtype=dtype).requires_grad_()
    Q = torch.randn(G, experts, r, q, generator=g, dtype=dtype).requires_grad_()
    return w, P, Q


# (G, U, S, r, p, q, d): q below, at and above a vector's lanes; d cutting the last chunk or none.
SHAPES = [(3, 4, 5, 3, 7, 6, 40), (2, 3, 2, 4, 21, 25, 512), (2, 1, 8, 2, 3, 5, 15), (1, 2, 3, 2, 4, 8, 32),
          (2, 2, 9, 2, 5, 17, 81)]


@needs_kernel
@pytest.mark.parametrize("mixed", [True, False], ids=["mixed", "plain"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("transpose", [False, True])
def test_kernel_equals_pytorch_ops_values_and_gradients(mixed, dtype, shape, transpose):
    G, U, S, r, p, q, d = shape
    w, P, Q = operands(mixed, G, U, S, r, p, q, dtype, seed=sum(shape))
    inputs = [t for t in (w, P, Q) if t is not None]
    want = torch_members(w, P, Q, d, transpose)
    got = kron_kernel.KronRows.apply(w, P, Q, d, transpose)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    assert len(got) == G
    for a, b in zip(got, want):
        assert a.shape == b.shape == ((U, d, r) if transpose else (U, r, d))
        torch.testing.assert_close(a, b, **tol)
    # One member gets no gradient (unused in the loss); another's is laid out with a non-unit last stride.
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(b.shape, generator=g, dtype=dtype) for b in want]
    if G > 1:
        grads[1] = torch.randn(tuple(reversed(want[1].shape)), generator=g, dtype=dtype).permute(2, 1, 0)
    used = range(1, G) if G > 1 else range(G)
    want_grads = torch.autograd.grad([want[i] for i in used], inputs, [grads[i] for i in used])
    got_grads = torch.autograd.grad([got[i] for i in used], inputs, [grads[i] for i in used])
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, **tol)


@needs_kernel
def test_gradcheck_mixed_and_plain():
    for mixed in (True, False):
        w, P, Q = operands(mixed, 2, 3, 2, 2, 3, 5, torch.float64, seed=3)
        inputs = tuple(t for t in (w, P, Q) if t is not None)

        def f(*args):
            return kron_kernel.KronRows.apply(*(args if mixed else (None, *args)), 13, True)

        assert torch.autograd.gradcheck(f, inputs)


@needs_kernel
@pytest.mark.parametrize("scope", ["joint", "row", "none"])
@pytest.mark.parametrize("used", [None, 7])
@pytest.mark.parametrize("stacked", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_normed_pair_equals_pytorch_ops(scope, used, stacked, dtype):
    """LN(a ⊗ b) with its affine, per layer when stacked, statistics over the first `used` entries or all."""
    g = torch.Generator().manual_seed(7)
    G, E, r, l = 3, 2, 4, 3
    a = torch.randn(G, E, r, l, generator=g, dtype=dtype).requires_grad_()
    b = torch.randn(G, E, r, l, generator=g, dtype=dtype).requires_grad_()
    norms = [make_pair_norms(2, r, l, scope, True, 1e-5, affine_trainable=True, dtype=dtype) for _ in range(G)]
    with torch.no_grad():
        for norm in (n for layer in norms for n in layer):
            norm.weight.add_(0.5 * torch.randn(norm.weight.shape, generator=g, dtype=dtype))
            norm.bias.add_(0.5 * torch.randn(norm.bias.shape, generator=g, dtype=dtype))
    over_padding = used is None
    if scope == "none":
        weight = bias = None
        want = kron_rows(a, b)
    elif stacked:
        stack = StackedNorms(norms, lead=1)
        _, eps, _, weight, bias = stack.norms[0]
        want = pair_norm(kron_rows(a, b), used, scope, 1e-5, over_padding, weight, bias, fused=False)
    else:  # one norm for every block
        a, b = a[0], b[0]
        weight, bias = norms[0][0].weight, norms[0][0].bias
        want = pair_norm(kron_rows(a, b), used, scope, 1e-5, over_padding, weight, bias)
    got = kron_kernel.normed_pair(a, b, used or l * l, scope, 1e-5, weight, bias)
    tol = dict(rtol=1e-11, atol=1e-11) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(got, want, **tol)
    leaves = [t for t in (a, b) if t.requires_grad]
    params = [p for layer in norms for n in layer for p in (n.weight, n.bias)] if scope != "none" else []
    grad = torch.randn(want.shape, generator=g, dtype=dtype)
    want_grads = torch.autograd.grad(want, leaves + params, grad, allow_unused=True)
    got_grads = torch.autograd.grad(got, leaves + params, grad, allow_unused=True)
    for x, y in zip(got_grads, want_grads):
        assert (x is None) == (y is None)
        if x is not None:
            torch.testing.assert_close(x, y, **tol)


@needs_kernel
@pytest.mark.parametrize("scope", ["joint", "row"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("lengths", [(5, 5), (3, 7), (23, 23)])
def test_normed_pair_without_affine_equals_layer_norm(scope, dtype, lengths):
    """No affine, statistics over every entry (the paper's frozen identity): the kernel takes the
    statistics from the leaves and reduces the gradient through per-row dots; against F.layer_norm of
    the written-out products, with offsets in the leaves so that the means matter."""
    g = torch.Generator().manual_seed(11)
    la, lb = lengths
    a = (torch.randn(6, 4, la, generator=g, dtype=dtype) + 0.7).requires_grad_()
    b = (torch.randn(6, 4, lb, generator=g, dtype=dtype) - 0.4).requires_grad_()
    got = kron_kernel.normed_pair(a, b, la * lb, scope, 1e-5, None, None)
    z = kron_rows(a, b)
    want = torch.nn.functional.layer_norm(z, tuple(z.shape[-2:]) if scope == "joint" else z.shape[-1:], eps=1e-5)
    tol = dict(rtol=1e-11, atol=1e-11) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(got, want, **tol)
    grad = torch.randn(want.shape, generator=g, dtype=dtype)
    for x, y in zip(torch.autograd.grad(got, (a, b), grad), torch.autograd.grad(want, (a, b), grad)):
        torch.testing.assert_close(x, y, **tol)
    if dtype == torch.float64:
        assert torch.autograd.gradcheck(
            lambda x, y: kron_kernel.PairNorm.apply(x, y, None, None, SCOPES[scope], la * lb, 1e-5), (a[:2], b[:2]))


def stats_written_out(a, b, scope, eps):
    """Independent computation: the statistics over the written-out products a ⊗ b."""
    z = kron_rows(a, b)  # [..., r, la lb]
    dims = (-2, -1) if scope == "joint" else (-1,)
    var, mean = torch.var_mean(z, dims, unbiased=False, keepdim=True)
    rstd = torch.rsqrt(var + eps)
    return (rstd * torch.ones_like(z[..., :1])).squeeze(-1), (mean * rstd * torch.ones_like(z[..., :1])).squeeze(-1)


@needs_kernel
@pytest.mark.parametrize("scope", ["joint", "row"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "ops"])
def test_pair_stats_equal_the_statistics_of_the_products(scope, dtype, kernel):
    """rstd and mean * rstd of LN(a ⊗ b) from the leaves (order 2's folded norm), by the kernel and by the
    PyTorch ops, against the statistics of the written-out products: values and gradients."""
    g = torch.Generator().manual_seed(5)
    a = (torch.randn(3, 2, 4, 5, generator=g, dtype=dtype) + 0.8).requires_grad_()
    b = (torch.randn(3, 2, 4, 7, generator=g, dtype=dtype) - 0.3).requires_grad_()
    with kron_kernel.fused_kernels(kernel):
        got = pair_stats(a, b, scope, 1e-5)
    want = stats_written_out(a, b, scope, 1e-5)
    tol = dict(rtol=1e-11, atol=1e-11) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    weights = [torch.randn(want[0].shape, generator=g, dtype=dtype) for _ in range(2)]
    got_grads = torch.autograd.grad(sum((t * w).sum() for t, w in zip(got, weights)), (a, b))
    want_grads = torch.autograd.grad(sum((t * w).sum() for t, w in zip(want, weights)), (a, b))
    for x, y in zip(got + got_grads, want + want_grads):
        torch.testing.assert_close(x, y, **tol)
    if kernel and dtype == torch.float64:
        assert torch.autograd.gradcheck(lambda x, y: kron_kernel.PairStats.apply(x, y, SCOPES[scope], 1e-5),
                                        (a[0].detach().requires_grad_(), b[0].detach().requires_grad_()))


@needs_kernel
def test_gradcheck_normed_pair():
    g = torch.Generator().manual_seed(2)
    a, b = (torch.randn(2, 3, 3, generator=g, dtype=torch.float64).requires_grad_() for _ in range(2))
    W = torch.randn(2, 3, 9, generator=g, dtype=torch.float64).requires_grad_()
    beta = torch.randn(2, 3, 9, generator=g, dtype=torch.float64).requires_grad_()
    for scope, used in ((1, 9), (1, 5), (2, 9), (2, 4), (0, 9)):
        assert torch.autograd.gradcheck(lambda *x: kron_kernel.PairNorm.apply(*x, scope, used, 1e-5), (a, b, W, beta))


def assert_grad_close(got, want, name):
    """Equal up to rounding, entry by entry against the size of the gradient's largest entry: the
    kernels sum in another order than the ops (one LayerNorm's 1/sigma amplifies that to ~1e-12)."""
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10 * want.abs().max().item(), msg=name)


def run_step(model, task_ids):
    model.zero_grad(set_to_none=True)
    input_ids, labels = batch(len(task_ids))
    out = model(input_ids=input_ids, labels=labels, task_ids=torch.tensor(task_ids))
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads


@needs_kernel
@pytest.mark.parametrize("module_type,fields", [
    ("tensorpoly1", dict(order=4)), ("tensorpoly2", dict(order=4)), ("tensorpoly1", dict(order=3, share_norm=False)),
    ("tensorpoly2", dict(order=5)), ("tlora", dict(order=4)), ("tensorpoly1", dict(order=2)),
    ("tensorpoly2", dict(order=4, norm="row", norm_affine_trainable=True)),
    ("tensorpoly1", dict(order=4, norm_over_padding=False, norm_affine_trainable=True)),
    ("tensorpoly2", dict(order=2, norm="row", norm_affine_trainable=True)), ("tlora", dict(order=2, norm="none")),
    ("tensorpoly1", dict(order=2, norm="row")), ("tensorpoly2", dict(order=2, norm_over_padding=False))])
def test_model_with_kernel_equals_model_without(module_type, fields, monkeypatch):
    calls = {}
    for function in (kron_kernel.KronRows, kron_kernel.PairNorm, kron_kernel.KronLowRank):
        monkeypatch.setattr(function, "apply", lambda *a, apply=function.apply, f=function.__name__:
                            calls.setdefault(f, []).append(a) or apply(*a))
    model = adapted(module_type, **fields).train()
    task_ids = [2, 0, 2, 3] if module_type != "tlora" else [0, 0, 0]
    with kron_kernel.fused_kernels(False):
        logits_off, grads_off = run_step(model, task_ids)
    assert not calls
    logits_on, grads_on = run_step(model, task_ids)
    assert calls, "the factor construction did not reach the fused kernels"
    # Every adapted layer's update is the fused one (its factors never stored): from order 3 on the last
    # Kronecker product, at order 2 the normalised pair, unless its statistics skip the padding.
    layers = sum(hasattr(m, "leaves_A") for m in model.modules())
    folded = model.config.order > 2 or model.config.norm_over_padding
    assert len(calls.get("KronLowRank", [])) == (layers if folded else 0)
    torch.testing.assert_close(logits_on, logits_off, rtol=1e-12, atol=1e-12)
    assert grads_on.keys() == grads_off.keys()
    for name in grads_on:
        assert_grad_close(grads_on[name], grads_off[name], name)


@needs_kernel
@pytest.mark.parametrize("module_type", ["tensorpoly1", "tensorpoly2", "tlora"])
@pytest.mark.parametrize("build", [dict(whole_factors=False), dict(recompute_factors=True), dict()],
                         ids=["layerwise", "recompute", "whole"])
def test_factors_materialised_or_fused_equal_the_ops(module_type, build, monkeypatch):
    """Without the fused update, each member finishing its own rows (and rebuilding them in the backward
    pass) runs the construction kernel on its slice of the group's operands; with it, any build runs
    the fused update from the same slices. Both equal the PyTorch ops."""
    calls = []
    apply = kron_kernel.KronRows.apply
    monkeypatch.setattr(kron_kernel.KronRows, "apply", lambda *a: calls.append(a) or apply(*a))
    model = adapted(module_type, order=4).train()
    for name, value in build.items():
        setattr(model.task_routing, name, value)
    task_ids = [2, 0, 2, 3] if module_type != "tlora" else [0, 0, 0]
    with kron_kernel.fused_kernels(False):
        logits_off, grads_off = run_step(model, task_ids)
    with kron_kernel.fused_kernels(True, low_rank=False):
        logits_on, grads_on = run_step(model, task_ids)
    if build:
        assert calls and all(call[1].shape[0] == 1 for call in calls)  # one member per call
    else:
        assert calls and all(call[1].shape[0] > 1 for call in calls)  # one call per group
    calls.clear()
    logits_fused, grads_fused = run_step(model, task_ids)
    assert not calls  # nothing materialised
    for logits, grads in ((logits_on, grads_on), (logits_fused, grads_fused)):
        torch.testing.assert_close(logits, logits_off, rtol=1e-12, atol=1e-12)
        assert grads.keys() == grads_off.keys()
        for name in grads:
            assert_grad_close(grads[name], grads_off[name], name)


def test_operands_the_kernel_does_not_take_use_pytorch_ops():
    P = torch.randn(1, 1, 2, 3)
    assert not kron_kernel.usable(P.bfloat16(), P.bfloat16())
    assert not kron_kernel.usable(P, P.double())  # mixed dtypes
    with kron_kernel.fused_kernels(False):
        assert not kron_kernel.usable(P, P)


def test_a_failed_build_warns_once_and_falls_back(monkeypatch):
    import torch.utils.cpp_extension as cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler found (simulated)")

    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    monkeypatch.setattr(kron_kernel, "_STATE", kron_kernel._State())
    with pytest.warns(UserWarning, match="could not be built.*TENSORPOLY_FUSED_KERNELS=0.*simulated"):
        assert kron_kernel.extension() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second attempt, no second warning
        assert kron_kernel.extension() is None
        P = torch.randn(1, 1, 2, 3)
        assert not kron_kernel.usable(P, P)
    # The model still trains, through the PyTorch ops.
    model = adapted("tensorpoly2", order=4).train()
    logits, grads = run_step(model, [1, 0])
    assert torch.isfinite(logits).all() and grads


@needs_kernel
def test_several_threads_give_the_single_thread_results():
    """The kernels split their work over torch's threads: no two threads write the same gradient."""
    w, P, Q = operands(True, 4, 3, 5, 6, 7, 6, torch.float64, seed=5)
    g = torch.Generator().manual_seed(4)
    a, b = (torch.randn(4, 6, 5, generator=g, dtype=torch.float64).requires_grad_() for _ in range(2))
    W = torch.randn(2, 6, 25, generator=g, dtype=torch.float64).requires_grad_()
    beta = torch.randn(2, 6, 25, generator=g, dtype=torch.float64).requires_grad_()

    def run():
        rows = kron_kernel.KronRows.apply(w, P, Q, 40, False)
        plain = kron_kernel.KronRows.apply(None, P, Q, 40, True)
        pair = kron_kernel.PairNorm.apply(a, b, W, beta, 1, 20, 1e-5)
        loss = sum((m ** 2).sum() for m in rows + plain) + (pair ** 3).sum()
        return torch.autograd.grad(loss, [w, P, Q, a, b, W, beta])

    one, several = on_one_and_several_threads(run)
    for x, y in zip(several, one):
        torch.testing.assert_close(x, y, rtol=1e-13, atol=1e-13)


@needs_kernel
@pytest.mark.parametrize("module_type", ["tensorpoly1", "tensorpoly2", "tlora"])
@pytest.mark.parametrize("norm", ["joint", "row", "none"])
def test_order_2_folded_norm_materialises_to_the_normalised_pairs(module_type, norm):
    """At order 2 the group hands out leaf pairs with their norm folded in (KronFactors); materialised
    by PyTorch ops (where the fused update cannot run) they are each layer's own rows."""
    from tensorpoly.adapters.tlora import KronFactors

    model = adapted(module_type, order=2, norm=norm, norm_affine_trainable=True)
    ids = torch.tensor([2, 0, 3]) if model.config.routed else None
    for group in model.task_routing._groups.values():
        for member, factors in zip(group.members, group.build(ids)):
            assert isinstance(factors, KronFactors)
            want = member.factors(None if ids is None else member.router(ids))
            for got, expected in zip(factors.materialize(), want):
                torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def check_identity_affine_left_out(model, function, affine_at: int, change) -> None:
    """Every pair norm's affine set to the identity, then changed in place by change(first norm): the
    kernel `function` gets no affine (its argument affine_at is None) before the change and some after,
    and the model's logits and gradients equal the PyTorch ops' both times."""
    calls = []
    apply = function.apply
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(function, "apply", lambda *a: calls.append(a) or apply(*a))
        norms = [n for _, adapter in model.adapters() for side in ("A", "B") for n in getattr(adapter, f"norms_{side}")]
        assert norms and not any(n.weight.requires_grad for n in norms)
        with torch.no_grad():
            for n in norms:
                n.weight.fill_(1.0)
                n.bias.zero_()
        task_ids = [2, 0, 2, 3]
        for changed in (False, True):
            if changed:
                with torch.no_grad():
                    change(norms[0])
            calls.clear()
            with kron_kernel.fused_kernels(False):
                logits_off, grads_off = run_step(model, task_ids)
            logits_on, grads_on = run_step(model, task_ids)
            assert calls and any(call[affine_at] is not None for call in calls) == changed
            torch.testing.assert_close(logits_on, logits_off, rtol=1e-12, atol=1e-12)
            for name in grads_off:
                assert_grad_close(grads_on[name], grads_off[name], name)


@needs_kernel
@pytest.mark.parametrize("module_type", ["tensorpoly1", "tensorpoly2"])
def test_frozen_identity_norm_affine_is_left_out_only_while_it_is_one(module_type):
    """The paper's setting (LN affine frozen at the identity): the fused update gets no W or beta. Once a
    frozen affine is changed in place (say by loading a checkpoint), the next build uses it again
    (the first adapted layer's A side: its group now needs W)."""
    model = adapted(module_type, order=2).train()
    # side A's W: (x, out, task, scale, mixed, c, P, Q, W, ...)
    check_identity_affine_left_out(model, kron_kernel.KronLowRank, 8, lambda norm: norm.weight.mul_(1.5))


@needs_kernel
@pytest.mark.parametrize("module_type", ["tlora", "tensorpoly1", "tensorpoly2"])
def test_frozen_identity_affine_of_stacked_pair_norms_is_left_out_only_while_it_is_one(module_type):
    """From order 3 on the group's pair norms run stacked (StackedNorms): with every affine frozen at the
    identity no affine is stacked or applied; once one changes in place, the group applies them all."""
    model = adapted(module_type, order=4).train()
    # PairNorm.apply(a, b, W, beta, scope, used, eps)
    check_identity_affine_left_out(model, kron_kernel.PairNorm, 2, lambda norm: norm.bias.add_(0.25))
