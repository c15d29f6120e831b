"""Tokenisation (EOS conventions, truncation) and collation layouts."""
import pytest
import torch
from transformers import ByT5Tokenizer

from tensorpoly.data import Collator, DataError, Example, TokenizeConfig, collate, encode

TOK = ByT5Tokenizer()
EOS, PAD = TOK.eos_token_id, TOK.pad_token_id


def ex(inp="Is it red?", tgt="yes", choices=("no", "yes"), label=1, task="a"):
    return Example(input=inp, target=tgt, answer_choices=list(choices) if choices else None,
                   label=label if choices else None, task=task)


def test_round_trip_and_eos_conventions():
    (f,) = encode([ex()], TOK, {"a": 0})
    assert f["input_ids"][-1] == EOS and TOK.decode(f["input_ids"][:-1]) == "Is it red?"
    assert TOK.decode(f["target_ids"][:-1]) == "yes" and f["target_ids"][-1] == EOS
    assert [TOK.decode(c[:-1]) for c in f["choice_ids"]] == ["no", "yes"]
    (g,) = encode([ex()], TOK, {"a": 0}, TokenizeConfig(eos="t0"))
    assert g["input_ids"] == f["input_ids"][:-1]  # T0: no EOS on the input
    assert g["target_ids"] == f["target_ids"] and g["choice_ids"] == f["choice_ids"]
    with pytest.raises(DataError, match="eos must be one of"):
        TokenizeConfig(eos="none")


def test_truncation_keeps_eos():
    (f,) = encode([ex(inp="x" * 500, tgt="y" * 50)], TOK, {"a": 0}, TokenizeConfig(max_input_len=256, max_target_len=16))
    assert len(f["input_ids"]) == 256 and f["input_ids"][-1] == EOS
    assert len(f["target_ids"]) == 16 and f["target_ids"][-1] == EOS


def test_unknown_task_and_bad_label():
    with pytest.raises(DataError, match="tasks not in task2id"):
        encode([ex(task="zzz")], TOK, {"a": 0})
    bad = ex()
    bad.label, bad.dataset, bad.template = 2, "toy", "tmpl"
    with pytest.raises(DataError, match="'toy'.*'tmpl'.*label 2 out of range"):
        encode([bad], TOK, {"a": 0})


def test_collate_layout():
    feats = encode([ex(inp="short"), ex(inp="a much longer input", choices=("one", "two", "three"), tgt="three", label=2, task="b")],
                   TOK, {"a": 0, "b": 1})
    b = collate(feats, PAD)
    assert b["task_ids"].tolist() == [0, 1] and b["task_ids"].dtype == torch.int64
    assert b["input_ids"].shape == b["attention_mask"].shape
    assert b["attention_mask"][0].sum() == len(feats[0]["input_ids"])
    assert (b["input_ids"][0][b["attention_mask"][0] == 0] == PAD).all()
    assert b["labels"][0, len(feats[0]["target_ids"]):].eq(-100).all()
    B, C, L = b["choice_ids"].shape
    assert (B, C) == (2, 3) and L == max(len(c) for f in feats for c in f["choice_ids"])
    assert b["choice_valid"].tolist() == [[True, True, False], [True, True, True]]
    assert b["label"].tolist() == [1, 2]
    assert (b["choice_ids"][b["choice_mask"] == 0] == PAD).all()
    # the gold choice, unpadded, is the target
    j = b["label"][1]
    assert b["choice_ids"][1, j][b["choice_mask"][1, j].bool()].tolist() == feats[1]["target_ids"]


def test_collate_without_choices():
    feats = encode([ex(choices=None), ex()], TOK, {"a": 0})
    b = collate(feats)
    assert "choice_ids" not in b
    with pytest.raises(DataError, match="some examples have no answer choices"):
        Collator(with_choices=True)(feats)
