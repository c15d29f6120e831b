"""tensorpoly: LoRA, TLoRA, Poly/MHR, TensorPoly-I and TensorPoly-II adapters for Hugging Face T5."""
from .checkpoint import load_adapter, merge, save_adapter
from .config import AdapterConfig, ConfigError
from .model import TensorPolyModel
from .scoring import choice_log_likelihoods

__all__ = ["AdapterConfig", "ConfigError", "TensorPolyModel", "save_adapter", "load_adapter", "merge",
           "choice_log_likelihoods"]
