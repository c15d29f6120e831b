#!/usr/bin/env python
"""`make data`: put every dataset of the T0 path under data/t0/ (Arrow), resumably.

    python scripts/prepare_data.py                          # download what is missing (needs the hub)
    python scripts/prepare_data.py --storycloze-dir DIR     # StoryCloze 2016 from its two CSVs
    python scripts/prepare_data.py --few-shot-dir DIR       # T-Few's data/few_shot/ (JSONL files)
    python scripts/prepare_data.py --only super_glue/rte --only imdb
    python scripts/prepare_data.py --list                   # what is there, what is missing

Offline (HF_HUB_OFFLINE=1, or no route to the hub) it stops before any download with one message
naming the missing datasets and how to supply them. Each dataset is written to a temporary path
and renamed, so an interrupted run leaves nothing half-written; rerunning resumes.
The embedded benchmark (the default run) needs none of this.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from tqdm.auto import tqdm

from tensorpoly.data.example import DataError
from tensorpoly.data.fewshot import few_shot_path
from tensorpoly.data.hub import (T0_DIR, HubUnavailable, download_eval, download_train, hub_reachable, import_storycloze,
                                 is_ready, missing, missing_message, offline_flags)
from tensorpoly.data.io import atomic_path, read_jsonl
from tensorpoly.data.registry import load_registry

FEW_SHOT_OUT = T0_DIR / "few_shot"


def import_few_shot(src: Path, reg) -> int:
    """Copy T-Few's ``<task>/<k>_shot/<seed>_seed.jsonl`` files, validating each first."""
    n = 0
    for t in reg.eval:
        for f in sorted((Path(src) / t.task).glob("*_shot/*_seed.jsonl")):
            rows = read_jsonl(f)  # DataError names the file and line
            for i, r in enumerate(rows):
                try:
                    lab = t.gold_label(r)
                except (DataError, ValueError, TypeError) as e:
                    raise DataError(f"{f}, example {i}: {e}") from e
                if not 0 <= lab < t.n_choices:
                    raise DataError(f"{f}, example {i}: label {lab} out of range for {t.n_choices} choices")
            k, seed = int(f.parent.name.split("_")[0]), int(f.name.split("_")[0])
            with atomic_path(few_shot_path(FEW_SHOT_OUT, t.task, k, seed)) as tmp:
                shutil.copyfile(f, tmp)
            n += 1
    if n == 0:
        raise DataError(f"{src}: no few-shot files found (expected <task>/<k>_shot/<seed>_seed.jsonl for tasks "
                        f"{[t.task for t in reg.eval]})")
    return n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", action="append", default=[], help="registry dataset key (repeatable)")
    p.add_argument("--storycloze-dir", type=Path)
    p.add_argument("--few-shot-dir", type=Path)
    p.add_argument("--list", action="store_true")
    a = p.parse_args(argv)
    reg = load_registry()
    try:
        for k in a.only:
            if k not in reg.datasets:
                raise DataError(f"dataset {k!r} is not in the registry (data/registry/*.csv); known: {reg.datasets}")
        if a.list:
            for k in reg.datasets:
                print(("ready    " if is_ready(k) else "missing  ") + k)
            return 0
        if a.storycloze_dir:
            import_storycloze(a.storycloze_dir, reg.eval_task("storycloze"))
            print(f"StoryCloze 2016 imported from {a.storycloze_dir}")
        if a.few_shot_dir:
            print(f"{import_few_shot(a.few_shot_dir, reg)} few-shot files imported from {a.few_shot_dir}")
        todo = [k for k in (a.only or missing(reg)) if not is_ready(k)]
        manual = [k for k in todo if k == reg.eval_task("storycloze").dataset]
        todo = [k for k in todo if k not in manual]
        if not todo:
            if manual:
                print(missing_message(manual, "needs a local file"), file=sys.stderr)
                return 1
            print(f"all {len(reg.datasets)} datasets ready under {T0_DIR}")
            return 0
        # Fail fast, before any download: one message for everything that is missing.
        if not hub_reachable():
            why = f"offline ({', '.join(offline_flags())} set)" if offline_flags() else "the Hugging Face Hub is unreachable"
            raise HubUnavailable(missing_message(todo + manual, why))
        failed = []
        train = {d.dataset: d for d in reg.train}
        for k in tqdm(todo, desc="datasets", unit="ds"):
            try:
                download_train(train[k]) if k in train else download_eval(reg.eval_task(k))
            except HubUnavailable as e:
                failed.append(f"{k}: {e}")
        if failed or manual:
            print("\n".join(["could not download:", *failed]) if failed else "", file=sys.stderr)
            if manual:
                print(missing_message(manual, "needs a local file"), file=sys.stderr)
            return 1
        print(f"all {len(reg.datasets)} datasets ready under {T0_DIR}")
        return 0
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
