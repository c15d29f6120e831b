"""Smoke test of scripts/bench_adapters.py: its whole code path on the tiny preset (no timing checks)."""
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from tensorpoly import kron_kernel

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import bench_adapters  # noqa: E402

COLUMNS = ["name", "label", "settings", "trainable_params", "train_ms", "eval_ms", "peak_mib", "train_x_lora",
           "eval_x_lora", "peak_x_lora", "train_over_floor_ms"]


def test_bench_writes_json_and_markdown(tmp_path):
    threads = torch.get_num_threads()
    only = "peft_lora_r16,peft_poly,tensorpoly2_n4,tensorpoly2_n4_torch_ops,literal_tensorpoly2_n4"
    try:
        # --malloc default: pinning glibc's thresholds would last for the rest of the test process.
        assert bench_adapters.main(["--preset", "tiny", "--out", str(tmp_path), "--only", only, "--profile", "3",
                                    "--malloc", "default"]) == 0
    finally:
        torch.set_num_threads(threads)
    result = json.loads((tmp_path / "tiny.json").read_text())
    names = [row["name"] for row in result["rows"]]
    assert names == ["floor", "peft_lora_r16", "lora_r16", "peft_poly", "tensorpoly2_n4", "tensorpoly2_n4_torch_ops",
                     "literal_tensorpoly2_n4"]
    for row in result["rows"]:
        assert all(key in row for key in COLUMNS), row["name"]
        assert row["train_ms"] > 0 and row["eval_ms"] > 0 and row["peak_mib"] > 0
    lora = result["rows"][names.index("lora_r16")]
    assert lora["train_x_lora"] == 1.0 and lora["peak_x_lora"] == 1.0
    for row in result["rows"]:  # interleaved: per-round ratios, against LoRA's step of the same round
        rounds = [a / b for a, b in zip(row["train_ms_all"], lora["train_ms_all"], strict=True)]
        assert row["train_x_lora_per_round"] == statistics.median(rounds)
    assert result["rows"][0]["trainable_params"] == 0  # the floor trains nothing
    constructed = [row["name"] for row in result["rows"] if row.get("construct_ms")]
    # LoRA has no factors to build; PEFT and the literal rows are not ours
    assert constructed == ["tensorpoly2_n4", "tensorpoly2_n4_torch_ops"]
    fast = result["rows"][names.index("tensorpoly2_n4")]
    assert fast["literal_x_train"] > 0 and fast["trainable_params"] == result["rows"][-1]["trainable_params"]
    assert {"torch", "transformers", "peft"} <= set(result["versions"]) and result["hardware"]["cpu_count"]
    assert result["hardware"]["allocator"] == "default"
    kernel = "built" if kron_kernel.extension() is not None else f"not built ({kron_kernel._STATE.failed})"
    assert result["hardware"]["fused_kernel"] == kernel
    table = (tmp_path / "tiny.md").read_text()
    assert "| variant | settings | trainable | train step ms | × LoRA (per round) |" in table
    assert f"fused CPU kernel: {kernel}." in table
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


def test_bench_memory_fits_and_extrapolates(tmp_path):
    import numpy as np

    import bench_memory

    xs, ys = [1, 2, 4], [10.0, 13.5, 19.0]
    a, b, residual = bench_memory.fit_line(xs, ys)
    slope, intercept = np.polyfit(xs, ys, 1)
    assert abs(a - intercept) < 1e-9 and abs(b - slope) < 1e-9
    assert abs(residual - np.abs(np.polyval([slope, intercept], xs) - ys).max()) < 1e-9

    threads = torch.get_num_threads()
    try:
        assert bench_memory.main(["--preset", "tiny", "--layers", "1,2,3", "--only", "tensorpoly1_n4",
                                  "--threads", "1", "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    result = json.loads((tmp_path / "tiny_memory.json").read_text())
    assert [row["name"] for row in result["rows"]] == ["lora_r16", "tensorpoly1_n4"]
    for row in result["rows"]:
        assert len(row["peak_bytes"]) == 3 and all(p > 0 for p in row["peak_bytes"])
        # The tiny backbone has 2+2 layers, one of the measured depths: the line passes near it.
        assert abs(row["extrapolated"] - row["peak_bytes"][1]) <= row["residual"] + 1
        assert row["slope"] > 0  # deeper models hold more
    lora, tp = result["rows"]
    assert lora["x_lora"] == 1.0 and tp["x_lora"] == tp["extrapolated"] / lora["extrapolated"]
    assert (tmp_path / "tiny_memory.md").read_text().count("\n| ") == 3


def test_bench_memory_rejects_bad_arguments(tmp_path, capsys):
    import bench_memory

    assert bench_memory.main(["--preset", "tiny", "--layers", "2", "--out", str(tmp_path)]) == 2
    assert "at least two distinct counts" in capsys.readouterr().err
    assert bench_memory.main(["--preset", "tiny", "--layers", "1,x", "--out", str(tmp_path)]) == 2
    assert "'1,x'" in capsys.readouterr().err
    assert bench_memory.main(["--preset", "tiny", "--dtype", "float33", "--out", str(tmp_path)]) == 2
    assert "float33" in capsys.readouterr().err
    assert bench_memory.main(["--preset", "tiny", "--only", "nope", "--out", str(tmp_path)]) == 2
    assert "nope" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing written
    # The default selection (what `make bench-memory` runs) names only variants the benchmark has.
    assert set(bench_memory.DEFAULT_VARIANTS.split(",")) <= {v.name for v in bench_adapters.variants(4)}



def test_bench_pins_the_allocator_by_default(tmp_path):
    """Run in a child process: pinning glibc's thresholds lasts for the rest of the process."""
    subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_adapters.py"), "--preset", "tiny", "--out",
                    str(tmp_path), "--only", "tensorpoly1_n4", "--steps", "1", "--warmup", "1"],
                   check=True, capture_output=True)
    result = json.loads((tmp_path / "tiny.json").read_text())
    allocator = result["hardware"]["allocator"]
    assert allocator.startswith("glibc") if sys.platform.startswith("linux") else allocator.startswith("default")
    assert all(row["train_faults"] >= 0 for row in result["rows"])
    assert "page faults / step" in (tmp_path / "tiny.md").read_text()
