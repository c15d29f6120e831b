"""Figures: accuracy versus trainable parameters per method, and learned routing heatmaps
(tasks by experts, averaged over layers or for one layer) read from a saved adapter."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on CI or clusters
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from ..routing import Router  # noqa: E402
from .collect import Group  # noqa: E402
from .tables import task_cells  # noqa: E402


def accuracy_vs_params(groups: list[Group], path: Path, title: str) -> Path | None:
    points = []
    for g in groups:
        tasks = sorted({t for s in g.samples for t in s})
        avg = task_cells(g, tasks)[-1]
        if avg.mean is not None and g.params:
            points.append((g.label, g.params["adapter"] + g.params["routing"], avg.mean, avg.std or 0.0,
                           sum(g.chance.values()) / max(len(g.chance), 1)))
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, x, y, err, _ in points:
        ax.errorbar(x, 100 * y, yerr=100 * err, fmt="o", capsize=3, label=label)
        ax.annotate(label, (x, 100 * y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.axhline(100 * points[0][4], color="grey", ls="--", lw=1, label="chance")
    ax.set_xscale("log")
    ax.set(xlabel="trainable parameters (adapter + routing)", ylabel="average held-out accuracy (%)", title=title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def routing_weights(adapter_dir: Path, layer: str | None = None) -> tuple[torch.Tensor, list[str], list[str]]:
    """[tasks, experts] routing weights (sigmoid, normalised; averaged over splits and over layers unless
    `layer` names one router), the task names and the router keys."""
    spec = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    config = spec["adapter_config"]
    state = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    keys = sorted(k for k in state if k.startswith("routers.") and k.endswith(".logits"))
    if layer is not None:
        keys = [k for k in keys if layer in k]
    if not keys:
        raise ValueError(f"{adapter_dir}: no router{' matching ' + layer if layer else ''} (dense adapters have none)")
    S = int(config["n_experts"])
    tables = [Router.normalise(torch.sigmoid(state[k].float().view(state[k].shape[0], -1, S))).mean(1) for k in keys]
    return torch.stack(tables).mean(0), list(config["task_names"]), keys


def routing_heatmap(adapter_dir: Path, path: Path, title: str, layer: str | None = None) -> Path:
    weights, tasks, keys = routing_weights(adapter_dir, layer)
    clusters = [t.split("/")[0] for t in tasks]
    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * weights.shape[1], 1.5 + 0.22 * len(tasks)))
    image = ax.imshow(weights.numpy(), aspect="auto", cmap="viridis")
    ax.set_yticks(range(len(tasks)), tasks, fontsize=6)
    ax.set_xticks(range(weights.shape[1]), [f"e{s}" for s in range(weights.shape[1])], fontsize=7)
    for i in range(1, len(tasks)):  # a line between task clusters (datasets)
        if clusters[i] != clusters[i - 1]:
            ax.axhline(i - 0.5, color="white", lw=1)
    where = layer or f"mean of {len(keys)} routers"
    ax.set(xlabel="expert", title=f"{title}\n({where})")
    fig.colorbar(image, ax=ax, fraction=0.05)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
