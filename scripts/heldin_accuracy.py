"""Rank-classification accuracy of a trained adapter on the *training* tasks' validation examples, each
routed by its own task id: which skills the multi-task stage learnt (held-out tasks combine them).
With --average, every task goes through the zero-shot router instead: which skills survive the
average routing that the held-out tasks get.

    python scripts/heldin_accuracy.py [--checkpoint latest|outputs/train/<run>] [--per-task 100] [--average uniform]
"""
import argparse
import statistics
from collections import Counter, defaultdict

import torch

from tensorpoly.experiment.data import tokenize, training_mixture
from tensorpoly.experiment.evaluation import predict
from tensorpoly.experiment.setup import load_trained
from tensorpoly.routing import AVERAGE_KINDS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="latest")
    parser.add_argument("--per-task", type=int, default=100, help="validation examples per task")
    parser.add_argument("--average", choices=AVERAGE_KINDS, default=None,
                        help="route every task with this zero-shot router, not its own row")
    args = parser.parse_args()
    torch.set_num_threads(1)
    adapter_dir, run_cfg, tokenizer, model = load_trained(args.checkpoint)
    if args.average and model.config.routed:
        model.use_average_routing(args.average)
    mixture = training_mixture(run_cfg.data, int(run_cfg.seed))
    by_task = defaultdict(list)
    for example in mixture.validation:
        if example.answer_choices and len(by_task[example.task]) < args.per_task:
            by_task[example.task].append(example)
    routing = f"{args.average} average router" if args.average and model.config.routed else "own task rows"
    print(f"{adapter_dir} ({routing})\n{'task':<36} {'accuracy':>8} {'chance':>7} {'top answer':>10}")
    for task, examples in sorted(by_task.items()):
        preds = predict(model, tokenize(examples, tokenizer, mixture.task2id, run_cfg.data), tokenizer.pad_token_id,
                        64, bool(run_cfg.eval.length_norm))
        acc = statistics.mean(p == e.label for p, e in zip(preds, examples))
        chance = statistics.mean(1 / len(e.answer_choices) for e in examples)
        top = Counter(preds).most_common(1)[0][1] / len(preds)  # 1.00: one constant answer
        print(f"{task:<36} {acc:>8.2f} {chance:>7.2f} {top:>10.2f}")


if __name__ == "__main__":
    main()
