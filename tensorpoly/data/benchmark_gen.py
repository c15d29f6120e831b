"""Seeded generator of the embedded benchmark's raw examples and of its pretraining text.

One small synthetic world (items in four categories, polarity adjectives, names, colours, numbers)
supplies six primitive skills: polarity, category, order, count, lookup, negation. Training datasets
exercise one skill each (two of them with a contrary twin); held-out datasets either need two skills at
once (composition) or ask one trained skill in new words (rewording). The rationale is in
data/README.md. Everything is drawn from `random.Random(seed)` streams
derived from (seed, dataset, split) so one dataset can be regenerated without the others.
"""
from __future__ import annotations

import hashlib
import random

CATEGORIES = ["animal", "food", "tool", "vehicle"]
ITEMS = {
    "animal": ["fox", "owl", "wolf", "deer", "frog", "goat", "duck", "bear", "mouse", "horse", "tiger", "snake"],
    "food": ["soup", "bread", "cheese", "apple", "rice", "cake", "pear", "honey", "salad", "plum", "pie", "noodles"],
    "tool": ["hammer", "saw", "drill", "wrench", "shovel", "chisel", "rake", "axe", "pliers", "ladder", "needle", "broom"],
    "vehicle": ["car", "bus", "truck", "bike", "boat", "train", "van", "tram", "ship", "plane", "taxi", "wagon"],
}
CATEGORY_OF = {w: c for c, ws in ITEMS.items() for w in ws}
ALL_ITEMS = [w for c in CATEGORIES for w in ITEMS[c]]
POSITIVE = ["great", "lovely", "wonderful", "superb", "pleasant", "excellent", "charming", "delightful",
            "splendid", "perfect", "fantastic", "brilliant"]
NEGATIVE = ["awful", "terrible", "horrible", "dreadful", "nasty", "poor", "boring", "ugly", "broken", "lousy",
            "grim", "shabby"]
NAMES = ["Ann", "Bob", "Cleo", "Dan", "Eve", "Finn", "Gus", "Hana", "Ivo", "Jon", "Kai", "Lia", "Max", "Nia",
         "Omar", "Pia"]
COLORS = ["red", "blue", "green", "yellow", "black", "white", "brown", "pink"]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


def rng_for(seed: int, *key: str) -> random.Random:
    """An independent, stable stream per (seed, key...): adding a dataset never shifts another one."""
    h = hashlib.sha256(("|".join([str(seed), *key])).encode()).hexdigest()
    return random.Random(int(h[:16], 16))


# ----------------------------------------------------------------------------- review sentences
_REVIEW_PATTERNS = [
    "{name} thought the {item} was {neg}{adj}.",
    "{name} tried the {item}. It was {neg}{adj}.",
    "According to {name}, the {item} is {neg}{adj}.",
    "{name} said: \"This {item} is {neg}{adj}.\"",
]


def _review(r: random.Random, negated: bool = False) -> dict:
    pol = r.randrange(2)  # 1 = positive adjective
    adj = r.choice(POSITIVE if pol else NEGATIVE)
    name, item = r.choice(NAMES), r.choice(ALL_ITEMS)
    text = r.choice(_REVIEW_PATTERNS).format(name=name, item=item, adj=adj, neg="not " if negated else "")
    return {"text": text, "name": name, "item": item, "adjective": adj, "polarity": pol}


# ----------------------------------------------------------------------------- training datasets
def gen_review(r):
    ex = _review(r)
    return {**ex, "label": ex["polarity"]}


def gen_review_contrary(r):
    # Same inputs as `review`; the contrary critic means the opposite, so the label flips.
    ex = _review(r)
    return {**ex, "label": 1 - ex["polarity"]}


_TOPIC_SENTENCES = ["{name} saw a {item} today.", "There was a {item} near the house.",
                    "{name} talked about the {item} all day.", "The {item} was the first thing {name} noticed."]


def gen_topic(r):
    item = r.choice(ALL_ITEMS)
    return {"item": item, "sentence": r.choice(_TOPIC_SENTENCES).format(item=item, name=r.choice(NAMES)),
            "label": CATEGORIES.index(CATEGORY_OF[item])}


def gen_odd_one_out(r):
    main, odd = r.sample(CATEGORIES, 2)
    items = r.sample(ITEMS[main], 3)
    pos = r.randrange(4)
    items.insert(pos, r.choice(ITEMS[odd]))
    return {"items": items, "label": pos}


def _pair(r):
    a, b = r.sample(range(1, 100), 2)
    return a, b


def gen_compare(r):
    a, b = _pair(r)
    return {"a": a, "b": b, "label": 0 if a > b else 1}


def gen_compare_contrary(r):
    a, b = _pair(r)
    return {"a": a, "b": b, "label": 0 if a < b else 1}


