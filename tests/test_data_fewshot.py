"""Few-shot sets: the T-Few sampling algorithm, file precedence, and bad files."""
import json

import numpy as np
import pytest

from tensorpoly.data import DataError
from tensorpoly.data.fewshot import SEEDS, few_shot_path, load_few_shot, sample_few_shot

POOL = [{"idx": i, "label": i % 3, "text": f"row {i}"} for i in range(100)]


def test_same_permutation_as_tfew_global_numpy():
    for seed in SEEDS:
        rows = list(POOL)
        state = np.random.get_state()
        np.random.seed(seed)
        np.random.shuffle(rows)  # what T-Few / mttl do
        np.random.set_state(state)
        assert sample_few_shot(POOL, 32, seed) == rows[:32]


def test_global_numpy_state_untouched():
    np.random.seed(5)
    expected = np.random.rand()
    np.random.seed(5)
    sample_few_shot(POOL, 8, 42)
    assert np.random.rand() == expected


def test_seeds_differ_and_repeat():
    a = [r["idx"] for r in sample_few_shot(POOL, 16, 42)]
    assert a == [r["idx"] for r in sample_few_shot(POOL, 16, 42)]
    assert a != [r["idx"] for r in sample_few_shot(POOL, 16, 1024)]


def test_file_preferred_then_cached(tmp_path):
    path = few_shot_path(tmp_path, "rte", 4, 42)
    path.parent.mkdir(parents=True)
    given = [{"idx": 1000 + i, "label": 0} for i in range(4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in given))
    assert load_few_shot("rte", 4, 42, pool=POOL, root=tmp_path) == given
    rows = load_few_shot("rte", 4, 1024, pool=POOL, root=tmp_path, cache=True)
    assert few_shot_path(tmp_path, "rte", 4, 1024).is_file()
    assert load_few_shot("rte", 4, 1024, pool=None, root=tmp_path) == rows


def test_bad_files_are_named(tmp_path):
    path = few_shot_path(tmp_path, "cb", 2, 0)
    path.parent.mkdir(parents=True)
    path.write_text('{"label": 0}\n{"label": \n')
    with pytest.raises(DataError, match=r"0_seed.jsonl, line 2: malformed JSON"):
        load_few_shot("cb", 2, 0, root=tmp_path)
    path.write_text('{"label": 0}\n{"label": 3}\n')
    with pytest.raises(DataError, match=r"0_seed.jsonl: example 1 has label 3, out of range for 3 choices"):
        load_few_shot("cb", 2, 0, root=tmp_path, n_choices=3)
    path.write_text('{"label": 0}\n')
    with pytest.raises(DataError, match="expected 2 examples, found 1"):
        load_few_shot("cb", 2, 0, root=tmp_path)
    with pytest.raises(DataError, match="asked for 500 shots"):
        sample_few_shot(POOL, 500, 0, "cb")
