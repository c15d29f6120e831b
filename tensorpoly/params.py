"""Parameter report: adapter, routing and frozen-extra parameters per module type, from shapes alone.

The backbone is built on the meta device, so T0-3B or T0-11B shapes cost no memory and no download.
"""
from __future__ import annotations

from .backbones import build_backbone, read_group_config
from .config import AdapterConfig
from .model import TensorPolyModel


def adapter_config_for(model_name: str, n_tasks: int, **overrides) -> AdapterConfig:
    fields = dict(read_group_config("model", model_name))
    fields.update(overrides)
    if fields.get("module_type") in ("poly", "mhr", "tensorpoly1", "tensorpoly2"):
        fields.setdefault("task_names", [f"task{i}" for i in range(n_tasks)])
    return AdapterConfig(**fields)


def count_parameters(model_name: str, backbone: str, n_tasks: int, **overrides) -> dict:
    config = adapter_config_for(model_name, n_tasks, **overrides)
    model = TensorPolyModel(build_backbone(backbone, device="meta"), config)
    counts = model.parameter_counts()
    counts["adapted_layers"] = len(model.adapter_names)
    counts["routers"] = len(model.routers)
    return counts


def format_report(rows: dict[str, dict], backbone: str, n_tasks: int) -> str:
    header = (f"backbone {backbone}, {n_tasks} tasks\n"
              f"{'model':<12} {'layers':>6} {'adapter':>12} {'routing':>12} {'frozen extra':>13} "
              f"{'trainable':>12} {'% backbone':>10}")
    lines = [header, "-" * len(header.splitlines()[-1])]
    for name, c in rows.items():
        trainable = c["adapter"] + c["routing"]
        lines.append(f"{name:<12} {c['adapted_layers']:>6} {c['adapter']:>12,} {c['routing']:>12,} "
                     f"{c['frozen_extra']:>13,} {trainable:>12,} {100 * trainable / c['backbone']:>9.3f}%")
    first = next(iter(rows.values()))
    lines.append(f"frozen backbone: {first['backbone']:,} parameters")
    return "\n".join(lines)
