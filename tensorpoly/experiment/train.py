"""Multi-task training (scripts/train.py): adapters and routers on a frozen backbone over the training
mixture, resumable checkpoints, then zero-shot evaluation of the held-out tasks with the average router
and one results file."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from ..checkpoint import save_adapter
from ..data import Collator
from .average_route import average_route_steps, check_average_route_prob
from .data import heldout_tasks, tokenize, training_mixture
from .evaluation import describe, evaluate_heldout, heldout_metrics
from .fit import fit, params_checksum
from .losses import lm_loss
from .optim import build_optimizer, build_scheduler, param_groups
from .results import write_result
from .rundir import CONFIG_FILE, training_roots, fingerprint, resolve_resume, write_state
from .runtime import broadcast, make_accelerator, seed_everything
from .setup import build_model, check_training_config
from .state import gathered_adapter_state, latest_checkpoint, load_training_state, save_training_state
from .tracking import Tracker

log = logging.getLogger(__name__)


def hydra_run_dir(cfg) -> Path:
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except (ImportError, ValueError):
        if "run_dir" in cfg:  # the compose API (tests, notebooks): +run_dir=...
            return Path(cfg.run_dir)
        raise


def run_name(cfg) -> str:
    return f"{cfg.data.name}-{cfg.backbone.name}-{cfg.model.module_type}-{cfg.routing.granularity}-seed{cfg.seed}"


def _choose_run_dir(cfg, fp: str) -> tuple[Path, bool]:
    here = hydra_run_dir(cfg)
    resumed = None
    for root in (*training_roots(), here.parent):
        try:
            resumed = resolve_resume(cfg.resume, root, fp)
            break
        except Exception as exc:  # noqa: BLE001 - keep looking in the other roots, then re-raise
            error = exc
    if cfg.resume not in (False, None, "false") and resumed is None:
        raise error
    return (resumed or here).resolve(), resumed is not None


@torch.no_grad()
def validation_loss(model, features, pad_id, batch_size, n_batches, device) -> float:
    """Mean LM loss over batch_size * n_batches validation examples spread evenly over the whole split
    (the split is ordered by task: its head would measure only the first tasks)."""
    collate, losses = Collator(pad_id), []
    n = min(len(features), batch_size * n_batches)
    subset = [features[i * len(features) // n] for i in range(n)]
    was_training = model.training
    model.eval()
    for i in range(0, n, batch_size):
        batch = {k: v.to(device) for k, v in collate(subset[i: i + batch_size]).items()}
        losses.append(lm_loss(model, batch).item())
    model.train(was_training)
    return sum(losses) / max(len(losses), 1)


def run_training(cfg) -> dict:
    config = check_training_config(cfg)  # before anything is loaded
    accelerator = make_accelerator(cfg.train)
    fp = fingerprint(cfg)
    choice = None
    if accelerator.is_main_process:
        try:
            choice = _choose_run_dir(cfg, fp)
        except Exception as exc:  # noqa: BLE001 - every rank must learn about it, not only rank 0
            choice = exc
    choice = broadcast(accelerator, choice)
    if isinstance(choice, Exception):
        raise choice
    run_dir, resumed = choice
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not resumed:
            (run_dir / CONFIG_FILE).write_text(OmegaConf.to_yaml(cfg, resolve=True))
        write_state(run_dir, status="running", fingerprint=fp, started=time.strftime("%Y-%m-%dT%H:%M:%S"))
        log.info("run dir: %s%s", run_dir, " (resumed)" if resumed else "")

    seed_everything(int(cfg.seed))
    mixture = training_mixture(cfg.data, int(cfg.seed))
    model, tokenizer = build_model(cfg, config, int(cfg.seed))
    train_features = tokenize(mixture.train, tokenizer, mixture.task2id, cfg.data)
    val_features = tokenize(mixture.validation, tokenizer, mixture.task2id, cfg.data)
    optimizer = build_optimizer(param_groups(model, cfg.train), cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train)
    model, optimizer = accelerator.prepare(model, optimizer)
    inner = accelerator.unwrap_model(model)

    start = 0
    ckpt = latest_checkpoint(run_dir) if resumed else None
    if ckpt is not None:
        start = load_training_state(accelerator, ckpt, model, optimizer, scheduler)
        log.info("resumed from %s at step %d", ckpt, start)

    tracker = Tracker(cfg.logger, cfg, run_dir, run_name(cfg), enabled=accelerator.is_main_process)
    stop_after = cfg.get("debug", {}).get("stop_after_step")
    history = []

    def after_step(step: int, metrics: dict):
        if step % int(cfg.train.val_every) == 0 or step == int(cfg.train.steps):
            if accelerator.is_main_process:
                metrics["val_loss"] = validation_loss(inner, val_features, tokenizer.pad_token_id,
                                                      int(cfg.train.batch_size), int(cfg.train.val_batches),
                                                      accelerator.device)
        if step % int(cfg.train.log_every) == 0 or "val_loss" in metrics:
            tracker.log(metrics, step)
            history.append({"step": step, **metrics})
        if step % int(cfg.train.checkpoint_every) == 0 and step < int(cfg.train.steps):
            save_training_state(accelerator, run_dir, step, model, optimizer, scheduler)
        if stop_after is not None and step >= int(stop_after):
            return "stop"

    val_start = None
    if accelerator.is_main_process and start == 0:
        val_start = validation_loss(inner, val_features, tokenizer.pad_token_id, int(cfg.train.batch_size),
                                    int(cfg.train.val_batches), accelerator.device)
    started = time.perf_counter()
    last = fit(accelerator, model, optimizer, scheduler, train_features, lambda m, b: (lm_loss(m, b), {}),
               cfg.train, int(cfg.seed), tokenizer.pad_token_id, start_step=start, after_step=after_step,
               desc=f"train {cfg.model.module_type}",
               step_context=average_route_steps(inner, check_average_route_prob(cfg.train), int(cfg.seed)))
    train_seconds = time.perf_counter() - started
    sums = accelerator.gather(params_checksum(inner.trainable_parameters()).to(accelerator.device).unsqueeze(0))
    rank_diff = float((sums - sums[0]).abs().max())
    if stop_after is not None and last and int(stop_after) < int(cfg.train.steps):
        tracker.finish()
        return {"run_dir": str(run_dir), "stopped_at": int(stop_after)}

    summary = {"run_dir": str(run_dir)}
    tensors = gathered_adapter_state(accelerator, model)
    if accelerator.is_main_process:
        adapter_dir = save_adapter(inner, run_dir / "adapter", tensors)
        (adapter_dir / CONFIG_FILE).write_text((run_dir / CONFIG_FILE).read_text())
        if config.routed:
            inner.use_average_routing(cfg.eval.average)
        started_eval = time.perf_counter()
        heldout = evaluate_heldout(inner, tokenizer, cfg.data, cfg.eval, heldout_tasks(cfg.data))
        eval_seconds = time.perf_counter() - started_eval
        inner.use_learned_routing()
        metrics = {"train_loss": last.get("loss"), "val_loss_start": val_start, "val_loss": last.get("val_loss"), "steps": int(cfg.train.steps),
                   "resumed_from_step": start, "train_seconds": train_seconds, "eval_seconds": eval_seconds,
                   "processes": accelerator.num_processes, "rank_param_max_diff": rank_diff,
                   **heldout_metrics(heldout)}
        path = write_result(cfg.results_dir, "train", run_name(cfg), cfg, method=cfg.model.module_type,
                            metrics=metrics, heldout=heldout["tasks"], params=inner.parameter_counts(),
                            history=history, run_dir=str(run_dir), adapter_dir=str(adapter_dir))
        tracker.summary({"zero_shot/average": heldout["average"],
                         **{f"zero_shot/{kind}": g["average"] for kind, g in heldout.get("groups", {}).items()},
                         **{f"zero_shot/{t}": r["accuracy"] for t, r in heldout["tasks"].items()}})
        write_state(run_dir, status="finished", result=str(path), finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
        summary.update(result=str(path), zero_shot_average=heldout["average"], chance=heldout["chance"],
                       rank_param_max_diff=rank_diff)
        log.info("%s; result %s", describe(metrics), path)
    tracker.finish()
    accelerator.wait_for_everyone()
    return summary
