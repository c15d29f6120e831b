"""Bad overrides fail before any training starts, with a message naming the value and the fix,
and without writing a run."""
import os
import subprocess
import sys
import time

import pytest
from hydra.errors import MissingConfigException

from tensorpoly.config import ConfigError
from tensorpoly.data import DataError
from tensorpoly.experiment.finetune import run_finetune
from tensorpoly.experiment.train import run_training

from experiment_helpers import REPO_ROOT, compose_cfg, quick_train_cfg


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))


@pytest.mark.parametrize("overrides,error,message", [
    (["model.order=0"], ConfigError, "order"),
    (["model.rank=-2"], ConfigError, "rank"),
    (["model=poly", "model.n_experts=0"], ConfigError, "n_experts"),
    (["model=mhr", "model.n_splits=7"], ConfigError, "n_splits"),
    (["routing.granularity=per_token"], ConfigError, "per_token"),
    (["train.optimizer=sgd"], ConfigError, "train.optimizer='sgd'"),
    (["train.steps=0"], ConfigError, "train.steps=0"),
    (["train.warmup=1.5"], ConfigError, "train.warmup=1.5"),
    (["train.leaf_lr=-1e-3"], ConfigError, "train.leaf_lr=-0.001"),
    (["train.precision=fp8"], ConfigError, "fp8"),
    (["data=t0"], DataError, "make data"),
    (["data.heldout=[rte]"], DataError, "unknown held-out task"),
    (["data.datasets=[topic,reviews]"], DataError, r"unknown training dataset.*reviews"),
    (["logger=wandb_online"], ConfigError, "WANDB_API_KEY"),
])
def test_bad_training_overrides_fail_fast_and_write_nothing(tmp_path, overrides, error, message):
    cfg = quick_train_cfg(tmp_path, "bad", *overrides)
    started = time.perf_counter()
    with pytest.raises(error, match=message):
        run_training(cfg)
    assert time.perf_counter() - started < 10  # no model, no data loading
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "results").exists()


def test_an_unknown_model_names_the_available_ones():
    with pytest.raises(MissingConfigException, match="tensorpoly1"):
        compose_cfg("train", ["model=tensorpoly3"])


def test_the_script_reports_an_unknown_model_before_training():
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "train.py"), "model=tensorpoly3", "logger=disabled"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode != 0
    assert "Could not find 'model/tensorpoly3'" in proc.stderr and "tensorpoly1" in proc.stderr


@pytest.mark.parametrize("overrides,message", [
    (["checkpoint=latest"], "no finished training run"),
    (["checkpoint=/nonexistent/run"], "neither an adapter dir"),
    (["finetune.trainable=everything"], "finetune.trainable='everything'"),
])
def test_bad_finetune_overrides_fail_fast(tmp_path, overrides, message):
    cfg = compose_cfg("finetune", ["logger=disabled", f"results_dir={tmp_path / 'results'}", *overrides])
    with pytest.raises(ConfigError, match=message):
        run_finetune(cfg)
    assert not (tmp_path / "results").exists()
