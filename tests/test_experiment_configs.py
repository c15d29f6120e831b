"""Every config group composes, alone and inside the top-level configs, into a buildable run."""
import pytest
from omegaconf import OmegaConf
from transformers import T5Config

from tensorpoly.backbones import available
from tensorpoly.experiment.setup import adapter_config, check_recipe, training_tasks
from tensorpoly.model import check_config

from experiment_helpers import compose_cfg

GROUPS = ["backbone", "model", "routing", "data", "train", "eval", "logger", "experiment"]


def test_the_default_composition_is_the_embedded_cpu_run():
    cfg = compose_cfg("train", [])
    assert cfg.backbone.name == "embedded" and cfg.data.source == "benchmark" and cfg.model.module_type == "tensorpoly1"
    assert cfg.logger.mode == "offline" and cfg.train.precision == "auto"


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in available(g)])
def test_every_group_option_composes_into_a_buildable_training_config(group, option):
    cfg = compose_cfg("train", [f"{group}={option}"])
    OmegaConf.resolve(cfg)
    check_recipe(cfg.train, "train")
    config = adapter_config(cfg, training_tasks(cfg.data))
    check_config(config, T5Config(**OmegaConf.to_container(cfg.backbone.config)))  # meta device: no weights
    if group == "experiment":
        assert cfg.data.source == "t0" and cfg.train.steps == 100000 and cfg.train.optimizer == "adafactor"


@pytest.mark.parametrize("name,group", [("finetune", "finetune"), ("finetune", "eval"), ("finetune", "logger"),
                                        ("eval", "eval"), ("eval", "logger")])
def test_finetune_and_eval_configs_compose_with_every_option(name, group):
    for option in available(group):
        cfg = compose_cfg(name, [f"{group}={option}"])
        OmegaConf.resolve(cfg)
        if name == "finetune":
            check_recipe(cfg.finetune, "finetune")


def test_experiment_files_state_what_they_reproduce():
    from tensorpoly.backbones import CONFIG_ROOT

    for path in (CONFIG_ROOT / "experiment").glob("*.yaml"):
        text = path.read_text()
        assert text.startswith("# @package _global_") and "Reproduces:" in text, path.name


@pytest.mark.parametrize("experiment", ["t0_3b_lora", "t0_3b_poly", "t0_3b_mhr", "t0_3b_tlora", "t0_3b_tensorpoly1",
                                        "t0_3b_tensorpoly2"])
def test_paper_experiments_train_lora_factors_at_1e3_and_leaves_at_3e4(experiment):
    """What the paper code did: *lora* parameters at adapters_learning_rate 1e-3, leaves at learning_rate 3e-4."""
    train = compose_cfg("train", [f"experiment={experiment}"]).train
    assert (train.lr, train.leaf_lr, train.router_lr) == pytest.approx((1e-3, 3e-4, 0.1))
