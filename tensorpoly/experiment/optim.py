"""Optimizer groups (LoRA factors, TLoRA leaves, norm affines, routers at their own learning rates), the
optimizer (AdamW or Adafactor as the paper ran it) and the linear warm-up / linear decay schedule.

Leaves get their own rate because the LayerNorm after each leaf product makes them scale-sensitive: once
a leaf product's variance passes the LN epsilon the factor rows jump to unit scale, so a step size that
suits LoRA factors throws the adapter output far past the frozen layer's own (the paper code, too, ran
leaves at 3e-4 and LoRA factors at 1e-3)."""
from __future__ import annotations

import torch
from transformers import get_linear_schedule_with_warmup
from transformers.optimization import Adafactor

from ..config import ConfigError

OPTIMIZERS = ("adamw", "adafactor")


def param_groups(model, recipe, train_adapters: bool = True) -> list[dict]:
    roles = model.parameter_roles()
    if not train_adapters:
        for p in roles["adapter"] + roles["norm"]:
            p.requires_grad_(False)
    leaves = {id(p) for name, p in model.named_parameters() if name.rsplit(".", 1)[-1].startswith("leaves_")}
    roles["leaf"] = [p for p in roles["adapter"] if id(p) in leaves]
    roles["adapter"] = [p for p in roles["adapter"] if id(p) not in leaves]
    lrs = {"adapter": recipe.lr, "leaf": recipe.get("leaf_lr", recipe.lr), "norm": recipe.norm_lr,
           "router": recipe.router_lr}
    groups = []
    for role in ("adapter", "leaf", "norm", "router"):
        params = [p for p in roles[role] if p.requires_grad]
        if params:
            groups.append({"name": role, "params": params, "lr": float(lrs[role])})
    if not groups:
        raise ConfigError("nothing to train: the model has no trainable parameter "
                          "(finetune.trainable=router needs a routed model type)")
    return groups


def build_optimizer(groups: list[dict], recipe) -> torch.optim.Optimizer:
    if recipe.optimizer == "adamw":
        # foreach: a few multi-tensor kernels per step instead of ~10 ops per parameter tensor (torch's
        # default on CPU), the same values bit for bit. A task-routed model has hundreds of small
        # parameter tensors (leaves, routers), so the per-tensor loop is a visible part of a CPU step.
        return torch.optim.AdamW(groups, lr=float(recipe.lr), weight_decay=float(recipe.weight_decay), foreach=True)
    if recipe.optimizer == "adafactor":
        # The paper's settings: absolute step sizes, no warm-up init, HF defaults otherwise.
        return Adafactor(groups, lr=float(recipe.lr), relative_step=False, warmup_init=False,
                         scale_parameter=bool(recipe.adafactor_scale_parameter),
                         weight_decay=float(recipe.weight_decay))
    raise ConfigError(f"optimizer={recipe.optimizer!r}; choose one of {OPTIMIZERS}")


def build_scheduler(optimizer, recipe):
    return get_linear_schedule_with_warmup(optimizer, int(recipe.warmup * recipe.steps), recipe.steps)
