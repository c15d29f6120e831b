"""Optimizer groups: LoRA-type factors, TLoRA/TensorPoly leaves, norm affines and routers each at their own
learning rate, every trainable parameter in exactly one group."""
import pytest
import torch
from omegaconf import OmegaConf
from transformers import T5Config, T5ForConditionalGeneration

from tensorpoly.config import AdapterConfig
from tensorpoly.experiment.optim import build_optimizer, param_groups
from tensorpoly.model import TensorPolyModel

RECIPE = dict(optimizer="adamw", lr=1e-2, leaf_lr=1e-3, norm_lr=5e-3, router_lr=0.1, weight_decay=0.0)


def tiny_model(module_type: str, **kw) -> TensorPolyModel:
    torch.manual_seed(0)
    backbone = T5ForConditionalGeneration(T5Config(vocab_size=32, d_model=16, d_kv=4, d_ff=32, num_heads=4,
                                                   num_layers=1, num_decoder_layers=1))
    names = ["a", "b"] if module_type in ("poly", "mhr", "tensorpoly1", "tensorpoly2") else []
    return TensorPolyModel(backbone, AdapterConfig(module_type=module_type, rank=2, n_experts=2, order=2,
                                                   task_names=names, **kw))


def lrs_by_name(model, groups) -> dict[str, float]:
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    return {n: lr_of[id(p)] for n, p in model.named_parameters() if id(p) in lr_of}


@pytest.mark.parametrize("module_type", ["tlora", "tensorpoly1", "tensorpoly2"])
def test_leaves_train_at_leaf_lr_and_routers_at_router_lr(module_type):
    model = tiny_model(module_type, norm_affine_trainable=True)
    groups = param_groups(model, OmegaConf.create(RECIPE))
    lrs = lrs_by_name(model, groups)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(lrs) == sorted(trainable)  # each trainable parameter in exactly one group
    assert sum(len(g["params"]) for g in groups) == len(trainable)
    for name, lr in lrs.items():
        leaf = name.rsplit(".", 1)[-1].startswith("leaves_")
        expected = (RECIPE["leaf_lr"] if leaf else RECIPE["norm_lr"] if ".norms_" in name
                    else RECIPE["router_lr"])
        assert lr == expected, name
    assert any(n.rsplit(".", 1)[-1].startswith("leaves_") for n in lrs)


@pytest.mark.parametrize("module_type", ["lora", "poly", "mhr"])
def test_lora_factors_train_at_lr(module_type):
    model = tiny_model(module_type, n_splits=2) if module_type == "mhr" else tiny_model(module_type)
    groups = param_groups(model, OmegaConf.create(RECIPE))
    assert {g["name"] for g in groups} <= {"adapter", "router"}
    for name, lr in lrs_by_name(model, groups).items():
        assert lr == (RECIPE["router_lr"] if "router" in name else RECIPE["lr"]), name


def test_recipe_without_leaf_lr_trains_leaves_at_lr():
    """Run configs written before leaf_lr existed still load for fine-tuning."""
    recipe = {k: v for k, v in RECIPE.items() if k != "leaf_lr"}
    groups = param_groups(tiny_model("tlora"), OmegaConf.create(recipe))
    assert {g["name"]: g["lr"] for g in groups} == {"leaf": RECIPE["lr"]}


def test_optimizer_steps_leaves_by_leaf_lr():
    model = tiny_model("tlora")
    groups = param_groups(model, OmegaConf.create({**RECIPE, "optimizer": "adamw"}))
    opt = build_optimizer(groups, OmegaConf.create(RECIPE))
    leaves = [p for n, p in model.named_parameters() if n.endswith("leaves_A")]
    before = [p.detach().clone() for p in leaves]
    for p in leaves:
        p.grad = torch.ones_like(p)
    opt.step()
    # AdamW's first step moves each entry by exactly lr (sign of the gradient) when weight decay is 0.
    for p, b in zip(leaves, before):
        torch.testing.assert_close(b - p.detach(), torch.full_like(b, RECIPE["leaf_lr"]), rtol=1e-3, atol=1e-9)


def test_adamw_runs_multi_tensor_and_matches_the_per_tensor_loop():
    """build_optimizer's AdamW uses the foreach kernels, whose steps equal torch's per-tensor loop bit for bit."""
    recipe = OmegaConf.create(RECIPE)
    params = {}
    for impl in ("built", "loop"):
        model = tiny_model("tensorpoly1")
        groups = param_groups(model, recipe)
        optimizer = build_optimizer(groups, recipe) if impl == "built" else \
            torch.optim.AdamW(groups, lr=recipe.lr, weight_decay=recipe.weight_decay, foreach=False)
        if impl == "built":
            assert all(group["foreach"] for group in optimizer.param_groups)
        generator = torch.Generator().manual_seed(1)
        for _ in range(3):
            for group in groups:
                for p in group["params"]:
                    p.grad = torch.randn(p.shape, generator=generator)
            optimizer.step()
        params[impl] = [p.detach().clone() for group in groups for p in group["params"]]
    assert len(params["built"]) > 4
    for a, b in zip(params["built"], params["loop"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
