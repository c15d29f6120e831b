"""Bad configurations fail with a message naming the bad value, before the backbone is touched."""
import pytest
import torch

from conftest import TASKS, tiny_t5, tiny_t5_config
from tensorpoly import AdapterConfig, ConfigError, TensorPolyModel
from tensorpoly.backbones import backbone_config
from tensorpoly.model import check_config


@pytest.mark.parametrize("fields,message", [
    (dict(module_type="tensorpoly3"), "unknown module_type 'tensorpoly3'; choose one of lora, tlora"),
    (dict(module_type="tlora", order=0), "order must be an integer >= 1, got 0"),
    (dict(module_type="lora", rank=0), "rank must be an integer >= 1, got 0"),
    (dict(module_type="poly", n_experts=0, task_names=TASKS), "n_experts must be an integer >= 1"),
    (dict(module_type="lora", rank=2.5), "rank must be an integer >= 1, got 2.5"),
    (dict(module_type="mhr", n_splits=1, task_names=TASKS), "mhr is Poly with n_splits > 1"),
    (dict(module_type="tensorpoly1", n_splits=2, task_names=TASKS), "n_splits=2 only applies to poly/mhr"),
    (dict(module_type="poly"), "poly routes per task: give task_names"),
    (dict(module_type="poly", task_names=["a", "a"]), "task_names must be unique; repeated: ['a']"),
    (dict(module_type="poly", task_names=TASKS, granularity="head"), "unknown granularity 'head'"),
    (dict(module_type="tlora", norm="batch"), "unknown norm 'batch'"),
    (dict(module_type="tlora", init="xavier"), "unknown init 'xavier'"),
    (dict(module_type="lora", target_layers="q|("), "target_layers is not a valid regular expression"),
])
def test_bad_config_values_are_named(fields, message):
    with pytest.raises(ConfigError) as err:
        AdapterConfig(**fields)
    assert message in str(err.value)


def test_unknown_keys_are_named():
    with pytest.raises(ConfigError, match=r"unknown adapter config keys \['n_skills'\]"):
        AdapterConfig.from_dict({"module_type": "poly", "n_skills": 8})


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()]


@pytest.mark.parametrize("fields,message", [
    (dict(module_type="lora", target_layers="query|value"), "match no linear layer of this model"),
    (dict(module_type="lora", target_modules=".*nothing.*"), "match no linear layer"),
    (dict(module_type="mhr", n_splits=7, task_names=TASKS), "n_splits=7 must divide both dimensions of"),
    (dict(module_type="lora", target_modules=r".*layer\.\d+", target_layers="SelfAttention"), "is a T5Attention, not nn.Linear"),
    (dict(module_type="poly", task_names=TASKS, granularity="block", target_modules="", target_layers="lm_head"),
     "needs T5 layer names"),
])
def test_model_level_errors_leave_the_backbone_untouched(fields, message):
    backbone = tiny_t5()
    state, types = snapshot(backbone)
    with pytest.raises(ConfigError, match=message):
        TensorPolyModel(backbone, AdapterConfig(**fields))
    after_state, after_types = snapshot(backbone)
    assert after_types == types and all(torch.equal(state[k], after_state[k]) for k in state)
    assert all(p.requires_grad for p in backbone.parameters())


def test_wrapping_twice_is_refused():
    model = TensorPolyModel(tiny_t5(), AdapterConfig(module_type="lora", rank=1))
    with pytest.raises(ConfigError, match="already holds an adapter"):
        TensorPolyModel(model.model, AdapterConfig(module_type="lora", rank=1))


def test_unknown_backbone_names_the_choices():
    with pytest.raises(ConfigError, match=r"unknown backbone 't0_7b'; choose one of .*t0_3b"):
        backbone_config("t0_7b")


def test_config_is_checked_against_a_backbone_config_without_weights():
    check_config(AdapterConfig(module_type="mhr", n_splits=4, task_names=TASKS), tiny_t5_config())
    with pytest.raises(ConfigError, match=r"n_splits=64 must divide both dimensions of encoder.block.0.layer.0.SelfAttention.q \(24->24\)"):
        check_config(AdapterConfig(module_type="mhr", n_splits=64, task_names=TASKS), tiny_t5_config())
    # T0-3B shapes: 2048 and 5120 are both divisible by 64, not by 3.
    check_config(AdapterConfig(module_type="mhr", n_splits=64, task_names=TASKS), backbone_config("t0_3b"))
    with pytest.raises(ConfigError, match="n_splits=3 must divide"):
        check_config(AdapterConfig(module_type="mhr", n_splits=3, task_names=TASKS), backbone_config("t0_3b"))
