"""Save/load round trips, merging, and refusing checkpoints that do not fit."""
import json

import pytest
import torch

from conftest import ALL_TYPES, adapted, batch, tiny_t5
from tensorpoly.adapters import AdapterLinear
from tensorpoly import ConfigError, load_adapter, merge, save_adapter
from tensorpoly.checkpoint import CONFIG_FILE, WEIGHTS_FILE, CheckpointError


def run(model, task_ids):
    input_ids, labels = batch(4)
    with torch.no_grad():
        return model(input_ids=input_ids, labels=labels, task_ids=task_ids).logits


@pytest.mark.parametrize("module_type", ALL_TYPES)
def test_save_load_reproduces_logits(module_type, tmp_path):
    fields = dict(order=4, granularity="block") if module_type != "lora" else {}
    if module_type in ("lora", "tlora", "mhr", "poly"):
        fields.pop("order", None)
    if module_type in ("lora", "tlora"):
        fields.pop("granularity", None)
    model = adapted(module_type, **fields)
    task_ids = torch.tensor([3, 1, 0, 3]) if model.config.routed else None
    save_adapter(model, tmp_path / "ckpt")
    loaded = load_adapter(tiny_t5(), tmp_path / "ckpt").eval()
    assert loaded.config == model.config
    torch.testing.assert_close(run(loaded, task_ids), run(model, task_ids), rtol=0, atol=1e-6)
    assert torch.equal(run(loaded, task_ids), run(model, task_ids))


def test_saved_files_hold_no_backbone_weights(tmp_path):
    from safetensors.torch import load_file
    model = adapted("tensorpoly1")
    save_adapter(model, tmp_path)
    keys = load_file(str(tmp_path / WEIGHTS_FILE)).keys()
    assert not any("base_layer" in k or "shared" in k for k in keys)
    spec = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert spec["adapter_config"]["order"] == 2 and spec["adapter_config"]["task_names"] == ["t0", "t1", "t2", "t3"]
    assert len(spec["layers"]) == 36


def test_average_routing_is_restored(tmp_path):
    model = adapted("poly")
    model.use_average_routing("mean_of_tasks")
    save_adapter(model, tmp_path)
    assert load_adapter(tiny_t5(), tmp_path).averaging == "mean_of_tasks"


def test_backbone_mismatch_is_refused(tmp_path):
    save_adapter(adapted("tensorpoly2"), tmp_path)
    with pytest.raises(CheckpointError, match=r"d_model: saved 24 vs given 32"):
        load_adapter(tiny_t5(d_model=32), tmp_path)
    with pytest.raises(CheckpointError, match=r"num_layers: saved 2 vs given 3"):
        load_adapter(tiny_t5(num_layers=3), tmp_path)


def test_damaged_checkpoints_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="not a saved tensorpoly adapter"):
        load_adapter(tiny_t5(), tmp_path)
    save_adapter(adapted("poly"), tmp_path)
    (tmp_path / CONFIG_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_adapter(tiny_t5(), tmp_path)
    save_adapter(adapted("poly"), tmp_path)
    spec = json.loads((tmp_path / CONFIG_FILE).read_text())
    spec["adapter_config"]["rank"] = 2
    (tmp_path / CONFIG_FILE).write_text(json.dumps(spec))
    with pytest.raises(CheckpointError, match=r"lora_A has shape \(1, 3, 24, 3\), the spec builds \(1, 3, 24, 2\)"):
        load_adapter(tiny_t5(), tmp_path)


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model = adapted("tensorpoly1")
    save_adapter(model, tmp_path)
    good = (tmp_path / WEIGHTS_FILE).read_bytes(), (tmp_path / CONFIG_FILE).read_text()
    import tensorpoly.checkpoint as ckpt

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", explode)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(adapted("tensorpoly1", seed=3), tmp_path)
    assert (tmp_path / WEIGHTS_FILE).read_bytes() == good[0] and (tmp_path / CONFIG_FILE).read_text() == good[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([WEIGHTS_FILE, CONFIG_FILE])


@pytest.mark.parametrize("module_type", ALL_TYPES)
def test_merge_folds_one_task_into_plain_weights(module_type):
    model = adapted(module_type, **({"order": 3} if module_type in ("tlora", "tensorpoly1", "tensorpoly2") else {}))
    merged = merge(model, task=2 if model.config.routed else None)
    assert not any(isinstance(m, AdapterLinear) for m in merged.modules())
    task_ids = torch.full((4,), 2) if model.config.routed else None
    input_ids, labels = batch(4)
    with torch.no_grad():
        want = model(input_ids=input_ids, labels=labels, task_ids=task_ids).logits
        got = merged(input_ids=input_ids, labels=labels).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    # The adapted model itself is untouched by merging (its factors rebuilt as before: cache cleared).
    model.clear_factor_cache()
    with torch.no_grad():
        again = model(input_ids=input_ids, labels=labels, task_ids=task_ids).logits
    torch.testing.assert_close(again, want, rtol=0, atol=0)


def test_merge_by_name_and_average():
    model = adapted("tensorpoly2")
    input_ids, labels = batch(2)
    with torch.no_grad():
        by_name = merge(model, "t3")(input_ids=input_ids, labels=labels).logits
        want = model(input_ids=input_ids, labels=labels, task_ids=torch.tensor([3, 3])).logits
        torch.testing.assert_close(by_name, want, rtol=0, atol=1e-6)
        with pytest.raises(ConfigError, match="use_average_routing"):
            merge(model, None)
        model.use_average_routing()
        torch.testing.assert_close(merge(model, None)(input_ids=input_ids, labels=labels).logits,
                                   model(input_ids=input_ids, labels=labels).logits, rtol=0, atol=1e-6)
