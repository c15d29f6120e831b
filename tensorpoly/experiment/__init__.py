"""What the scripts run: multi-task training, few-shot fine-tuning and zero-shot evaluation, driven by
a Hydra config (configs/) and Accelerate. One job per module; scripts/*.py are thin Hydra entry points."""
