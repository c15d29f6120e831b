"""Shared fixtures: a tiny random T5 (T5 v1.1 / LM-adapt layout) and helpers."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import T5Config, T5ForConditionalGeneration  # noqa: E402

from tensorpoly import AdapterConfig, TensorPolyModel  # noqa: E402

# Tiny float64 ops: one thread is as fast, and two OpenMP threads on a busy 2-core box can be 100x slower.
torch.set_num_threads(1)

TASKS = ["t0", "t1", "t2", "t3"]
VOCAB = 50


def tiny_t5_config(**overrides) -> T5Config:
    # d_model 24 and d_ff 40 are not perfect powers, so leaf products need truncation.
    fields = dict(vocab_size=VOCAB, d_model=24, d_kv=6, num_heads=4, d_ff=40, num_layers=2, num_decoder_layers=2,
                  feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0,
                  pad_token_id=0, eos_token_id=1, dropout_rate=0.0)
    fields.update(overrides)
    return T5Config(**fields)


def tiny_t5(seed: int = 0, **overrides) -> T5ForConditionalGeneration:
    torch.manual_seed(seed)
    return T5ForConditionalGeneration(tiny_t5_config(**overrides)).double().eval()


def adapted(module_type: str, seed: int = 0, randomize: bool = True, **fields) -> TensorPolyModel:
    """A tiny T5 with adapters whose parameters are all random (no zero B), in float64, eval mode."""
    defaults = dict(rank=3, n_experts=3, order=2)
    if module_type in ("poly", "mhr", "tensorpoly1", "tensorpoly2"):
        defaults["task_names"] = TASKS
    if module_type == "mhr":
        defaults["n_splits"] = 4
    defaults.update(fields)
    model = TensorPolyModel(tiny_t5(seed), AdapterConfig(module_type=module_type, **defaults)).double().eval()
    if randomize:
        randomize_adapters(model, seed)
    return model


def randomize_adapters(model: TensorPolyModel, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, adapter in model.adapters():
            for name, p in adapter.named_parameters():
                if name.startswith("base_layer."):
                    continue
                if name.startswith("norms_"):
                    # Non-identity affines, so a test catches a norm applied to the wrong pair.
                    base = 1.0 if name.endswith("weight") else 0.0
                    p.copy_(base + 0.2 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
                else:
                    p.copy_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        for router in model.routers.values():
            router.logits.copy_(torch.randn(router.logits.shape, generator=gen, dtype=router.logits.dtype))


def batch(n: int = 4, src: int = 7, tgt: int = 5, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(2, VOCAB, (n, src), generator=gen)
    labels = torch.randint(2, VOCAB, (n, tgt), generator=gen)
    return input_ids, labels


ALL_TYPES = ["lora", "tlora", "poly", "mhr", "tensorpoly1", "tensorpoly2"]
ROUTED_TYPES = ["poly", "mhr", "tensorpoly1", "tensorpoly2"]


@pytest.fixture
def tasks():
    return list(TASKS)


def on_one_and_several_threads(run, several: int = 3):
    """(run() on one torch thread, run() on `several`): kernels that split their work over threads must
    not let two threads write the same result."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(several)
        return one, run()
    finally:
        torch.set_num_threads(threads)
