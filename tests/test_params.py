"""The parameter report against the counts the paper code's configs imply (reference-code.md §1.11, paper.md §3.3)."""
import subprocess
import sys
from pathlib import Path

import pytest

from tensorpoly.params import count_parameters

T0_TASKS = 313


@pytest.mark.parametrize("model,overrides,adapter,routing,frozen", [
    ("tensorpoly1", {}, 3_244_032, 1_081_728, 1_502_208),
    ("tensorpoly2", {}, 3_244_032, 4_326_912, 3_004_416),
    ("poly", {}, 17_694_720, 1_081_728, 0),
    ("lora", {}, 2_211_840, 0, 0),
    ("lora", {"rank": 16}, 35_389_440, 0, 0),
    ("tlora", {}, 405_504, 0, 1_502_208),
    ("tensorpoly1", {"order": 2}, 11_132_928, 1_081_728, 72_640_512),
])
def test_t0_3b_counts(model, overrides, adapter, routing, frozen):
    counts = count_parameters(model, "t0_3b", T0_TASKS, **overrides)
    assert counts["adapted_layers"] == 432
    assert (counts["adapter"], counts["routing"], counts["frozen_extra"]) == (adapter, routing, frozen)


def test_routing_tables_for_one_finetuning_task():
    # After reset to one task: 432 layers x S (TensorPoly-I) or x N x S (TensorPoly-II).
    assert count_parameters("tensorpoly1", "t0_3b", 1)["routing"] == 3_456
    assert count_parameters("tensorpoly2", "t0_3b", 1)["routing"] == 13_824


def test_granularity_shrinks_the_routing_table():
    assert count_parameters("poly", "t0_3b", T0_TASKS, granularity="coder")["routing"] == 2 * T0_TASKS * 8
    assert count_parameters("poly", "t0_3b", T0_TASKS, granularity="model")["routers"] == 1


def test_cli_prints_a_row_per_model():
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "scripts/param_report.py", "--model", "tensorpoly1", "--backbone", "t0_3b"],
                         cwd=root, capture_output=True, text=True, check=True).stdout
    row = next(line for line in out.splitlines() if line.startswith("tensorpoly1"))
    assert "3,244,032" in row and "1,081,728" in row and "1,502,208" in row
