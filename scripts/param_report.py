"""Print trainable adapter, routing and frozen extra parameters per module type.

    python scripts/param_report.py --model tensorpoly1 --backbone t0_3b --n-tasks 313
    python scripts/param_report.py --model all --backbone t0_3b           # every module type

Shapes only: the backbone is built on the meta device from configs/backbone/<name>.yaml.
"""
import argparse

from tensorpoly.backbones import available
from tensorpoly.params import count_parameters, format_report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="all", help=f"one of {available('model')} or 'all'")
    parser.add_argument("--backbone", default="t0_3b", help=f"one of {available('backbone')}")
    parser.add_argument("--n-tasks", type=int, default=313, help="routing rows (313 = T0 templates as tasks)")
    parser.add_argument("--order", type=int, help="override the tensor order")
    parser.add_argument("--rank", type=int, help="override the rank")
    parser.add_argument("--n-experts", type=int, help="override the number of experts")
    args = parser.parse_args()
    models = available("model") if args.model == "all" else [args.model]
    overrides = {k: v for k, v in (("order", args.order), ("rank", args.rank), ("n_experts", args.n_experts)) if v}
    rows = {}
    for name in models:
        kw = dict(overrides)
        if name in ("lora", "poly", "mhr"):
            kw.pop("order", None)
        rows[name] = count_parameters(name, args.backbone, args.n_tasks, **kw)
    print(format_report(rows, args.backbone, args.n_tasks))


if __name__ == "__main__":
    main()
