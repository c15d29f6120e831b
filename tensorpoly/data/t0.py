"""The real T0 path on top of prepared data (``make data``): mixture, held-out examples, few-shot sets."""
from __future__ import annotations

from pathlib import Path

from .example import DataError, Example
from .fewshot import load_few_shot
from .hub import T0_DIR, load_local
from .mixture import Mixture, build_mixture, stable_seed
from .registry import eval_templates, load_registry
from .templates import promptsource_templates

FEW_SHOT_DIR = T0_DIR / "few_shot"


def t0_mixture(task_level: str = "template", n_train: int = 1000, n_val: int = 100, seed: int = 42,
               datasets: list[str] | None = None, root: Path = T0_DIR) -> Mixture:
    """The T0 training mixture (313 template tasks or 38 dataset tasks); paper setting 1,000/100."""
    reg = load_registry()
    names = datasets or [d.dataset for d in reg.train]
    pools = {}
    for n in names:
        d = reg.train_dataset(n)  # DataError for a name not in the registry
        train = load_local(n, root)["train"]
        pools[n] = (train.select(range(d.cap)) if len(train) > d.cap else train, promptsource_templates(n))
    return build_mixture(pools, n_train=n_train, n_val=n_val, seed=seed, task_level=task_level)


def _check_labels(task, rows, where):
    for i, r in enumerate(rows):
        lab = task.gold_label(r)
        if not 0 <= lab < task.n_choices:
            raise DataError(f"{where}: example {i} has label {lab}, out of range for {task.n_choices} choices")


def render_rows(task_name: str, rows: list[dict], mode: str = "all", seed: int = 0, where: str = "") -> list[Example]:
    """Render raw rows with the task's evaluation templates; every template must render (strict) and
    its label must agree with the registry's gold-label rule."""
    import random

    task = load_registry().eval_task(task_name)
    _check_labels(task, rows, where or f"task {task.task!r}")
    ts = eval_templates(task)
    pairs = ([(t, i) for t in ts for i in range(len(rows))] if mode == "all" else
             [(random.Random(stable_seed(seed, task.task, "eval-templates", i)).choice(ts), i) for i in range(len(rows))])
    out = []
    for t, i in pairs:
        ex = t.render(dict(rows[i]), task=task.task, idx=i, strict=True)
        gold = task.gold_label(rows[i])
        if ex.label != gold:
            raise DataError(f"dataset {task.dataset!r}, template {t.name!r}, example {i}: rendered target "
                            f"{ex.target!r} is choice {ex.label}, gold label is {gold}")
        out.append(ex)
    return out


def t0_eval_examples(task_name: str, mode: str = "all", seed: int = 0, root: Path = T0_DIR) -> list[Example]:
    task = load_registry().eval_task(task_name)
    rows = list(load_local(task.dataset, root)[task.eval_split])
    if len(rows) != task.eval_size:
        raise DataError(f"task {task.task!r}: {task.eval_split} has {len(rows)} rows, registry says {task.eval_size}")
    return render_rows(task.task, rows, mode, seed)


def t0_few_shot(task_name: str, seed: int = 42, k: int | None = None, mode: str = "random", root: Path = T0_DIR,
                few_shot_dir: Path = FEW_SHOT_DIR) -> list[Example]:
    """k-shot set from T-Few's file if present, else sampled from the few-shot pool (T-Few algorithm)."""
    task = load_registry().eval_task(task_name)
    k = task.k_shot if k is None else k
    pool = None
    if not (Path(few_shot_dir) / task.task / f"{k}_shot" / f"{seed}_seed.jsonl").is_file():
        pool = list(load_local(task.dataset, root)[task.fewshot_split])
    rows = load_few_shot(task.task, k, seed, pool=pool, root=few_shot_dir, n_choices=task.n_choices,
                         label_of=task.gold_label)
    return render_rows(task.task, rows, mode, seed)
