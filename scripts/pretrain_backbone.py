#!/usr/bin/env python
"""Pretrain the embedded backbone: a small T5 (v1.1 / LM-adapt layout: gated-GELU FF with wi_0/wi_1/wo,
untied LM head) on the embedded benchmark's pretraining text, with a SentencePiece unigram vocabulary
trained here on that text (default; `--tokenizer byte` uses ByT5's byte-level tokenizer instead).

Objective: a 50/50 mix of T5 span corruption (15% noise, mean span 3 tokens, sentinels <extra_id_i>)
and prefix LM (encoder gets a prefix, decoder continues) - the two stages of T5 LM-adapt, interleaved.
Why SentencePiece: with bytes, a model this small spent its budget on spelling (probes of category and
polarity knowledge stayed at chance); word-sized tokens make the world's facts one hop away. A frozen *random* T5 shows no transfer.
The shipped backbone knows polarity words and some number order, but not item categories (probe at chance,
also after 8,000 steps: see README, "What the default run measures"); it has never seen a prompt or an
evaluation example.

    python scripts/pretrain_backbone.py            # writes data/backbone/ (866 s of training on one thread, data/README.md)
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import ByT5Tokenizer, T5Config, T5ForConditionalGeneration

from tensorpoly.data.benchmark import pretraining_text
from tensorpoly.data.io import DATA_DIR, atomic_path

PAD, EOS, OFFSET = 0, 1, 3  # T5/ByT5 ids: pad 0, eos 1, unk 2; ByT5 byte b -> b + 3


def encode(text: str) -> list[int]:
    """ByT5 byte ids (no tokenizer needed)."""
    return [b + OFFSET for b in text.encode("utf-8")]


def sentinel(i: int, vocab: int) -> int:
    return vocab - 1 - i  # <extra_id_0> is the last id, in ByT5Tokenizer and in T5Tokenizer alike


def benchmark_words(docs: list[str]) -> list[str]:
    """The closed word list of the embedded benchmark: every word of the pretraining text, of the prompt
    templates and answer choices (templates.yaml), of the training datasets' raw text fields, and of the
    world lists (items, categories, adjectives, names, colours, number words, digits). Words only: no
    sentence of any prompt or example reaches the tokenizer corpus."""
    import re

    import yaml

    from tensorpoly.data import benchmark_gen as G
    from tensorpoly.data.benchmark import BENCHMARK_DIR

    word = re.compile(r"[A-Za-z]+|[0-9]+")

    def strings(o):
        if isinstance(o, dict):
            for v in o.values():
                yield from strings(v)
        elif isinstance(o, list):
            for v in o:
                yield from strings(v)
        elif isinstance(o, str):
            yield o

    words = {w for d in docs for w in word.findall(d)}
    for t in strings(yaml.safe_load((BENCHMARK_DIR / "templates.yaml").read_text())):
        words |= set(word.findall(re.sub(r"\{\{.*?\}\}|\{%.*?%\}", " ", t, flags=re.S)))
    for f in sorted((BENCHMARK_DIR / "train").glob("*.jsonl")):
        for line in f.read_text().splitlines():
            words |= {w for v in json.loads(line).values() if isinstance(v, str) for w in word.findall(v)}
    words |= set(G.CATEGORIES + G.ALL_ITEMS + G.POSITIVE + G.NEGATIVE + G.NAMES + G.COLORS + G.NUMBER_WORDS)
    words |= {str(i) for i in range(100)}
    return sorted(words)


def train_sentencepiece(docs: list[str], out_dir: Path, vocab_size: int, seed: int, add_words: bool = False):
    """A unigram SentencePiece model on the pretraining text, plus one piece per word of the benchmark's
    closed word list (``benchmark_words``), wrapped as a T5 tokenizer (+100 sentinels).

    Why the added words: trained alone, the unigram model shredded the commonest words (`the` -> `▁th e`,
    `thought` -> 5 pieces, `Which` -> 4, `yes` -> `▁ y es` while `no` -> `▁no`), so answer choices differed
    in length and prompts were long. SentencePiece's unigram trainer cannot be asked for them: on this
    repetitive corpus it stops at ~530-680 pieces whatever `vocab_size` says (few seed pieces), and a BPE
    model is read as a unigram model by transformers' T5 converter (different segmentations). So every
    benchmark word missing from the trained vocabulary is appended to the model as a piece `▁word` with
    score 0 (above every trained piece's log-probability): Viterbi then always takes the whole word, in
    SentencePiece and in the converted fast tokenizer alike (checked below), and anything else still falls
    back to the trained sub-word pieces and characters.
    transformers 5 ignores `T5Tokenizer(vocab_file=...)`, so load it from a directory holding spiece.model."""
    import string

    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb
    from transformers import T5Tokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    corpus = out_dir / "corpus.txt"
    # one line of every printable character, so prompt text outside the corpus never maps to <unk>
    corpus.write_text("\n".join(docs + [" ".join(string.ascii_letters + string.digits + string.punctuation)]) + "\n")
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(out_dir / "spiece"), vocab_size=vocab_size,
                                   model_type="unigram", pad_id=PAD, eos_id=EOS, unk_id=2, bos_id=-1,
                                   character_coverage=1.0, num_threads=1, minloglevel=2, hard_vocab_limit=False,
                                   )  # deterministic given the corpus (single thread)
    corpus.unlink()
    (out_dir / "spiece.vocab").unlink(missing_ok=True)
    words = benchmark_words(docs) if add_words else []
    if words:
        proto = pb.ModelProto()
        proto.ParseFromString((out_dir / "spiece.model").read_bytes())
        have = {p.piece for p in proto.pieces}
        for w in words:
            if "\u2581" + w not in have:
                proto.pieces.add(piece="\u2581" + w, score=0.0, type=pb.ModelProto.SentencePiece.NORMAL)
        (out_dir / "spiece.model").write_bytes(proto.SerializeToString())
    tok = T5Tokenizer.from_pretrained(str(out_dir))
    ids = tok("fox", add_special_tokens=False).input_ids
    assert tok.unk_token_id not in ids and len(tok) > vocab_size // 2, "SentencePiece vocabulary was not loaded"
    sp = spm.SentencePieceProcessor(model_file=str(out_dir / "spiece.model"))
    split = [w for w in words if len(tok(w, add_special_tokens=False).input_ids) != 1 or len(sp.encode(w)) != 1]
    assert not split, f"benchmark words that are not one piece: {split[:20]}"
    text = " ".join(docs[:50])
    assert sp.encode(text) == tok(text, add_special_tokens=False).input_ids, "fast tokenizer != SentencePiece"
    return tok


def span_corruption(ids: list[int], r: random.Random, vocab: int, density=0.15, mean_span=3):
    n = len(ids)
    n_noise = max(1, round(n * density))
    n_spans = max(1, round(n_noise / mean_span))
    # choose span starts on a coarse grid so spans never overlap
    starts = sorted(r.sample(range(0, max(1, n - mean_span), mean_span * 2), min(n_spans, max(1, (n - mean_span) // (mean_span * 2)))))
    inp, tgt, last = [], [], 0
    for i, s in enumerate(starts):
        # at most 2*mean_span - 1 tokens: spans start on a 2*mean_span grid, so one visible token always
        # separates two sentinels (T5 never emits adjacent sentinels)
        length = max(1, min(n - s, int(r.expovariate(1 / mean_span)) + 1, 2 * mean_span - 1))
        inp += ids[last:s] + [sentinel(i, vocab)]
        tgt += [sentinel(i, vocab)] + ids[s:s + length]
        last = s + length
    inp += ids[last:]
    return inp + [EOS], tgt + [EOS]


def prefix_lm(ids: list[int], r: random.Random, max_tgt: int):
    cut = r.randint(max(1, len(ids) // 4), max(1, 3 * len(ids) // 4))
    return ids[:cut] + [EOS], ids[cut:cut + max_tgt] + [EOS]


def make_batch(docs, r, bs, max_src, max_tgt, vocab, mean_span=3, density=0.15, prefix_frac=0.5):
    """``docs``: token-id lists. A ``prefix_frac`` share of prefix LM, the rest span corruption."""
    srcs, tgts = [], []
    for _ in range(bs):
        ids = docs[r.randrange(len(docs))]
        if len(ids) > max_src - 1:
            s = r.randrange(len(ids) - (max_src - 1) + 1)
            ids = ids[s:s + max_src - 1]
        src, tgt = (span_corruption(ids, r, vocab, density, mean_span) if r.random() < 1 - prefix_frac else prefix_lm(ids, r, max_tgt - 1))
        srcs.append(src[:max_src])
        tgts.append(tgt[:max_tgt])
    ls, lt = max(map(len, srcs)), max(map(len, tgts))
    x = torch.tensor([s + [PAD] * (ls - len(s)) for s in srcs])
    y = torch.tensor([t + [-100] * (lt - len(t)) for t in tgts])
    return x, (x != PAD).long(), y


def build_model(args, vocab: int) -> T5ForConditionalGeneration:
    cfg = T5Config(vocab_size=vocab, d_model=args.d_model, d_kv=args.d_model // args.heads, d_ff=args.d_ff,
                   num_layers=args.layers, num_decoder_layers=args.layers, num_heads=args.heads,
                   feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=getattr(args, "dropout", 0.0),
                   relative_attention_num_buckets=32, relative_attention_max_distance=128,
                   decoder_start_token_id=PAD, pad_token_id=PAD, eos_token_id=EOS)
    model = T5ForConditionalGeneration(cfg)
    # transformers 5 ties lm_head to the shared embedding whatever the config says (T5Config forces
    # tie_word_embeddings=True and keeps the v1.1 "no rescale" flag as scale_decoder_outputs). T5 v1.1 /
    # LM-adapt have an untied head, so untie it here; a checkpoint with its own lm_head.weight reloads untied.
    # Init std d_model**-0.5 (mesh-tf's) keeps the initial logits O(1) without output rescaling.
    model.lm_head.weight = torch.nn.Parameter(torch.randn(vocab, args.d_model) * args.d_model ** -0.5)
    model.config.tie_word_embeddings = False
    return model


@torch.no_grad()
def evaluate(model, docs, seed, args, vocab, n_batches=20):
    model.eval()
    r = random.Random(seed + 1)
    losses = [model(input_ids=x, attention_mask=m, labels=y).loss.item()
              for x, m, y in (make_batch(docs, r, args.batch_size, args.max_src, args.max_tgt, vocab, args.mean_span,
                                         getattr(args, "noise_density", 0.15), getattr(args, "prefix_lm", 0.5))
                              for _ in range(n_batches))]
    model.train()
    return sum(losses) / len(losses)


@torch.no_grad()
def knowledge_probes(model, tok, seed: int = 0) -> dict:
    """Does the backbone know its world? Prefix-LM rank classification of true vs false continuations of
    declarative sentences (the pretraining format, not a task prompt). Chance: category 0.25, others 0.5."""
    from tensorpoly.data import benchmark_gen as G

    model.eval()
    r = random.Random(seed)

    def best(src, options):
        x = tok([src] * len(options), return_tensors="pt", padding=True)
        y = tok(options, return_tensors="pt", padding=True).input_ids
        y[y == tok.pad_token_id] = -100
        logits = model(**x, labels=y).logits
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), y, reduction="none", ignore_index=-100).sum(1)
        return int(nll.argmin())

    art = lambda w: "an" if w[0] in "aeiou" else "a"  # noqa: E731
    cat = sum(G.CATEGORIES[best(f"A {it} is", [f" {art(c)} {c}." for c in G.CATEGORIES])] == G.CATEGORY_OF[it]
              for it in G.ALL_ITEMS) / len(G.ALL_ITEMS)
    adjs = G.POSITIVE + G.NEGATIVE
    pol = sum((best(f"{r.choice(G.NAMES)} was", [f" glad because the {r.choice(G.ALL_ITEMS)} was {a}.",
                                                   f" sad because the {r.choice(G.ALL_ITEMS)} was {a}."]) == 0)
              == (a in G.POSITIVE) for a in adjs) / len(adjs)
    pairs = [r.sample(range(100), 2) for _ in range(100)]
    order = sum(best(f"{a} is", [f" larger than {b}.", f" smaller than {b}."]) == (0 if a > b else 1)
                for a, b in pairs) / len(pairs)
    model.train()
    return {"category": round(cat, 3), "polarity": round(pol, 3), "order": round(order, 3)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DATA_DIR / "backbone")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--max-src", type=int, default=48, help="tokens")
    p.add_argument("--max-tgt", type=int, default=16, help="tokens")
    p.add_argument("--noise-density", type=float, default=0.15, help="span corruption: share of tokens masked")
    p.add_argument("--prefix-lm", type=float, default=0.5, help="share of prefix-LM examples (rest: span corruption)")
    p.add_argument("--mean-span", type=int, default=3, help="span corruption: mean span length in tokens")
    p.add_argument("--tokenizer", choices=["spm", "byte"], default="spm")
    p.add_argument("--add-words", action=argparse.BooleanOptionalAction, default=True,
                   help="spm: append every benchmark word missing from the trained vocabulary as one piece (see train_sentencepiece)")
    p.add_argument("--vocab", type=int, default=512, help="trained SentencePiece pieces (before --add-words words and the 100 sentinels)")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--dropout", type=float, default=0.0, help="pretraining only; the saved config has none")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--d-ff", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--n-docs", type=int, default=12000)
    p.add_argument("--sentence-kinds", type=int, nargs="+", metavar="K",
                   help="ablation: pretrain only on these kinds of world sentence (0-11, see benchmark_gen._pretrain_sentence; "
                        "category facts are 0 1 9 11); default all")
    p.add_argument("--probe-every", type=int, default=1000, help="steps between knowledge probes logged in the curve (0: only at the end)")
    p.add_argument("--threads", type=int, default=1, help="1 is robust when other jobs share the 2 cores (OpenMP oversubscription is 10x slower)")
    p.add_argument("--probe", type=Path, help="only run the knowledge probes on this backbone and add them to its log")
    a = p.parse_args(argv)

    if a.probe:
        from transformers import AutoTokenizer

        res = knowledge_probes(T5ForConditionalGeneration.from_pretrained(a.probe), AutoTokenizer.from_pretrained(a.probe))
        log_path = a.probe / "pretrain_log.json"
        if log_path.is_file():
            rec = json.loads(log_path.read_text())
            rec["knowledge_probes"] = res
            with atomic_path(log_path) as tmp:
                tmp.write_text(json.dumps(rec, indent=1) + "\n")
        print(json.dumps(res))
        return 0

    torch.manual_seed(a.seed)
    torch.set_num_threads(a.threads)
    docs = pretraining_text(n_docs=a.n_docs, kinds=tuple(a.sentence_kinds) if a.sentence_kinds else None)
    n_val = len(docs) // 20
    val_docs, train_docs = docs[:n_val], docs[n_val:]  # held-out pretraining docs for the final loss
    with tempfile.TemporaryDirectory() as spm_dir:
        if a.tokenizer == "spm":
            tok = train_sentencepiece(train_docs, Path(spm_dir), a.vocab, a.seed, a.add_words)
            spm_model = (Path(spm_dir) / "spiece.model").read_bytes()
        else:
            tok = ByT5Tokenizer()  # 384 ids: 3 special + 256 bytes + 125 sentinels
    vocab = len(tok)
    if a.tokenizer == "spm":
        enc = tok(train_docs + val_docs, add_special_tokens=False).input_ids
        train_ids, val_ids = enc[: len(train_docs)], enc[len(train_docs):]
    else:
        train_ids, val_ids = [encode(d) for d in train_docs], [encode(d) for d in val_docs]
    model = build_model(a, vocab)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=a.weight_decay, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / a.warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / a.steps))))
    r = random.Random(a.seed)
    t0, ema, log = time.time(), None, []
    bar = tqdm(range(a.steps), desc=f"pretrain ({n_params / 1e6:.2f}M params)", mininterval=5)
    for step in bar:
        x, m, y = make_batch(train_ids, r, a.batch_size, a.max_src, a.max_tgt, vocab, a.mean_span,
                             a.noise_density, a.prefix_lm)
        loss = model(input_ids=x, attention_mask=m, labels=y).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if (step + 1) % 200 == 0:
            bar.set_postfix(loss=f"{ema:.3f}")
            log.append({"step": step + 1, "loss_ema": round(ema, 4), "seconds": round(time.time() - t0, 1)})
        if a.probe_every and (step + 1) % a.probe_every == 0 and step + 1 < a.steps:
            # when does the backbone learn its world? (the probes cost about a second)
            log.append({"step": step + 1, "probes": knowledge_probes(model, tok, a.seed)})
            bar.write(f"step {step + 1}: {log[-1]['probes']}")
    train_time = time.time() - t0
    val_loss = evaluate(model, val_ids, a.seed, a, vocab)
    probes = knowledge_probes(model, tok, a.seed)
    record = {
        "command": "python scripts/pretrain_backbone.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "seed": a.seed, "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
        "n_params": n_params, "train_seconds": round(train_time, 1), "final_train_loss_ema": round(ema, 4),
        "heldout_pretrain_loss": round(val_loss, 4), "loss_unit": "nats per token", "knowledge_probes": probes,
        "tokenizer": f"{a.tokenizer} ({type(tok).__name__}, {vocab} ids)",
        "objective": f"{1 - a.prefix_lm:.0%} span corruption ({a.noise_density:.0%}, mean span {a.mean_span}) + {a.prefix_lm:.0%} prefix LM",
        "torch": torch.__version__, "machine": f"{platform.machine()} {torch.get_num_threads()} threads", "curve": log,
    }
    model.config.dropout_rate = 0.0  # pretraining-only regulariser: the shipped config has no dropout (as before)
    with atomic_path(a.out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if a.tokenizer == "spm":
            (tmp / "spiece.model").write_bytes(spm_model)  # the raw SentencePiece model, for other toolkits
        (tmp / "pretrain_log.json").write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps({k: v for k, v in record.items() if k != "curve"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
