"""The TLoRA construction against an independent computation (torch.kron, explicit statistics)."""
import math

import pytest
import torch
from torch import nn

from reference import reference_rows
from tensorpoly.tensor_product import build_rows, integer_root_ceil, leaf_length, make_pair_norms


@pytest.mark.parametrize("d,n,expected", [(2048, 2, 46), (2048, 4, 7), (5120, 2, 72), (5120, 4, 9),
                                          (1024, 4, 6), (2816, 4, 8), (2048, 1, 2048), (4096, 4, 8)])
def test_leaf_lengths_of_t5_dimensions(d, n, expected):
    assert leaf_length(d, n) == expected


def test_integer_root_is_exact_where_float_roots_fail():
    # 11**5 = 161051, and 161051 ** (1/5) is 11.000000000000002 on IEEE doubles: ceil gives 12.
    assert math.ceil(161051 ** (1 / 5)) == 12
    assert integer_root_ceil(161051, 5) == 11
    for d in range(1, 3000):
        for n in (1, 2, 3, 4, 5):
            q = integer_root_ceil(d, n)
            assert q**n >= d and (q == 1 or (q - 1) ** n < d)


@pytest.mark.parametrize("order", [1, 2, 3, 4, 5, 6])
@pytest.mark.parametrize("scope,shared", [("joint", True), ("joint", False), ("row", False), ("none", True)])
def test_build_rows_matches_kronecker_reference(order, scope, shared):
    torch.manual_seed(order)
    r, d = 3, 37
    leaf = leaf_length(d, order)
    leaves = torch.randn(order, r, leaf, dtype=torch.float64)
    norms = make_pair_norms(order, r, leaf, scope, shared, 1e-5, affine_trainable=True).double()
    with torch.no_grad():
        for norm in norms:
            norm.weight.add_(0.3 * torch.randn_like(norm.weight))
            norm.bias.add_(0.3 * torch.randn_like(norm.bias))
    got = build_rows(leaves, d, norms)
    want = reference_rows(leaves, d, None if scope == "none" or order < 2 else norms, scope, shared)
    assert got.shape == (r, d)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("order,d", [(2, 37), (3, 37), (4, 37), (4, 200), (2, 50)])
def test_uncut_rows_run_past_d_and_agree_on_the_first_d(order, d):
    """cut=False (the whole-group build, whose MemberRows does the cut): the last product is not cut
    either, so no slice (and no zero-filled gradient copy) is left inside; the first d entries are
    the rows, values and gradients."""
    torch.manual_seed(order)
    r, leaf = 3, leaf_length(d, order)
    norms = make_pair_norms(order, r, leaf, "joint", False, 1e-5, affine_trainable=True).double()
    source = torch.randn(order, r, leaf, dtype=torch.float64)
    results = []
    for cut in (True, False):
        leaves = source.clone().requires_grad_()
        rows = build_rows(leaves, d, norms, cut=cut)
        weight = torch.arange(d, dtype=torch.float64).sin()
        (rows[..., :d] * weight).sum().backward()
        results.append((rows, leaves.grad))
    (cut_rows, cut_grad), (uncut_rows, uncut_grad) = results
    assert cut_rows.shape[-1] == d and uncut_rows.shape[-1] > d  # these d are not powers of the leaf length
    # Slices of the short factors (entries that cannot reach d) stay; none of row length is left.
    slices = [n._saved_self_sym_sizes for n in graph_nodes(uncut_rows.grad_fn) if n.name().startswith("SliceBackward")]
    assert all(sizes[-1] < d for sizes in slices), slices
    cut_slices = [n for n in graph_nodes(cut_rows.grad_fn) if n.name().startswith("SliceBackward")]
    assert any(n._saved_self_sym_sizes[-1] > d for n in cut_slices)  # what cut=False saves
    torch.testing.assert_close(uncut_rows[..., :d], cut_rows, rtol=0, atol=0)
    torch.testing.assert_close(uncut_grad, cut_grad, rtol=1e-12, atol=1e-12)


