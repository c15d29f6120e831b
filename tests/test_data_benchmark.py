"""The embedded benchmark: shipped files = generator output, seeded determinism, design properties,
and disjointness of the pretraining text from the evaluation data."""
import json
from collections import Counter

import pytest

from tensorpoly.data import DataError
from tensorpoly.data import benchmark as B
from tensorpoly.data import benchmark_gen as G


def test_shipped_files_are_the_generator_output(tmp_path):
    new = B.build_benchmark(tmp_path)
    old = json.loads((B.BENCHMARK_DIR / "manifest.json").read_text())
    assert new["files"] == old["files"] and new["seed"] == old["seed"]


def test_generation_depends_on_the_seed(tmp_path):
    a = G.generate("review", 50, seed=1, split="train")
    assert a == G.generate("review", 50, seed=1, split="train")
    assert a != G.generate("review", 50, seed=2, split="train")


def test_mixture_is_seeded_per_template():
    m1 = B.train_mixture(n_train=20, n_val=5, seed=7)
    m2 = B.train_mixture(n_train=20, n_val=5, seed=7)
    assert [e.to_dict() for e in m1.train] == [e.to_dict() for e in m2.train]
    assert m1.tasks == B.tasks("template") and len(m1.train) == 20 * len(m1.tasks)
    m3 = B.train_mixture(n_train=20, n_val=5, seed=8)
    assert [e.to_dict() for e in m1.train] != [e.to_dict() for e in m3.train]
    # validation and training rows of one template never overlap
    for t in m1.tasks[:5]:
        tr = {e.idx for e in m1.train if e.task == t}
        va = {e.idx for e in m1.validation if e.task == t}
        assert tr and va and not tr & va


def test_dataset_level_tasks():
    m = B.train_mixture(task_level="dataset", n_train=5, n_val=1)
    assert m.tasks == B.train_datasets() and set(m.task2id.values()) == set(range(len(m.tasks)))


def test_heldout_examples_agree_with_registry():
    for ds in B.heldout_datasets():
        spec = B.dataset_spec(ds)
        ex = B.eval_examples(ds)
        n_t = len(B.templates(ds, original_only=True))
        assert len(ex) == n_t * len(B.raw_heldout(ds))
        assert all(len(e.answer_choices) == spec["n_choices"] and e.answer_choices[e.label] == e.target for e in ex)
        # original-task rule: the reverse "write a review" template is excluded
        assert all(t.original_task for t in B.templates(ds, original_only=True))
        labels = {e.label for e in ex}
        assert len(labels) > 1, f"{ds}: degenerate labels"


def test_heldout_tasks_compose_or_reword_training_skills():
    reg = B.benchmark_registry()["datasets"]
    train_skills = {s for d in B.train_datasets() for s in reg[d]["skills"]}
    kinds = B.heldout_transfer()
    assert set(kinds) == set(B.heldout_datasets())
    composed = [d for d, k in kinds.items() if k == "composition"]
    reworded = [d for d, k in kinds.items() if k == "rewording"]
    for d in composed:
        assert len(reg[d]["skills"]) >= 2 and set(reg[d]["skills"]) <= train_skills
    # one rewording per training skill, each of one skill, in words no training template uses
    assert sorted(s for d in reworded for s in reg[d]["skills"]) == sorted(train_skills)
    train_prompts = {t._impl.jinja.split("|||")[0].strip() for d in B.train_datasets() for t in B.templates(d)}
    for d in reworded:
        assert len(reg[d]["skills"]) == 1
        for t in B.templates(d):
            assert t._impl.jinja.split("|||")[0].strip() not in train_prompts, f"{d}/{t.name} repeats a training prompt"


def test_rewording_prompts_use_only_words_the_backbone_has_seen():
    for d, kind in B.heldout_transfer().items():
        if kind == "rewording":
            assert not any(B.unseen_prompt_words(d).values()), (d, B.unseen_prompt_words(d))
    # the check can fail: these composition prompts key on words the backbone never saw
    assert B.unseen_prompt_words("longer_list")["which_longer"] == ["b", "longer"]
    assert "who" in B.unseen_prompt_words("who_liked")["pleased"]


def test_heldout_labels_are_balanced_so_a_constant_answer_scores_chance():
    # The reported chance level is 1 / choices; a skewed held-out task (like the training `negation`, 75% no)
    # would let a model that only learnt the training majority pass for one that transfers.
    for d in B.heldout_datasets():
        rows = B.raw_heldout(d, "validation")
        n_choices = B.dataset_spec(d)["n_choices"]
        top = max(Counter(r["label"] for r in rows).values()) / len(rows)
        assert top <= 1 / n_choices + 0.08, f"{d}: the most frequent answer is {top:.0%} of the examples"


