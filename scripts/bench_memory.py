#!/usr/bin/env python
"""Peak training memory of every adapter on a preset's shapes, without the device it was meant for.

    python scripts/bench_memory.py --preset gpu --layers 1,2,3     # T5-XL shapes on this CPU, float32
    make bench-memory

The gpu preset of scripts/bench_adapters.py (T5-XL / T0-3B shapes, batch 16 with 8 tasks, input 256,
target 64) needs a GPU for its timings, but its memory ratios do not: peak memory of a training step
is the same bookkeeping on any device. A 24+24-layer step is far too slow on a CPU, so this script
builds the preset's backbone with L encoder and L decoder layers for a few small L, measures each
variant's peak (parameters, buffers, optimizer state, plus the peak torch allocated during one training
step: bench_adapters.cpu_step_peak), fits peak = a + b L by least squares, and extrapolates to the
preset's own layer count. Everything that grows with depth (weights, saved activations, per-task
factors, their optimizer state) is per layer, and what does not (embeddings, logits) is in a; the
fit's largest residual is printed so that a step that is not linear in depth shows itself.

All tensors share one dtype, so the ratio to LoRA does not depend on it; the default float32 runs
faster than bfloat16 on most CPUs. Writes <out>/<preset>_memory.{json,md}.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from bench_adapters import PRESETS, ROOT, Runner, backbone_config, build, hardware, make_batch, variants, versions

MIB = 2**20
# The rows the memory target is about: LoRA, TensorPoly-I/II as the defaults run them, with
# recompute_factors, and the paper code's algorithm. Each costs about 3 minutes at depths 1, 2 and 3.
DEFAULT_VARIANTS = ("peft_lora_r16,tensorpoly1_n2,tensorpoly1_n4,tensorpoly2_n2,tensorpoly2_n4,tensorpoly1_n4_recompute,"
                    "tensorpoly2_n4_recompute,literal_tensorpoly1_n4,literal_tensorpoly2_n4")


def fit_line(xs: list[int], ys: list[float]) -> tuple[float, float, float]:
    """(intercept, slope, largest absolute residual) of the least-squares line through (xs, ys)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    intercept = my - slope * mx
    return intercept, slope, max(abs(y - intercept - slope * x) for x, y in zip(xs, ys))


def measure(variant, config, preset: dict, tasks: list[str], batch: dict, seed: int) -> int:
    """Peak bytes of one training step, after a first step that creates the optimizer state."""
    model, call = build(variant, config, preset, tasks, seed)
    runner = Runner(variant, model, call, batch, torch.device(preset["device"]))
    runner.train_step()
    peak = runner.peak_bytes()
    del runner, model, call
    gc.collect()
    return peak


