"""The task registry: which datasets train, which tasks are held out, and how each is read.

The T0 path reads ``data/registry/t0_train.csv`` and ``t0_eval.csv``; the embedded benchmark reads
``data/benchmark/registry.yaml``. Both give task names that map to ids deterministically
(:func:`task_to_id`: position in the sorted list), so routing tables are stable across runs.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, fields
from functools import lru_cache
from pathlib import Path

from .example import DataError
from .io import DATA_DIR
from .mixture import TASK_LEVELS, task_to_id

REGISTRY_DIR = DATA_DIR / "registry"
CAP_BUDGET = 500_000  # T0 / T-Few: at most 500k examples per dataset, split over its templates
SOURCES = ("t0", "benchmark")


@dataclass(frozen=True)
class TrainDataset:
    dataset: str  # registry key, "name/subset" or "name"
    hf_name: str
    subset: str | None
    cluster: str
    train_size: int
    n_templates: int
    n_original: int

    @property
    def cap(self) -> int:
        """Rows of ``train`` read per template (the first ``cap`` rows, HF order)."""
        return min(self.train_size, CAP_BUDGET // self.n_templates)


@dataclass(frozen=True)
class EvalTask:
    task: str  # T-Few key: rte, cb, anli-r1, ..., wic
    dataset: str
    hf_name: str
    subset: str | None
    template_dataset: str | None
    fewshot_split: str
    eval_split: str
    eval_size: int
    n_choices: int
    k_shot: int
    k_shot_tfew: int
    n_templates: int
    template_rule: str
    label_field: str
    label_offset: int

    @property
    def templates_from(self) -> str:
        return self.template_dataset or self.dataset

    def gold_label(self, row: dict) -> int:
        """The gold choice index of a raw row (1-based fields shifted, string labels parsed)."""
        if self.label_field not in row:
            raise DataError(f"task {self.task!r}: example has no field {self.label_field!r}")
        return int(row[self.label_field]) + self.label_offset


@dataclass(frozen=True)
class Registry:
    train: tuple[TrainDataset, ...]
    eval: tuple[EvalTask, ...]

    def train_dataset(self, name: str) -> TrainDataset:
        for d in self.train:
            if d.dataset == name:
                return d
        raise DataError(f"dataset {name!r} is not in the T0 training registry ({REGISTRY_DIR / 't0_train.csv'})")

    def eval_task(self, name: str) -> EvalTask:
        for t in self.eval:
            if t.task == name or t.dataset == name:
                return t
        raise DataError(f"task {name!r} is not in the T0 evaluation registry ({REGISTRY_DIR / 't0_eval.csv'}); "
                        f"known: {[t.task for t in self.eval]}")

    @property
    def datasets(self) -> list[str]:
        """Every dataset key the registry knows (training datasets and held-out datasets)."""
        return sorted({d.dataset for d in self.train} | {t.dataset for t in self.eval})


def _read_csv(path: Path, cls) -> tuple:
    names = {f.name: f.type for f in fields(cls)}
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except FileNotFoundError as e:
        raise DataError(f"{path}: registry file not found") from e
    if not rows or set(rows[0]) != set(names):
        got = sorted(rows[0]) if rows else []
        raise DataError(f"{path}: expected columns {sorted(names)}, got {got}")
    out = []
    for i, r in enumerate(rows, 2):
        try:
            kw = {}
            for k, typ in names.items():
                v = r[k]
                if "int" in str(typ):
                    kw[k] = int(v)
                else:
                    kw[k] = v or None if "None" in str(typ) else v
            out.append(cls(**kw))
        except (TypeError, ValueError) as e:
            raise DataError(f"{path}, line {i}: {e}") from e
    return tuple(out)


@lru_cache(maxsize=4)
def load_registry(root: str | Path = REGISTRY_DIR) -> Registry:
    root = Path(root)
    reg = Registry(train=_read_csv(root / "t0_train.csv", TrainDataset), eval=_read_csv(root / "t0_eval.csv", EvalTask))
    dup = {d.dataset for d in reg.train if sum(x.dataset == d.dataset for x in reg.train) > 1}
    if dup:
        raise DataError(f"{root / 't0_train.csv'}: duplicate datasets {sorted(dup)}")
    return reg


def list_tasks(task_level: str = "template", source: str = "t0") -> list[str]:
    """Sorted training task names. ``source="t0"``: 313 ``dataset/template`` or 38 ``dataset``
    (template level needs promptsource); ``"benchmark"``: the embedded benchmark's."""
    if task_level not in TASK_LEVELS:
        raise DataError(f"task_level must be one of {TASK_LEVELS}, got {task_level!r}")
    if source == "benchmark":
        from . import benchmark

        return benchmark.tasks(task_level)
    if source != "t0":
        raise DataError(f"source must be one of {SOURCES}, got {source!r}")
    reg = load_registry()
    if task_level == "dataset":
        return sorted(d.dataset for d in reg.train)
    from .templates import promptsource_templates

    return sorted(t.task_name for d in reg.train for t in promptsource_templates(d.dataset))


def eval_templates(task: str | EvalTask):
    """The promptsource templates a held-out task is evaluated with (the registry's template rule)."""
    from .templates import promptsource_templates

    t = task if isinstance(task, EvalTask) else load_registry().eval_task(task)
    ts = [x for x in promptsource_templates(t.dataset, t.templates_from) if x.original_task]
    if t.template_rule == "original_task_first_8":
        ts = ts[:8]
    elif t.template_rule != "original_task":
        raise DataError(f"task {t.task!r}: unknown template rule {t.template_rule!r}")
    if len(ts) != t.n_templates:
        raise DataError(f"task {t.task!r}: {len(ts)} templates under rule {t.template_rule!r}, registry says {t.n_templates}")
    return ts


__all__ = ["EvalTask", "Registry", "TrainDataset", "eval_templates", "list_tasks", "load_registry", "task_to_id"]
