"""checkpoint= specs resolve to adapter dirs, and each finds the run config it was trained with."""
import pytest
from omegaconf import OmegaConf

from tensorpoly.config import ConfigError
from tensorpoly.experiment.rundir import CONFIG_FILE, find_checkpoint, run_config_of


@pytest.fixture
def run(tmp_path):
    run = tmp_path / "outputs" / "train" / "2026-01-01_00-00-00-000001"
    for adapter in (run / "adapter", run / "checkpoints" / "step_00000500"):
        adapter.mkdir(parents=True)
        (adapter / "adapter_config.json").write_text("{}")
    OmegaConf.save(OmegaConf.create({"seed": 7, "model": {"module_type": "tlora"}}), run / CONFIG_FILE)
    return run


def test_run_dir_and_adapter_dir_give_the_final_adapter(run):
    assert find_checkpoint(str(run)) == run / "adapter"
    assert find_checkpoint(str(run / "adapter")) == run / "adapter"


def test_intermediate_checkpoint_reads_its_run_config(run):
    step = find_checkpoint(str(run / "checkpoints" / "step_00000500"))
    assert step == run / "checkpoints" / "step_00000500"
    assert run_config_of(step).seed == 7 and run_config_of(run / "adapter").model.module_type == "tlora"


def test_unknown_dirs_are_refused_with_the_fix(tmp_path, run):
    with pytest.raises(ConfigError, match="checkpoints/step_N"):
        find_checkpoint(str(tmp_path / "nowhere"))
    stray = tmp_path / "stray" / "a" / "b"
    stray.mkdir(parents=True)
    with pytest.raises(ConfigError, match="no run_config.yaml"):
        run_config_of(stray)


def test_validation_loss_spreads_over_every_task(monkeypatch):
    """The validation split is ordered by task; the measured subset must not be its head."""
    import torch
    from transformers import ByT5Tokenizer

    from tensorpoly.data import benchmark as B, encode
    from tensorpoly.experiment import train

    mix = B.train_mixture(n_train=4, n_val=10, seed=0)
    feats = encode(mix.validation, ByT5Tokenizer(), mix.task2id)
    seen = []
    monkeypatch.setattr(train, "lm_loss", lambda model, batch: (seen.extend(batch["task_ids"].tolist()), torch.zeros(()))[1])
    train.validation_loss(torch.nn.Linear(1, 1), feats, 0, batch_size=8, n_batches=4, device="cpu")
    assert len(seen) == 32 and len(set(seen)) == 32 == len(mix.task2id)
