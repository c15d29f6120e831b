"""The multi-task training mixture, shared by the T0 path and the embedded benchmark.

Each (dataset, template) pair draws its own training and validation examples from the dataset's
(capped) pool with a generator seeded by (seed, dataset, template). Unlike mttl, which used the
global torch RNG after model construction, the draw therefore does not depend on the adapter type:
every module type sees the same examples. Templates that do not apply to an example are skipped
(mttl trained on "<NO INPUT>" -> "<NO LABEL>" pairs instead).
"""
from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass

from tqdm.auto import tqdm

from .example import DataError, Example
from .templates import PromptTemplate

TASK_LEVELS = ("template", "dataset")


def stable_seed(*key) -> int:
    return int(hashlib.sha256("|".join(map(str, key)).encode()).hexdigest()[:16], 16)


def task_name(template: PromptTemplate, task_level: str) -> str:
    if task_level == "template":
        return template.task_name
    if task_level == "dataset":
        return template.dataset
    raise DataError(f"task_level must be one of {TASK_LEVELS}, got {task_level!r}")


def task_to_id(tasks) -> dict[str, int]:
    """Deterministic ids: positions in the sorted list of task names (stable routing tables)."""
    return {t: i for i, t in enumerate(sorted(set(tasks)))}


@dataclass
class Mixture:
    train: list[Example]
    validation: list[Example]
    tasks: list[str]  # sorted
    skipped: dict[str, int]  # template task -> non-applicable examples skipped

    @property
    def task2id(self) -> dict[str, int]:
        return task_to_id(self.tasks)


def sample_template(pool: Sequence[dict], template: PromptTemplate, n_train: int, n_val: int, seed: int,
                    task: str) -> tuple[list[Example], list[Example], int]:
    """Validation first (like mttl's random_split), then training, from one seeded permutation of the
    pool. Returns (train, val, number of non-applicable examples skipped)."""
    order = list(range(len(pool)))
    random.Random(stable_seed(seed, template.dataset, template.name)).shuffle(order)
    val, train, skipped = [], [], 0
    for i in order:
        if len(train) >= n_train and len(val) >= n_val:
            break
        ex = template.render(pool[i], task=task, idx=i)  # row position in the (capped) pool
        if ex is None:
            skipped += 1
            continue
        (val if len(val) < n_val else train).append(ex)
    return train, val, skipped


def build_mixture(pools: dict[str, tuple[Sequence[dict], list[PromptTemplate]]], n_train: int = 1000,
                  n_val: int = 100, seed: int = 42, task_level: str = "template",
                  progress: bool = True) -> Mixture:
    """``pools``: dataset -> (raw examples, its templates). Paper setting: 1,000 / 100 per template."""
    if task_level not in TASK_LEVELS:
        raise DataError(f"task_level must be one of {TASK_LEVELS}, got {task_level!r}")
    train, val, tasks, skipped = [], [], set(), {}
    items = [(ds, t) for ds, (_, ts) in sorted(pools.items()) for t in ts]
    for ds, t in tqdm(items, desc="templating", disable=not progress):
        name = task_name(t, task_level)
        tr, va, sk = sample_template(pools[ds][0], t, n_train, n_val, seed, name)
        if not tr:
            raise DataError(f"dataset {ds!r}, template {t.name!r}: renders no training example")
        train += tr
        val += va
        tasks.add(name)
        if sk:
            skipped[t.task_name] = sk
    return Mixture(train=train, validation=val, tasks=sorted(tasks), skipped=skipped)
