"""Regenerate the paper's tables and plots from every results file under results/ (= make tables).

    python scripts/make_tables.py [--results results] [--out results]
writes results/tables/*.md, *.tex (main per kind/data/backbone, ablations when such runs exist, parameter
efficiency) and results/plots/*.png (accuracy vs trainable parameters; routing heatmaps from checkpoints).
"""
import argparse
from pathlib import Path

from tensorpoly.backbones import available, read_group_config
from tensorpoly.params import count_parameters
from tensorpoly.reporting.collect import METHODS, group_results, read_results
from tensorpoly.reporting.plots import accuracy_vs_params, routing_heatmap
from tensorpoly.reporting.tables import ablation_tables, main_tables, params_table, to_latex, to_markdown


def slug(text: str) -> str:
    return "_".join("".join(c if c.isalnum() else " " for c in text.lower()).split())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default="results", type=Path)
    parser.add_argument("--out", default=None, type=Path, help="default: the --results dir")
    parser.add_argument("--paper-backbone", default="t0_3b", help="also count parameters on this backbone")
    parser.add_argument("--paper-tasks", default=313, type=int)
    args = parser.parse_args()
    out = args.out or args.results
    defaults = {m: read_group_config("model", m) for m in available("model")}
    groups = group_results(read_results(args.results))
    tables = main_tables(groups, defaults) + ablation_tables(groups, defaults)
    counted = {METHODS[m]: count_parameters(m, args.paper_backbone, args.paper_tasks) for m in METHODS}
    tables.append(params_table(counted, f"parameter efficiency, {args.paper_backbone} ({args.paper_tasks} tasks)",
                               "counted on the adapted models built on the meta device (configs/model/ settings); "
                               "frozen LayerNorm affines excluded"))
    for data, backbone in sorted({(g.data, g.backbone) for g in groups}):
        seen = {}
        # Training runs' counts: fine-tuned models hold one routing row per task, not the mixture's table.
        for g in sorted(groups, key=lambda g: g.kind != "zero-shot"):
            if (g.data, g.backbone) == (data, backbone) and g.params and g.label not in seen:
                seen[g.label] = g.params
        if seen:
            tables.append(params_table(dict(sorted(seen.items(), key=lambda kv: list(METHODS.values()).index(kv[0])
                                                   if kv[0] in METHODS.values() else 99)),
                                       f"parameter efficiency, {backbone} ({data})",
                                       "counted on the trained models (results files); frozen LayerNorm affines excluded"))
    (out / "tables").mkdir(parents=True, exist_ok=True)
    for table in tables:
        name = slug(table.title)
        (out / "tables" / f"{name}.md").write_text(to_markdown(table))
        (out / "tables" / f"{name}.tex").write_text(to_latex(table))
    (out / "tables" / "all.md").write_text("\n".join(to_markdown(t) for t in tables))
    plots = []
    for kind, data, backbone in sorted({(g.kind, g.data, g.backbone) for g in groups}):
        members = [g for g in groups if (g.kind, g.data, g.backbone) == (kind, data, backbone)
                   and all(defaults.get(g.method, {}).get(k, v) == v for k, v in g.variant)]
        made = accuracy_vs_params(members, out / "plots" / f"accuracy_vs_params_{slug(kind)}_{data}_{backbone}.png",
                                  f"{kind}: {data} / {backbone}")
        plots += [made] if made else []
    for g in groups:
        ckpts = [Path(d) for d in g.adapter_dirs if Path(d).is_dir()]
        if g.kind == "zero-shot" and g.method in ("poly", "mhr", "tensorpoly1", "tensorpoly2") and ckpts:
            plots.append(routing_heatmap(ckpts[0], out / "plots" / f"routing_{g.method}_{g.data}_{g.backbone}.png",
                                         f"{g.label} routing, {g.data} / {g.backbone}"))
    print(f"{len(groups)} result groups -> {len(tables)} tables in {out / 'tables'}, {len(plots)} plots in {out / 'plots'}")
    print((out / "tables" / "all.md").read_text())


if __name__ == "__main__":
    main()
