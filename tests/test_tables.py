"""The table generator on synthetic results files: means, spreads, bold best entries, missing cells,
few-shot seeds, ablations, LaTeX, and plots that are written and non-empty."""
import json
import statistics
import subprocess
import warnings
import sys
from pathlib import Path

import pytest

from tensorpoly.backbones import available, read_group_config
from tensorpoly.reporting.collect import group_results, read_results
from tensorpoly.reporting.tables import ablation_tables, main_tables, to_latex, to_markdown

from experiment_helpers import REPO_ROOT

TASKS = ["alpha", "beta"]
MODEL_DEFAULTS = {m: read_group_config("model", m) for m in available("model")}


def write(root: Path, name: str, method: str, seed: int, accs: dict, kind: str = "train", data: str = "bench",
          extra: dict | None = None, **model_overrides):
    model = {**MODEL_DEFAULTS[method], **model_overrides}
    cfg = {"seed": seed, "model": model, "data": {"name": data}, "backbone": {"name": "bb"},
           "routing": {"granularity": "finegrained"}}
    if kind in ("train", "eval"):
        heldout = {t: {"accuracy": a, "chance": 0.5} for t, a in accs.items()}
    else:  # accs: {task: {seed: acc}}
        heldout = {t: {str(s): {"accuracy": a, "chance": 0.5} for s, a in runs.items()} for t, runs in accs.items()}
    record = {"format": "tensorpoly-result/1", "kind": kind, "config": cfg, "heldout": heldout,
              "params": {"adapter": 100 * (1 + len(method)), "routing": 10, "backbone": 10_000}}
    if kind in ("finetune", "eval"):
        record["train_config"] = cfg
    record.update(extra or {})
    (root / kind).mkdir(parents=True, exist_ok=True)
    (root / kind / f"{name}.json").write_text(json.dumps(record))


@pytest.fixture
def results(tmp_path):
    root = tmp_path / "results"
    write(root, "lora1", "lora", 1, {"alpha": 0.6, "beta": 0.5})
    write(root, "lora2", "lora", 2, {"alpha": 0.7, "beta": 0.7})
    write(root, "tp1", "tensorpoly1", 1, {"alpha": 0.9, "beta": 0.4})
    write(root, "tp1-o2", "tensorpoly1", 1, {"alpha": 0.5, "beta": 0.5}, order=2)
    write(root, "ft", "poly", 1, {"alpha": {42: 0.8, 0: 0.6}, "beta": {42: 0.5, 0: 0.7}}, kind="finetune")
    (root / "tables").mkdir()
    (root / "tables" / "ignored.json").write_text("{}")
    return root


def test_main_table_means_spreads_bold_and_missing(results):
    groups = group_results(read_results(results))
    table = next(t for t in main_tables(groups, MODEL_DEFAULTS) if t.title.startswith("zero-shot"))
    rows = dict(table.rows)
    lora, tp = rows["LoRA"], rows["TensorPoly-I"]
    assert lora[0].mean == pytest.approx(0.65) and lora[0].std == pytest.approx(statistics.stdev([0.6, 0.7]))
    assert lora[2].mean == pytest.approx(statistics.mean([0.55, 0.7]))  # average = mean over seeds of task means
    assert tp[0].mean == pytest.approx(0.9) and tp[0].std is None       # the order=2 run is an ablation, not here
    assert all(c.mean is None for c in rows["Poly"])                     # no zero-shot Poly run: missing
    md = to_markdown(table)
    assert "| TensorPoly-I | **90.0** | 40.0 | **65.0** |" in md
    assert "| LoRA | 65.0 ± 7.1 | **60.0 ± 14.1** | 62.5 ± 10.6 |" in md
    assert "| Poly | – | – | – |" in md and "| chance | 50.0 | 50.0 | 50.0 |" in md
    tex = to_latex(table)
    assert r"\textbf{90.0}" in tex and r"65.0 $\pm$ 7.1" in tex and "--" in tex


def test_embedded_benchmark_tables_average_each_transfer_group(tmp_path):
    root = tmp_path / "results"
    write(root, "a", "lora", 1, {"tally": 0.9, "enjoyed": 0.7, "negated_review": 0.2}, data="benchmark")
    write(root, "b", "lora", 2, {"tally": 0.5, "enjoyed": 0.5, "negated_review": 0.4}, data="benchmark")
    table = main_tables(group_results(read_results(root)), MODEL_DEFAULTS)[0]
    assert table.columns == ["negated_review", "enjoyed", "tally", "composition avg", "rewording avg", "average"]
    lora = dict(table.rows)["LoRA"]
    assert lora[3].values == pytest.approx([0.2, 0.4])                    # composition: negated_review only
    assert lora[4].values == pytest.approx([0.8, 0.5])                    # rewording: per seed, mean of two tasks
    assert lora[5].values == pytest.approx([0.6, 0.4666666666666667])
    assert [c.mean for c in dict(table.rows)["chance"]][3:] == pytest.approx([0.5, 0.5, 0.5])


