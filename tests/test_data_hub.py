"""Hub loading stays real but fails fast offline; local files; nothing half-written."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tensorpoly.data import DataError, load_registry
from tensorpoly.data.hub import HubUnavailable, import_storycloze, load_hub_split, load_local, read_storycloze_csv
from tensorpoly.data.io import atomic_path

ROOT = Path(__file__).resolve().parents[1]
OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
HEADER = "InputStoryid,InputSentence1,InputSentence2,InputSentence3,InputSentence4,RandomFifthSentenceQuiz1,RandomFifthSentenceQuiz2,AnswerRightEnding\n"


sys.path.insert(0, str(ROOT / "scripts"))
import prepare_data  # noqa: E402


def run_prepare(capsys, monkeypatch, *args):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    t = time.time()
    rc = prepare_data.main(list(args))
    return rc, capsys.readouterr().err, time.time() - t


def test_offline_fails_fast_naming_missing_datasets(capsys, monkeypatch):
    rc, err, secs = run_prepare(capsys, monkeypatch, "--only", "super_glue/rte", "--only", "imdb")
    assert rc != 0 and secs < 10
    assert "offline" in err and "super_glue/rte" in err and "imdb" in err
    assert "make data" in err  # says how to supply them
    assert not (ROOT / "data" / "t0" / "imdb").exists()


def test_offline_without_flags_does_not_hang(capsys, monkeypatch):
    monkeypatch.setattr(prepare_data, "hub_reachable", lambda: False)  # what a machine with no route sees
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    rc = prepare_data.main(["--only", "imdb"])
    assert rc != 0 and "unreachable" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_offline_message():
    p = subprocess.run([sys.executable, "scripts/prepare_data.py"], cwd=ROOT, env=OFFLINE, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode != 0 and "story_cloze/2016" in p.stderr and "--storycloze-dir" in p.stderr


def test_unknown_dataset_is_named(capsys, monkeypatch):
    rc, err, _ = run_prepare(capsys, monkeypatch, "--only", "not_a_dataset")
    assert rc == 2 and "'not_a_dataset' is not in the registry" in err


def test_real_hub_call_fails_fast_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    t = time.time()
    with pytest.raises(HubUnavailable, match="super_glue/rte"):
        load_hub_split("super_glue", "rte", "validation")
    assert time.time() - t < 10


def test_unprepared_dataset_message(tmp_path):
    with pytest.raises(DataError, match="imdb"):
        load_local("imdb", root=tmp_path)


def test_storycloze_from_csv(tmp_path):
    src = tmp_path / "sc"
    src.mkdir()
    row = "s{i},A.,B.,C.,D.,Good end.,Bad end.,{a}\n"
    (src / "cloze_test_val__spring2016.csv").write_text(HEADER + "".join(row.format(i=i, a=1 + i % 2) for i in range(4)))
    (src / "cloze_test_test__spring2016.csv").write_text(HEADER + "".join(row.format(i=i, a=1) for i in range(3)))
    out = tmp_path / "t0"
    import_storycloze(src, load_registry().eval_task("storycloze"), root=out)
    dd = load_local("story_cloze/2016", root=out)
    assert len(dd["validation"]) == 4 and len(dd["test"]) == 3
    assert dd["validation"][1]["answer_right_ending"] == 2 and dd["test"][0]["sentence_quiz1"] == "Good end."


def test_malformed_storycloze_csv_is_named(tmp_path):
    f = tmp_path / "val.csv"
    f.write_text("InputStoryid,InputSentence1\ns1,A.\n")
    with pytest.raises(DataError, match="val.csv: not a StoryCloze 2016 CSV, missing columns"):
        read_storycloze_csv(f)
    f.write_text(HEADER + "s1,A.,B.,C.,D.,E.,F.,3\n")
    with pytest.raises(DataError, match="val.csv, line 2: AnswerRightEnding 3"):
        read_storycloze_csv(f)


def test_interrupted_write_leaves_nothing(tmp_path):
    final = tmp_path / "data" / "imdb"
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(final) as tmp:
            tmp.mkdir()
            (tmp / "part.arrow").write_text("half")
            raise KeyboardInterrupt
    assert not final.exists() and list((tmp_path / "data").iterdir()) == []
    with atomic_path(final) as tmp:
        tmp.mkdir()
        (tmp / "ok").write_text("done")
    assert (final / "ok").read_text() == "done"