def test_heldout_groups_select_tasks_and_bad_names_say_the_groups():
    from omegaconf import OmegaConf
    from tensorpoly.experiment.data import heldout_tasks

    cfg = OmegaConf.create({"name": "benchmark", "source": "benchmark", "heldout": "rewording"})
    assert set(heldout_tasks(cfg)) == {d for d, k in B.heldout_transfer().items() if k == "rewording"}
    assert set(heldout_tasks(cfg, "composition")) | set(heldout_tasks(cfg)) == set(B.heldout_datasets())
    with pytest.raises(DataError, match=r"'rewordings'.*or a group: composition, rewording"):
        heldout_tasks(cfg, ["rewordings"])


def test_conflicting_pairs_share_templates_and_flip_answers():
    reg = B.benchmark_registry()["datasets"]
    pairs = [(d, s["conflicts_with"]) for d, s in reg.items() if "conflicts_with" in s]
    assert pairs
    for a, b in pairs:
        shared = {t.name for t in B.templates(a)} & {t.name for t in B.templates(b)}
        assert shared
        gen_a, gen_b = G.GENERATORS[a], G.GENERATORS[b]
        for i in range(50):  # same random stream -> same input, opposite answer
            ra, rb = gen_a(G.rng_for(0, str(i))), gen_b(G.rng_for(0, str(i)))
            assert {k: v for k, v in ra.items() if k != "label"} == {k: v for k, v in rb.items() if k != "label"}
            assert ra["label"] != rb["label"]


def test_few_shot_sets_come_from_the_train_split_and_are_seeded():
    for ds in B.heldout_datasets():
        k = B.dataset_spec(ds)["k_shot"]
        pool = {G.example_key(r) for r in B.raw_heldout(ds, "train")}
        ev = {G.example_key(r) for r in B.raw_heldout(ds, "validation")}
        assert not pool & ev
        sets = {}
        for seed in B.SEEDS:
            ex = B.few_shot_examples(ds, seed=seed)
            assert len(ex) == k
            sets[seed] = tuple(e.input for e in ex)
        assert len(set(sets.values())) == len(B.SEEDS)
        assert tuple(e.input for e in B.few_shot_examples(ds, seed=42)) == sets[42]


def test_pretraining_text_is_disjoint_from_evaluation_data():
    gen = B.generate_all()
    forbidden = B.forbidden_strings(B.all_heldout_rows(gen))
    assert len(forbidden) > 1000
    corpus = "\n".join(G.pretraining_corpus(gen["seed"], 2000, forbidden))
    assert len(corpus) > 100_000
    assert not [s for s in forbidden if s in corpus]
    # nor any rendered evaluation prompt
    for ds in B.heldout_datasets():
        assert not [e.input for e in B.eval_examples(ds)[:100] if e.input in corpus]
    # and the filter really filters: a corpus seeded with an eval string loses that document
    victim = forbidden[0]
    docs = G.pretraining_corpus(gen["seed"], 50, forbidden=[victim])
    assert all(victim not in d for d in docs)


def test_pretraining_sentence_kinds_ablation():
    """kinds=CATEGORY_KINDS keeps only the sentences that state categories; bad kinds are refused."""
    import re

    docs = G.pretraining_corpus(0, 200, kinds=G.CATEGORY_KINDS)
    sentences = [x for d in docs for x in re.split(r"(?<=\.) ", d)]
    category_words = "|".join(G.CATEGORIES)
    assert len(sentences) > 600
    assert all(re.search(rf"\b({category_words})s?\b", x, flags=re.I) for x in sentences)
    full = [x for d in G.pretraining_corpus(0, 200) for x in re.split(r"(?<=\.) ", d)]
    assert sum(not re.search(rf"\b({category_words})s?\b", x, flags=re.I) for x in full) > len(full) / 3
    with pytest.raises(ValueError, match="subset of 0..11, got \\(3, 12\\)"):
        G.pretraining_corpus(0, 5, kinds=(3, 12))


def test_bad_names_and_files(tmp_path):
    with pytest.raises(DataError, match="unknown benchmark dataset 'nope'"):
        B.dataset_spec("nope")
    with pytest.raises(DataError, match="held out"):
        B.raw_train("who_liked")
    root = tmp_path / "bm"
    B.build_benchmark(root)
    for f in ("registry.yaml", "templates.yaml"):
        (root / f).write_text((B.BENCHMARK_DIR / f).read_text())
    path = root / "heldout" / "who_liked" / "validation.jsonl"
    lines = path.read_text().splitlines()
    lines[3] = lines[3][:-5]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"validation.jsonl, line 4: malformed JSON"):
        B.raw_heldout("who_liked", root=root)
    row = json.loads(lines[0])
    row["label"] = 7
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(DataError, match="validation.jsonl.*label 7, out of range"):
        B.raw_heldout("who_liked", root=root)
