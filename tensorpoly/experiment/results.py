"""One JSON file per run under results/: what ran (full config, package versions, git commit, hardware)
and what it measured. `make tables` (scripts/make_tables.py) reads every such file.

Schema (format "tensorpoly-result/1"): kind (train | finetune | eval), name, created, config, metrics,
heldout ({task: {...}}), params, run_dir, versions, git, hardware.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path

import torch
from omegaconf import OmegaConf

from .rundir import REPO_ROOT, repo_path

FORMAT = "tensorpoly-result/1"
PACKAGES = ("torch", "transformers", "peft", "accelerate", "datasets", "hydra-core", "omegaconf", "wandb", "tensorpoly")


def versions() -> dict:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def git_info() -> dict:
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    try:
        return {"commit": git("rev-parse", "HEAD") or None, "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def hardware() -> dict:
    info = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
    return info


def write_result(results_dir: str, kind: str, name: str, cfg, **payload) -> Path:
    """Write results/<…>/<kind>/<name>-<timestamp>.json atomically; returns the path."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_dir = repo_path(results_dir) / kind
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}-{stamp}-{os.getpid()}.json"
    record = {"format": FORMAT, "kind": kind, "name": name, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "config": OmegaConf.to_container(cfg, resolve=True), **payload,
              "versions": versions(), "git": git_info(), "hardware": hardware()}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str))
    os.replace(tmp, path)
    return path
