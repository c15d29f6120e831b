"""Which routing would serve a held-out task? Scores each held-out task zero-shot through the average router
and through every training task's own routing row, one at a time. The best single row is an upper bound
of what picking a trained route could give; if no row beats chance, the task needs something no one
route learnt (on the embedded benchmark: two skills at once).

    python scripts/route_probe.py [--checkpoint latest|outputs/train/<run>] [--tasks count_category ...] [--limit 300]
"""
import argparse
import statistics

import torch
from tqdm.auto import tqdm

from tensorpoly.experiment.data import eval_examples, heldout_tasks, tokenize
from tensorpoly.experiment.evaluation import predict
from tensorpoly.experiment.setup import load_trained


def accuracy(model, examples, tokenizer, row: int, run_cfg) -> float:
    features = tokenize(examples, tokenizer, {examples[0].task: row}, run_cfg.data)
    preds = predict(model, features, tokenizer.pad_token_id, 64, bool(run_cfg.eval.length_norm))
    return statistics.mean(p == e.label for p, e in zip(preds, examples))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="latest")
    parser.add_argument("--tasks", nargs="+", default=None, help="held-out tasks (default: all)")
    parser.add_argument("--limit", type=int, default=300, help="evaluation examples per task")
    parser.add_argument("--top", type=int, default=3, help="best single rows to list per task")
    args = parser.parse_args()
    torch.set_num_threads(1)
    adapter_dir, run_cfg, tokenizer, model = load_trained(args.checkpoint)
    if not model.config.routed:
        raise SystemExit(f"{adapter_dir}: a {model.config.module_type} adapter has no router to probe; "
                         f"pass a poly, mhr, tensorpoly1 or tensorpoly2 run")
    rows = list(model.config.task_names)
    print(f"{adapter_dir}: {len(rows)} training rows\n"
          f"{'held-out task':<16} {'chance':>6} {'average':>7} {'best row':>8}  best rows")
    for task in heldout_tasks(run_cfg.data, args.tasks or "all"):
        examples = eval_examples(run_cfg.data, task, str(run_cfg.eval.protocol), int(run_cfg.eval.seed))[: args.limit]
        chance = statistics.mean(1 / len(e.answer_choices) for e in examples)
        model.use_average_routing("uniform")
        average = accuracy(model, examples, tokenizer, 0, run_cfg)
        model.use_learned_routing()
        by_row = {name: accuracy(model, examples, tokenizer, i, run_cfg)
                  for i, name in enumerate(tqdm(rows, desc=task, leave=False))}
        best = sorted(by_row.items(), key=lambda kv: -kv[1])[: args.top]
        listing = ", ".join(f"{name} {acc:.2f}" for name, acc in best)
        print(f"{task:<16} {chance:>6.2f} {average:>7.2f} {best[0][1]:>8.2f}  {listing}")


if __name__ == "__main__":
    main()