def markdown(result: dict) -> str:
    s = result["settings"]
    layers = result["layers"]
    lines = [f"Preset `{result['preset']}` shapes: {s['backbone']} (d_model {s['d_model']}), batch {s['batch']} with "
             f"{s['distinct']} different tasks, input {s['input_len']}, target {s['target_len']}, {s['dtype']} on "
             f"{result['device']}. Peak memory of one training step measured with {', '.join(map(str, layers))} "
             f"encoder + decoder layers, a + b L fitted, extrapolated to {s['full_layers']} + {s['full_layers']} "
             f"layers.", "",
             "| variant | settings | " + " | ".join(f"L={n} MiB" for n in layers)
             + " | per layer MiB | fit residual MiB | " + f"L={s['full_layers']} GiB (extrapolated) | × LoRA |",
             "|---|---|" + "---:|" * (len(layers) + 4)]
    for row in result["rows"]:
        cells = " | ".join(f"{b / MIB:,.0f}" for b in row["peak_bytes"])
        lines.append(f"| {row['label']} | {row['settings']} | {cells} | {row['slope'] / MIB:,.1f} | "
                     f"{row['residual'] / MIB:,.1f} | {row['extrapolated'] / 2**30:,.2f} | {row['x_lora']:.3f} |")
    lines += ["", f"× LoRA: extrapolated peak ÷ our LoRA r16's. {result['memory_note']}", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="gpu")
    parser.add_argument("--layers", default="1,2,3", help="comma-separated encoder (= decoder) layer counts to measure")
    parser.add_argument("--device", default="cpu", help="where to run the steps (default: this CPU)")
    parser.add_argument("--dtype", default="float32", help="dtype of the backbone and adapters")
    parser.add_argument("--only", default=DEFAULT_VARIANTS,
                        help="comma-separated variant names (lora_r16 is always kept; default: %(default)s), or all")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    try:
        layers = sorted({int(n) for n in args.layers.split(",")})
    except ValueError:
        print(f"--layers must be comma-separated integers, got {args.layers!r}", file=sys.stderr)
        return 2
    if len(layers) < 2 or layers[0] < 1:
        print(f"--layers needs at least two distinct counts >= 1 to fit a line, got {args.layers!r}", file=sys.stderr)
        return 2
    if not isinstance(getattr(torch, args.dtype, None), torch.dtype):
        print(f"--dtype {args.dtype!r} is not a torch dtype (e.g. float32, bfloat16)", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"--device {args.device} needs CUDA; this machine has none (use --device cpu)", file=sys.stderr)
        return 2
    rows = [v for v in variants(PRESETS[args.preset]["mhr_heads"]) if v.kind != "floor"]
    if args.only != "all":
        keep = set(args.only.split(",")) | {"lora_r16"}
        unknown = keep - {v.name for v in rows}
        if unknown:
            print(f"unknown variants {sorted(unknown)}; known: {[v.name for v in rows]}", file=sys.stderr)
            return 2
        rows = [v for v in rows if v.name in keep]
    if args.threads:
        torch.set_num_threads(args.threads)

    preset = dict(PRESETS[args.preset], device=str(device), dtype=args.dtype)
    full = backbone_config(preset)
    tasks = [f"task{i}" for i in range(preset["n_tasks"])]
    batch = make_batch(preset, full.vocab_size, len(tasks), args.seed)
    started = time.perf_counter()
    peaks: dict[str, list[int]] = {v.name: [] for v in rows}
    with tqdm(total=len(layers) * len(rows), desc="training steps", unit="model") as bar:
        for n in layers:
            config = backbone_config(preset)
            config.num_layers = config.num_decoder_layers = n
            for v in rows:
                bar.set_postfix_str(f"L={n} {v.name}")
                peaks[v.name].append(measure(v, config, preset, tasks, batch, args.seed))
                bar.update()

    lora = None
    out_rows = []
    for v in rows:
        a, b, residual = fit_line(layers, peaks[v.name])
        extrapolated = a + b * full.num_layers
        out_rows.append(dict(name=v.name, label=v.label, settings=v.settings, peak_bytes=peaks[v.name], intercept=a,
                             slope=b, residual=residual, extrapolated=extrapolated))
        if v.name == "lora_r16":
            lora = extrapolated
    for row in out_rows:
        row["x_lora"] = row["extrapolated"] / lora
    result = dict(
        preset=args.preset, device=str(device), layers=layers,
        command="python scripts/bench_memory.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        settings=dict(backbone=preset["backbone"] or "tiny", d_model=full.d_model, full_layers=full.num_layers,
                      batch=preset["batch"], distinct=preset["distinct"], input_len=preset["input_len"],
                      target_len=preset["target_len"], dtype=args.dtype, task_ids=batch["task_ids"].tolist()),
        memory_note=("torch.cuda.max_memory_allocated over one training step." if device.type == "cuda" else
                     "Peak: parameters + buffers + optimizer state, plus the peak bytes torch allocated during one "
                     "training step above its start (profiler allocation events)."),
        hardware=hardware(device), versions=versions(), seconds=round(time.perf_counter() - started, 1), rows=out_rows)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"{args.preset}_memory"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    (args.out / f"{stem}.md").write_text(table)
    print(table)
    print(f"wrote {args.out / (stem + '.json')} and .md in {result['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
