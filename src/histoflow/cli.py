"""Command line: `histoflow train|download|compare`; the MLproject entry points call these."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import fields

from histoflow.errors import HistoflowError

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _add_train(sub: argparse._SubParsersAction) -> None:
    from histoflow.config import TrainConfig, VARIANTS

    parser = sub.add_parser("train", help="train and evaluate one model variant as an MLflow run")
    parser.add_argument("--variant", choices=VARIANTS, required=True)
    for f in fields(TrainConfig):
        if f.name != "variant":
            # Strings everywhere: make_config coerces and validates, with the variant's defaults.
            parser.add_argument(f"--{f.name}", default=None, help=f"default: the variant's ({f.default!r})")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="histoflow", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    dl = sub.add_parser("download", help="download, verify and extract a public dataset")
    dl.add_argument("--dataset", required=True, choices=["breakhis", "idc"])
    dl.add_argument("--dest", default="", help="target folder (default data/<dataset>)")
    dl.add_argument("--url", default="", help="archive URL (default: the dataset's public archive)")
    dl.add_argument("--sha256", default="", help="expected SHA-256 of the archive")
    cmp = sub.add_parser("compare", help="summary table of an experiment's training runs")
    cmp.add_argument("--experiment", default="", help="default: the current experiment")
    cmp.add_argument("--dataset", default="", help="only runs on this dataset name")
    cmp.add_argument("--output_dir", default="outputs")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = _parser().parse_args(argv)
    try:
        if args.command == "train":
            from histoflow import train
            from histoflow.config import make_config

            overrides = {k: v for k, v in vars(args).items() if k not in ("command", "variant")}
            train.run(make_config(args.variant, **overrides))
        elif args.command == "download":
            from histoflow.download import download

            download(args.dataset, args.dest or None, args.url, args.sha256)
        elif args.command == "compare":
            from histoflow import compare, tracking

            tracking.configure()
            compare.run(args.experiment or tracking.current_experiment_name(), args.dataset, args.output_dir)
    except HistoflowError as exc:
        print(f"histoflow: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
