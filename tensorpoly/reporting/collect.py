"""Read every results file under results/ into flat records the tables group and average.

A sample is one evaluated model: a training run (zero-shot) or one (training run, few-shot seed) pair
(few-shot). Cells average over samples: seeds of training runs, and few-shot seeds. Results files that
evaluate the same model on different tasks (a training run's own evaluation and a later `make eval` of
its checkpoint on tasks added since) fill one sample.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

FORMAT = "tensorpoly-result/1"
METHODS = {"lora": "LoRA", "poly": "Poly", "mhr": "MHR", "tlora": "TLoRA", "tensorpoly1": "TensorPoly-I",
           "tensorpoly2": "TensorPoly-II"}
VARIANT_KEYS = ("rank", "order", "n_experts", "n_splits")
KINDS = {"train": "zero-shot", "finetune": "few-shot", "eval": "zero-shot"}


@dataclass
class Group:
    """Runs that differ only in their seeds: one row of a table."""
    kind: str                      # zero-shot | few-shot
    data: str
    backbone: str
    method: str
    variant: tuple                 # ((key, value), ...) of VARIANT_KEYS
    granularity: str
    samples: list[dict] = field(default_factory=list)   # {task: accuracy}
    chance: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)
    adapter_dirs: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return METHODS.get(self.method, self.method)

    def variant_value(self, key: str):
        return dict(self.variant).get(key)


def _train_config(record: dict) -> dict:
    return record.get("train_config") or record["config"]


def read_results(root: Path) -> list[dict]:
    records = []
    for path in sorted(Path(root).rglob("*.json")):
        if any(part in ("tables", "plots", "bench") for part in path.relative_to(root).parts[:-1]):
            continue
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            warnings.warn(f"skipping unreadable results file {path}: {exc}")
            continue
        if isinstance(record, dict) and record.get("format") == FORMAT and record.get("kind") in KINDS:
            problem = config_problem(record)
            if problem:
                warnings.warn(f"skipping results file {path}: {problem} (written by an older version? rerun it)")
                continue
            record["_path"] = str(path)
            records.append(record)
    return records


def config_problem(record: dict) -> str | None:
    """What keeps a results file out of the tables (None: nothing)."""
    cfg = _train_config(record)
    for key in ("model", "data", "backbone", "routing"):
        if not isinstance(cfg.get(key), dict):
            return f"its config's {key!r} is {type(cfg.get(key)).__name__}, not a mapping"
    if "module_type" not in cfg["model"] or not isinstance(record.get("heldout"), dict):
        return "it names no model.module_type or has no held-out results"
    return None


def evaluated_model(record: dict) -> str:
    """The checkpoint a results file evaluated (its own path when it names none)."""
    return str(Path(record.get("adapter_dir") or record.get("checkpoint") or record["_path"]).resolve())


# Training settings that change what a run learns (not how it is logged or checkpointed).
BOOKKEEPING = ("threads", "checkpoint_every", "log_every", "val_every", "val_batches", "precision")


def recipe_of(record: dict) -> str:
    train = _train_config(record).get("train")
    if not isinstance(train, dict):
        return ""
    return json.dumps({k: v for k, v in train.items() if k not in BOOKKEEPING}, sort_keys=True)


def group_results(records: list[dict]) -> list[Group]:
    groups: dict[tuple, Group] = {}
    recipes: dict[tuple, dict[str, str]] = {}  # group key -> {recipe: one file that used it}
    samples: dict[tuple, dict] = {}  # (group key, evaluated model, few-shot seed) -> that sample

    def sample(g: Group, key: tuple) -> dict:
        if key not in samples:
            samples[key] = {}
            g.samples.append(samples[key])
        return samples[key]

    for r in records:
        cfg = _train_config(r)
        model = cfg["model"]
        variant = tuple((k, model.get(k)) for k in VARIANT_KEYS if k in model)
        key = (KINDS[r["kind"]], cfg["data"]["name"], cfg["backbone"]["name"], model["module_type"], variant,
               cfg["routing"]["granularity"])
        g = groups.setdefault(key, Group(*key))
        recipes.setdefault(key, {}).setdefault(recipe_of(r), r["_path"])
        if r["kind"] == "finetune":
            seeds = sorted({s for runs in r["heldout"].values() for s in runs})
            for s in seeds:
                sample(g, (key, evaluated_model(r), s)).update(
                    {t: runs[s]["accuracy"] for t, runs in r["heldout"].items() if s in runs})
            for t, runs in r["heldout"].items():
                g.chance[t] = next(iter(runs.values()))["chance"]
        else:
            sample(g, (key, evaluated_model(r), None)).update({t: v["accuracy"] for t, v in r["heldout"].items()})
            g.chance.update({t: v["chance"] for t, v in r["heldout"].items()})
        g.params = r.get("params") or g.params
        if r.get("adapter_dir"):
            g.adapter_dirs.append(r["adapter_dir"])
    for key, seen in recipes.items():
        if len(seen) > 1:
            warnings.warn(f"{groups[key].label} ({key[0]}, {key[1]} / {key[2]}) averages runs of {len(seen)} training "
                          f"recipes, e.g. {' and '.join(sorted(seen.values())[:2])}; give make_tables one recipe's "
                          f"results (--results DIR, as make reproduce does)")
    return list(groups.values())
