"""Smoke test of scripts/bench_adapters.py: its whole code path on the tiny preset (no timing checks)."""
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import bench_adapters  # noqa: E402

COLUMNS = ["name", "label", "settings", "trainable_params", "train_ms", "eval_ms", "peak_mib", "train_x_lora",
           "eval_x_lora", "peak_x_lora", "train_over_floor_ms"]


def test_bench_writes_json_and_markdown(tmp_path):
    threads = torch.get_num_threads()
    only = "peft_lora_r16,peft_poly,tensorpoly2_n4,literal_tensorpoly2_n4"
    try:
        assert bench_adapters.main(["--preset", "tiny", "--out", str(tmp_path), "--only", only, "--profile", "3"]) == 0
    finally:
        torch.set_num_threads(threads)
    result = json.loads((tmp_path / "tiny.json").read_text())
    names = [row["name"] for row in result["rows"]]
    assert names == ["floor", "peft_lora_r16", "lora_r16", "peft_poly", "tensorpoly2_n4", "literal_tensorpoly2_n4"]
    for row in result["rows"]:
        assert all(key in row for key in COLUMNS), row["name"]
        assert row["train_ms"] > 0 and row["eval_ms"] > 0 and row["peak_mib"] > 0
    lora = result["rows"][names.index("lora_r16")]
    assert lora["train_x_lora"] == 1.0 and lora["peak_x_lora"] == 1.0
    assert result["rows"][0]["trainable_params"] == 0  # the floor trains nothing
    fast = result["rows"][names.index("tensorpoly2_n4")]
    assert fast["literal_x_train"] > 0 and fast["trainable_params"] == result["rows"][-1]["trainable_params"]
    assert {"torch", "transformers", "peft"} <= set(result["versions"]) and result["hardware"]["cpu_count"]
    table = (tmp_path / "tiny.md").read_text()
    assert "| variant | settings | trainable | train step ms | × LoRA |" in table
    assert table.count("\n| ") == len(names) + 1  # header + one line per row (the separator starts with |-)
    profile = (tmp_path / "tiny_profile.md").read_text()
    assert profile.count("### ") == len(names) and "autograd nodes" in profile


def test_bench_history_tabulates_runs(tmp_path, capsys):
    import bench_history

    threads = torch.get_num_threads()
    try:
        for run in ("a", "b"):
            out = tmp_path / run
            assert bench_adapters.main(["--preset", "tiny", "--out", str(out), "--only", "tensorpoly1_n4"]) == 0
    finally:
        torch.set_num_threads(threads)
    runs = [tmp_path / "a" / "tiny.json", tmp_path / "b" / "tiny.json"]
    capsys.readouterr()  # the benchmark's own tables
    assert bench_history.main([str(p) for p in runs]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| variant | tiny | tiny |" and len(lines) == 2 + 3  # floor, LoRA, TensorPoly-I
    result = json.loads(runs[0].read_text())
    row = next(r for r in result["rows"] if r["name"] == "tensorpoly1_n4")
    assert f"{row['train_x_lora']:.3f} / " in next(line for line in lines if line.startswith("| TensorPoly-I"))
    lora = next(line for line in lines if line.startswith("| LoRA (ours)"))
    assert lora.count("1.000 / 1.000") == 2  # LoRA against itself, both estimates, both runs
    assert bench_history.main([str(tmp_path / "missing.json")]) == 2
