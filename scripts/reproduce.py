"""The scaled-down reproduction (= make reproduce): LoRA, TLoRA, Poly, MHR, TensorPoly-I and TensorPoly-II
on the embedded benchmark and backbone, 3 seeds each; per run multi-task training (zero-shot held-out
accuracy) then few-shot fine-tuning of every held-out task (T-Few recipe, shrunk); then make_tables.

Jobs run as independent processes (--workers, one CPU thread each) and write to results/reproduce/.
A job whose results files cover every held-out task is skipped, so an interrupted reproduction continues
where it stopped; a finished run that lacks held-out tasks added since is evaluated (zero-shot, from its
checkpoint) and fine-tuned on those tasks only.

    python scripts/reproduce.py                 # everything, 2 workers
    python scripts/reproduce.py --models lora tensorpoly1 --seeds 42 --workers 1
"""
import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tensorpoly.data import benchmark as B

ROOT = Path(__file__).resolve().parent.parent
MODELS = ["lora", "tlora", "poly", "mhr", "tensorpoly1", "tensorpoly2"]


def records(results: Path, kind: str, model: str, seed: int) -> list[Path]:
    return sorted((results / kind).glob(f"*-{model}-*-seed{seed}-*.json"))


def done(results: Path, kind: str, model: str, seed: int) -> Path | None:
    found = records(results, kind, model, seed)
    return found[0] if found else None


def missing_tasks(paths: list[Path]) -> list[str]:
    """Held-out tasks of today's benchmark that none of these results files covers (tasks added since)."""
    covered = {t for path in paths for t in json.loads(path.read_text())["heldout"]}
    return [t for t in B.heldout_datasets() if t not in covered]


def hydra_list(items: list[str]) -> str:
    return "[" + ",".join(items) + "]"


def run(cmd: list[str], log: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    with log.open("w") as fh:
        subprocess.run(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, check=True)


def job(model: str, seed: int, args) -> str:
    results, logs = ROOT / args.results, ROOT / args.results / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    train = done(results, "train", model, seed)
    if train is None:
        run([sys.executable, "scripts/train.py", f"model={model}", f"seed={seed}", f"train={args.train}",
             f"results_dir={args.results}", "logger=disabled", *args.overrides], logs / f"train-{model}-{seed}.log")
        train = done(results, "train", model, seed)
    record = json.loads(train.read_text())
    # A run finished before held-out tasks were added: its checkpoint is evaluated on the new ones only.
    evals = [p for p in records(results, "eval", model, seed) if json.loads(p.read_text())["checkpoint"] == record["adapter_dir"]]
    todo = missing_tasks([train, *evals])
    if todo:
        run([sys.executable, "scripts/evaluate.py", f"checkpoint={record['adapter_dir']}", f"tasks={hydra_list(todo)}",
             f"results_dir={args.results}", "logger=disabled"], logs / f"eval-{model}-{seed}.log")
    todo = missing_tasks(records(results, "finetune", model, seed)) if args.finetune else []
    if todo:
        run([sys.executable, "scripts/finetune.py", f"checkpoint={record['run_dir']}", f"finetune={args.finetune}",
             f"finetune.seeds=[{seed}]", f"finetune.tasks={hydra_list(todo)}", f"results_dir={args.results}",
             "logger=disabled"], logs / f"finetune-{model}-{seed}-{len(todo)}tasks.log")
    return f"{model} seed {seed}: {time.perf_counter() - started:.0f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[42, 1024, 0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--train", default="reproduce", help="train recipe (configs/train/)")
    parser.add_argument("--finetune", default="reproduce", help="finetune recipe (configs/finetune/); '' to skip")
    parser.add_argument("--results", default="results/reproduce")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for training")
    args = parser.parse_args()
    started = time.perf_counter()
    jobs = [(m, s) for s in args.seeds for m in args.models]
    with ThreadPoolExecutor(args.workers) as pool:
        for line in pool.map(lambda ms: job(*ms, args), jobs):
            print(line, flush=True)
    print(f"all {len(jobs)} jobs: {time.perf_counter() - started:.0f} s", flush=True)
    subprocess.run([sys.executable, "scripts/make_tables.py", "--results", args.results], cwd=ROOT, check=True)


if __name__ == "__main__":
    main()