def test_results_of_one_model_on_different_tasks_fill_one_sample(tmp_path):
    root = tmp_path / "results"
    run_a, run_b = str(tmp_path / "a" / "adapter"), str(tmp_path / "b" / "adapter")
    write(root, "train-a", "lora", 1, {"alpha": 0.6}, extra={"adapter_dir": run_a})
    write(root, "train-b", "lora", 2, {"alpha": 0.8}, extra={"adapter_dir": run_b})
    write(root, "eval-a", "lora", 1, {"beta": 0.4}, kind="eval", extra={"checkpoint": run_a})
    write(root, "ft-a1", "lora", 1, {"alpha": {42: 0.7}}, kind="finetune", extra={"checkpoint": run_a})
    write(root, "ft-a2", "lora", 1, {"beta": {42: 0.9, 0: 0.5}}, kind="finetune", extra={"checkpoint": run_a})
    groups = {g.kind: g for g in group_results(read_results(root))}
    assert sorted(groups["zero-shot"].samples, key=len) == [{"alpha": 0.8}, {"alpha": 0.6, "beta": 0.4}]
    assert sorted(groups["few-shot"].samples, key=len) == [{"beta": 0.5}, {"alpha": 0.7, "beta": 0.9}]
    table = next(t for t in main_tables(list(groups.values()), MODEL_DEFAULTS) if t.title.startswith("zero-shot"))
    assert dict(table.rows)["LoRA"][-1].values == pytest.approx([0.5])  # average: complete samples only


def test_a_results_file_of_an_older_layout_is_skipped_with_a_warning(results):
    old = {"format": "tensorpoly-result/1", "kind": "finetune", "heldout": {},
           "train_config": {"model": "{'module_type': 'lora'}", "data": {}, "backbone": {}, "routing": {}}}
    (results / "finetune" / "old.json").write_text(json.dumps(old))
    with pytest.warns(UserWarning, match=r"old.json: its config's 'model' is str, not a mapping"):
        records = read_results(results)
    assert len(records) == 5 and not any(r["_path"].endswith("old.json") for r in records)


def test_runs_of_different_training_recipes_in_one_row_are_named_in_a_warning(tmp_path):
    root = tmp_path / "results"
    write(root, "short", "lora", 1, {"alpha": 0.6}, extra={"config": {"train": {"steps": 800, "threads": 1}}})
    write(root, "long", "lora", 2, {"alpha": 0.8}, extra={"config": {"train": {"steps": 1500, "threads": 2}}})
    write(root, "long2", "lora", 3, {"alpha": 0.7}, extra={"config": {"train": {"steps": 1500, "threads": 1}}})
    for r in (root / "train").glob("*.json"):  # keep the rest of each file's config
        rec = json.loads(r.read_text())
        base = {"seed": 1, "model": MODEL_DEFAULTS["lora"], "data": {"name": "bench"}, "backbone": {"name": "bb"},
                "routing": {"granularity": "finegrained"}}
        rec["config"] = {**base, **rec["config"]}
        r.write_text(json.dumps(rec))
    with pytest.warns(UserWarning, match=r"LoRA \(zero-shot, bench / bb\) averages runs of 2 training recipes"):
        group_results(read_results(root))
    (root / "train" / "short.json").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # threads is bookkeeping: one recipe
        group_results(read_results(root))


def test_few_shot_cells_average_over_few_shot_seeds(results):
    groups = group_results(read_results(results))
    table = next(t for t in main_tables(groups, MODEL_DEFAULTS) if t.title.startswith("few-shot"))
    poly = dict(table.rows)["Poly"]
    assert poly[0].mean == pytest.approx(0.7) and poly[0].std == pytest.approx(statistics.stdev([0.8, 0.6]))
    assert poly[2].values == pytest.approx([0.65, 0.65])


def test_ablation_table_appears_only_for_varied_settings(results):
    groups = group_results(read_results(results))
    tables = ablation_tables(groups, MODEL_DEFAULTS)
    assert [t.title for t in tables] == ["ablation: TensorPoly-I order, zero-shot, bench / bb"]
    assert [label for label, _ in tables[0].rows] == ["order=2", "order=4"]


def test_make_tables_writes_tables_and_non_empty_plots(results, tmp_path):
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "make_tables.py"), "--results", str(results)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    md = sorted(p.name for p in (results / "tables").glob("*.md"))
    assert "all.md" in md and any(n.startswith("parameter_efficiency_t0_3b") for n in md)
    plots = list((results / "plots").glob("*.png"))
    assert plots and all(p.stat().st_size > 5000 for p in plots)
