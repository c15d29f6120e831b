"""Multi-task training end to end on CPU: every adapter type learns, a killed run resumes to the same
weights as an uninterrupted one, results files are complete, and checkpoints are found again."""
import json
import statistics
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tensorpoly.data import benchmark as B
from tensorpoly.experiment.rundir import read_state
from tensorpoly.experiment.train import run_training

from experiment_helpers import quick_train_cfg

ALL_TYPES = ["lora", "tlora", "poly", "mhr", "tensorpoly1", "tensorpoly2"]


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outputs/ and multirun/ are relative to the working directory


@pytest.mark.parametrize("model", ALL_TYPES)
def test_a_short_run_lowers_the_validation_loss_and_writes_a_complete_result(tmp_path, model):
    extra = ["model.n_splits=4"] if model == "mhr" else []
    # 12 steps: leaves at the LoRA factors' rate move far enough to show; the recipe's 10x lower leaf_lr is
    # for runs of hundreds of steps (configs/train/embedded.yaml).
    extra += ["train.leaf_lr=${train.lr}"]
    cfg = quick_train_cfg(tmp_path, model, f"model={model}", "train.steps=12", "train.batch_size=8", *extra)
    out = run_training(cfg)
    record = json.loads(Path(out["result"]).read_text())
    metrics = record["metrics"]
    assert metrics["val_loss"] < metrics["val_loss_start"] - 0.5, metrics
    assert record["method"] == model and record["config"]["model"]["module_type"] == model
    assert set(record["heldout"]) == set(B.heldout_datasets())
    assert all(r["n"] == 8 for r in record["heldout"].values())
    accuracy = {t: r["accuracy"] for t, r in record["heldout"].items()}
    assert metrics["zero_shot_average"] == pytest.approx(statistics.mean(accuracy.values()))
    for kind in B.TRANSFER_KINDS:  # each transfer group's average is over its own tasks
        assert metrics[f"zero_shot_{kind}"] == pytest.approx(
            statistics.mean(a for t, a in accuracy.items() if B.heldout_transfer()[t] == kind))
    assert record["versions"]["torch"] == torch.__version__ and "commit" in record["git"]
    assert record["params"]["adapter"] > 0 and (record["params"]["routing"] > 0) == (model not in ("lora", "tlora"))
    run_dir = Path(out["run_dir"])
    assert read_state(run_dir)["status"] == "finished"
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert (run_dir / "adapter" / "run_config.yaml").is_file()


def test_kill_and_resume_equals_an_uninterrupted_run(tmp_path):
    # Relaxed-Bernoulli routing draws random numbers every step: resuming must restore the RNG too.
    common = ["model=tensorpoly1", "model.relaxed_bernoulli=true", "train.steps=6", "train.checkpoint_every=3"]
    whole = run_training(quick_train_cfg(tmp_path, "whole", *common))
    killed = run_training(quick_train_cfg(tmp_path, "killed", *common, "debug.stop_after_step=4"))
    assert killed["stopped_at"] == 4 and read_state(Path(killed["run_dir"]))["status"] == "running"
    assert not (Path(killed["run_dir"]) / "adapter").exists()
    resumed = run_training(quick_train_cfg(tmp_path, "resumer", *common, "resume=true"))
    assert resumed["run_dir"] == killed["run_dir"]  # continued the killed run, from its step-3 checkpoint
    record = json.loads(Path(resumed["result"]).read_text())
    assert record["metrics"]["resumed_from_step"] == 3
    a = load_file(str(Path(whole["run_dir"]) / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(Path(resumed["run_dir"]) / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert record["metrics"]["zero_shot_average"] == json.loads(Path(whole["result"]).read_text())["metrics"]["zero_shot_average"]


def test_resume_true_without_an_unfinished_run_says_so(tmp_path):
    with pytest.raises(ValueError, match="resume=true: no unfinished run with this config"):
        run_training(quick_train_cfg(tmp_path, "nothing", "resume=true"))


def test_a_sub_mixture_routes_and_trains_only_its_datasets(tmp_path):
    cfg = quick_train_cfg(tmp_path, "sub", "model=poly", "data.datasets=[topic,count]", "train.steps=2")
    out = run_training(cfg)
    adapter_config = json.loads((Path(out["run_dir"]) / "adapter" / "adapter_config.json").read_text())
    tasks = adapter_config["adapter_config"]["task_names"]
    assert tasks == sorted(tasks) and {t.split("/")[0] for t in tasks} == {"topic", "count"}
    assert len(tasks) == 7  # 4 topic + 3 count templates (data/README.md)


def test_frozen_gc_freezes_only_within_the_context():
    import gc

    from tensorpoly.experiment.runtime import frozen_gc

    before = gc.get_freeze_count()
    with frozen_gc():
        assert gc.get_freeze_count() > before
    assert gc.get_freeze_count() == before
    with pytest.raises(RuntimeError, match="inside"):
        with frozen_gc():
            raise RuntimeError("inside")
    assert gc.get_freeze_count() == before
