"""The T-Few losses against a direct computation from per-choice forward passes."""
import math

import pytest
import torch
from transformers import ByT5Tokenizer

from tensorpoly.data import Collator, Example, TokenizeConfig, encode
from tensorpoly.experiment.losses import tfew_losses

from tensorpoly import AdapterConfig, TensorPolyModel

from conftest import randomize_adapters, tiny_t5


def test_lm_mc_and_unlikelihood_losses_match_a_direct_computation():
    tok = ByT5Tokenizer()
    model = TensorPolyModel(tiny_t5(0, vocab_size=384), AdapterConfig(
        module_type="tensorpoly2", rank=3, order=2, n_experts=3, task_names=["t0", "t1", "t2"])).double()
    randomize_adapters(model)
    exs = [Example(input="is it?", target="yes", answer_choices=["no", "yes"], label=1, task="t1"),
           Example(input="pick one", target="bb", answer_choices=["a", "bb", "ccc"], label=1, task="t2")]
    task2id = {"t1": 1, "t2": 2}
    feats = encode(exs, tok, task2id, TokenizeConfig(eos="tfew"))
    batch = Collator(tok.pad_token_id)(feats)
    loss, parts = tfew_losses(model, batch, mc_weight=0.7, ul_weight=0.3)

    gold_lp, gold_n, mc_terms, ul_sum, ul_n = 0.0, 0, [], 0.0, 0
    for f, ex in zip(feats, exs):
        enc = torch.tensor([f["input_ids"]])
        means = []
        for c, choice in enumerate(f["choice_ids"]):
            dec = torch.tensor([[0] + choice[:-1]])
            logits = model(input_ids=enc, attention_mask=torch.ones_like(enc), decoder_input_ids=dec,
                           task_ids=torch.tensor([task2id[ex.task]])).logits[0]
            lps = [torch.log_softmax(logits[t], -1)[y].item() for t, y in enumerate(choice)]
            means.append(sum(lps) / len(lps))
            if c == ex.label:
                gold_lp, gold_n = gold_lp + sum(lps), gold_n + len(lps)
            else:
                ul_sum += sum(-math.log(1 - math.exp(lp) + 0.01) for lp in lps)
                ul_n += len(lps)
        mc_terms.append(-(means[ex.label] - math.log(sum(math.exp(m) for m in means))))
    lm, mc, ul = -gold_lp / gold_n, sum(mc_terms) / len(mc_terms), ul_sum / ul_n
    assert parts["lm"].item() == pytest.approx(lm, rel=1e-9)
    assert parts["mc"].item() == pytest.approx(mc, rel=1e-9)
    assert parts["ul"].item() == pytest.approx(ul, rel=1e-9)
    assert loss.item() == pytest.approx(lm + 0.7 * mc + 0.3 * ul, rel=1e-9)
    loss.backward()
    assert all(p.grad is not None for p in model.trainable_parameters())
