"""Evaluation-time factor cache: built once per task while nothing changes, equal to uncached outputs,
and forgotten after an optimizer step, a routing change, new tasks or a load."""
import copy

import pytest
import torch

from conftest import adapted, batch
from tensorpoly.task_routing import FactorGroup
from test_per_example import one_thread  # noqa: F401  (autouse: these tests on one thread too)


@pytest.fixture
def count_builds(monkeypatch):
    calls = []
    original = FactorGroup.build

    def build(self, ids, whole=True):
        calls.append(None if ids is None else ids.tolist())
        return original(self, ids, whole)

    monkeypatch.setattr(FactorGroup, "build", build)
    return calls


def logits(model, task_ids, n=None, seed=0):
    n = len(task_ids) if task_ids is not None else n
    input_ids, labels = batch(n, seed=seed)
    ids = None if task_ids is None else torch.tensor(task_ids)
    with torch.no_grad():
        return model(input_ids=input_ids, labels=labels, task_ids=ids).logits


def uncached(model, task_ids, n=None):
    size = model.task_routing.cache_size
    model.task_routing.cache_size = 0
    try:
        return logits(model, task_ids, n)
    finally:
        model.task_routing.cache_size = size


@pytest.mark.parametrize("module_type", ["tlora", "poly", "tensorpoly1", "tensorpoly2"])
def test_cached_factors_are_built_once_and_equal_uncached(module_type, count_builds):
    model = adapted(module_type, order=4)
    ids = [1, 3, 1, 0] if model.config.routed else None
    first = logits(model, ids, n=4)
    groups = len(model.task_routing._groups)
    assert len(count_builds) == groups  # one build per group, for the three distinct tasks
    count_builds.clear()
    again = logits(model, ids, n=4, seed=1)  # other inputs, same tasks: nothing rebuilt
    assert count_builds == []
    torch.testing.assert_close(first, uncached(model, ids, n=4), rtol=0, atol=1e-12)
    torch.testing.assert_close(again, logits(copy.deepcopy(model), ids, n=4, seed=1), rtol=0, atol=1e-12)
    if model.config.routed:
        count_builds.clear()
        logits(model, [3, 2])  # task 3 is kept, only task 2 is built
        assert count_builds and all(ids == [2] for ids in count_builds)


def test_the_cache_is_forgotten_after_an_optimizer_step():
    model = adapted("tensorpoly2", order=4)
    ids = [0, 2]
    before = logits(model, ids)
    model.train()
    input_ids, labels = batch(2)
    model(input_ids=input_ids, labels=labels, task_ids=torch.tensor(ids)).loss.backward()
    torch.optim.AdamW(model.trainable_parameters(), lr=1e-2).step()
    model.eval()
    after = logits(model, ids)
    assert (after - before).abs().max() > 1e-6
    torch.testing.assert_close(after, uncached(model, ids), rtol=0, atol=1e-12)


def test_the_cache_follows_routing_changes_new_tasks_and_loads():
    model = adapted("tensorpoly1", order=4)
    learned = logits(model, [1, 1])
    model.use_average_routing("uniform")
    average = logits(model, None, n=2)
    assert (average - learned).abs().max() > 1e-6
    torch.testing.assert_close(average, uncached(model, None, n=2), rtol=0, atol=1e-12)
    model.use_learned_routing()
    torch.testing.assert_close(logits(model, [1, 1]), learned, rtol=0, atol=1e-12)

    model.reset_tasks(["new0", "new1"])
    torch.testing.assert_close(logits(model, [1, 1]), uncached(model, [1, 1]), rtol=0, atol=1e-12)

    other = adapted("tensorpoly1", order=4, seed=5)
    other.reset_tasks(["new0", "new1"])
    logits(model, [0, 1])  # fill the cache, then load other parameters in place
    model.load_state_dict(other.state_dict())
    torch.testing.assert_close(logits(model, [0, 1]), logits(other, [0, 1]), rtol=0, atol=1e-12)


def test_data_edits_need_an_explicit_clear_and_the_cache_is_bounded():
    model = adapted("tensorpoly2", order=4)
    first = logits(model, [2])
    adapter = next(a for _, a in model.adapters())
    adapter.leaves_A.data.mul_(2.0)  # bypasses version counters
    assert torch.equal(logits(model, [2]), first)
    model.clear_factor_cache()
    assert not torch.equal(logits(model, [2]), first)
    torch.testing.assert_close(logits(model, [2]), uncached(model, [2]), rtol=0, atol=1e-12)

    model.task_routing.cache_size = 2
    for task in range(4):
        logits(model, [task])
    assert all(len(group.entries) <= 2 for group in model.task_routing._groups.values())


def test_training_calls_never_use_the_cache(count_builds):
    model = adapted("tensorpoly1", order=2)
    logits(model, [0, 1])
    count_builds.clear()
    input_ids, labels = batch(2)
    model(input_ids=input_ids, labels=labels, task_ids=torch.tensor([0, 1])).loss.backward()
    assert len(count_builds) == len(model.task_routing._groups)  # built afresh, with a graph
