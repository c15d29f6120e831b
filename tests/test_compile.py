"""torch.compile of the factor construction (tensor_product.compiled_factors, bench_adapters.py --compile factors):
the same rows, mixtures and gradients as eager. Skipped where torch.compile cannot run (no C++ compiler, an
unsupported platform or Python)."""
import pytest
import torch

from conftest import adapted, batch
from tensorpoly.tensor_product import (StackedNorms, build_rows, compiled_factors, leaf_length, make_pair_norms,
                                       mix_kron_chain, row_factors)


@pytest.fixture(scope="module", autouse=True)
def compile_works():
    try:
        with compiled_factors():
            from tensorpoly.tensor_product import _compiled

            _compiled("kron_chain")([torch.ones(1, 2), torch.ones(1, 2)], 3)
    except Exception as error:  # noqa: BLE001 - any failure to compile means: not supported here
        pytest.skip(f"torch.compile unavailable: {type(error).__name__}: {error}")


def both(fn, inputs):
    """fn(*inputs) eager and compiled, with the gradients of a fixed projection of the output."""
    results = []
    for compiled in (False, True):
        leaves = [x.detach().clone().requires_grad_() for x in inputs]
        with compiled_factors(compiled):
            out = fn(*leaves)
        out = torch.cat([o.flatten() for o in out]) if isinstance(out, (list, tuple)) else out.flatten()
        projection = torch.linspace(-1, 1, out.numel(), dtype=out.dtype)
        (out * projection).sum().backward()
        results.append((out.detach(), [x.grad for x in leaves]))
    return results


def test_compiled_mixture_matches_eager():
    # TensorPoly-I's grouped order-4 path: stacked pair norms, then the mixture over experts.
    torch.manual_seed(0)
    r, d, S, U = 3, 37, 4, 5
    leaf = leaf_length(d, 4)
    lists = [make_pair_norms(4, r, leaf, "joint", True, 1e-5, False).double() for _ in range(2)]
    stacked = StackedNorms(lists, lead=1)

    def mixed(leaves, w):  # leaves [G, N, S, r, l], w [U, S]
        pairs = row_factors(leaves.transpose(1, 2), d, stacked)  # [G, S, r, l^2] each
        return [mix_kron_chain(w, [p[g] for p in pairs], d) for g in range(2)]

    inputs = [torch.randn(2, 4, S, r, leaf).double(), torch.rand(U, S).double()]
    (eager, eager_grads), (got, grads) = both(mixed, inputs)
    torch.testing.assert_close(got, eager)
    torch.testing.assert_close(grads, eager_grads)


@pytest.mark.slow
def test_compiled_odd_order_rows_match_eager():
    # Odd order, per-pair norms with non-identity affines and statistics over the kept entries only.
    torch.manual_seed(0)
    r, d, S = 3, 37, 4
    leaf = leaf_length(d, 3)
    norms = make_pair_norms(3, r, leaf, "joint", False, 1e-5, True, over_padding=False).double()
    with torch.no_grad():
        for n in norms:
            n.weight.add_(0.3 * torch.randn_like(n.weight))
            n.bias.add_(0.3 * torch.randn_like(n.bias))
    (eager, eager_grads), (got, grads) = both(lambda x: build_rows(x, d, norms), [torch.randn(S, 3, r, leaf).double()])
    torch.testing.assert_close(got, eager)
    torch.testing.assert_close(grads, eager_grads)


@pytest.mark.slow  # about 20 compiled graphs: a minute on a busy CPU
def test_model_with_compiled_factors_matches_eager():
    input_ids, labels = batch()
    task_ids = torch.tensor([0, 2, 1, 2])
    results = []
    for compiled in (False, True):
        model = adapted("tensorpoly1", order=4, target_layers="q|o")
        with compiled_factors(compiled):
            loss = model(input_ids=input_ids, labels=labels, task_ids=task_ids).loss
        loss.backward()  # outside the context: the compiled backward all the same
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        with torch.no_grad(), compiled_factors(compiled):  # evaluation: factors built once per task, cached
            logits = model(input_ids=input_ids, labels=labels, task_ids=task_ids).logits
        results.append((loss.detach(), grads, logits))
    (loss, grads, logits), (loss_c, grads_c, logits_c) = results
    torch.testing.assert_close(loss_c, loss)
    assert grads_c.keys() == grads.keys() and len(grads) > 2
    for name in grads:
        torch.testing.assert_close(grads_c[name], grads[name], msg=name)
    torch.testing.assert_close(logits_c, logits)
