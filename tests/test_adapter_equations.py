"""Each adapter's output equals an independent computation of its equations (tests/reference.py)."""
import pytest
import torch

from conftest import ALL_TYPES, adapted
from reference import reference_layer_output

# One layer of every kind and shape (d_model->d_model, d_model->d_ff, d_ff->d_model), both sides.
SAMPLE_LAYERS = ["encoder.block.0.layer.0.SelfAttention.q", "encoder.block.1.layer.1.DenseReluDense.wi_0",
                 "encoder.block.0.layer.1.DenseReluDense.wo", "decoder.block.1.layer.0.SelfAttention.o",
                 "decoder.block.0.layer.1.EncDecAttention.k", "decoder.block.1.layer.2.DenseReluDense.wi_1"]
CASES = [(t, {}) for t in ALL_TYPES] + [
    ("tlora", {"order": 3}), ("tlora", {"order": 4, "norm": "row"}),
    ("tensorpoly1", {"order": 4}), ("tensorpoly1", {"order": 3, "share_norm": False}),
    ("tensorpoly2", {"order": 4}), ("tensorpoly2", {"order": 5, "norm": "none"}),
    ("tensorpoly2", {"order": 1}), ("mhr", {"n_splits": 2, "n_experts": 5}),
    ("tensorpoly1", {"order": 2, "norm_over_padding": False}), ("tensorpoly2", {"order": 4, "norm_over_padding": False}),
]


@pytest.mark.parametrize("module_type,fields", CASES, ids=[f"{t}-{f}" for t, f in CASES])
def test_every_adapted_layer_matches_its_equations(module_type, fields):
    model = adapted(module_type, **fields)
    task_ids = torch.tensor([2, 0, 2, 3, 1]) if model.config.routed else None
    gen = torch.Generator().manual_seed(3)
    checked = 0
    assert len(model.adapter_names) == 36  # 2x7 encoder + 2x11 decoder linears
    for name in SAMPLE_LAYERS:
        adapter = model.model.get_submodule(name)
        x = torch.randn(5, 4, adapter.in_features, generator=gen, dtype=torch.float64)
        with model.routing(task_ids):
            got = adapter(x)
        want = reference_layer_output(adapter, x, task_ids)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=f"{module_type} {name}")
        checked += 1
    assert checked == len(SAMPLE_LAYERS)


def test_poly_and_tensorpoly2_router_shapes():
    assert next(iter(adapted("mhr", n_splits=4).routers.values())).logits.shape == (4, 4 * 3)
    assert next(iter(adapted("tensorpoly2", order=4).routers.values())).logits.shape == (4, 4 * 3)
    assert next(iter(adapted("tensorpoly1", order=4).routers.values())).logits.shape == (4, 3)


def test_paper_inits():
    lora = dict(adapted("lora", randomize=False).adapters())["encoder.block.0.layer.0.SelfAttention.q"]
    assert torch.all(lora.lora_B == 0) and lora.lora_A.abs().max() <= (1 / 3) ** 0.5 / 24 ** 0.5
    tp1 = dict(adapted("tensorpoly1", randomize=False).adapters())["encoder.block.0.layer.1.DenseReluDense.wo"]
    # The paper code bounds both A and B leaves by 0.577 / sqrt(d_in); nothing is zero.
    bound = (1 / 3) ** 0.5 / 40 ** 0.5
    assert tp1.leaves_B.abs().max() <= bound and tp1.leaves_B.abs().min() > 0
    zero_b = dict(adapted("tensorpoly1", randomize=False, init="zero_b").adapters())["encoder.block.0.layer.1.DenseReluDense.wo"]
    assert torch.all(zero_b.delta_weight(torch.full((1, 1, 3), 1 / 3, dtype=torch.float64)) == 0)
