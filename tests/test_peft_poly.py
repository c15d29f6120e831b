"""Our Poly/MHR equals PEFT's Poly tuner given the same parameters (PEFT as the peer implementation)."""
import copy

import pytest
import torch
from peft import PolyConfig, get_peft_model

from conftest import TASKS, batch, tiny_t5
from tensorpoly import AdapterConfig, TensorPolyModel

TARGETS = ["q", "k", "v", "o", "wi_0", "wi_1", "wo"]


@pytest.mark.parametrize("n_splits", [1, 4])  # 1 = Poly, 4 = MHR
def test_poly_matches_peft(n_splits):
    backbone = tiny_t5()
    peft_model = get_peft_model(copy.deepcopy(backbone), PolyConfig(
        task_type="SEQ_2_SEQ_LM", r=3, n_tasks=len(TASKS), n_skills=3, n_splits=n_splits, target_modules=TARGETS)).double()
    ours = TensorPolyModel(backbone, AdapterConfig(module_type="mhr" if n_splits > 1 else "poly", rank=3,
                                                   n_experts=3, n_splits=n_splits, task_names=TASKS))
    gen = torch.Generator().manual_seed(0)
    copied = 0
    with torch.no_grad():
        for name, adapter in ours.adapters():
            peer = peft_model.base_model.model.get_submodule(name)
            for p in (peer.poly_lora_A["default"], peer.poly_lora_B["default"], peer.poly_router["default"].module_logits):
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3)
            adapter.lora_A.copy_(peer.poly_lora_A["default"])
            adapter.lora_B.copy_(peer.poly_lora_B["default"])
            adapter.router.logits.copy_(peer.poly_router["default"].module_logits)
            copied += 1
    assert copied == 36
    peft_model.eval()
    ours.eval()  # PEFT samples a relaxed Bernoulli in training; both use the sigmoid at evaluation
    input_ids, labels = batch(4)
    task_ids = torch.tensor([3, 0, 3, 2])
    with torch.no_grad():
        theirs = peft_model(input_ids=input_ids, labels=labels, task_ids=task_ids).logits
        mine = ours(input_ids=input_ids, labels=labels, task_ids=task_ids).logits
    torch.testing.assert_close(mine, theirs, rtol=1e-10, atol=1e-10)
    # The comparison is not vacuous: the adapters move the logits.
    with torch.no_grad():
        with peft_model.disable_adapter():
            base = peft_model(input_ids=input_ids, labels=labels, task_ids=task_ids).logits
    assert (base - mine).abs().max() > 1e-3
