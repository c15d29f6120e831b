"""The embedded backbone: loads offline in the agreed layout, is small, and has learnt its text."""
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, T5ForConditionalGeneration

ROOT = Path(__file__).resolve().parents[1]
BACKBONE = ROOT / "data" / "backbone"
sys.path.insert(0, str(ROOT / "scripts"))
import pretrain_backbone as P  # noqa: E402


def test_loads_offline_in_t5_v11_layout():
    model = T5ForConditionalGeneration.from_pretrained(BACKBONE)
    tok = AutoTokenizer.from_pretrained(BACKBONE)
    cfg = model.config
    assert cfg.vocab_size == len(tok) and tok.pad_token_id == 0 and tok.eos_token_id == 1
    # the repo's SentencePiece vocabulary really is loaded (transformers 5 can silently fall back to ~100 ids)
    assert len(tok) > 300 and tok.convert_ids_to_tokens(len(tok) - 1) == "<extra_id_0>"
    assert tok.unk_token_id not in tok("fox owl soup hammer lovely awful", add_special_tokens=False).input_ids
    assert cfg.feed_forward_proj == "gated-gelu" and cfg.scale_decoder_outputs is False  # v1.1: no output rescale
    # untied LM head (transformers 5 forces config.tie_word_embeddings=True; the weights decide)
    assert json.loads((BACKBONE / "config.json").read_text())["tie_word_embeddings"] is False
    assert model.lm_head.weight.data_ptr() != model.shared.weight.data_ptr()
    assert not torch.equal(model.lm_head.weight, model.shared.weight)
    names = {n for n, _ in model.named_modules()}
    assert any(n.endswith("DenseReluDense.wi_0") for n in names) and any(n.endswith("DenseReluDense.wi_1") for n in names)
    assert (BACKBONE / "model.safetensors").stat().st_size < 10 * 2**20
    ids = tok(["A fox is an animal."], return_tensors="pt").input_ids
    assert tok.decode(ids[0], skip_special_tokens=True) == "A fox is an animal."


def test_pretrain_record_is_complete():
    rec = json.loads((BACKBONE / "pretrain_log.json").read_text())
    assert {"command", "seed", "n_params", "train_seconds", "heldout_pretrain_loss"} <= set(rec)
    model = T5ForConditionalGeneration.from_pretrained(BACKBONE)
    assert rec["n_params"] == sum(p.numel() for p in model.parameters())


@torch.no_grad()
def test_pretrained_beats_random_init_on_heldout_text():
    model = T5ForConditionalGeneration.from_pretrained(BACKBONE).eval()
    rec = json.loads((BACKBONE / "pretrain_log.json").read_text())

    class A:
        pass

    a = A()
    a.__dict__.update(rec["args"])
    docs = P.pretraining_text(seed=999, n_docs=100)  # a different seed: text the backbone never saw verbatim
    ids = AutoTokenizer.from_pretrained(BACKBONE)(docs, add_special_tokens=False).input_ids
    torch.manual_seed(0)
    random_model = P.build_model(a, model.config.vocab_size).eval()
    x, m, y = P.make_batch(ids, random.Random(0), 16, a.max_src, a.max_tgt, model.config.vocab_size, a.mean_span)
    trained = model(input_ids=x, attention_mask=m, labels=y).loss.item()
    untrained = random_model(input_ids=x, attention_mask=m, labels=y).loss.item()
    assert trained < 0.6 * untrained


def test_span_corruption_round_trip():
    r = random.Random(0)
    ids = P.encode("The wolf, the owl and the deer are all animals.")
    src, tgt = P.span_corruption(ids, r, 384, mean_span=8)
    assert src[-1] == P.EOS and tgt[-1] == P.EOS
    # filling each sentinel in the input with its span from the target gives back the text
    spans, cur = {}, None
    for t in tgt[:-1]:
        if t >= 384 - 125:
            cur = t
            spans[cur] = []
        else:
            spans[cur].append(t)
    rebuilt = [x for s in src[:-1] for x in (spans[s] if s in spans else [s])]
    assert rebuilt == ids


def test_pretrain_script_writes_the_layout(tmp_path):
    out = tmp_path / "bb"
    threads = torch.get_num_threads()
    with torch.random.fork_rng():  # the script seeds torch and sets its thread count: keep other tests unaffected
        try:
            rc = P.main(["--steps", "3", "--d-model", "32", "--d-ff", "64", "--layers", "1", "--heads", "2",
                         "--n-docs", "200", "--batch-size", "4", "--probe-every", "2", "--out", str(out)])
        finally:
            torch.set_num_threads(threads)
    assert rc == 0
    assert {"config.json", "model.safetensors", "pretrain_log.json"} <= {f.name for f in out.iterdir()}
    assert T5ForConditionalGeneration.from_pretrained(out).config.d_model == 32
    rec = json.loads((out / "pretrain_log.json").read_text())
    probed = [e for e in rec["curve"] if "probes" in e]  # along the curve at step 2, and at the end
    assert [e["step"] for e in probed] == [2] and set(probed[0]["probes"]) == {"category", "polarity", "order"}
    assert set(rec["knowledge_probes"]) == {"category", "polarity", "order"}


@pytest.mark.slow
def test_pretrain_script_cli(tmp_path):
    p = subprocess.run([sys.executable, "scripts/pretrain_backbone.py", "--steps", "2", "--d-model", "32", "--d-ff", "64",
                        "--layers", "1", "--heads", "2", "--n-docs", "100", "--batch-size", "2", "--out", str(tmp_path / "bb")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]


def test_benchmark_words_are_single_pieces():
    """Common words and every answer word of the templates are one piece each (the first vocabulary
    shredded `the`, `yes`, `Which` into characters, and `yes` (3 pieces) vs `no` (1) biased rank
    classification)."""
    tok = AutoTokenizer.from_pretrained(BACKBONE)
    for w in ["the", "was", "thought", "Which", "Did", "yes", "no", "positive", "negative", "good", "bad", "true",
              "false", "animal", "food", "tool", "vehicle", "fox", "lovely", "awful", "Ann", "red", "three", "7", "37"]:
        assert len(tok(w, add_special_tokens=False).input_ids) == 1, (w, tok.tokenize(w))
