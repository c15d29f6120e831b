"""Zero-shot evaluation of a trained adapter on the held-out tasks (scripts/evaluate.py): the average
router (uniform 1/S over experts, the paper) serves the unseen tasks; dense adapters apply as they are."""
from __future__ import annotations

import logging
from omegaconf import OmegaConf

from ..checkpoint import load_adapter
from .data import check_available, heldout_tasks
from .evaluation import describe, evaluate_heldout, heldout_metrics
from .results import write_result
from .rundir import find_checkpoint, run_config_of
from .setup import load_backbone, load_tokenizer

log = logging.getLogger(__name__)


def run_evaluation(cfg) -> dict:
    adapter_dir = find_checkpoint(str(cfg.checkpoint))
    run_cfg = run_config_of(adapter_dir)
    check_available(run_cfg.data)
    tasks = heldout_tasks(run_cfg.data, cfg.tasks)
    tokenizer = load_tokenizer(run_cfg.backbone)
    model = load_adapter(load_backbone(run_cfg.backbone), adapter_dir)
    if model.config.routed:
        model.use_average_routing(cfg.eval.average)
    heldout = evaluate_heldout(model, tokenizer, run_cfg.data, cfg.eval, tasks)
    method = model.config.module_type
    path = write_result(cfg.results_dir, "eval", f"{run_cfg.data.name}-{run_cfg.backbone.name}-{method}-"
                        f"{run_cfg.routing.granularity}-seed{run_cfg.seed}", cfg, method=method,
                        metrics=heldout_metrics(heldout),
                        heldout=heldout["tasks"], checkpoint=str(adapter_dir), train_config=OmegaConf.to_container(run_cfg, resolve=True),
                        params=model.parameter_counts())
    log.info("%s; result %s", describe(heldout_metrics(heldout)), path)
    return {"result": str(path), "zero_shot_average": heldout["average"], "chance": heldout["chance"],
            "tasks": {t: r["accuracy"] for t, r in heldout["tasks"].items()}}
