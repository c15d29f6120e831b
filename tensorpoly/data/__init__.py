"""Data for TensorPoly: the T0 path (registry, promptsource templates, hub loading, few-shot sets)
and the embedded benchmark that the default run uses. See data/README.md.

Light imports only: promptsource, datasets and the hub are imported when a function needs them.
"""
from .collate import Collator, collate
from .example import DataError, Example
from .fewshot import SEEDS as FEW_SHOT_SEEDS
from .mixture import Mixture, task_to_id
from .registry import EvalTask, Registry, TrainDataset, list_tasks, load_registry
from .tokenization import TokenizeConfig, encode

__all__ = ["Collator", "DataError", "EvalTask", "Example", "FEW_SHOT_SEEDS", "Mixture", "Registry", "TokenizeConfig",
           "TrainDataset", "collate", "encode", "list_tasks", "load_registry", "task_to_id"]
