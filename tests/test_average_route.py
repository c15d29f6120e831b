"""Training the zero-shot route (`train.average_route_prob`): which steps are drawn, what a drawn step
trains, the error for a bad probability; and the two scripts that diagnose zero-shot routing."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tensorpoly.checkpoint import adapter_state_dict
from tensorpoly.config import ConfigError
from tensorpoly.experiment.average_route import average_route_draw
from tensorpoly.experiment.setup import build_model, check_training_config
from tensorpoly.experiment.train import run_training

from experiment_helpers import quick_train_cfg


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def test_the_draw_is_a_function_of_seed_and_step_with_the_asked_rate():
    draws = [average_route_draw(42, step, 0.25) for step in range(4000)]
    assert draws == [average_route_draw(42, step, 0.25) for step in range(4000)]  # same on every rank and on resume
    assert 0.22 < sum(draws) / len(draws) < 0.28
    assert draws != [average_route_draw(43, step, 0.25) for step in range(4000)]
    assert not any(average_route_draw(42, step, 0.0) for step in range(500))
    assert all(average_route_draw(42, step, 1.0) for step in range(500))


def _weights(run):
    return load_file(str(Path(run["run_dir"]) / "adapter" / "adapter_model.safetensors"))


def test_steps_through_the_average_route_train_the_experts_and_leave_the_routers(tmp_path):
    common = ["model=poly", "train.steps=4"]
    cfg = quick_train_cfg(tmp_path, "always", *common, "train.average_route_prob=1.0")
    initial, _ = build_model(cfg, check_training_config(cfg), int(cfg.seed))
    always = run_training(cfg)
    never = run_training(quick_train_cfg(tmp_path, "never", *common))
    wa, wn = _weights(always), _weights(never)
    w0 = adapter_state_dict(initial)
    assert w0.keys() == wa.keys()
    routers = [k for k in w0 if "router" in k]
    experts = [k for k in w0 if k not in routers]
    assert routers and experts
    # Every step went through the uniform average: no routing gradient, so the logits keep their init.
    assert all(torch.equal(w0[k], wa[k]) for k in routers)
    assert any(not torch.equal(w0[k], wn[k]) for k in routers)
    assert all(not torch.equal(w0[k], wa[k]) for k in experts)
    # The run's own validation and held-out evaluation still see the learned routing afterwards.
    record = json.loads(Path(always["result"]).read_text())
    assert record["config"]["train"]["average_route_prob"] == 1.0


def test_resume_redraws_the_same_steps(tmp_path):
    common = ["model=tensorpoly1", "train.average_route_prob=0.5", "train.steps=6", "train.checkpoint_every=3"]
    whole = run_training(quick_train_cfg(tmp_path, "whole", *common))
    run_training(quick_train_cfg(tmp_path, "killed", *common, "debug.stop_after_step=4"))
    resumed = run_training(quick_train_cfg(tmp_path, "resumer", *common, "resume=true"))
    a, b = _weights(whole), _weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("bad", ["1.5", "-0.1", "often"])
def test_a_bad_probability_is_refused_before_anything_loads(tmp_path, bad):
    cfg = quick_train_cfg(tmp_path, "bad", f"train.average_route_prob={bad}")
    with pytest.raises(ConfigError, match=r"train.average_route_prob=.*a probability in \[0, 1\]"):
        check_training_config(cfg)


def test_heldin_accuracy_scores_training_tasks_through_the_zero_shot_router(tmp_path, monkeypatch, capsys):
    run = run_training(quick_train_cfg(tmp_path, "scored", "model=poly", "data.datasets=[count]", "train.steps=2"))
    for extra, routing in (([], "own task rows"), (["--average", "uniform"], "uniform average router")):
        _run_script("heldin_accuracy.py", ["--checkpoint", run["run_dir"], "--per-task", "4", *extra], monkeypatch)
        out = capsys.readouterr().out
        assert f"({routing})" in out and "top answer" in out
        rows = [line.split() for line in out.splitlines() if line.startswith("count/")]
        assert [r[0] for r in rows] == ["count/count_words", "count/how_many", "count/number_of_items"]
        assert all(0 <= float(r[1]) <= 1 and abs(float(r[2]) - 1 / 6) < 0.01 and 0.25 <= float(r[3]) <= 1 for r in rows)


def _run_script(name, argv, monkeypatch):
    import runpy
    import sys

    from tensorpoly.experiment.rundir import REPO_ROOT

    script = str(REPO_ROOT / "scripts" / name)
    monkeypatch.setattr(sys, "argv", [script, *argv])
    runpy.run_path(script, run_name="__main__")


def test_route_probe_scores_held_out_tasks_through_every_training_row(tmp_path, monkeypatch, capsys):
    run = run_training(quick_train_cfg(tmp_path, "probed", "model=poly", "data.datasets=[count]", "train.steps=2"))
    _run_script("route_probe.py", ["--checkpoint", run["run_dir"], "--tasks", "who_liked", "count_category",
                                   "--limit", "6"], monkeypatch)
    out = capsys.readouterr().out
    assert "3 training rows" in out
    lines = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("who_liked", "count_category"))}
    assert set(lines) == {"who_liked", "count_category"}
    assert float(lines["who_liked"][1]) == 0.5 and float(lines["count_category"][1]) == 0.25
    for fields in lines.values():
        average, best = float(fields[2]), float(fields[3])
        assert 0 <= average <= 1 and 0 <= best <= 1
        assert fields[4].startswith("count/") and float(fields[5].rstrip(",")) == best  # best row listed first


def test_route_probe_refuses_a_dense_adapter(tmp_path, monkeypatch):
    run = run_training(quick_train_cfg(tmp_path, "dense", "model=lora", "train.steps=1"))
    with pytest.raises(SystemExit, match="a lora adapter has no router to probe"):
        _run_script("route_probe.py", ["--checkpoint", run["run_dir"]], monkeypatch)
