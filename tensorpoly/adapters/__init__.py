"""One file per adapter family; ADAPTERS maps AdapterConfig.module_type to its layer class."""
from .base import AdapterLinear
from .lora import LoRALinear
from .poly import PolyLinear
from .tensorpoly import TensorPolyIILinear, TensorPolyILinear
from .tlora import TLoRALinear

ADAPTERS: dict[str, type[AdapterLinear]] = {
    "lora": LoRALinear,
    "tlora": TLoRALinear,
    "poly": PolyLinear,
    "mhr": PolyLinear,  # MHR is Poly with n_splits > 1
    "tensorpoly1": TensorPolyILinear,
    "tensorpoly2": TensorPolyIILinear,
}

__all__ = ["ADAPTERS", "AdapterLinear", "LoRALinear", "TLoRALinear", "PolyLinear",
           "TensorPolyILinear", "TensorPolyIILinear"]
