"""The one record every data path produces: a rendered prompt, its target, and (for rank
classification) the answer choices and the index of the gold one."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


class DataError(ValueError):
    """Bad input: a malformed file, an unknown dataset, a template that renders empty, a label
    out of range. The message always names the file, dataset or template at fault."""


@dataclass
class Example:
    input: str
    target: str
    answer_choices: list[str] | None = None
    label: int | None = None
    task: str = ""
    # Provenance, kept for debugging and for the benchmark's disjointness checks.
    dataset: str = ""
    template: str = ""
    idx: int = -1
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Example":
        return cls(**d)
