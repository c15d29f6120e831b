"""Zero-shot evaluation of a trained adapter on the held-out tasks (rank classification).

    python scripts/evaluate.py                                   # newest finished outputs/train run (= make eval)
    python scripts/evaluate.py checkpoint=outputs/train/<run> eval.protocol=all eval.length_norm=false   # T0's protocol
"""
import hydra

from tensorpoly.experiment.evaluate import run_evaluation
from tensorpoly.experiment.rundir import register_resolvers

register_resolvers()


@hydra.main(version_base="1.3", config_path="../configs", config_name="eval")
def main(cfg) -> float:
    return run_evaluation(cfg)["zero_shot_average"]


if __name__ == "__main__":
    main()
