"""Hub access for the T0 path: download what is missing into ``data/t0/`` as Arrow, or explain,
at once, why it cannot.

Every dataset is saved with ``save_to_disk`` into a temporary sibling and renamed into place, so an
interrupted ``make data`` leaves no half-written dataset and the next run resumes where it stopped.
Training datasets keep only ``train[:cap]`` (what the mixture reads); held-out tasks keep their
few-shot pool and evaluation split.
"""
from __future__ import annotations

import csv
import os
import socket
from pathlib import Path

from .example import DataError
from .io import DATA_DIR, atomic_path
from .registry import EvalTask, Registry, TrainDataset

T0_DIR = DATA_DIR / "t0"
HUB_HOST = ("huggingface.co", 443)
MANUAL = {  # datasets no hub can give (StoryCloze needs a form) -> how to supply them
    "story_cloze/2016": "download the two StoryCloze 2016 CSVs (val + test) from "
                        "https://cs.rochester.edu/nlp/rocstories/ and pass --storycloze-dir DIR",
}
STORYCLOZE_COLUMNS = {  # ROCStories CSV header -> HF story_cloze schema
    "InputStoryid": "story_id", "InputSentence1": "input_sentence_1", "InputSentence2": "input_sentence_2",
    "InputSentence3": "input_sentence_3", "InputSentence4": "input_sentence_4",
    "RandomFifthSentenceQuiz1": "sentence_quiz1", "RandomFifthSentenceQuiz2": "sentence_quiz2",
    "AnswerRightEnding": "answer_right_ending",
}


class HubUnavailable(DataError):
    """The hub cannot be reached (offline flags or no route). The message lists what is missing."""


def local_dir(key: str, root: Path = T0_DIR) -> Path:
    return Path(root) / key.replace("/", "__")


def is_ready(key: str, root: Path = T0_DIR) -> bool:
    return (local_dir(key, root) / "dataset_dict.json").is_file()


def offline_flags() -> list[str]:
    return [v for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")]


def hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connect with a short timeout: without it `load_dataset` retries for ~23 s per dataset."""
    if offline_flags():
        return False
    try:
        with socket.create_connection(HUB_HOST, timeout=timeout):
            return True
    except OSError:
        return False


def missing_message(missing: list[str], reason: str) -> str:
    lines = [f"{reason}: {len(missing)} dataset(s) missing under {T0_DIR}:"]
    for m in missing:
        lines.append(f"  - {m}" + (f"  ({MANUAL[m]})" if m in MANUAL else ""))
    lines += [
        "Supply them by running `make data` on a machine that reaches the Hugging Face Hub (unset",
        "HF_HUB_OFFLINE / HF_DATASETS_OFFLINE there) and copying data/t0/ here; StoryCloze and T-Few's",
        "few-shot files come from local files: scripts/prepare_data.py --storycloze-dir DIR --few-shot-dir DIR.",
        "The default run needs none of this: it uses the embedded benchmark (data/benchmark/).",
    ]
    return "\n".join(lines)


def load_hub_split(hf_name: str, subset: str | None, split: str):
    """``datasets.load_dataset`` with the real names; connection failures become HubUnavailable."""
    import datasets  # late: slow import, and not needed by the embedded benchmark

    try:
        return datasets.load_dataset(hf_name, subset, split=split)
    except (ConnectionError, OSError) as e:  # offline mode raises ConnectionError; no route, OSError
        raise HubUnavailable(f"{hf_name}/{subset or ''} split {split!r}: cannot reach the hub ({type(e).__name__}: {e})") from e


def download_train(d: TrainDataset, root: Path = T0_DIR) -> None:
    import datasets

    ds = load_hub_split(d.hf_name, d.subset, f"train[:{d.cap}]")
    with atomic_path(local_dir(d.dataset, root)) as tmp:
        datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp))


def download_eval(t: EvalTask, root: Path = T0_DIR) -> None:
    import datasets

    splits = {s: load_hub_split(t.hf_name, t.subset, s) for s in dict.fromkeys([t.fewshot_split, t.eval_split])}
    with atomic_path(local_dir(t.dataset, root)) as tmp:
        datasets.DatasetDict(splits).save_to_disk(str(tmp))


def read_storycloze_csv(path: Path) -> list[dict]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: cannot read StoryCloze CSV: {e}") from e
    if not rows:
        raise DataError(f"{path}: empty StoryCloze CSV")
    missing = sorted(set(STORYCLOZE_COLUMNS) - set(rows[0]))
    if missing:
        raise DataError(f"{path}: not a StoryCloze 2016 CSV, missing columns {missing}")
    out = []
    for i, r in enumerate(rows, 2):
        row = {new: r[old] for old, new in STORYCLOZE_COLUMNS.items()}
        try:
            row["answer_right_ending"] = int(row["answer_right_ending"])
        except ValueError as e:
            raise DataError(f"{path}, line {i}: AnswerRightEnding {r['AnswerRightEnding']!r} is not 1 or 2") from e
        if row["answer_right_ending"] not in (1, 2):
            raise DataError(f"{path}, line {i}: AnswerRightEnding {row['answer_right_ending']} is not 1 or 2")
        out.append(row)
    return out


def import_storycloze(src: Path, t: EvalTask, root: Path = T0_DIR) -> None:
    """StoryCloze 2016 from the ROCStories CSVs: the file whose name contains 'val' becomes the
    HF 'validation' split, 'test' the 'test' split (as the HF loader named them)."""
    import datasets

    src = Path(src)
    files = sorted(src.glob("*.csv"))
    # ROCStories names them "cloze_test_val__spring2016 - ..." and "cloze_test_test__spring2016 - ...":
    # both contain "test", so the test file is the one *without* "val".
    pick = {"validation": [f for f in files if "val" in f.name.lower()],
            "test": [f for f in files if "test" in f.name.lower() and "val" not in f.name.lower()]}
    for split, fs in pick.items():
        if len(fs) != 1:
            raise DataError(f"{src}: expected one StoryCloze CSV whose name contains {'val' if split == 'validation' else 'test'!r}, "
                            f"found {[f.name for f in fs]}")
    splits = {s: datasets.Dataset.from_list(read_storycloze_csv(fs[0])) for s, fs in pick.items()}
    with atomic_path(local_dir(t.dataset, root)) as tmp:
        datasets.DatasetDict(splits).save_to_disk(str(tmp))


def load_local(key: str, root: Path = T0_DIR):
    """The prepared DatasetDict of ``key``; DataError naming the key if ``make data`` has not made it."""
    if not is_ready(key, root):
        raise DataError(missing_message([key], "not prepared"))
    import datasets

    return datasets.load_from_disk(str(local_dir(key, root)))


def missing(reg: Registry, root: Path = T0_DIR) -> list[str]:
    return [k for k in reg.datasets if not is_ready(k, root)]
