"""From a composed config to a backbone, a tokenizer and an adapted model, after checking every part
of the config that can be checked without weights (adapter shapes on the meta device, data presence,
recipe values, logger credentials). A bad override fails here, in seconds, naming the value and the fix."""
from __future__ import annotations

import torch
from omegaconf import OmegaConf
from transformers import AutoTokenizer, ByT5Tokenizer, T5Config, T5ForConditionalGeneration

from ..checkpoint import load_adapter
from ..config import ROUTED_TYPES, AdapterConfig, ConfigError
from ..model import TensorPolyModel, check_config
from .average_route import check_average_route_prob
from .data import check_available, heldout_tasks, training_tasks
from .optim import OPTIMIZERS
from .rundir import find_checkpoint, repo_path, run_config_of
from .runtime import mixed_precision
from .tracking import check_logger


def _local_or_hub(name: str) -> str:
    path = repo_path(name)
    return str(path) if path.exists() else name


def load_tokenizer(backbone_cfg):
    name = backbone_cfg.get("tokenizer") or backbone_cfg.pretrained
    if name == "byt5":
        return ByT5Tokenizer()
    if name is None:
        raise ConfigError(f"backbone {backbone_cfg.name}: no tokenizer; set backbone.tokenizer (a path, a hub id or byt5)")
    try:
        return AutoTokenizer.from_pretrained(_local_or_hub(name))
    except OSError as exc:
        raise ConfigError(f"backbone {backbone_cfg.name}: cannot load tokenizer {name!r} ({exc.__class__.__name__}); "
                          f"offline, only local paths work: use backbone=embedded or a downloaded copy") from exc


def load_backbone(backbone_cfg, seed: int = 0) -> T5ForConditionalGeneration:
    if backbone_cfg.pretrained is None:
        torch.manual_seed(seed)
        return T5ForConditionalGeneration(T5Config(**OmegaConf.to_container(backbone_cfg.config, resolve=True)))
    try:
        return T5ForConditionalGeneration.from_pretrained(_local_or_hub(backbone_cfg.pretrained))
    except OSError as exc:
        raise ConfigError(f"backbone {backbone_cfg.name}: cannot load {backbone_cfg.pretrained!r} "
                          f"({exc.__class__.__name__}); there is no hub here: use backbone=embedded, or point "
                          f"backbone.pretrained at a local copy") from exc


def adapter_config(cfg, task_names: list[str]) -> AdapterConfig:
    fields = OmegaConf.to_container(cfg.model, resolve=True)
    fields["granularity"] = cfg.routing.granularity
    if fields.get("module_type") in ROUTED_TYPES:
        fields["task_names"] = list(task_names)
    return AdapterConfig(**fields)


def check_recipe(recipe, where: str) -> None:
    def need(ok: bool, key: str, what: str) -> None:
        if not ok:
            raise ConfigError(f"{where}.{key}={recipe.get(key)!r}: {what}")
    need(recipe.optimizer in OPTIMIZERS, "optimizer", f"choose one of {OPTIMIZERS}")
    need(int(recipe.steps) >= 1, "steps", "must be >= 1")
    need(int(recipe.batch_size) >= 1, "batch_size", "must be >= 1")
    need(int(recipe.grad_accum) >= 1, "grad_accum", "must be >= 1")
    need(0 <= float(recipe.warmup) < 1, "warmup", "is a fraction of the steps, in [0, 1)")
    need(float(recipe.lr) > 0 and float(recipe.router_lr) > 0, "lr", "learning rates must be > 0")
    need(float(recipe.get("leaf_lr", recipe.lr)) > 0, "leaf_lr", "learning rates must be > 0")
    mixed_precision(recipe.precision)


def check_training_config(cfg) -> AdapterConfig:
    """Everything `scripts/train.py` needs, checked before any weight or example is loaded."""
    if cfg.model is None or "module_type" not in cfg.model:
        raise ConfigError("no adapter type: pass model=<lora|tlora|poly|mhr|tensorpoly1|tensorpoly2>")
    check_logger(cfg.logger)
    check_recipe(cfg.train, "train")
    check_average_route_prob(cfg.train)
    for key in ("checkpoint_every", "log_every", "val_every"):
        if int(cfg.train[key]) < 1:
            raise ConfigError(f"train.{key}={cfg.train[key]!r}: must be >= 1")
    check_available(cfg.data)
    heldout_tasks(cfg.data)
    config = adapter_config(cfg, training_tasks(cfg.data))
    check_config(config, T5Config(**OmegaConf.to_container(cfg.backbone.config, resolve=True)))
    return config


def build_model(cfg, config: AdapterConfig, seed: int) -> tuple[TensorPolyModel, object]:
    tokenizer = load_tokenizer(cfg.backbone)
    backbone = load_backbone(cfg.backbone, seed)
    torch.manual_seed(seed)  # adapter init: identical on every rank and on resume
    return TensorPolyModel(backbone, config), tokenizer


def load_trained(spec: str):
    """(adapter dir, its run config, tokenizer, adapted model in eval mode) of a training run or checkpoint
    (`latest`, `outputs/train/<run>`, or a checkpoint dir): what the diagnostic scripts start from."""
    adapter_dir = find_checkpoint(spec)
    run_cfg = run_config_of(adapter_dir)
    model = load_adapter(load_backbone(run_cfg.backbone), adapter_dir).eval()
    return adapter_dir, run_cfg, load_tokenizer(run_cfg.backbone), model
