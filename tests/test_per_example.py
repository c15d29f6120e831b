"""The fast path (grouped, per distinct task) equals the literal per-example algorithm of the paper code.

tensorpoly/per_example.py builds every example's factors at every layer and applies them with a
per-example bmm, with plain autograd. Same parameters, float64: equal logits and equal gradients
for every parameter, whichever of the fast path's branches runs.
"""
import copy

import pytest
import torch

from conftest import adapted, batch
from tensorpoly import kron_kernel
from tensorpoly.per_example import per_example


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny float64 ops: a second intra-op thread only adds synchronisation (on a busy 2-core
    # machine, 100x slower). Restored afterwards for the other test modules.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

CASES = [
    ("tensorpoly1", dict(order=2)),
    ("tensorpoly1", dict(order=4)),
    ("tensorpoly1", dict(order=3, share_norm=False)),
    ("tensorpoly1", dict(order=4, norm_over_padding=False, granularity="block")),
    ("tensorpoly2", dict(order=2, norm_affine_trainable=True)),
    ("tensorpoly2", dict(order=4)),
    ("tensorpoly2", dict(order=4, norm="row", norm_affine_trainable=True)),
    ("tensorpoly2", dict(order=1)),
]
# Repeated tasks (factors gathered per row) and all-distinct tasks (factors in row order).
TASK_IDS = {"repeated": [2, 0, 2, 3, 1], "distinct": [3, 0, 1, 2]}


def run(model, task_ids):
    model.zero_grad(set_to_none=True)
    n = len(task_ids)
    input_ids, labels = batch(n)
    out = model(input_ids=input_ids, labels=labels, task_ids=torch.tensor(task_ids))
    out.loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach(), grads


def assert_grads_equal(fast, literal, tol=1e-10):
    assert fast.keys() == literal.keys()
    for name, want in literal.items():
        got = fast[name]
        assert got is not None and want is not None, name
        scale = want.abs().max().item()
        assert scale > 0, name
        assert (got - want).abs().max().item() <= tol * max(scale, 1.0), name


# How a group builds its members' factors: all of them at once (the default), small pieces that each
# layer finishes itself, or those pieces with the factors rebuilt in the backward pass.
BUILDS = {"whole": dict(), "layerwise": dict(whole_factors=False), "recompute": dict(recompute_factors=True)}


# The primitives both sides build their factors with: PyTorch's ops, or our fused CPU kernel. Two correct
# float64 LayerNorms can differ by ~1e-10 once 1/sigma amplifies their rounding (tensorpoly2 order 2
# with a trainable affine: 1.7e-10 between the kernel and the ops), so each side uses the same one
# here; tests/test_kron_kernel.py compares the kernel with the ops.
KERNELS = ["ops"] + (["fused"] if kron_kernel.extension() is not None else [])
# With the kernels, the fast path's order-2 pairs are never built: their LayerNorm's statistics come
# from the leaves' (adapters/tlora.py folded_pair_norm), another correct LayerNorm than the literal
# side's (both within 6e-16 of extended precision on their own). In this ill-conditioned case they
# differ by up to 1.4e-10 of the largest gradient.
TOLERANCE = {("tensorpoly2", "fused", 2): 3e-10}


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("build", sorted(BUILDS))
@pytest.mark.parametrize("layout", sorted(TASK_IDS))
@pytest.mark.parametrize("module_type,fields", CASES, ids=[f"{t}-{f}" for t, f in CASES])
def test_fast_path_equals_literal_per_example(module_type, fields, layout, build, kernels):
    model = adapted(module_type, **fields).train()
    literal = per_example(copy.deepcopy(model), fused_kernels=kernels == "fused")
    for name, value in BUILDS[build].items():
        setattr(model.task_routing, name, value)
    with kron_kernel.fused_kernels(kernels == "fused"):
        fast_logits, fast_grads = run(model, TASK_IDS[layout])
        literal_logits, literal_grads = run(literal, TASK_IDS[layout])
    torch.testing.assert_close(fast_logits, literal_logits, rtol=0, atol=1e-10)
    assert_grads_equal(fast_grads, literal_grads, TOLERANCE.get((module_type, kernels, fields["order"]), 1e-10))
    # Every adapted layer went through its group, none through the per-layer path.
    assert all(adapter._group is not None for _, adapter in model.adapters())


def test_per_example_keeps_parameters_and_refuses_other_types():
    model = adapted("tensorpoly2", order=4)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    literal = per_example(copy.deepcopy(model))
    assert literal.state_dict().keys() == state.keys()
    assert all(torch.equal(literal.state_dict()[k], v) for k, v in state.items())
    with pytest.raises(TypeError, match="tensorpoly1/tensorpoly2"):
        per_example(adapted("poly"))


def test_grouping_off_and_on_agree_for_every_type():
    for module_type in ("tlora", "poly", "mhr", "tensorpoly1", "tensorpoly2"):
        model = adapted(module_type, order=4)
        ids = torch.tensor([1, 3, 1]) if model.config.routed else None
        input_ids, labels = batch(3)
        with torch.no_grad():
            fast = model(input_ids=input_ids, labels=labels, task_ids=ids).logits
            model.task_routing.grouping = False
            simple = model(input_ids=input_ids, labels=labels, task_ids=ids).logits
        torch.testing.assert_close(fast, simple, rtol=0, atol=1e-10, msg=module_type)


def test_members_of_mixed_dtypes_fall_back_to_their_own_factors():
    model = adapted("tensorpoly1", order=4)
    input_ids, labels = batch(3)
    ids = torch.tensor([0, 2, 2])
    with torch.no_grad():
        want = model(input_ids=input_ids, labels=labels, task_ids=ids).logits
        member = dict(model.adapters())["encoder.block.0.layer.0.SelfAttention.q"]
        for p in member.factor_parameters():  # one member's factors in float32: no stacking with the others
            p.data = p.data.float()
        got = model(input_ids=input_ids, labels=labels, task_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_stochastic_routing_trains_through_the_groups():
    model = adapted("tensorpoly2", order=4, relaxed_bernoulli=True).train()
    input_ids, labels = batch(4)
    torch.manual_seed(0)
    model(input_ids=input_ids, labels=labels, task_ids=torch.tensor([1, 1, 2, 0])).loss.backward()
    roles = model.parameter_roles()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in roles["adapter"] + roles["router"])
