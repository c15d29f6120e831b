"""Few-shot training sets, T-Few protocol.

T-Few (and mttl) shuffle the *whole* training split with NumPy seeded by the run seed and keep the
first k rows; seeds 42, 1024, 0. ``np.random.RandomState(seed).shuffle`` draws the same permutation
as ``np.random.seed(seed); np.random.shuffle`` without touching the global state. Files follow
T-Few's layout ``<root>/<task>/<k>_shot/<seed>_seed.jsonl`` (raw fields + ``idx`` + ``label``), so
T-Few's own committed files can be dropped in and are preferred when present.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .example import DataError
from .io import read_jsonl, write_jsonl

SEEDS = (42, 1024, 0)


def few_shot_path(root: str | Path, task: str, k: int, seed: int) -> Path:
    return Path(root) / task / f"{k}_shot" / f"{seed}_seed.jsonl"


def sample_few_shot(pool: list[dict], k: int, seed: int, task: str = "") -> list[dict]:
    if k > len(pool):
        raise DataError(f"task {task!r}: asked for {k} shots but the training split has {len(pool)} rows")
    rows = list(pool)
    np.random.RandomState(seed).shuffle(rows)
    return rows[:k]


def load_few_shot(task: str, k: int, seed: int, pool: list[dict] | None = None, root: str | Path | None = None,
                  n_choices: int | None = None, cache: bool = False, label_of=None) -> list[dict]:
    """The k-shot set of ``task`` for ``seed``: from ``root``'s file if there, else sampled from
    ``pool`` (and written there when ``cache``). Labels (``label_of(row)``, default ``row["label"]``) are
    checked against ``n_choices``."""
    label_of = label_of or (lambda row: row.get("label"))
    path = few_shot_path(root, task, k, seed) if root is not None else None
    if path is not None and path.is_file():
        rows = read_jsonl(path)
        if len(rows) != k:
            raise DataError(f"{path}: expected {k} examples, found {len(rows)}")
    elif pool is not None:
        rows = sample_few_shot(pool, k, seed, task)
        if cache and path is not None:
            write_jsonl(path, rows)
    else:
        raise DataError(f"task {task!r}: no few-shot file at {path} and no training split to sample from")
    if n_choices is not None:
        for i, r in enumerate(rows):
            try:
                lab = label_of(r)
            except (KeyError, TypeError, ValueError):
                lab = None
            if not (isinstance(lab, int) and 0 <= lab < n_choices):
                where = path if path is not None and path.is_file() else f"task {task!r}"
                raise DataError(f"{where}: example {i} has label {lab!r}, out of range for {n_choices} choices")
    return rows
