"""Where runs write, and finding them again (resume, `checkpoint=latest`).

A training run dir holds run_config.yaml (the resolved config), run_state.json (status, step and the
config fingerprint), checkpoints/step_*/ (resumable states) and adapter/ (the final adapter).
Only rank 0 writes Hydra's dir: other ranks resolve theirs to a private temp dir and receive rank 0's
dir (tensorpoly.experiment.distributed.broadcast), so multi-process runs never scatter or collide.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ..config import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]
STATE_FILE = "run_state.json"
CONFIG_FILE = "run_config.yaml"
# Keys that do not change what a run computes: a resumed run may differ in them.
NOT_IN_FINGERPRINT = ("resume", "logger", "debug", "results_dir", "run_dir")


def process_rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))


def rank_dir(path: str) -> str:
    rank = process_rank()
    return path if rank == 0 else os.path.join(tempfile.gettempdir(), f"tensorpoly-rank{rank}-{os.getpid()}")


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("rank_dir"):
        OmegaConf.register_new_resolver("rank_dir", rank_dir)


def repo_path(path: str | os.PathLike) -> Path:
    """Relative paths in configs are relative to the repository root (data/, results/), whatever the cwd."""
    path = Path(path)
    return path if path.is_absolute() else REPO_ROOT / path


def fingerprint(cfg: DictConfig) -> str:
    plain = OmegaConf.to_container(cfg, resolve=True)
    kept = {k: v for k, v in plain.items() if k not in NOT_IN_FINGERPRINT}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_state(run_dir: Path) -> dict:
    path = Path(run_dir) / STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def write_state(run_dir: Path, **fields) -> None:
    state = {**read_state(run_dir), **fields}
    tmp = Path(run_dir) / f".{STATE_FILE}.tmp"
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, Path(run_dir) / STATE_FILE)


def _runs(*roots: Path) -> list[Path]:
    runs = {p.parent for root in roots for p in Path(root).glob(f"**/{STATE_FILE}")}
    return sorted(runs, key=lambda p: (p / STATE_FILE).stat().st_mtime, reverse=True)


def find_resumable(outputs: Path, fp: str) -> Path | None:
    """The newest unfinished run with this config fingerprint."""
    for run in _runs(outputs):
        state = read_state(run)
        if state.get("fingerprint") == fp and state.get("status") != "finished":
            return run
    return None


def resolve_resume(resume, outputs: Path, fp: str) -> Path | None:
    """The run dir to continue, None to start afresh. resume: false | true | a run dir."""
    if resume in (False, None, "false"):
        return None
    if resume in (True, "true"):
        found = find_resumable(outputs, fp)
        if found is None:
            raise ConfigError(f"resume=true: no unfinished run with this config under {outputs}; "
                              f"start one without resume, or pass resume=<run dir>")
        return found
    run = Path(str(resume))
    if not (run / STATE_FILE).is_file():
        raise ConfigError(f"resume={resume}: {run / STATE_FILE} not found; pass a training run dir (outputs/train/<run>)")
    state = read_state(run)
    if state.get("fingerprint") != fp:
        raise ConfigError(f"resume={resume}: that run was started with another config (fingerprint "
                          f"{state.get('fingerprint')} vs {fp}); resume with its overrides (see {run / CONFIG_FILE})")
    return run


def training_roots() -> tuple[Path, Path]:
    """Where training runs live, relative to the working directory (Hydra's default)."""
    return Path("outputs/train"), Path("multirun/train")


def find_checkpoint(spec: str) -> Path:
    """An adapter dir from `checkpoint=`: "latest" (newest finished run), a run dir, an adapter dir, or an
    intermediate checkpoint (<run>/checkpoints/step_N)."""
    if spec == "latest":
        for run in _runs(*training_roots()):
            if read_state(run).get("status") == "finished" and (run / "adapter").is_dir():
                return run / "adapter"
        raise ConfigError(f"checkpoint=latest: no finished training run under outputs/train or multirun/train; "
                          f"run `make train` first or pass checkpoint=<run dir>")
    path = Path(spec)
    if (path / "adapter" / "adapter_config.json").is_file():
        return path / "adapter"
    if (path / "adapter_config.json").is_file():
        return path
    raise ConfigError(f"checkpoint={spec}: neither an adapter dir (adapter_config.json) nor a training run "
                      f"dir (adapter/); pass outputs/train/<run>, outputs/train/<run>/checkpoints/step_N "
                      f"or checkpoint=latest")


def run_config_of(adapter_dir: Path) -> DictConfig:
    """The training run config stored beside an adapter (adapter/run_config.yaml), or in the run dir of an
    intermediate checkpoint (<run>/checkpoints/step_N)."""
    for candidate in (adapter_dir / CONFIG_FILE, adapter_dir.parent / CONFIG_FILE,
                      adapter_dir.parent.parent / CONFIG_FILE):
        if candidate.is_file():
            return OmegaConf.load(candidate)
    raise ConfigError(f"{adapter_dir}: no {CONFIG_FILE} beside the adapter, so its backbone and data are unknown; "
                      f"it was not written by scripts/train.py")
