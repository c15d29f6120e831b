"""Resumable training checkpoints: checkpoints/step_<n>/ holds the adapter (save_adapter's two files),
trainer_state.pt (optimizer, scheduler, step) and rng_rank<r>.pt per process. A checkpoint is built
in a hidden temp dir and renamed into place, so a kill at any moment leaves the previous one intact."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from accelerate.utils import DistributedType

from ..checkpoint import CheckpointError, restore_weights, save_adapter
from .runtime import rng_state, set_rng_state

KEEP = 2


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = sorted(checkpoint_dir(run_dir).glob("step_*"))
    return found[-1] if found else None


def gathered_adapter_state(accelerator, model) -> dict | None:
    """Under FSDP the adapter tensors are sharded: gather the full state (a collective, every rank calls
    it) and keep the adapter and router entries. None elsewhere (the module's own tensors are whole)."""
    if accelerator.distributed_type != DistributedType.FSDP:
        return None
    full = accelerator.get_state_dict(model)
    inner = accelerator.unwrap_model(model)
    state = {}
    for name, adapter in inner.adapters():
        for key in adapter.state_dict():
            if not key.startswith("base_layer."):
                state[f"adapters.{name}.{key}"] = full[f"model.{name}.{key}"]
    for key in inner.routers.state_dict():
        state[f"routers.{key}"] = full[f"routers.{key}"]
    return state


def save_training_state(accelerator, run_dir: Path, step: int, model, optimizer, scheduler) -> Path:
    root = checkpoint_dir(run_dir)
    final, tmp = root / f"step_{step:08d}", root / f".tmp_step_{step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(rng_state(), tmp / f"rng_rank{accelerator.process_index}.pt")
    tensors = gathered_adapter_state(accelerator, model)
    if accelerator.is_main_process:
        save_adapter(accelerator.unwrap_model(model), tmp, tensors)
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                   tmp / "trainer_state.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        os.replace(tmp, final)
        for old in sorted(root.glob("step_*"))[:-KEEP]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_training_state(accelerator, ckpt: Path, model, optimizer, scheduler) -> int:
    """Restore weights, optimizer, scheduler and this rank's RNG; returns the step to continue from."""
    if accelerator.distributed_type == DistributedType.FSDP:
        raise CheckpointError("resuming a sharded (FSDP) run is not supported: its optimizer state is sharded; "
                              "restart it, or resume with DDP (configs/accelerate/ddp.yaml)")
    state_file, rng_file = ckpt / "trainer_state.pt", ckpt / f"rng_rank{accelerator.process_index}.pt"
    for needed in (state_file, rng_file):
        if not needed.is_file():
            raise CheckpointError(f"{needed} is missing: {ckpt} is incomplete or was written by a run with another "
                                  f"number of processes; resume with the same launch command")
    restore_weights(accelerator.unwrap_model(model), ckpt)
    state = torch.load(state_file, map_location="cpu", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=False))
    return int(state["step"])
