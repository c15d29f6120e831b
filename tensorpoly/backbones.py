"""Backbones named by configs/backbone/*.yaml: their shapes, and building them.

A backbone file states the Hugging Face id it stands for (`pretrained`) and its config
(`config`), so shapes and parameter counts are known without downloading any weights.
"""
from __future__ import annotations

from pathlib import Path

import torch
import yaml
from transformers import T5Config, T5ForConditionalGeneration

from .config import ConfigError

CONFIG_ROOT = Path(__file__).resolve().parent.parent / "configs"


def available(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_ROOT / group).glob("*.yaml"))


def read_group_config(group: str, name: str) -> dict:
    path = CONFIG_ROOT / group / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown {group} {name!r}; choose one of {', '.join(available(group))}")
    return yaml.safe_load(path.read_text()) or {}


def backbone_config(name: str) -> T5Config:
    spec = read_group_config("backbone", name)
    return T5Config(**spec["config"])


def build_backbone(name: str, device: str | torch.device = "cpu") -> T5ForConditionalGeneration:
    """The backbone's architecture with random weights; on device "meta" it allocates nothing."""
    with torch.device(device):
        return T5ForConditionalGeneration(backbone_config(name))
