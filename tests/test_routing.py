"""Routers, granularity, task-id handling, average routing, resetting tasks, gradients and freezing."""
import pytest
import torch

from conftest import ALL_TYPES, ROUTED_TYPES, adapted, batch
from tensorpoly.task_routing import TaskRoutingError


@pytest.mark.parametrize("granularity,count", [("finegrained", 36), ("layer", 10), ("block", 4), ("coder", 2), ("model", 1)])
def test_granularity_decides_which_layers_share_a_router(granularity, count):
    model = adapted("poly", granularity=granularity)
    assert len(model.routers) == count
    adapters = dict(model.adapters())
    q = adapters["decoder.block.1.layer.1.EncDecAttention.q"].router
    wo = adapters["decoder.block.1.layer.2.DenseReluDense.wo"].router
    enc = adapters["encoder.block.1.layer.0.SelfAttention.k"].router
    assert (q is wo) == (granularity in ("block", "coder", "model"))
    assert (q is enc) == (granularity == "model")
    # A shared router is stored once.
    assert sum(1 for k in model.state_dict() if k.startswith("routers.")) == count


@pytest.mark.parametrize("module_type", ALL_TYPES)
def test_gradients_reach_adapters_and_routers_and_the_backbone_stays_frozen(module_type):
    model = adapted(module_type, order=4).train()
    before = {k: v.clone() for k, v in model.model.state_dict().items() if "base_layer" in k or "shared" in k}
    input_ids, labels = batch(4)
    task_ids = torch.tensor([0, 1, 2, 1]) if model.config.routed else None
    model(input_ids=input_ids, labels=labels, task_ids=task_ids).loss.backward()
    roles = model.parameter_roles()
    for p in roles["adapter"]:
        assert p.grad is not None and p.grad.abs().sum() > 0
    for p in roles["router"]:
        assert p.grad is not None and p.grad.abs().sum() > 0
    for p in roles["norm"]:
        assert not p.requires_grad and p.grad is None
    backbone = [p for n, p in model.model.named_parameters() if "base_layer" in n or not any(p is q for q in model.trainable_parameters())]
    assert backbone and all(not p.requires_grad and p.grad is None for p in backbone)
    torch.optim.SGD(model.trainable_parameters(), lr=0.1).step()
    for k, v in model.model.state_dict().items():
        if k in before:
            assert torch.equal(v, before[k]), k


def test_trainable_norm_affines_get_gradients_when_asked():
    model = adapted("tensorpoly2", order=4, norm_affine_trainable=True).train()
    input_ids, labels = batch(2)
    model(input_ids=input_ids, labels=labels, task_ids=torch.tensor([0, 1])).loss.backward()
    norms = model.parameter_roles()["norm"]
    assert norms and all(p.grad is not None and p.grad.abs().sum() > 0 for p in norms)


def test_router_weights_are_sigmoid_then_normalised():
    model = adapted("mhr", n_splits=2)
    router = next(iter(model.routers.values()))
    w = router(torch.tensor([1, 3]))
    p = torch.sigmoid(router.logits[[1, 3]].view(2, 2, 3))
    torch.testing.assert_close(w, p / p.sum(-1, keepdim=True), rtol=1e-11, atol=1e-11)


def test_relaxed_bernoulli_samples_in_training_only():
    model = adapted("poly", relaxed_bernoulli=True)
    router = next(iter(model.routers.values()))
    ids = torch.tensor([1, 1])
    model.train()
    torch.manual_seed(0)
    w = router(ids)
    assert not torch.allclose(w[0], w[1])  # a fresh sample per example
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 1, dtype=w.dtype))
    model.eval()
    torch.testing.assert_close(router(ids)[0], router(ids)[1])
    input_ids, labels = batch(2)
    with torch.no_grad():
        a = model(input_ids=input_ids, labels=labels, task_ids=ids).logits
        b = model(input_ids=input_ids, labels=labels, task_ids=ids).logits
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("module_type", ROUTED_TYPES)
def test_uniform_average_routing_equals_equal_logits(module_type):
    model = adapted(module_type)
    input_ids, labels = batch(3)
    model.use_average_routing("uniform")
    with torch.no_grad():
        averaged = model(input_ids=input_ids, labels=labels).logits  # no task ids needed
        model.use_learned_routing()
        for router in model.routers.values():
            router.logits.zero_()
        equal = model(input_ids=input_ids, labels=labels, task_ids=torch.zeros(3, dtype=torch.long)).logits
    torch.testing.assert_close(averaged, equal, rtol=1e-9, atol=1e-9)


def test_mean_of_tasks_routing_is_the_mean_task_distribution():
    model = adapted("tensorpoly2")
    router = next(iter(model.routers.values()))
    learned = router(torch.arange(4))
    model.use_average_routing("mean_of_tasks")
    torch.testing.assert_close(router(torch.tensor([0, 0]))[0], learned.mean(0))


def test_reset_tasks_gives_fresh_rows_and_keeps_experts():
    model = adapted("tensorpoly1")
    experts = {n: p.clone() for n, p in model.named_parameters() if "leaves" in n}
    model.use_average_routing()
    model.reset_tasks(["rte"])
    assert model.config.task_names == ["rte"] and model.averaging is None
    for router in model.routers.values():
        assert router.logits.shape == (1, 3) and router.logits.abs().max() <= 1e-3
    assert all(torch.equal(p, experts[n]) for n, p in model.named_parameters() if "leaves" in n)
    input_ids, labels = batch(2)
    model(input_ids=input_ids, labels=labels, task_ids=model.task_ids(["rte", "rte"]))
    with pytest.raises(TaskRoutingError, match="task id 1 is out of range for 1 tasks"):
        model(input_ids=input_ids, labels=labels, task_ids=torch.tensor([0, 1]))


def test_task_id_errors_are_clear():
    model = adapted("poly")
    input_ids, labels = batch(2)
    with pytest.raises(TaskRoutingError, match="pass task_ids"):
        model(input_ids=input_ids, labels=labels)
    with pytest.raises(TaskRoutingError, match="task id 7 is out of range for 4 tasks"):
        model(input_ids=input_ids, labels=labels, task_ids=torch.tensor([0, 7]))
    with pytest.raises(TaskRoutingError, match="task id -1"):
        model(input_ids=input_ids, labels=labels, task_ids=torch.tensor([-1, 0]))
    with pytest.raises(TaskRoutingError, match="1-D integer tensor"):
        model(input_ids=input_ids, labels=labels, task_ids=torch.tensor([0.0, 1.0]))
    with pytest.raises(TaskRoutingError, match="unknown task names"):
        model.task_ids(["nope"])
    adapter = dict(model.adapters())["encoder.block.0.layer.0.SelfAttention.q"]
    with model.routing(torch.tensor([0, 1])), pytest.raises(TaskRoutingError, match="whole multiple"):
        adapter(torch.randn(3, 2, 24, dtype=torch.float64))


def test_task_ids_are_not_kept_after_the_call():
    model = adapted("poly")
    input_ids, labels = batch(2)
    model(input_ids=input_ids, labels=labels, task_ids=torch.tensor([0, 1]))
    with pytest.raises(TaskRoutingError, match="pass task_ids"):
        model.model(input_ids=input_ids, labels=labels)
