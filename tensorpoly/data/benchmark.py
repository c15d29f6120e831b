"""The embedded benchmark: a small synthetic multi-task suite shipped under ``data/benchmark/``.

Same shapes as the T0 path: datasets with several prompt templates, a training mixture of
(dataset, template) or dataset tasks, held-out multiple-choice tasks with a few-shot pool and an
evaluation split, and few-shot files in T-Few's layout. Design and rationale: data/README.md.

    build_benchmark()                 # regenerate the files (scripts/build_benchmark.py)
    train_mixture(task_level=...)     # Mixture(train, validation, tasks) of training tasks
    eval_examples("who_liked")        # rendered held-out examples with answer choices and labels
    few_shot_examples("who_liked", seed=42)
"""
from __future__ import annotations

import hashlib
import json
import random
import re
import time
from functools import lru_cache
from pathlib import Path

import yaml

from . import benchmark_gen as G
from .example import DataError, Example
from .fewshot import SEEDS, few_shot_path, load_few_shot, sample_few_shot
from .io import DATA_DIR, atomic_path, read_jsonl, write_jsonl
from .mixture import Mixture, build_mixture, stable_seed, task_to_id
from .templates import PromptTemplate, jinja_templates

BENCHMARK_DIR = DATA_DIR / "benchmark"
GENERATED = ("train", "heldout", "few_shot", "manifest.json")  # what build_benchmark writes


