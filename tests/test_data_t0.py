"""The T0 path end to end on fixture data saved in the prepared (Arrow) layout - no hub."""
import json
from pathlib import Path

import datasets
import pytest

from tensorpoly.data import DataError
from tensorpoly.data.hub import local_dir
from tensorpoly.data.t0 import t0_eval_examples, t0_few_shot, t0_mixture

FIXTURES = Path(__file__).resolve().parents[1] / "data" / "fixtures"
ROOT = Path(__file__).resolve().parents[1]


def fixture(key):
    return [json.loads(x) for x in (FIXTURES / (key.replace("/", "__") + ".jsonl")).read_text().splitlines()]


def prepare(root, key, splits):
    datasets.DatasetDict({s: datasets.Dataset.from_list(rows) for s, rows in splits.items()}).save_to_disk(str(local_dir(key, root)))


@pytest.fixture
def t0_root(tmp_path):
    rte = fixture("super_glue/rte")
    prepare(tmp_path, "super_glue/rte", {"train": rte * 3, "validation": rte})
    prepare(tmp_path, "imdb", {"train": fixture("imdb") * 4})
    prepare(tmp_path, "glue/mrpc", {"train": fixture("glue/mrpc") * 4})
    return tmp_path


def test_mixture_from_prepared_data(t0_root):
    m = t0_mixture(datasets=["imdb", "glue/mrpc"], n_train=2, n_val=1, seed=1, root=t0_root)
    assert len(m.tasks) == 11 + 7 and all(t.startswith(("imdb/", "glue/mrpc/")) for t in m.tasks)
    assert m.skipped  # mrpc has templates that apply to only one label: skipped, not trained on
    again = t0_mixture(datasets=["imdb", "glue/mrpc"], n_train=2, n_val=1, seed=1, root=t0_root)
    assert [e.to_dict() for e in m.train] == [e.to_dict() for e in again.train]
    d = t0_mixture(datasets=["imdb"], n_train=2, n_val=1, task_level="dataset", root=t0_root)
    assert d.tasks == ["imdb"]


def test_unknown_or_unprepared_dataset(t0_root):
    with pytest.raises(DataError, match="'imbd' is not in the T0 training registry"):
        t0_mixture(datasets=["imbd"], root=t0_root)
    with pytest.raises(DataError, match="ag_news"):
        t0_mixture(datasets=["ag_news"], root=t0_root)


def test_eval_split_size_is_checked(t0_root):
    with pytest.raises(DataError, match="rte.*validation has 2 rows, registry says 277"):
        t0_eval_examples("rte", root=t0_root)


def test_few_shot_from_pool_then_from_tfew_file(t0_root, tmp_path):
    fs = tmp_path / "few_shot"
    ex = t0_few_shot("rte", seed=42, k=4, root=t0_root, few_shot_dir=fs, mode="all")
    assert len(ex) == 4 * 10 and {e.task for e in ex} == {"rte"}
    assert all(e.answer_choices[e.label] == e.target for e in ex)
    f = fs / "rte" / "2_shot" / "0_seed.jsonl"
    f.parent.mkdir(parents=True)
    f.write_text("".join(json.dumps(r) + "\n" for r in fixture("super_glue/rte")))
    ex = t0_few_shot("rte", seed=0, k=2, root=tmp_path / "nothing_prepared", few_shot_dir=fs, mode="random")
    assert [e.idx for e in ex] == [0, 1]


def test_import_tfew_few_shot_files(tmp_path, monkeypatch):
    import sys

    sys.path.insert(0, str(ROOT / "scripts"))
    import prepare_data
    from tensorpoly.data import load_registry

    monkeypatch.setattr(prepare_data, "FEW_SHOT_OUT", tmp_path / "out")
    src = tmp_path / "tfew"
    f = src / "cb" / "32_shot" / "42_seed.jsonl"
    f.parent.mkdir(parents=True)
    f.write_text("".join(json.dumps(r) + "\n" for r in fixture("super_glue/cb")))
    assert prepare_data.import_few_shot(src, load_registry()) == 1
    assert (tmp_path / "out" / "cb" / "32_shot" / "42_seed.jsonl").read_text() == f.read_text()
    f.write_text('{"premise": "x", "hypothesis": "y", "label": 4}\n')
    with pytest.raises(DataError, match="42_seed.jsonl, example 0: label 4 out of range"):
        prepare_data.import_few_shot(src, load_registry())
