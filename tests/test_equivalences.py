"""Special cases that must coincide, and batching that must not change results."""
import pytest
import torch

from conftest import ROUTED_TYPES, adapted, batch
from tensorpoly import choice_log_likelihoods


def copy_params(src_model, dst_model, mapping):
    """mapping(src_adapter, dst_adapter) copies parameters layer by layer."""
    with torch.no_grad():
        for (name, src), (_, dst) in zip(src_model.adapters(), dst_model.adapters()):
            mapping(src, dst)


def logits(model, task_ids=None, n=4):
    input_ids, labels = batch(n)
    with torch.no_grad():
        return model(input_ids=input_ids, labels=labels, task_ids=task_ids).logits


def test_poly_with_one_expert_is_lora():
    poly, lora = adapted("poly", n_experts=1, rank=2), adapted("lora", rank=2, seed=0)

    def mapping(src, dst):
        dst.lora_A.copy_(src.lora_A[0, 0])
        dst.lora_B.copy_(src.lora_B[0, 0])

    copy_params(poly, lora, mapping)
    torch.testing.assert_close(logits(poly, torch.tensor([0, 3, 1, 2])), logits(lora), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("module_type", ["tensorpoly1", "tensorpoly2"])
@pytest.mark.parametrize("order", [2, 3, 4])
def test_tensorpoly_with_one_expert_is_tlora(module_type, order):
    tp = adapted(module_type, n_experts=1, order=order)
    tlora = adapted("tlora", order=order, share_norm=tp.config.share_norm)

    def mapping(src, dst):
        dst.leaves_A.copy_(src.leaves_A[:, 0])
        dst.leaves_B.copy_(src.leaves_B[:, 0])
        dst.norms_A.load_state_dict(src.norms_A.state_dict())
        dst.norms_B.load_state_dict(src.norms_B.state_dict())

    copy_params(tp, tlora, mapping)
    # One expert's weight is sigmoid/(sigmoid + 1e-12), 1 up to ~1e-12, which the network amplifies a little.
    torch.testing.assert_close(logits(tp, torch.tensor([0, 3, 1, 2])), logits(tlora), rtol=1e-7, atol=1e-7)


def test_tlora_of_order_one_is_lora():
    tlora, lora = adapted("tlora", order=1), adapted("lora", seed=0)
    assert all(len(a.norms_A) == 0 for _, a in tlora.adapters())

    def mapping(src, dst):
        dst.lora_A.copy_(src.leaves_A[0].T)
        dst.lora_B.copy_(src.leaves_B[0])

    copy_params(tlora, lora, mapping)
    torch.testing.assert_close(logits(tlora), logits(lora), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("module_type", ROUTED_TYPES)
@pytest.mark.parametrize("granularity", ["finegrained", "block"])
def test_mixed_task_batch_equals_examples_one_by_one(module_type, granularity):
    model = adapted(module_type, granularity=granularity)
    input_ids, labels = batch(5)
    task_ids = torch.tensor([2, 0, 2, 3, 1])
    with torch.no_grad():
        together = model(input_ids=input_ids, labels=labels, task_ids=task_ids).logits
        alone = torch.cat([model(input_ids=input_ids[i:i + 1], labels=labels[i:i + 1], task_ids=task_ids[i:i + 1]).logits
                           for i in range(5)])
    torch.testing.assert_close(together, alone, rtol=1e-10, atol=1e-10)
    # ...and the tasks really are routed differently.
    with torch.no_grad():
        other = model(input_ids=input_ids, labels=labels, task_ids=torch.tensor([1, 1, 1, 1, 1])).logits
    assert (other - together).abs().max() > 1e-4


@pytest.mark.parametrize("module_type", ["poly", "tensorpoly2"])
@pytest.mark.parametrize("explicit", [False, True])
def test_choice_scores_equal_scores_of_repeated_inputs(module_type, explicit):
    model = adapted(module_type)
    input_ids, _ = batch(3)
    mask = torch.ones_like(input_ids)
    mask[1, 5:] = 0
    gen = torch.Generator().manual_seed(7)
    choices = torch.randint(2, 50, (3, 4, 3), generator=gen)
    choices[0, 1, 2] = -100  # choices of different lengths
    task_ids = torch.tensor([3, 1, 3])
    with torch.no_grad():
        fast = choice_log_likelihoods(model, input_ids, mask, choices, task_ids, explicit_decoder_ids=explicit)
        # The slow way: every (example, choice) pair as its own full forward pass.
        out = model(input_ids=input_ids.repeat_interleave(4, 0), attention_mask=mask.repeat_interleave(4, 0),
                    labels=choices.view(12, 3), task_ids=task_ids.repeat_interleave(4))
    logp = torch.log_softmax(out.logits, -1)
    labels = choices.view(12, 3)
    keep = labels.ne(-100)
    per_token = logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1) * keep
    slow = (per_token.sum(-1) / keep.sum(-1)).view(3, 4)
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_generation_of_a_mixed_batch_equals_one_by_one(num_beams):
    model = adapted("tensorpoly1")
    input_ids, _ = batch(3)
    task_ids = torch.tensor([1, 3, 0])
    kw = dict(max_new_tokens=4, num_beams=num_beams, do_sample=False)
    together = model.generate(input_ids=input_ids, task_ids=task_ids, **kw)
    for i in range(3):
        alone = model.generate(input_ids=input_ids[i:i + 1], task_ids=task_ids[i:i + 1], **kw)
        assert torch.equal(together[i, : alone.shape[1]], alone[0])
