"""The two data sources behind one interface: the embedded benchmark and the T0 mixture.

Everything here is checked before a model is built: a missing source fails in seconds with the
command that supplies it.
"""
from __future__ import annotations

from ..data import DataError, Example, TokenizeConfig, encode, list_tasks, load_registry
from ..data import benchmark as B
from ..data.mixture import Mixture

SOURCES = ("benchmark", "t0")


def tokenize_config(data_cfg) -> TokenizeConfig:
    return TokenizeConfig(max_input_len=int(data_cfg.max_input_len), max_target_len=int(data_cfg.max_target_len),
                          eos=data_cfg.eos)


def check_available(data_cfg) -> None:
    if data_cfg.source not in SOURCES:
        raise DataError(f"data.source={data_cfg.source!r}; choose one of {SOURCES} (data=benchmark or data=t0)")
    if data_cfg.source == "benchmark":
        if not (B.BENCHMARK_DIR / "manifest.json").is_file():
            raise DataError(f"the embedded benchmark is missing from {B.BENCHMARK_DIR}; regenerate it with `make benchmark`")
        return
    from ..data import hub

    reg = load_registry()
    keys = sorted({d.dataset for d in reg.train} | {t.dataset for t in reg.eval})
    missing = [k for k in keys if not hub.is_ready(k)]
    if missing:
        raise DataError(hub.missing_message(missing, "data=t0 needs the prepared T0 data"))


def heldout_tasks(data_cfg, chosen="all") -> list[str]:
    known = B.heldout_datasets() if data_cfg.source == "benchmark" else [t.task for t in load_registry().eval]
    wanted = data_cfg.heldout if chosen in (None, "all") else chosen
    if wanted in (None, "all"):
        return list(known)
    if data_cfg.source == "benchmark" and wanted in B.TRANSFER_KINDS:
        return [t for t, kind in B.heldout_transfer().items() if kind == wanted]
    wanted = [wanted] if isinstance(wanted, str) else list(wanted)
    unknown = [t for t in wanted if t not in known]
    if unknown:
        groups = f", or a group: {', '.join(B.TRANSFER_KINDS)}" if data_cfg.source == "benchmark" else ""
        raise DataError(f"unknown held-out task(s) {unknown} for data={data_cfg.name}; choose from {known}{groups}")
    return wanted


def training_tasks(data_cfg) -> list[str]:
    """The routed training tasks: every task of the mixture, or those of `data.datasets` (a list of dataset
    names: a sub-mixture, for ablations and for checking one skill at a time)."""
    tasks = list_tasks(data_cfg.task_level, source=data_cfg.source)
    chosen = data_cfg.get("datasets", "all")
    if chosen in (None, "all"):
        return tasks
    chosen = [chosen] if isinstance(chosen, str) else list(chosen)
    known = sorted({t.split("/", 1)[0] for t in tasks})
    unknown = [d for d in chosen if d not in known]
    if unknown or not chosen:
        raise DataError(f"data.datasets={chosen}: unknown training dataset(s) {unknown} for data={data_cfg.name}; "
                        f"choose from {known} or `all`")
    return [t for t in tasks if t.split("/", 1)[0] in chosen]


def training_mixture(data_cfg, seed: int) -> Mixture:
    kw = dict(task_level=data_cfg.task_level, n_train=int(data_cfg.n_train), n_val=int(data_cfg.n_val), seed=seed)
    if data_cfg.source == "benchmark":
        mixture = B.train_mixture(**kw)
    else:
        from ..data.t0 import t0_mixture

        mixture = t0_mixture(**kw)
    tasks = training_tasks(data_cfg)
    if tasks == mixture.tasks:
        return mixture
    keep = set(tasks)
    return Mixture(train=[e for e in mixture.train if e.task in keep],
                   validation=[e for e in mixture.validation if e.task in keep], tasks=tasks,
                   skipped={t: n for t, n in mixture.skipped.items() if t in keep})


def eval_examples(data_cfg, task: str, protocol: str, seed: int) -> list[Example]:
    if data_cfg.source == "benchmark":
        return B.eval_examples(task, mode=protocol, seed=seed)
    from ..data.t0 import t0_eval_examples

    return t0_eval_examples(task, mode=protocol, seed=seed)


def few_shot_examples(data_cfg, task: str, seed: int, k: int | None) -> list[Example]:
    if data_cfg.source == "benchmark":
        return B.few_shot_examples(task, seed=seed, k=k)
    from ..data.t0 import t0_few_shot

    return t0_few_shot(task, seed=seed, k=k)


def tokenize(examples: list[Example], tokenizer, task2id: dict[str, int], data_cfg) -> list[dict]:
    return encode(examples, tokenizer, task2id, tokenize_config(data_cfg))