def gen_count(r):
    n = r.randint(1, 6)
    return {"items": r.sample(ALL_ITEMS, n), "name": r.choice(NAMES), "label": n - 1}


def gen_lookup(r):
    n = 3
    names = r.sample(NAMES, n)
    colors = r.sample(COLORS, n)
    items = [r.choice(ALL_ITEMS) for _ in range(n)]
    facts = [f"{nm} has a {c} {it}." for nm, c, it in zip(names, colors, items)]
    q = r.randrange(n)
    return {"facts": facts, "colors": colors, "name": names[q], "item": items[q], "label": q}


def gen_negation(r):
    item = r.choice(ALL_ITEMS)
    stated = r.choice(COLORS)
    negated = r.random() < 0.5
    if negated:
        asked, label = stated, 0  # "is not red" -> "is it red?" no
    else:
        same = r.random() < 0.5
        asked = stated if same else r.choice([c for c in COLORS if c != stated])
        label = int(same)
    return {"statement": f"The {item} is {'not ' if negated else ''}{stated}.", "item": item, "color": asked,
            "negated": negated, "label": label}


# ----------------------------------------------------------------------------- held-out datasets
def gen_negated_review(r):
    ex = _review(r, negated=True)
    return {**ex, "label": 1 - ex["polarity"]}  # "not awful" reads as positive


_KINDS = {"animal": "pet", "food": "meal", "tool": "tool", "vehicle": "ride"}


def gen_who_liked(r):
    names = r.sample(NAMES, 2)
    cat = r.choice(CATEGORIES)
    items = r.sample(ITEMS[cat], 2)
    happy = r.randrange(2)
    adjs = [r.choice(POSITIVE) if i == happy else r.choice(NEGATIVE) for i in range(2)]
    text = " ".join(f"{n} thought the {it} was {a}." for n, it, a in zip(names, items, adjs))
    return {"text": text, "names": names, "kind": _KINDS[cat], "label": happy}


def gen_count_category(r):
    cat = r.choice(CATEGORIES)
    k = r.randint(1, 4)
    others = [w for w in ALL_ITEMS if CATEGORY_OF[w] != cat]
    items = r.sample(ITEMS[cat], k) + r.sample(others, r.randint(1, 3))
    r.shuffle(items)
    return {"items": items, "category": cat, "name": r.choice(NAMES), "label": k - 1}


def gen_longer_list(r):
    la, lb = r.sample(range(1, 6), 2)
    na, nb = r.sample(NAMES, 2)
    return {"list_a": r.sample(ALL_ITEMS, la), "list_b": r.sample(ALL_ITEMS, lb), "name_a": na, "name_b": nb,
            "label": 0 if la > lb else 1}


def gen_same_category(r):
    same = r.random() < 0.5
    a = r.choice(ALL_ITEMS)
    pool = [w for w in ALL_ITEMS if w != a and (CATEGORY_OF[w] == CATEGORY_OF[a]) == same]
    return {"item_a": a, "item_b": r.choice(pool), "name": r.choice(NAMES), "label": int(same)}


# One held-out dataset per primitive skill, reworded: the raw rows of a training dataset (from the
# held-out dataset's own random stream) under new templates. They test the transfer a small model can
# show, a trained skill asked in new words; the datasets above test composition of two skills.
def gen_enjoyed(r):
    return gen_review(r)


def gen_kind_of_thing(r):
    return gen_topic(r)


def gen_greater_number(r):
    return gen_compare(r)


def gen_tally(r):
    return gen_count(r)


def gen_color_of(r):
    return gen_lookup(r)


def gen_color_check(r):
    # Unlike `negation` (75% no), half the answers are yes: a held-out task's chance level must be what a
    # constant answer scores, or a model that learnt only the training majority looks like it transfers.
    item = r.choice(ALL_ITEMS)
    stated = r.choice(COLORS)
    label = int(r.random() < 0.5)
    negated = not label and r.random() < 0.5
    asked = stated if label or negated else r.choice([c for c in COLORS if c != stated])
    return {"statement": f"The {item} is {'not ' if negated else ''}{stated}.", "item": item, "color": asked,
            "negated": negated, "label": label}


GENERATORS = {name[4:]: fn for name, fn in globals().items() if name.startswith("gen_")}


def example_key(ex: dict) -> str:
    """Identity of a raw example (label and position excluded), for de-duplication across splits."""
    return repr(sorted((k, v) for k, v in ex.items() if k not in ("label", "idx")))


