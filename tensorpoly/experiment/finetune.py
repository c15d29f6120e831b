"""Few-shot fine-tuning on held-out tasks (scripts/finetune.py), the T-Few recipe the paper follows.

For each held-out task and few-shot seed: restore the multi-task adapter, give the task one fresh
routing row (U(-1e-3, 1e-3): about the uniform mixture), train adapters and router (or the router only,
finetune.trainable=router, the paper's `Z`) on the k-shot set with LM + unlikelihood + length-normalised
multiple-choice losses, then evaluate the task with its learned row. One results file for the job.
"""
from __future__ import annotations

import logging
import statistics
import time
from omegaconf import OmegaConf

from ..checkpoint import load_adapter, restore_weights, save_adapter
from ..config import ConfigError
from .data import check_available, few_shot_examples, heldout_tasks, tokenize
from .evaluation import evaluate_heldout
from .fit import fit
from .losses import tfew_losses
from .optim import build_optimizer, build_scheduler, param_groups
from .results import write_result
from .rundir import find_checkpoint, run_config_of
from .runtime import make_accelerator, seed_everything
from .setup import check_recipe, load_backbone, load_tokenizer
from .tracking import Tracker, check_logger
from .train import hydra_run_dir

log = logging.getLogger(__name__)
TRAINABLE = ("adapters_router", "router")


def check_finetune_config(cfg):
    check_logger(cfg.logger)
    check_recipe(cfg.finetune, "finetune")
    if cfg.finetune.trainable not in TRAINABLE:
        raise ConfigError(f"finetune.trainable={cfg.finetune.trainable!r}; choose one of {TRAINABLE}")
    adapter_dir = find_checkpoint(str(cfg.checkpoint))
    run_cfg = run_config_of(adapter_dir)
    if cfg.finetune.trainable == "router" and run_cfg.model.module_type in ("lora", "tlora"):
        raise ConfigError(f"finetune.trainable=router: the checkpoint is a dense {run_cfg.model.module_type} adapter "
                          f"without a router; use finetune.trainable=adapters_router")
    check_available(run_cfg.data)
    tasks = heldout_tasks(run_cfg.data, cfg.finetune.tasks)
    return adapter_dir, run_cfg, tasks


def run_finetune(cfg) -> dict:
    adapter_dir, run_cfg, tasks = check_finetune_config(cfg)
    accelerator = make_accelerator(cfg.finetune)
    if accelerator.num_processes > 1:
        raise ConfigError("few-shot fine-tuning runs in one process (32-example tasks); run tasks or seeds as "
                          "separate jobs instead: python scripts/finetune.py -m finetune.tasks=[rte],[cb] ...")
    run_dir = hydra_run_dir(cfg)
    tokenizer = load_tokenizer(run_cfg.backbone)
    model = load_adapter(load_backbone(run_cfg.backbone), adapter_dir).to(accelerator.device)
    pretrained_tasks = list(model.config.task_names)
    routed = model.config.routed
    method = model.config.module_type
    tracker = Tracker(cfg.logger, cfg, run_dir, f"finetune-{method}-{run_cfg.data.name}")
    per_task, started = {}, time.perf_counter()
    for task in tasks:
        per_task[task] = {}
        for seed in cfg.finetune.seeds:
            seed = int(seed)
            if routed:
                model.reset_tasks(pretrained_tasks)       # back to the checkpoint's table shape ...
            restore_weights(model, adapter_dir)           # ... and weights
            seed_everything(seed)
            if routed:
                model.reset_tasks([task])                 # one fresh row for the new task
            for p in model.trainable_parameters():
                p.requires_grad_(True)
            shots = few_shot_examples(run_cfg.data, task, seed, cfg.finetune.k)
            features = tokenize(shots, tokenizer, {task: 0}, run_cfg.data)
            optimizer = build_optimizer(param_groups(model, cfg.finetune, cfg.finetune.trainable == "adapters_router"),
                                        cfg.finetune)
            scheduler = build_scheduler(optimizer, cfg.finetune)
            fitted, prepared_opt = accelerator.prepare(model, optimizer)

            def log_step(step, metrics, task=task, seed=seed):
                if step % int(cfg.finetune.log_every) == 0:
                    tracker.log({f"{task}/seed{seed}/{k}": v for k, v in metrics.items()}, step)

            def loss_fn(m, batch):
                return tfew_losses(m, batch, float(cfg.finetune.mc_loss), float(cfg.finetune.unlikely_loss))

            last = fit(accelerator, fitted, prepared_opt, scheduler, features, loss_fn, cfg.finetune, seed,
                       tokenizer.pad_token_id, after_step=log_step, desc=f"{task} seed {seed}")
            result = evaluate_heldout(model, tokenizer, run_cfg.data, cfg.eval, [task], task_ids={task: 0})
            per_task[task][str(seed)] = {**result["tasks"][task], "final_loss": last.get("loss"), "n_shots": len(shots)}
            save_adapter(model, run_dir / "adapters" / task / f"seed{seed}")
            log.info("%s seed %d: accuracy %.3f", task, seed, result["tasks"][task]["accuracy"])
    means = {t: statistics.mean(r["accuracy"] for r in runs.values()) for t, runs in per_task.items()}
    average = statistics.mean(means.values())
    chance = statistics.mean(next(iter(runs.values()))["chance"] for runs in per_task.values())
    metrics = {"few_shot_average": average, "chance": chance, "seconds": time.perf_counter() - started,
               "seeds": [int(s) for s in cfg.finetune.seeds]}
    path = write_result(cfg.results_dir, "finetune", f"{run_cfg.data.name}-{run_cfg.backbone.name}-{method}-"
                        f"{run_cfg.routing.granularity}-seed{run_cfg.seed}", cfg, method=method, metrics=metrics,
                        heldout=per_task, checkpoint=str(adapter_dir), train_config=OmegaConf.to_container(run_cfg, resolve=True),
                        params=model.parameter_counts(), run_dir=str(run_dir))
    tracker.summary({"few_shot/average": average, **{f"few_shot/{t}": v for t, v in means.items()}})
    tracker.finish()
    log.info("few-shot held-out accuracy %.3f (chance %.3f); result %s", average, chance, path)
    return {"result": str(path), "few_shot_average": average, "chance": chance, "per_task": means}
