"""File helpers with the two guarantees `make data` promises: nothing half-written (write to a
temporary sibling, then rename) and errors that name the file."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from .example import DataError

REPO_ROOT = Path(__file__).resolve().parents[2]
DATA_DIR = REPO_ROOT / "data"


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike):
    """Yield a temporary path next to ``final``; move it into place only if the block succeeds.
    Works for files and directories (e.g. `Dataset.save_to_disk`). An interrupted run leaves at
    most a ``.tmp-*`` sibling, which the next run ignores and overwrites."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent)) / final.name
    try:
        yield tmp
        _publish_mode(tmp)
        if final.is_dir() and not final.is_symlink():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


def _publish_mode(path: Path) -> None:
    """mkdtemp makes 0700 directories; give published data ordinary permissions."""
    if path.is_dir():
        os.chmod(path, 0o755)
        for p in path.rglob("*"):
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
    elif path.exists():
        os.chmod(path, 0o644)


def write_jsonl(path: str | os.PathLike, rows) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n")


def read_jsonl(path: str | os.PathLike, required: tuple[str, ...] = ()) -> list[dict]:
    """Read a JSONL file; a bad line or a row missing a ``required`` field raises DataError naming
    the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, line {i}: malformed JSON ({e.msg})") from e
            if not isinstance(row, dict):
                raise DataError(f"{path}, line {i}: expected a JSON object, got {type(row).__name__}")
            missing = [k for k in required if k not in row]
            if missing:
                raise DataError(f"{path}, line {i}: missing field(s) {missing}")
            rows.append(row)
    return rows
