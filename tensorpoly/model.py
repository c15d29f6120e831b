"""TensorPolyModel: a frozen Hugging Face model with adapters injected by regular expressions.

    model = TensorPolyModel(T5ForConditionalGeneration(config), AdapterConfig(module_type="tensorpoly1",
                            task_names=names))
    out = model(input_ids=..., labels=..., task_ids=torch.tensor([3, 0, 3]))

Everything is validated (module type, sizes, targets, splits) before the backbone is touched.
"""
from __future__ import annotations

import re
from collections import Counter
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import nn

from .adapters import ADAPTERS, AdapterLinear
from .config import AdapterConfig, ConfigError
from .routing import AVERAGE_KINDS, Router, granularity_key
from .scoring import score_choices
from .task_routing import TaskRouting, TaskRoutingError


def find_targets(model: nn.Module, config: AdapterConfig) -> list[tuple[str, nn.Linear]]:
    """(qualified name, linear) for every child matching target_layers of a module matching target_modules."""
    modules_re, layers_re = re.compile(config.target_modules), re.compile(config.target_layers)
    found = []
    for parent_name, parent in model.named_modules():
        if not modules_re.fullmatch(parent_name):
            continue
        for child_name, child in parent.named_children():
            if not layers_re.fullmatch(child_name):
                continue
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            if isinstance(child, AdapterLinear):
                raise ConfigError(f"{full} already holds an adapter; wrap the plain backbone once")
            if not isinstance(child, nn.Linear):
                raise ConfigError(f"{full} matches the targets but is a {type(child).__name__}, not nn.Linear; "
                                  f"narrow target_layers={config.target_layers!r}")
            found.append((full, child))
    if not found:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:6]
        raise ConfigError(f"target_modules={config.target_modules!r} with target_layers={config.target_layers!r} "
                          f"match no linear layer of this model; its linears are named like {linears}")
    return found


def layer_side(name: str) -> str | None:
    head = name.split(".", 1)[0]
    return head if head in ("encoder", "decoder") else None


def check_targets(model: nn.Module, config: AdapterConfig) -> tuple[list[tuple[str, nn.Linear]], list[str]]:
    """Validate config against the model's layers without changing anything; (targets, router keys)."""
    config.validate()
    targets = find_targets(model, config)
    cls = ADAPTERS[config.module_type]
    for name, linear in targets:
        cls.check_shape(config, linear.in_features, linear.out_features, name)
    keys = [granularity_key(name, config.granularity) for name, _ in targets] if config.routed else []
    return targets, keys


def check_config(config: AdapterConfig, hf_config) -> None:
    """Raise ConfigError if config does not fit a backbone of this HF config.

    Runs on the meta device from the config alone, so a bad setting is caught before
    multi-GB weights are loaded.
    """
    from transformers import AutoModelForSeq2SeqLM

    with torch.device("meta"):
        skeleton = AutoModelForSeq2SeqLM.from_config(hf_config)
    check_targets(skeleton, config)


