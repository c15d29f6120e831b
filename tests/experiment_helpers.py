"""Composing the repo's Hydra configs in-process, with small runs for tests."""
from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir

from tensorpoly.experiment.rundir import REPO_ROOT, register_resolvers

CONFIGS = REPO_ROOT / "configs"
# A run of seconds: 20 examples per template task, 8 eval examples per held-out task.
QUICK = ["logger=disabled", "data.n_train=20", "data.n_val=4", "train.batch_size=4", "train.steps=6",
         "train.checkpoint_every=3", "train.val_every=3", "train.log_every=1", "train.val_batches=2",
         "eval.limit=8", "eval.batch_size=16"]


def compose_cfg(config_name: str, overrides: list[str]):
    register_resolvers()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIGS)):
        return compose(config_name=config_name, overrides=overrides)


def quick_train_cfg(tmp_path: Path, run: str, *overrides: str):
    return compose_cfg("train", [*QUICK, f"+run_dir={tmp_path / 'outputs' / 'train' / run}",
                                 f"results_dir={tmp_path / 'results'}", *overrides])