# ----------------------------------------------------------------------------- registry and templates
def _yaml(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except FileNotFoundError as e:
        raise DataError(f"{path}: file not found") from e
    except yaml.YAMLError as e:
        raise DataError(f"{path}: malformed YAML: {e}") from e


@lru_cache(maxsize=4)
def benchmark_registry(root: str | Path = BENCHMARK_DIR) -> dict:
    reg = _yaml(Path(root) / "registry.yaml")
    for name, spec in reg["datasets"].items():
        if spec["role"] not in ("train", "heldout"):
            raise DataError(f"{Path(root) / 'registry.yaml'}: dataset {name!r} has unknown role {spec['role']!r}")
        if name not in G.GENERATORS:
            raise DataError(f"{Path(root) / 'registry.yaml'}: dataset {name!r} has no generator in benchmark_gen.py")
    return reg


def train_datasets(root=BENCHMARK_DIR) -> list[str]:
    return sorted(n for n, s in benchmark_registry(str(root))["datasets"].items() if s["role"] == "train")


def heldout_datasets(root=BENCHMARK_DIR) -> list[str]:
    return sorted(n for n, s in benchmark_registry(str(root))["datasets"].items() if s["role"] == "heldout")


TRANSFER_KINDS = ("composition", "rewording")


def heldout_transfer(root=BENCHMARK_DIR) -> dict[str, str]:
    """Held-out dataset -> the transfer it tests: composition (two training skills at once) or rewording
    (one training skill in new words)."""
    reg = benchmark_registry(str(root))
    out = {n: s.get("transfer") for n, s in reg["datasets"].items() if s["role"] == "heldout"}
    bad = {n: k for n, k in out.items() if k not in TRANSFER_KINDS}
    if bad:
        raise DataError(f"{Path(root) / 'registry.yaml'}: held-out dataset(s) {bad} need transfer: one of {TRANSFER_KINDS}")
    return out


def dataset_spec(name: str, root=BENCHMARK_DIR) -> dict:
    ds = benchmark_registry(str(root))["datasets"]
    if name not in ds:
        raise DataError(f"unknown benchmark dataset {name!r}; known: {sorted(ds)}")
    return ds[name]


@lru_cache(maxsize=64)
def _templates(name: str, root: str) -> tuple[PromptTemplate, ...]:
    groups = _yaml(Path(root) / "templates.yaml")
    specs = []
    for g in dataset_spec(name, root)["template_groups"]:
        if g not in groups:
            raise DataError(f"{Path(root) / 'templates.yaml'}: template group {g!r} (dataset {name!r}) not found")
        specs += groups[g]
    return tuple(jinja_templates(name, specs))


def templates(name: str, original_only: bool = False, root=BENCHMARK_DIR) -> list[PromptTemplate]:
    ts = list(_templates(name, str(root)))
    return [t for t in ts if t.original_task] if original_only else ts


def tasks(task_level: str = "template", root=BENCHMARK_DIR) -> list[str]:
    """Sorted training task names: ``dataset/template`` (template level) or ``dataset``."""
    if task_level == "dataset":
        return train_datasets(root)
    return sorted(t.task_name for d in train_datasets(root) for t in templates(d, root=root))


# ----------------------------------------------------------------------------- generation
def _paths(root: Path) -> dict:
    return {"train": root / "train", "heldout": root / "heldout", "few_shot": root / "few_shot"}


def forbidden_strings(heldout_rows: list[dict]) -> list[str]:
    """Evaluation data the pretraining text must not contain: every string field of a held-out row
    (>= 12 characters) and every list field joined as the templates join it."""
    out = set()
    for row in heldout_rows:
        for v in row.values():
            if isinstance(v, str) and len(v) >= 12:
                out.add(v)
            elif isinstance(v, list) and v and all(isinstance(x, str) for x in v):
                for sep in (", ", " "):
                    s = sep.join(v)
                    if len(s) >= 12:
                        out.add(s)
    return sorted(out)


def generate_all(seed: int | None = None, root: Path = BENCHMARK_DIR) -> dict:
    """In-memory generation: {"train": {ds: rows}, "heldout": {ds: {"train": rows, "validation": rows}}}."""
    reg = benchmark_registry(str(root))
    seed = reg["seed"] if seed is None else seed
    out = {"seed": seed, "train": {}, "heldout": {}}
    for ds in train_datasets(root):
        out["train"][ds] = G.generate(ds, reg["train_pool_size"], seed, "train")
    for ds in heldout_datasets(root):
        ev = G.generate(ds, reg["heldout_eval_size"], seed, "validation")
        tr = G.generate(ds, reg["heldout_train_size"], seed, "train", exclude={G.example_key(r) for r in ev})
        out["heldout"][ds] = {"train": tr, "validation": ev}
    return out


def all_heldout_rows(gen: dict) -> list[dict]:
    return [r for d in gen["heldout"].values() for split in d.values() for r in split]


def pretraining_text(seed: int | None = None, n_docs: int = 30000, root: Path = BENCHMARK_DIR,
                     kinds: tuple[int, ...] | None = None) -> list[str]:
    """The backbone's pretraining corpus: declarative world sentences, no prompts, and no string of
    any held-out example (checked, not assumed)."""
    gen = generate_all(seed, root)
    return G.pretraining_corpus(gen["seed"], n_docs, forbidden_strings(all_heldout_rows(gen)), kinds)


BACKBONE_PRETRAINING_DOCS = 12000  # scripts/pretrain_backbone.py --n-docs: the shipped backbone's corpus


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def _prompt_words(template: PromptTemplate) -> set[str]:
    """The words a template itself writes (prompt and answer choices), without the fields it fills in."""
    impl = template._impl
    fixed = re.sub(r"\{[{%].*?[%}]\}", " ", impl.jinja) + " " + re.sub(r"\{\{.*?\}\}", " ", impl.answer_choices or "")
    return _words(fixed)


@lru_cache(maxsize=1)
def known_words(root: str = str(BENCHMARK_DIR)) -> frozenset[str]:
    """Words the embedded backbone can have learnt: those of its pretraining text and of the training prompts."""
    words = _words(" ".join(pretraining_text(n_docs=BACKBONE_PRETRAINING_DOCS, root=Path(root))))
    for d in train_datasets(root):
        for t in templates(d, root=root):
            words |= _prompt_words(t)
    return frozenset(words)


def unseen_prompt_words(dataset: str, root=BENCHMARK_DIR) -> dict[str, list[str]]:
    """Per original-task template of a held-out dataset, the words of its prompt that neither the pretraining
    text nor any training prompt contains (their embeddings were never trained)."""
    known = known_words(str(root))
    return {t.name: sorted(_prompt_words(t) - known) for t in templates(dataset, original_only=True, root=root)}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_benchmark(out_dir: str | Path = BENCHMARK_DIR, seed: int | None = None, registry_root=BENCHMARK_DIR) -> dict:
    """Write the benchmark files under ``out_dir`` (each atomically) and a manifest with hashes."""
    t0 = time.time()
    out_dir = Path(out_dir)
    reg = benchmark_registry(str(registry_root))
    gen = generate_all(seed, Path(registry_root))
    files = []
    for ds, rows in gen["train"].items():
        files.append(out_dir / "train" / f"{ds}.jsonl")
        write_jsonl(files[-1], rows)
    for ds, splits in gen["heldout"].items():
        for split, rows in splits.items():
            files.append(out_dir / "heldout" / ds / f"{split}.jsonl")
            write_jsonl(files[-1], rows)
        k = dataset_spec(ds, registry_root)["k_shot"]
        for s in reg["few_shot_seeds"]:
            files.append(few_shot_path(out_dir / "few_shot", ds, k, s))
            write_jsonl(files[-1], sample_few_shot(splits["train"], k, s, ds))
    manifest = {"seed": gen["seed"], "generator": "scripts/build_benchmark.py",
                "files": {str(f.relative_to(out_dir)): _sha(f) for f in files}}
    with atomic_path(out_dir / "manifest.json") as tmp:
        tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    manifest["seconds"] = time.time() - t0
    return manifest


# ----------------------------------------------------------------------------- loading
def raw_train(ds: str, root=BENCHMARK_DIR) -> list[dict]:
    if dataset_spec(ds, root)["role"] != "train":
        raise DataError(f"benchmark dataset {ds!r} is held out: it has no training pool")
    return read_jsonl(Path(root) / "train" / f"{ds}.jsonl", required=("label",))


def raw_heldout(ds: str, split: str = "validation", root=BENCHMARK_DIR) -> list[dict]:
    spec = dataset_spec(ds, root)
    if spec["role"] != "heldout":
        raise DataError(f"benchmark dataset {ds!r} is a training dataset, not a held-out task")
    if split not in ("train", "validation"):
        raise DataError(f"benchmark held-out splits are 'train' and 'validation', got {split!r}")
    path = Path(root) / "heldout" / ds / f"{split}.jsonl"
    rows = read_jsonl(path, required=("label",))
    for r in rows:
        if not 0 <= r["label"] < spec["n_choices"]:
            raise DataError(f"{path}: example {r.get('idx')} has label {r['label']}, out of range for {spec['n_choices']} choices")
    return rows


def train_mixture(task_level: str = "template", n_train: int = 1000, n_val: int = 100, seed: int = 42,
                  root=BENCHMARK_DIR, progress: bool = False) -> Mixture:
    """Training tasks, each template contributing ``n_train``/``n_val`` examples (paper: 1,000/100)."""
    pools = {ds: (raw_train(ds, root), templates(ds, root=root)) for ds in train_datasets(root)}
    return build_mixture(pools, n_train=n_train, n_val=n_val, seed=seed, task_level=task_level, progress=progress)


def render_eval(rows: list[dict], ts: list[PromptTemplate], task: str, mode: str = "all", seed: int = 0) -> list[Example]:
    """``mode="all"``: every (example, template) pair (T0's per-template protocol, median over
    templates); ``"random"``: one template per example from a seeded generator (T-Few's protocol)."""
    if mode == "all":
        return [t.render(r, task=task, idx=r.get("idx", i), strict=True) for t in ts for i, r in enumerate(rows)]
    if mode == "random":
        rng = random.Random(stable_seed(seed, task, "eval-templates"))
        return [rng.choice(ts).render(r, task=task, idx=r.get("idx", i), strict=True) for i, r in enumerate(rows)]
    raise DataError(f"eval mode must be 'all' or 'random', got {mode!r}")


def eval_examples(ds: str, split: str = "validation", mode: str = "all", seed: int = 0, root=BENCHMARK_DIR) -> list[Example]:
    """Rendered held-out examples (original-task templates only); task name = dataset name."""
    ex = render_eval(raw_heldout(ds, split, root), templates(ds, original_only=True, root=root), ds, mode, seed)
    n = dataset_spec(ds, root)["n_choices"]
    for e in ex:
        if len(e.answer_choices) != n:
            raise DataError(f"dataset {ds!r}, template {e.template!r}: {len(e.answer_choices)} choices, registry says {n}")
    return ex


def few_shot_examples(ds: str, seed: int = 42, k: int | None = None, mode: str = "random",
                      root=BENCHMARK_DIR) -> list[Example]:
    spec = dataset_spec(ds, root)
    k = spec["k_shot"] if k is None else k
    rows = load_few_shot(ds, k, seed, pool=None if few_shot_path(Path(root) / "few_shot", ds, k, seed).is_file()
                         else raw_heldout(ds, "train", root), root=Path(root) / "few_shot", n_choices=spec["n_choices"])
    return render_eval(rows, templates(ds, original_only=True, root=root), ds, mode, seed)


__all__ = ["BENCHMARK_DIR", "SEEDS", "benchmark_registry", "build_benchmark", "eval_examples", "few_shot_examples",
           "heldout_datasets", "pretraining_text", "raw_heldout", "raw_train", "task_to_id", "tasks", "templates",
           "train_datasets", "train_mixture"]
