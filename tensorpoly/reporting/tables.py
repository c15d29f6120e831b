"""The paper's tables from grouped results: main (methods x held-out tasks + average), parameter
efficiency, and ablations over order / rank / number of experts. Cells are mean ± std over samples;
the best mean per column is bold; a missing run is a dash, never a number."""
from __future__ import annotations

import statistics
from dataclasses import dataclass

from .collect import METHODS, Group

MISSING = "–"


@dataclass
class Cell:
    values: list[float]

    @property
    def mean(self) -> float | None:
        return statistics.mean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values) if len(self.values) > 1 else None


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[tuple[str, list[Cell]]]
    note: str = ""
    percent: bool = True
    bold: bool = True


def task_cells(group: Group, tasks: list[str], subsets: dict[str, list[str]] | None = None) -> list[Cell]:
    """Per task, then the average of each subset (e.g. a transfer group), then the overall average."""
    cells = [Cell([s[t] for s in group.samples if t in s]) for t in tasks]
    for subset in [*(subsets or {}).values(), tasks]:
        complete = [s for s in group.samples if all(t in s for t in subset)]
        cells.append(Cell([statistics.mean(s[t] for t in subset) for s in complete]))
    return cells


def transfer_subsets(data: str, tasks: list[str]) -> dict[str, list[str]]:
    """The embedded benchmark's held-out groups present among tasks ({} for other data)."""
    if data != "benchmark":
        return {}
    from ..data.benchmark import TRANSFER_KINDS, heldout_transfer

    kinds = heldout_transfer()
    subsets = {kind: [t for t in tasks if kinds.get(t) == kind] for kind in TRANSFER_KINDS}
    return {kind: ts for kind, ts in subsets.items() if ts} if len(tasks) > 1 else {}


def method_order(method: str) -> int:
    return list(METHODS).index(method) if method in METHODS else len(METHODS)


def main_tables(groups: list[Group], defaults: dict[str, dict]) -> list[Table]:
    """One table per (kind, data, backbone): each method at its default setting (configs/model/)."""
    tables = []
    for key in sorted({(g.kind, g.data, g.backbone) for g in groups}):
        members = [g for g in groups if (g.kind, g.data, g.backbone) == key and is_default(g, defaults)]
        if not members:
            continue
        tasks, subsets = ordered_tasks(key[1], members)
        columns = tasks + [f"{kind} avg" for kind in subsets] + ["average"]
        rows = []
        for method in sorted(set(METHODS) | {g.method for g in members}, key=method_order):
            found = [g for g in members if g.method == method]
            rows.append((METHODS.get(method, method),
                         task_cells(found[0], tasks, subsets) if found else [Cell([]) for _ in columns]))
        chance = {t: next(g.chance[t] for g in members if t in g.chance) for t in tasks}
        rows.append(("chance", [Cell([chance[t]]) for t in tasks]
                     + [Cell([statistics.mean(chance[t] for t in ts)]) for ts in [*subsets.values(), tasks]]))
        n = max(len(g.samples) for g in members)
        tables.append(Table(f"{key[0]} accuracy, {key[1]} / {key[2]}", columns, rows,
                            note=f"accuracy (%), mean ± std over up to {n} samples (seeds); best mean per column in bold"))
    return tables


def ordered_tasks(data: str, members: list[Group]) -> tuple[list[str], dict[str, list[str]]]:
    """The tasks of the groups' samples, grouped by transfer kind where the data has kinds, and the kinds."""
    tasks = sorted({t for g in members for s in g.samples for t in s})
    subsets = transfer_subsets(data, tasks)
    return ([t for ts in subsets.values() for t in ts] + [t for t in tasks if not any(t in ts for ts in subsets.values())]
            if subsets else tasks), subsets


def is_default(group: Group, defaults: dict[str, dict]) -> bool:
    want = defaults.get(group.method, {})
    return all(want.get(k, v) == v for k, v in group.variant)


def ablation_tables(groups: list[Group], defaults: dict[str, dict]) -> list[Table]:
    tables = []
    for (kind, data, backbone, method) in sorted({(g.kind, g.data, g.backbone, g.method) for g in groups}):
        members = [g for g in groups if (g.kind, g.data, g.backbone, g.method) == (kind, data, backbone, method)]
        for key in ("order", "rank", "n_experts"):
            values = {g.variant_value(key) for g in members}
            if len(values) < 2:
                continue
            tasks, subsets = ordered_tasks(data, members)
            rows = [(f"{key}={g.variant_value(key)}", task_cells(g, tasks, subsets))
                    for g in sorted(members, key=lambda g: g.variant_value(key))]
            tables.append(Table(f"ablation: {METHODS.get(method, method)} {key}, {kind}, {data} / {backbone}",
                                tasks + [f"{k} avg" for k in subsets] + ["average"], rows,
                                note="accuracy (%), mean ± std over samples"))
    return tables


def params_table(rows: dict[str, dict], title: str, note: str) -> Table:
    """rows: label -> {adapter, routing, backbone} counts (from the models)."""
    out = []
    for label, c in rows.items():
        trainable = c["adapter"] + c["routing"]
        out.append((label, [Cell([c["adapter"]]), Cell([c["routing"]]), Cell([trainable]),
                            Cell([100 * trainable / c["backbone"]])]))
    return Table(title, ["adapter", "routing", "trainable", "% of backbone"], out, percent=False, bold=False, note=note)


def _fmt(cell: Cell, percent: bool, column: str) -> str:
    if cell.mean is None:
        return MISSING
    if not percent:
        return f"{cell.mean:.3f}%" if column.startswith("%") else f"{int(cell.mean):,}"
    text = f"{100 * cell.mean:.1f}"
    return text + (f" ± {100 * cell.std:.1f}" if cell.std is not None else "")


def _best(table: Table) -> list[float | None]:
    best = []
    for j in range(len(table.columns)):
        means = [cells[j].mean for label, cells in table.rows if label != "chance" and cells[j].mean is not None]
        best.append(max(means) if means and table.bold else None)
    return best


def to_markdown(table: Table) -> str:
    best = _best(table)
    lines = [f"### {table.title}", "", "| | " + " | ".join(table.columns) + " |", "|---" * (len(table.columns) + 1) + "|"]
    for label, cells in table.rows:
        texts = []
        for j, cell in enumerate(cells):
            text = _fmt(cell, table.percent, table.columns[j])
            if label != "chance" and best[j] is not None and cell.mean == best[j]:
                text = f"**{text}**"
            texts.append(text)
        lines.append(f"| {label} | " + " | ".join(texts) + " |")
    if table.note:
        lines += ["", table.note]
    return "\n".join(lines) + "\n"


def _tex(text: str) -> str:
    return text.replace("_", r"\_").replace("%", r"\%").replace("±", r"$\pm$").replace("–", "--")


def to_latex(table: Table) -> str:
    best = _best(table)
    lines = [f"% {table.title}", r"\begin{tabular}{l" + "r" * len(table.columns) + "}", r"\toprule",
             " & " + " & ".join(_tex(c) for c in table.columns) + r" \\", r"\midrule"]
    for label, cells in table.rows:
        texts = []
        for j, cell in enumerate(cells):
            text = _tex(_fmt(cell, table.percent, table.columns[j]))
            if label != "chance" and best[j] is not None and cell.mean == best[j]:
                text = rf"\textbf{{{text}}}"
            texts.append(text)
        if label == "chance":
            lines.append(r"\midrule")
        lines.append(f"{_tex(label)} & " + " & ".join(texts) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"
