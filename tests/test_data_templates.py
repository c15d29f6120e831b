"""Every promptsource template of every registry dataset, applied to the hand-written fixtures."""
import json
import sys
from pathlib import Path

import pytest

from tensorpoly.data import DataError, load_registry
from tensorpoly.data.registry import eval_templates
from tensorpoly.data.t0 import render_rows
from tensorpoly.data.templates import install_pkg_resources_shim, jinja_templates, promptsource_templates

FIXTURES = Path(__file__).resolve().parents[1] / "data" / "fixtures"
REG = load_registry()
TEMPLATE_DATASETS = sorted({d.dataset for d in REG.train} | {t.templates_from for t in REG.eval})


def fixture(key):
    return [json.loads(line) for line in (FIXTURES / (key.replace("/", "__") + ".jsonl")).read_text().splitlines()]


def test_every_dataset_has_a_fixture():
    assert sorted(p.stem.replace("__", "/") for p in FIXTURES.glob("*.jsonl")) == TEMPLATE_DATASETS


@pytest.mark.parametrize("key", TEMPLATE_DATASETS)
def test_every_template_renders_or_is_not_applicable(key):
    rows = fixture(key)
    for t in promptsource_templates(key):
        rendered = [t.render(r, task=t.task_name, idx=i) for i, r in enumerate(rows)]  # raises on a template error
        ok = [e for e in rendered if e is not None]
        assert ok, f"{key} / {t.name}: no fixture example renders (fixtures should cover every template)"
        for e in ok:
            assert e.input and e.target
            if e.answer_choices is not None and e.label is not None:
                assert e.answer_choices[e.label] == e.target


def test_rendering_is_deterministic_even_for_random_templates():
    # kilt_tasks templates pick an answer with the `choice` filter (Python's random)
    rows = fixture("kilt_tasks/hotpotqa")
    t = promptsource_templates("kilt_tasks/hotpotqa")[0]
    assert [t.render(r, "x") for r in rows] == [t.render(r, "x") for r in rows]


@pytest.mark.parametrize("task", sorted(t.task for t in REG.eval))
def test_held_out_templates_render_every_fixture_with_the_gold_label(task):
    t = REG.eval_task(task)
    exs = render_rows(task, fixture(t.templates_from), mode="all")
    assert len(exs) == t.n_templates * len(fixture(t.templates_from))
    for e in exs:
        assert len(e.answer_choices) == t.n_choices
        assert e.answer_choices[e.label] == e.target


def test_label_out_of_range_is_reported():
    rows = fixture("super_glue/rte")
    rows[1]["label"] = 5
    with pytest.raises(DataError, match="label 5, out of range"):
        render_rows("rte", rows)


def test_template_rendering_empty_is_named():
    (t,) = jinja_templates("toy", [{"name": "only_if_x", "jinja": "{% if x %}{{x}} ||| y{% endif %}"}])
    assert t.render({"x": ""}, "toy") is None  # training: skipped
    with pytest.raises(DataError, match="toy.*only_if_x.*renders empty"):
        t.render({"x": ""}, "toy", strict=True)


def test_missing_field_is_named():
    (t,) = jinja_templates("toy", [{"name": "uses_y", "jinja": "{{y}} ||| z"}])
    with pytest.raises(DataError, match="'toy'.*'uses_y'.*y"):
        t.render({"x": 1}, "toy")


def test_pkg_resources_shim(monkeypatch):
    monkeypatch.setitem(sys.modules, "pkg_resources", None)  # makes `import pkg_resources` fail
    assert install_pkg_resources_shim() is True
    import pkg_resources
    import promptsource

    path = pkg_resources.resource_filename("promptsource", "templates")
    assert Path(path) == Path(promptsource.__file__).parent / "templates"
    assert Path(path).is_dir()
