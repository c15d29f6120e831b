#!/usr/bin/env python
"""Training-step ratios to our LoRA r16 across several runs of scripts/bench_adapters.py.

    python scripts/bench_history.py results/bench/history/cpu_s7_run*.json

One Markdown row per variant, one column per run: the ratio of medians (the table's "× LoRA") and,
after the slash, the median over rounds of the per-round ratio (each round times every model once,
so a load drift that hits one round hits both models of a pair). On a shared host the runs of the
same code differ by more than either estimate's spread within a run: read the range.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def ratios(result: dict) -> dict[str, tuple[float, float]]:
    """variant name -> (ratio of medians, median of per-round ratios) of the training step."""
    rows = {row["name"]: row for row in result["rows"]}
    lora = rows["lora_r16"]["train_ms_all"]
    return {name: (row["train_x_lora"], row.get("train_x_lora_per_round")
                   or statistics.median(a / b for a, b in zip(row["train_ms_all"], lora)))
            for name, row in rows.items()}


def table(results: list[dict], names: list[str]) -> str:
    per_run = [ratios(r) for r in results]
    labels = {row["name"]: f"{row['label']} ({row['settings']})" for r in results for row in r["rows"]}
    lines = ["| variant | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for variant in labels:
        cells = [f"{run[variant][0]:.3f} / {run[variant][1]:.3f}" if variant in run else "-" for run in per_run]
        lines.append(f"| {labels[variant]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="JSON files written by bench_adapters.py")
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.runs if not p.is_file()]
    if missing:
        print(f"no such benchmark result: {', '.join(missing)}", file=sys.stderr)
        return 2
    results = [json.loads(p.read_text()) for p in args.runs]
    print(table(results, [p.stem for p in args.runs]), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