class TensorPolyModel(nn.Module):
    def __init__(self, model: nn.Module, config: AdapterConfig):
        super().__init__()
        targets, keys = check_targets(model, config)
        cls = ADAPTERS[config.module_type]

        self.config = config
        self.model = model
        self.task_routing = TaskRouting()
        self.routers = nn.ModuleDict()
        for p in model.parameters():
            p.requires_grad_(False)
        first = next(model.parameters())
        for key in dict.fromkeys(keys):
            # Adapters and routers take the backbone's device and dtype, as the adapter layers do.
            with torch.device(first.device):
                router = Router(config.n_tasks, config.router_splits, config.n_experts, config.relaxed_bernoulli)
            self.routers[_module_key(key)] = router.to(first.dtype)
        self.adapter_names: list[str] = []
        for i, (name, linear) in enumerate(targets):
            adapter = cls(linear, config)
            adapter._routing, adapter._side = self.task_routing, layer_side(name)
            if config.routed:
                adapter._router = (self.routers[_module_key(keys[i])],)
            parent_name, _, child_name = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child_name, adapter)
            self.adapter_names.append(name)
            self.task_routing.register(adapter)  # groups layers whose factors are built together

    # ---- calling the model -------------------------------------------------------------
    @contextmanager
    def routing(self, task_ids=None, decoder_task_ids=None):
        """Route every adapted layer by these task ids for the calls inside the block."""
        with self.task_routing.use(self._check_ids(task_ids), self._check_ids(decoder_task_ids)):
            yield

    def forward(self, *args, task_ids=None, decoder_task_ids=None, choice_ids=None, **kwargs):
        """The backbone's forward under task routing. With choice_ids [B, C, Lc] (padded with -100)
        it returns the [B, C, Lc] token log-probabilities of every answer choice instead, the encoder
        run once per example (rank classification and the T-Few losses)."""
        with self.routing(task_ids, decoder_task_ids):
            if choice_ids is not None:
                return score_choices(self.model, kwargs["input_ids"], kwargs["attention_mask"], choice_ids)
            return self.model(*args, **kwargs)

    @torch.no_grad()
    def generate(self, *args, task_ids=None, **kwargs):
        with self.routing(task_ids):
            return self.model.generate(*args, **kwargs)

    def task_ids(self, names: Sequence[str]) -> torch.Tensor:
        """Task names -> ids tensor, on the model's device."""
        index = {n: i for i, n in enumerate(self.config.task_names)}
        missing = [n for n in names if n not in index]
        if missing:
            raise TaskRoutingError(f"unknown task names {missing[:5]}; this model knows {len(index)} tasks "
                                   f"(e.g. {self.config.task_names[:3]}); use use_average_routing() for unseen tasks")
        return torch.tensor([index[n] for n in names], device=self.device)

    def _check_ids(self, ids):
        if ids is None:
            return None
        if not torch.is_tensor(ids):
            ids = torch.as_tensor(ids)
        if ids.dtype not in (torch.int64, torch.int32) or ids.dim() != 1:
            raise TaskRoutingError(f"task_ids must be a 1-D integer tensor (one id per example), "
                                   f"got dtype {ids.dtype} and shape {tuple(ids.shape)}")
        if self.config.routed and not self.averaging and ids.numel():
            low, high = int(ids.min()), int(ids.max())
            if low < 0 or high >= self.config.n_tasks:
                bad = high if high >= self.config.n_tasks else low
                raise TaskRoutingError(f"task id {bad} is out of range for {self.config.n_tasks} tasks; "
                                       f"use use_average_routing() for unseen tasks or reset_tasks([...]) "
                                       f"to add rows for new ones")
        return ids.to(self.device, torch.long)

    # ---- routing table -------------------------------------------------------------------
    @property
    def averaging(self) -> str | None:
        return next(iter(self.routers.values())).average if len(self.routers) else None

    def use_average_routing(self, kind: str = "uniform") -> None:
        """Serve unseen tasks: "uniform" weights 1/S (the paper's zero-shot), or "mean_of_tasks"."""
        if kind not in AVERAGE_KINDS:
            raise ConfigError(f"unknown average routing {kind!r}; choose one of {AVERAGE_KINDS}")
        for router in self.routers.values():
            router.average = kind
        self.clear_factor_cache()

    def use_learned_routing(self) -> None:
        for router in self.routers.values():
            router.average = None
        self.clear_factor_cache()

    def reset_tasks(self, task_names: Sequence[str]) -> None:
        """Fresh routing rows for new tasks (few-shot fine-tuning); the experts are kept."""
        self.config.task_names = list(task_names)
        self.config.validate()
        for router in self.routers.values():
            router.reset_logits(len(task_names))
            router.average = None
        self.clear_factor_cache()

    def clear_factor_cache(self) -> None:
        """Forget the factors kept for gradient-free calls (see task_routing.py). Parameter updates
        through optimizers, copy_ or load_state_dict are detected without it; edits via .data are not."""
        self.task_routing.clear_factor_cache()

    # ---- introspection ---------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def adapters(self) -> Iterator[tuple[str, AdapterLinear]]:
        for name in self.adapter_names:
            yield name, self.model.get_submodule(name)

    def parameter_roles(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by role, for optimizer groups (routers get their own learning rate)."""
        roles: dict[str, list[nn.Parameter]] = {"adapter": [], "norm": [], "router": list(self.routers.parameters())}
        for _, adapter in self.adapters():
            for pname, p in adapter.named_parameters():
                if pname.startswith("base_layer."):
                    continue
                roles["norm" if pname.startswith("norms_") else "adapter"].append(p)
        return roles

    def parameter_counts(self) -> dict[str, int]:
        """adapter / routing (trainable), frozen_extra (frozen norm affines), backbone (frozen)."""
        roles = self.parameter_roles()
        counts = Counter()
        for role, params in roles.items():
            for p in params:
                if role == "router":
                    counts["routing"] += p.numel()
                elif p.requires_grad:
                    counts["adapter"] += p.numel()
                else:
                    counts["frozen_extra"] += p.numel()
        extras = {id(p) for ps in roles.values() for p in ps}
        counts["backbone"] = sum(p.numel() for p in self.model.parameters() if id(p) not in extras)
        return {k: counts[k] for k in ("adapter", "routing", "frozen_extra", "backbone")}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]


def _module_key(key: str) -> str:
    # nn.ModuleDict keys cannot hold dots.
    return key.replace(".", ":")
