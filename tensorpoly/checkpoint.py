"""Save, load and merge adapters.

A saved adapter is a folder with two files:
  adapter_config.json       the AdapterConfig, the backbone's shape fingerprint and every adapted
                            layer's (d_in, d_out): enough to rebuild the exact model and to refuse
                            a backbone it does not fit;
  adapter_model.safetensors adapter, norm and router tensors (never the frozen backbone).
Both are written to temporary files first and renamed, so an interrupted save never leaves a
half-written checkpoint over a good one.
"""
from __future__ import annotations

import copy
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import AdapterConfig, ConfigError
from .model import TensorPolyModel, _module_key

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
FORMAT = "tensorpoly-adapter/1"
FINGERPRINT_KEYS = ("model_type", "d_model", "d_ff", "d_kv", "num_heads", "num_layers", "num_decoder_layers",
                    "feed_forward_proj", "vocab_size")


class CheckpointError(ValueError):
    pass


def backbone_fingerprint(hf_config) -> dict:
    return {k: getattr(hf_config, k, None) for k in FINGERPRINT_KEYS}


def adapter_state_dict(model: TensorPolyModel) -> dict[str, torch.Tensor]:
    state = {}
    for name, adapter in model.adapters():
        for key, value in adapter.state_dict().items():
            if not key.startswith("base_layer."):
                state[f"adapters.{name}.{key}"] = value
    for key, value in model.routers.state_dict().items():
        state[f"routers.{key}"] = value
    return state


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_adapter(model: TensorPolyModel, directory: str | os.PathLike, tensors: dict | None = None) -> Path:
    """tensors: the adapter_state_dict gathered elsewhere (sharded training); default: read from model."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    spec = {
        "format": FORMAT,
        "adapter_config": model.config.to_dict(),
        "backbone": backbone_fingerprint(model.model.config),
        "layers": {name: [a.in_features, a.out_features] for name, a in model.adapters()},
        "average_routing": model.averaging,
    }
    tensors = {k: v.detach().contiguous().cpu() for k, v in (tensors or adapter_state_dict(model)).items()}
    # Weights first, then the spec: a folder with a fresh spec always has matching weights.
    _atomic_write(directory / WEIGHTS_FILE, lambda p: save_file(tensors, p, metadata={"format": FORMAT}))
    _atomic_write(directory / CONFIG_FILE, lambda p: Path(p).write_text(json.dumps(spec, indent=2)))
    return directory


def read_spec(directory: str | os.PathLike) -> dict:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist: not a saved tensorpoly adapter (save with save_adapter)")
    try:
        spec = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); the checkpoint is damaged, save it again") from exc
    if not isinstance(spec, dict) or spec.get("format") != FORMAT:
        raise CheckpointError(f"{path} has format {spec.get('format') if isinstance(spec, dict) else None!r}, "
                              f"expected {FORMAT!r}")
    return spec


def load_adapter(backbone: nn.Module, directory: str | os.PathLike) -> TensorPolyModel:
    """Rebuild the adapted model saved in `directory` on a fresh copy of its backbone."""
    directory = Path(directory)
    spec = read_spec(directory)
    found = backbone_fingerprint(backbone.config)
    diffs = {k: (v, found.get(k)) for k, v in spec["backbone"].items() if found.get(k) != v}
    if diffs:
        detail = ", ".join(f"{k}: saved {a!r} vs given {b!r}" for k, (a, b) in diffs.items())
        raise CheckpointError(f"the adapter in {directory} was saved for another backbone ({detail}); "
                              f"load it onto the backbone it was trained with")
    try:
        config = AdapterConfig.from_dict(spec["adapter_config"])
    except ConfigError as exc:
        raise CheckpointError(f"{directory / CONFIG_FILE}: {exc}") from exc
    model = TensorPolyModel(backbone, config)
    layers = {name: [a.in_features, a.out_features] for name, a in model.adapters()}
    if layers != spec["layers"]:
        missing = sorted(set(spec["layers"]) - set(layers))[:3]
        extra = sorted(set(layers) - set(spec["layers"]))[:3]
        raise CheckpointError(f"the backbone's adapted layers differ from the saved ones "
                              f"(saved only: {missing}, backbone only: {extra}); wrong backbone for {directory}")
    restore_weights(model, directory)
    if spec.get("average_routing"):
        model.use_average_routing(spec["average_routing"])
    return model


def restore_weights(model: TensorPolyModel, directory: str | os.PathLike) -> None:
    """Copy the saved adapter, norm and router tensors into `model` (same spec), in place."""
    weights_path = Path(directory) / WEIGHTS_FILE
    if not weights_path.is_file():
        raise CheckpointError(f"{weights_path} is missing; the checkpoint is incomplete")
    state = load_file(str(weights_path))
    expected = adapter_state_dict(model)
    if set(state) != set(expected):
        raise CheckpointError(f"{weights_path} does not match its spec: missing {sorted(set(expected) - set(state))[:3]}, "
                              f"unexpected {sorted(set(state) - set(expected))[:3]}")
    for key, target in expected.items():
        if state[key].shape != target.shape:
            raise CheckpointError(f"{weights_path}: {key} has shape {tuple(state[key].shape)}, "
                                  f"the spec builds {tuple(target.shape)}")
        with torch.no_grad():
            target.copy_(state[key])


def merge(model: TensorPolyModel, task: int | str | None = None) -> nn.Module:
    """A plain copy of the backbone with one task's update folded into its weights.

    task: a task id or name; None uses the current average routing (zero-shot). Dense types
    (lora, tlora) ignore it.
    """
    weights = None
    if model.config.routed:
        if task is None and model.averaging is None:
            raise ConfigError("merge(task=None) needs average routing: call use_average_routing() "
                              "or name the task to merge")
        if isinstance(task, str):
            task = int(model.task_ids([task])[0])
        ids = torch.tensor([0 if task is None else task], device=model.device)
        model._check_ids(ids)
    deltas = {}
    for name, adapter in model.adapters():
        if adapter.routed:
            weights = adapter.router(ids)
        deltas[name] = adapter.delta_weight(weights)
    # Copy the backbone with the adapters swapped back to plain linears, then add the updates.
    memo = {id(adapter): copy.deepcopy(adapter.base_layer) for _, adapter in model.adapters()}
    merged = copy.deepcopy(model.model, memo)
    for name, delta in deltas.items():
        linear = merged.get_submodule(name)
        with torch.no_grad():
            linear.weight.add_(delta.to(linear.weight.dtype))
    return merged
