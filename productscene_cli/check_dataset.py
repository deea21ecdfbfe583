"""``check-dataset``: check a data set and list every problem (nothing is written)."""
from __future__ import annotations

import json

from productscene.train.datasets import check, open_dataset

from .options import data_args
from .progress import bar


def register(sub) -> None:
    c = sub.add_parser("check-dataset", help="check a data set; list every problem")
    data_args(c)
    c.add_argument("--shallow", action="store_true", help="read headers only (no empty-mask test)")
    c.add_argument("--json", action="store_true", help="print the report as JSON")
    c.set_defaults(func=run)


def run(args) -> int:
    dataset = open_dataset(args.data, args.layout, args.split)
    shown = bar(len(dataset), "checking")
    report = check(dataset, deep=not args.shallow, progress=(lambda i, n: shown.update(1)) if shown else None)
    if shown:
        shown.close()
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print(report.message(limit=None))
    return 0 if report.ok else 1
