"""Few-shot fine-tuning and zero-shot evaluation from a finished training run, through the scripts' code."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tensorpoly.experiment.evaluate import run_evaluation
from tensorpoly.experiment.finetune import run_finetune
from tensorpoly.experiment.train import run_training

from experiment_helpers import compose_cfg, quick_train_cfg


@pytest.fixture
def trained(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return run_training(quick_train_cfg(tmp_path, "run", "model=poly"))


def test_eval_of_latest_equals_the_training_runs_zero_shot(tmp_path, trained):
    cfg = compose_cfg("eval", [f"results_dir={tmp_path / 'results'}", "eval.limit=8"])
    out = run_evaluation(cfg)
    assert out["zero_shot_average"] == pytest.approx(trained["zero_shot_average"])


@pytest.mark.parametrize("trainable", ["adapters_router", "router"])
def test_finetune_trains_a_fresh_row_per_task_and_seed(tmp_path, trained, trainable):
    cfg = compose_cfg("finetune", [f"results_dir={tmp_path / 'results'}", "logger=disabled", "finetune.steps=3",
                                   "finetune.batch_size=4", "finetune.seeds=[42,0]", "finetune.tasks=[who_liked,longer_list]",
                                   "eval.limit=8", f"finetune.trainable={trainable}",
                                   f"+run_dir={tmp_path / 'outputs' / 'finetune' / trainable}"])
    out = run_finetune(cfg)
    record = json.loads(Path(out["result"]).read_text())
    assert set(record["heldout"]) == {"who_liked", "longer_list"}
    assert record["train_config"]["model"]["module_type"] == "poly"  # a plain dict, readable by make_tables
    assert all(set(runs) == {"42", "0"} and all(r["n_shots"] == 32 for r in runs.values()) for runs in record["heldout"].values())
    base = load_file(str(Path(trained["run_dir"]) / "adapter" / "adapter_model.safetensors"))
    tuned = load_file(str(tmp_path / "outputs" / "finetune" / trainable / "adapters" / "who_liked" / "seed42" / "adapter_model.safetensors"))
    routers = [k for k in tuned if k.startswith("routers.")]
    assert all(tuned[k].shape[0] == 1 for k in routers)  # one fresh routing row for the new task
    adapters_moved = any(not torch.equal(base[k], tuned[k]) for k in tuned if k.startswith("adapters."))
    assert adapters_moved == (trainable == "adapters_router")
