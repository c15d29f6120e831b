"""Held-out scoring against a hand computation: every (example, choice) pair scored by its own full
forward pass and a per-token loop, then argmax, accuracy and the median over templates."""
import statistics

import pytest
import torch
from transformers import ByT5Tokenizer

from tensorpoly import AdapterConfig, TensorPolyModel
from tensorpoly.data import Example, TokenizeConfig, encode
from tensorpoly.experiment.evaluation import predict, task_accuracy

from conftest import tiny_t5


def examples():
    rows = [("Is a fox an animal?", ["no", "yes"], 1, "t_a"), ("Which is larger, 3 or 12?", ["3", "12"], 0, "t_a"),
            ("Count: fox, owl, saw", ["1", "2", "3", "four"], 2, "t_b"), ("Ann liked it. Bob did not. Who?", ["Ann", "Bob"], 0, "t_b"),
            ("A saw is a", ["tool", "food item"], 0, "t_c")]
    return [Example(input=i, target=c[l], answer_choices=c, label=l, task="heldout", dataset="heldout", template=t, idx=k)
            for k, (i, c, l, t) in enumerate(rows)]


def hand_scores(model, tok, ex: Example, length_norm: bool) -> list[float]:
    """log p(choice | input) by teacher forcing one choice at a time and summing log-softmax entries."""
    enc = torch.tensor([tok(ex.input, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]])
    scores = []
    for choice in ex.answer_choices:
        target = tok(choice, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        decoder_in = torch.tensor([[0] + target[:-1]])
        logits = model(input_ids=enc, attention_mask=torch.ones_like(enc), decoder_input_ids=decoder_in,
                       task_ids=torch.tensor([0])).logits[0]
        logp = sum(torch.log_softmax(logits[t].double(), -1)[y].item() for t, y in enumerate(target))
        scores.append(logp / len(target) if length_norm else logp)
    return scores


@pytest.mark.parametrize("length_norm", [True, False])
def test_predictions_and_accuracies_match_a_hand_computation(length_norm):
    tok = ByT5Tokenizer()
    backbone = tiny_t5(3, vocab_size=384)
    model = TensorPolyModel(backbone, AdapterConfig(module_type="tensorpoly1", rank=2, order=2, n_experts=3,
                                                    task_names=["a", "b"])).double().eval()
    model.use_average_routing()
    exs = examples()
    feats = encode(exs, tok, {"heldout": 0}, TokenizeConfig(eos="tfew"))
    with torch.no_grad():
        preds = predict(model, feats, tok.pad_token_id, batch_size=2, length_norm=length_norm)
        hand = [max(range(len(e.answer_choices)), key=lambda c, s=hand_scores(model, tok, e, length_norm): s[c]) for e in exs]
    assert preds == hand
    res_random = task_accuracy(exs, preds, "random")
    assert res_random["accuracy"] == pytest.approx(sum(p == e.label for p, e in zip(preds, exs)) / len(exs))
    res_all = task_accuracy(exs, preds, "all")
    per_t = {t: [p == e.label for p, e in zip(preds, exs) if e.template == t] for t in ("t_a", "t_b", "t_c")}
    assert res_all["accuracy"] == pytest.approx(statistics.median(sum(v) / len(v) for v in per_t.values()))
    assert res_all["chance"] == pytest.approx(statistics.mean([0.5, 0.5, 0.25, 0.5, 0.5]))
