#!/usr/bin/env python
"""Regenerate the embedded benchmark under data/benchmark/ (seeded; a few seconds).

    python scripts/build_benchmark.py            # seed from data/benchmark/registry.yaml
    python scripts/build_benchmark.py --check    # regenerate in a temp dir and compare with the shipped files
"""
import argparse
import json
import sys
import tempfile
from pathlib import Path

from tensorpoly.data.benchmark import BENCHMARK_DIR, build_benchmark


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=BENCHMARK_DIR)
    p.add_argument("--seed", type=int, default=None, help="override the registry seed")
    p.add_argument("--check", action="store_true", help="verify the shipped files are what the generator makes")
    a = p.parse_args(argv)
    if a.check:
        with tempfile.TemporaryDirectory() as d:
            new = build_benchmark(d, a.seed)
        old = json.loads((a.out / "manifest.json").read_text())
        diff = sorted(set(new["files"].items()) ^ set(old["files"].items()))
        if diff or new["seed"] != old["seed"]:
            print(f"benchmark files differ from the generator output: {sorted({f for f, _ in diff})}", file=sys.stderr)
            return 1
        print(f"ok: {len(old['files'])} files match (generated in {new['seconds']:.1f} s)")
        return 0
    m = build_benchmark(a.out, a.seed)
    print(f"wrote {len(m['files'])} files to {a.out} (seed {m['seed']}) in {m['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
