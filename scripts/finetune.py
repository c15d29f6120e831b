"""Few-shot fine-tuning of a multi-task checkpoint on the held-out tasks (T-Few recipe), then evaluation.

    python scripts/finetune.py                                  # newest finished outputs/train run (= make finetune)
    python scripts/finetune.py checkpoint=outputs/train/<run> finetune=tfew finetune.trainable=router
"""
import hydra

from tensorpoly.experiment.finetune import run_finetune
from tensorpoly.experiment.rundir import register_resolvers

register_resolvers()


@hydra.main(version_base="1.3", config_path="../configs", config_name="finetune")
def main(cfg) -> float:
    return run_finetune(cfg)["few_shot_average"]


if __name__ == "__main__":
    main()
