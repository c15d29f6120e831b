"""The T0 registry: counts, caps, task ids, and errors for bad names and files."""
import pytest

from tensorpoly.data import DataError, list_tasks, load_registry, task_to_id
from tensorpoly.data.registry import eval_templates, _read_csv, TrainDataset

HELD_OUT = {"rte", "cb", "anli-r1", "anli-r2", "anli-r3", "copa", "h-swag", "storycloze", "wsc", "winogrande", "wic"}


def test_counts_match_the_t0_mixture():
    reg = load_registry()
    assert len(reg.train) == 38
    assert sum(d.n_templates for d in reg.train) == 313
    assert {t.task for t in reg.eval} == HELD_OUT
    # no held-out dataset is trained on
    assert not {d.dataset for d in reg.train} & {t.dataset for t in reg.eval}


def test_caps_follow_the_500k_rule():
    reg = load_registry()
    assert reg.train_dataset("glue/qqp").cap == 500_000 // 6
    assert reg.train_dataset("glue/mrpc").cap == 3668  # smaller than the budget: whole split
    assert all(d.cap == min(d.train_size, 500_000 // d.n_templates) for d in reg.train)


def test_template_level_tasks_are_the_promptsource_templates():
    tasks = list_tasks("template")
    assert len(tasks) == 313 == len(set(tasks))
    assert tasks == sorted(tasks)
    assert len(list_tasks("dataset")) == 38


@pytest.mark.parametrize("task", sorted(HELD_OUT))
def test_eval_template_counts_match_registry(task):
    t = load_registry().eval_task(task)
    ts = eval_templates(t)
    assert len(ts) == t.n_templates
    assert all(x.original_task and x.has_choices for x in ts)


def test_copa_keeps_first_eight_sorted():
    ts = eval_templates("copa")
    assert [t.name for t in ts] == sorted(t.name for t in ts)
    assert not any(t.name.startswith("…") for t in ts)  # the 4 one-question-type templates start with an ellipsis


def test_task_ids_are_sorted_positions_and_stable():
    tasks = ["b", "a", "c", "a"]
    assert task_to_id(tasks) == {"a": 0, "b": 1, "c": 2}
    assert task_to_id(reversed(tasks)) == task_to_id(tasks)


def test_unknown_names_raise_naming_them():
    reg = load_registry()
    with pytest.raises(DataError, match="not_a_dataset"):
        reg.train_dataset("not_a_dataset")
    with pytest.raises(DataError, match="boolq"):
        reg.eval_task("boolq")
    with pytest.raises(DataError, match="task_level"):
        list_tasks("prompt")


def test_malformed_registry_file_is_named(tmp_path):
    bad = tmp_path / "t0_train.csv"
    bad.write_text("dataset,hf_name\nimdb,imdb\n")
    with pytest.raises(DataError, match="t0_train.csv.*expected columns"):
        _read_csv(bad, TrainDataset)
    bad.write_text("dataset,hf_name,subset,cluster,train_size,n_templates,n_original\nimdb,imdb,,sentiment,many,11,10\n")
    with pytest.raises(DataError, match="t0_train.csv, line 2"):
        _read_csv(bad, TrainDataset)
