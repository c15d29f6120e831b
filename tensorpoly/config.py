"""AdapterConfig: the complete, serialisable description of an adapted model.

Everything that decides the adapter's shapes or maths lives here, so that a saved
spec rebuilds the exact model (the paper code lost `order` at fine-tuning time because
it was not persisted; see reference-code.md §8.2 item 11).
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

MODULE_TYPES = ("lora", "tlora", "poly", "mhr", "tensorpoly1", "tensorpoly2")
ROUTED_TYPES = ("poly", "mhr", "tensorpoly1", "tensorpoly2")
TENSOR_TYPES = ("tlora", "tensorpoly1", "tensorpoly2")
GRANULARITIES = ("finegrained", "layer", "block", "coder", "model")
NORMS = ("joint", "row", "none")
INITS = ("paper", "zero_b")

# The paper code's targets: every attention and FF linear in every block.
DEFAULT_TARGET_MODULES = r".*(SelfAttention|EncDecAttention|DenseReluDense)"
DEFAULT_TARGET_LAYERS = r"q|k|v|o|wi|wi_0|wi_1|wo"


class ConfigError(ValueError):
    """A bad adapter configuration, raised before any model is built."""


@dataclass
class AdapterConfig:
    """What to put into the backbone, and how it routes.

    module_type: one of MODULE_TYPES.
    rank: r, rows of each LoRA factor; the update is scaled by 1/r (no alpha, as in the paper code).
    n_experts: S, experts per adapted linear (ignored by lora/tlora).
    order: N, leaves per factor row (tensor types only).
    n_splits: MHR heads, contiguous blocks of the feature dimension (poly/mhr only; mhr needs > 1).
    task_names: one routing row per name. Empty for the dense types.
    granularity: which adapted linears share one router (see routing.granularity_key).
    norm: LayerNorm over each leaf-pair product: "joint" over [r, leaf^2] as the paper code,
        "row" per factor row, or "none".
    share_norm: one LayerNorm for every leaf pair of a factor (paper's TensorPoly-I/TLoRA) or one
        per pair (paper's TensorPoly-II). None picks the paper's choice for the module type.
    norm_affine_trainable: the paper's sota configs keep the LN affine frozen at identity.
    norm_over_padding: the paper code's LN statistics include the entries that truncation to d
        drops afterwards; False computes them over the surviving entries only.
    init: "paper" reproduces the paper code (TensorPoly leaves all non-zero, so the adapter is not
        zero at initialisation); "zero_b" zeroes the last B leaf so the update starts at zero as LoRA.
    relaxed_bernoulli: sample routing weights from RelaxedBernoulli(T=1) during training
        (mttl's default; the paper's sota configs turn it off).
    """

    module_type: str = "tensorpoly1"
    rank: int = 16
    n_experts: int = 8
    order: int = 4
    n_splits: int = 1
    task_names: list[str] = field(default_factory=list)
    granularity: str = "finegrained"
    target_modules: str = DEFAULT_TARGET_MODULES
    target_layers: str = DEFAULT_TARGET_LAYERS
    norm: str = "joint"
    share_norm: bool | None = None
    norm_eps: float = 1e-5
    norm_affine_trainable: bool = False
    norm_over_padding: bool = True
    init: str = "paper"
    relaxed_bernoulli: bool = False

    def __post_init__(self) -> None:
        self.task_names = list(self.task_names)
        if self.share_norm is None:
            # The paper code reuses one LN for both pairs in TensorPoly-I and has separate
            # LNs per pair in TensorPoly-II (reference-code.md §1.6, §1.7).
            self.share_norm = self.module_type != "tensorpoly2"
        self.validate()

    @property
    def routed(self) -> bool:
        return self.module_type in ROUTED_TYPES

    @property
    def n_tasks(self) -> int:
        return len(self.task_names)

    @property
    def router_splits(self) -> int:
        """Routing distributions per task and router: MHR heads, or one per order for TensorPoly-II."""
        if self.module_type == "tensorpoly2":
            return self.order
        if self.module_type in ("poly", "mhr"):
            return self.n_splits
        return 1

    def validate(self) -> None:
        def bad(msg: str) -> None:
            raise ConfigError(msg)

        if self.module_type not in MODULE_TYPES:
            bad(f"unknown module_type {self.module_type!r}; choose one of {', '.join(MODULE_TYPES)}")
        for name in ("rank", "order", "n_experts", "n_splits"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                bad(f"{name} must be an integer >= 1, got {value!r}")
        if self.module_type == "mhr" and self.n_splits < 2:
            bad(f"mhr is Poly with n_splits > 1, got n_splits={self.n_splits}; use module_type='poly' for one split")
        if self.n_splits > 1 and self.module_type not in ("poly", "mhr"):
            bad(f"n_splits={self.n_splits} only applies to poly/mhr; {self.module_type} routes "
                f"{'per order position' if self.module_type == 'tensorpoly2' else 'with one split'}: set n_splits=1")
        if self.granularity not in GRANULARITIES:
            bad(f"unknown granularity {self.granularity!r}; choose one of {', '.join(GRANULARITIES)}")
        if self.norm not in NORMS:
            bad(f"unknown norm {self.norm!r}; choose one of {', '.join(NORMS)}")
        if self.init not in INITS:
            bad(f"unknown init {self.init!r}; choose one of {', '.join(INITS)}")
        if not self.norm_eps > 0:
            bad(f"norm_eps must be > 0, got {self.norm_eps!r}")
        if self.routed and not self.task_names:
            bad(f"{self.module_type} routes per task: give task_names (one routing row each)")
        if len(set(self.task_names)) != len(self.task_names):
            dup = sorted({t for t in self.task_names if self.task_names.count(t) > 1})
            bad(f"task_names must be unique; repeated: {dup[:5]}")
        for name in ("target_modules", "target_layers"):
            try:
                re.compile(getattr(self, name))
            except re.error as exc:
                bad(f"{name} is not a valid regular expression ({exc}): {getattr(self, name)!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AdapterConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown adapter config keys {unknown}; known keys: {sorted(known)}")
        return cls(**data)
