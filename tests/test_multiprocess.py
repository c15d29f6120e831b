"""Two CPU processes (torchrun, gloo): they train in sync, write one run dir and one result."""
import json
import os
import subprocess
import sys

import pytest

from experiment_helpers import QUICK, REPO_ROOT


@pytest.mark.parametrize("average_route_prob", [0.0, 0.5])  # 0.5: steps where the routers get no gradient
def test_two_process_torchrun_trains_and_agrees_across_ranks(tmp_path, average_route_prob):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO_ROOT / "scripts" / "train.py"), *QUICK, "model=tensorpoly1", "train.steps=8",
           f"train.average_route_prob={average_route_prob}",
           f"results_dir={tmp_path / 'results'}"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = list((tmp_path / "results" / "train").glob("*.json"))
    assert len(results) == 1  # rank 0 alone writes results
    metrics = json.loads(results[0].read_text())["metrics"]
    assert metrics["processes"] == 2
    assert metrics["rank_param_max_diff"] == 0.0  # identical adapters and routers on both ranks
    assert metrics["val_loss"] < metrics["val_loss_start"]
    runs = [p for p in (tmp_path / "outputs" / "train").iterdir()]
    assert len(runs) == 1 and (runs[0] / "adapter").is_dir()  # one run dir, not one per rank