def generate(dataset: str, n: int, seed: int, split: str, exclude: set[str] | None = None) -> list[dict]:
    """``n`` distinct raw examples of ``dataset``; keys in ``exclude`` (other splits) are never produced."""
    r = rng_for(seed, dataset, split)
    gen = GENERATORS[dataset]
    seen = set(exclude or ())
    out = []
    for _ in range(200 * n):
        ex = gen(r)
        k = example_key(ex)
        if k in seen:
            continue
        seen.add(k)
        out.append({"idx": len(out), **ex})
        if len(out) == n:
            return out
    raise RuntimeError(f"benchmark dataset {dataset!r}: could not draw {n} distinct examples")


# ----------------------------------------------------------------------------- pretraining text
def _plural(w: str) -> str:
    if w.endswith(("s", "sh", "ch", "x")):
        return w + "es"
    if w in ("mouse",):
        return "mice"
    if w in ("deer", "noodles", "pliers", "rice", "honey", "bread", "cheese", "soup", "salad"):
        return w
    return w + "s"


PRETRAIN_KINDS = 12
CATEGORY_KINDS = (0, 1, 9, 11)  # the sentences that state an item's category


def _pretrain_sentence(r: random.Random, kinds: tuple[int, ...] | None = None) -> str:
    """Declarative 'world knowledge' sentences: what the skills are made of, never a task prompt.
    ``kinds``: draw only these sentence kinds (ablations of the backbone's knowledge); None: all."""
    kind = r.randrange(PRETRAIN_KINDS) if kinds is None else r.choice(kinds)
    it = r.choice(ALL_ITEMS)
    cat = CATEGORY_OF[it]
    nm = r.choice(NAMES)
    if kind == 0:
        return f"A {it} is {'an' if cat[0] in 'aeiou' else 'a'} {cat}."
    if kind == 1:
        ws = r.sample(ITEMS[cat], 3)
        return f"The {ws[0]}, the {ws[1]} and the {ws[2]} are all {cat}s."
    if kind == 2:
        good = r.random() < 0.5
        adj = r.choice(POSITIVE if good else NEGATIVE)
        return (f"When something is {adj}, people {'like' if good else 'dislike'} it."
                if r.random() < 0.5 else
                f"{nm} was {'glad' if good else 'sad'} because the {it} was {adj}.")
    if kind == 3:
        good = r.random() < 0.5
        adj = r.choice(POSITIVE if good else NEGATIVE)
        return f"A {adj} {it} makes {nm} {'happy' if good else 'unhappy'}."
    if kind == 4:
        a, b = r.sample(range(0, 100), 2)
        hi, lo = max(a, b), min(a, b)
        return f"{hi} is larger than {lo}." if r.random() < 0.5 else f"{lo} is smaller than {hi}."
    if kind == 5:
        n = r.randint(1, 10)
        return f"{NUMBER_WORDS[n].capitalize()} is written {n}, and {n} comes after {n - 1}."
    if kind == 6:
        n = r.randint(1, 6)
        ws = r.sample(ALL_ITEMS, n)
        return f"{nm} counted {NUMBER_WORDS[n]} things: the " + ", the ".join(ws) + f". That makes {n}."
    if kind == 7:
        c = r.choice(COLORS)
        return f"{nm}'s {it} was painted {c}, so the {it} is {c}."
    if kind == 8:
        c, d = r.sample(COLORS, 2)
        return f"The {it} is not {c}; it is {d}."
    if kind == 9:
        a, b = r.sample(ITEMS[cat], 2)
        return f"{cat.capitalize()}s such as the {a} and the {b} are common."
    if kind == 10:
        good = r.random() < 0.5
        adj = r.choice(POSITIVE if good else NEGATIVE)
        return f"If a {it} is not {adj}, it is not {'good' if good else 'bad'}."
    return f"{_plural(it).capitalize()} are {cat}s, and {nm} likes to talk about {_plural(it)}."


def pretraining_corpus(seed: int, n_docs: int, forbidden: list[str] = (), kinds: tuple[int, ...] | None = None) -> list[str]:
    """``n_docs`` paragraphs of 3-8 sentences. Any paragraph containing a ``forbidden`` string (the
    held-out evaluation texts) is dropped, so pretraining never sees evaluation data verbatim."""
    r = rng_for(seed, "pretrain")
    bad_kinds = [k for k in kinds or () if not 0 <= k < PRETRAIN_KINDS]
    if bad_kinds or (kinds is not None and not kinds):
        raise ValueError(f"pretraining sentence kinds must be a non-empty subset of 0..{PRETRAIN_KINDS - 1}, got {kinds}")
    docs = [" ".join(_pretrain_sentence(r, kinds) for _ in range(r.randint(3, 8))) for _ in range(n_docs)]
    blob = "\n".join(docs)
    bad = [s for s in forbidden if s in blob]
    if bad:
        docs = [d for d in docs if not any(s in d for s in bad)]
    return docs
