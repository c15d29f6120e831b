"""Multi-task training of an adapter on a frozen backbone, then zero-shot held-out evaluation.

    python scripts/train.py model=tensorpoly1                 # the embedded default on CPU (= make train)
    python scripts/train.py -m model=lora,tensorpoly1 seed=42,1024,0    # a sweep
    python scripts/train.py experiment=t0_3b_tensorpoly1      # the paper's run (needs T0-3B and make data)
    accelerate launch --config_file configs/accelerate/ddp.yaml scripts/train.py experiment=...
    python scripts/train.py model=tensorpoly1 resume=true     # continue the newest unfinished identical run
"""
import hydra

from tensorpoly.experiment.rundir import register_resolvers
from tensorpoly.experiment.train import run_training

register_resolvers()


@hydra.main(version_base="1.3", config_path="../configs", config_name="train")
def main(cfg) -> float | None:
    return run_training(cfg).get("zero_shot_average")


if __name__ == "__main__":
    main()