def graph_nodes(fn) -> list:
    seen, stack = [], [fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.append(node)
            stack.extend(next_fn for next_fn, _ in node.next_functions)
    return seen


@pytest.mark.parametrize("order,d", [(2, 37), (4, 37), (4, 200), (3, 30), (6, 37), (2, 49)])
@pytest.mark.parametrize("scope", ["joint", "row"])
def test_norm_statistics_without_padding(order, d, scope):
    torch.manual_seed(d)
    leaf = leaf_length(d, order)
    leaves = torch.randn(order, 3, leaf, dtype=torch.float64)
    norms = make_pair_norms(order, 3, leaf, scope, False, 1e-5, False, over_padding=False).double()
    got = build_rows(leaves, d, norms)
    torch.testing.assert_close(got, reference_rows(leaves, d, norms, scope, shared=False), rtol=1e-12, atol=1e-12)
    with_padding = build_rows(leaves, d, make_pair_norms(order, 3, leaf, scope, False, 1e-5, False).double())
    # The options differ exactly when truncation drops entries of a normalised pair.
    assert torch.allclose(got, with_padding) == (leaf**order == d)


def test_batched_leaves_build_each_set_independently():
    leaves = torch.randn(5, 4, 2, 3, 4, dtype=torch.float64)  # [batch..., N, r, l]
    norms = make_pair_norms(4, 3, 4, "joint", True, 1e-5, False).double()
    got = build_rows(leaves, 200, norms)
    for idx in [(0, 0), (4, 1), (2, 0)]:
        torch.testing.assert_close(got[idx], build_rows(leaves[idx], 200, norms))


def test_order_one_has_no_norm_and_returns_the_leaves():
    leaves = torch.randn(1, 4, 9)
    assert len(make_pair_norms(1, 4, 9, "joint", True, 1e-5, False)) == 0
    torch.testing.assert_close(build_rows(leaves, 9, nn.ModuleList()), leaves[0])


def test_norm_counts_follow_the_paper_sharing():
    # TensorPoly-I shares one LN over both pairs at order 4; TensorPoly-II has one per pair.
    assert len(make_pair_norms(4, 16, 7, "joint", True, 1e-5, False)) == 1
    assert len(make_pair_norms(4, 16, 7, "joint", False, 1e-5, False)) == 2
    assert len(make_pair_norms(8, 16, 3, "joint", False, 1e-5, False)) == 4
    ln = make_pair_norms(2, 16, 46, "joint", True, 1e-5, False)[0]
    assert tuple(ln.weight.shape) == (16, 46 * 46) and not ln.weight.requires_grad


def test_joint_norm_is_eps_dominated_for_tiny_leaves():
    # The paper's inits give pair products with variance far below eps: LN ~ z / sqrt(eps).
    torch.manual_seed(0)
    bound = math.sqrt(1 / 3) / math.sqrt(2048)
    leaves = torch.empty(2, 16, 46, dtype=torch.float64).uniform_(-bound, bound)
    norms = make_pair_norms(2, 16, 46, "joint", True, 1e-5, False).double()
    rows = build_rows(leaves, 2048, norms)
    raw = reference_rows(leaves, 2048, None)
    ratio = (rows.std() / raw.std()).item()
    assert 0.9 / math.sqrt(1e-5) < ratio < 1.0 / math.sqrt(1e-5)


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_member_rows_match_autograd_slicing(transpose, layout):
    """MemberRows (the members' views of a group's uncut rows, with a hand-written backward) gives
    the values and gradients of plain slicing and unbinding, unused members included."""
    from tensorpoly.adapters.tlora import MemberRows

    G, U, r, L, d = 4, 3, 2, 11, 9
    torch.manual_seed(0)
    source = torch.randn(G, r, U, L, dtype=torch.float64) if layout == "transposed" else \
        torch.randn(G, U, r, L, dtype=torch.float64)
    weights = [torch.randn(U, d, r) if transpose else torch.randn(U, r, d) for _ in range(G)]
    grads = []
    for fn in ("member", "autograd"):
        base = source.clone().requires_grad_()
        rows = base.transpose(1, 2) if layout == "transposed" else base  # [G, U, r, L]
        if fn == "member":
            members = MemberRows.apply(rows, d, transpose)
        else:
            members = [m.transpose(-1, -2) if transpose else m for m in rows[..., :d].unbind(0)]
        assert [tuple(m.shape) for m in members] == [(U, d, r) if transpose else (U, r, d)] * G
        # Member 2 is left unused: its gradient is zero.
        loss = sum((m * w.double()).sum() for g, (m, w) in enumerate(zip(members, weights)) if g != 2)
        loss.backward()
        grads.append(base.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
    assert grads[0][..., d:].abs().sum() == 0 and grads[0][2].abs().sum() == 0
