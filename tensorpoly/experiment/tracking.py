"""Experiment tracking: W&B (offline by default) or nothing, on rank 0 only.

One W&B run per Hydra job, finished at the end of the job (multirun sweeps do not merge runs); the
group is the sweep dir's name in multirun, so seeds and models of one sweep sit together. Online mode
is refused up front without credentials instead of prompting (which would hang a batch job).
"""
from __future__ import annotations

import netrc
import os
from pathlib import Path

from omegaconf import OmegaConf

from ..config import ConfigError

BACKENDS = ("wandb", "none")


def _has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def check_logger(logger_cfg) -> None:
    if logger_cfg.backend not in BACKENDS:
        raise ConfigError(f"logger.backend={logger_cfg.backend!r}; choose logger=wandb_offline, wandb_online or disabled")
    if logger_cfg.backend == "wandb" and logger_cfg.mode == "online" and not _has_wandb_key():
        raise ConfigError("logger=wandb_online needs credentials: set WANDB_API_KEY or run `wandb login`; "
                          "or use logger=wandb_offline (the default) and `wandb sync` later")


def sweep_group() -> str | None:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        return Path(hc.sweep.dir).name if hc.mode == RunMode.MULTIRUN else None
    except (ImportError, ValueError):
        return None


class Tracker:
    def __init__(self, logger_cfg, cfg, run_dir: Path, name: str, enabled: bool = True):
        self.run = None
        if not enabled or logger_cfg.backend == "none":
            return
        import wandb

        self.run = wandb.init(project=logger_cfg.project, entity=logger_cfg.entity, name=name,
                              group=logger_cfg.group or sweep_group(), tags=list(logger_cfg.tags or []),
                              dir=str(run_dir), mode=logger_cfg.mode, reinit="finish_previous",
                              config=OmegaConf.to_container(cfg, resolve=True))

    def log(self, metrics: dict, step: int) -> None:
        if self.run is not None:
            self.run.log({k: float(v) for k, v in metrics.items()}, step=step)

    def summary(self, metrics: dict) -> None:
        if self.run is not None:
            self.run.summary.update(metrics)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
