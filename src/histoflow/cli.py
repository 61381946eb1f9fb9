"""Command line: `histoflow train|tune|data|main|download|compare|register|promote|rollback|predict` (MLproject entry points)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import fields

from histoflow.errors import ConfigError, HistoflowError

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _add_train(sub: argparse._SubParsersAction) -> None:
    from histoflow.config import TrainConfig, VARIANTS

    parser = sub.add_parser("train", help="train and evaluate one model variant as an MLflow run")
    parser.add_argument("--variant", choices=VARIANTS, required=True)
    for f in fields(TrainConfig):
        if f.name != "variant":
            # Strings everywhere: make_config coerces and validates, with the variant's defaults.
            parser.add_argument(f"--{f.name}", default=None, help=f"default: the variant's ({f.default!r})")


def _add_tune(sub: argparse._SubParsersAction) -> None:
    from histoflow.config import TrainConfig
    from histoflow.tuning import SEARCHED, TuneConfig

    parser = sub.add_parser("tune", help="Optuna study of the fusion head on cached backbone features, "
                                         "then the best parameters as a full run")
    # Not argparse choices: make_tune_config explains why only densenet and transfer can be tuned.
    parser.add_argument("--variant", default="transfer", help="densenet or transfer (default: transfer)")
    for f in fields(TrainConfig):
        if f.name not in ("variant", "freeze_backbone", *SEARCHED):  # searched, or set by --fine_tune
            parser.add_argument(f"--{f.name}", default=None, help=f"default: the variant's ({f.default!r})")
    for f in fields(TuneConfig):
        if f.name != "train":
            parser.add_argument(f"--{f.name}", default=None, help=f"default: {f.default!r}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="histoflow", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_tune(sub)
    data = sub.add_parser("data", help="discover and split a dataset and log its report as a run (no training)")
    from histoflow.data_report import DATA_PARAMS
    from histoflow.workflow import WorkflowConfig

    for name in (*DATA_PARAMS, "experiment"):
        data.add_argument(f"--{name}", default=None)
    main = sub.add_parser("main", help="the whole study: data, variants, tune, register, promote, comparison")
    for f in fields(WorkflowConfig):
        main.add_argument(f"--{f.name}", default=None, help=f"default: {f.default!r}")
    dl = sub.add_parser("download", help="download, verify and extract a public dataset")
    dl.add_argument("--dataset", required=True, choices=["breakhis", "idc"])
    dl.add_argument("--dest", default="", help="target folder (default data/<dataset>)")
    dl.add_argument("--url", default="", help="archive URL (default: the dataset's public archive)")
    dl.add_argument("--sha256", default="", help="expected SHA-256 of the archive")
    cmp = sub.add_parser("compare", help="summary table of an experiment's training runs")
    cmp.add_argument("--experiment", default="", help="default: the current experiment")
    cmp.add_argument("--dataset", default="", help="only runs on this dataset name")
    cmp.add_argument("--output_dir", default="outputs")
    reg = sub.add_parser("register", help="register the best run's serving model as @challenger")
    reg.add_argument("--experiment", default="", help="default: the current experiment")
    reg.add_argument("--metric", default="validation_roc_auc", help="validation metric to select by")
    reg.add_argument("--name", default="histoflow", help="registered model name")
    reg.add_argument("--include_leaky", default="false", help="also consider image-level (leaky) splits")
    pro = sub.add_parser("promote", help="move @champion to @challenger if it passes the metric gate")
    pro.add_argument("--name", default="histoflow")
    pro.add_argument("--data_dir", default="", help="evaluation images (default: the challenger's test split)")
    pro.add_argument("--layout", default="auto")
    pro.add_argument("--max_images", default="0")
    from histoflow.registry import Gate

    for f in fields(Gate):
        pro.add_argument(f"--{f.name}", default=str(f.default))
    rb = sub.add_parser("rollback", help="move @champion back to @previous")
    rb.add_argument("--name", default="histoflow")
    pr = sub.add_parser("predict", help="score a folder of images with a registered model")
    pr.add_argument("--model_uri", default="models:/histoflow@champion")
    pr.add_argument("--data_dir", required=True)
    pr.add_argument("--output_dir", default="outputs/predictions")
    return parser


def _number(name: str, value: str, kind=float):
    try:
        return kind(float(value)) if kind is int else kind(value)
    except ValueError:
        raise ConfigError(f"{name} must be a number; got {value!r}") from None


def _registry_command(args: argparse.Namespace) -> None:
    from histoflow import registry, tracking

    tracking.configure()
    if args.command == "register":
        leaky = args.include_leaky.strip().lower() in ("1", "true", "yes")
        registry.register(args.experiment or tracking.current_experiment_name(), args.metric, args.name, leaky)
    elif args.command == "promote":
        gate = registry.Gate(**{f.name: _number(f.name, getattr(args, f.name)) for f in fields(registry.Gate)})
        registry.promote(args.name, gate, args.data_dir, args.layout, _number("max_images", args.max_images, int))
    elif args.command == "rollback":
        registry.rollback(args.name)
    elif args.command == "predict":
        registry.batch_predict(args.model_uri, args.data_dir, args.output_dir)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = _parser().parse_args(argv)
    try:
        if args.command == "train":
            from histoflow import train
            from histoflow.config import make_config

            overrides = {k: v for k, v in vars(args).items() if k not in ("command", "variant")}
            train.run(make_config(args.variant, **overrides))
        elif args.command == "tune":
            from histoflow import tuning

            overrides = {k: v for k, v in vars(args).items() if k not in ("command", "variant")}
            tuning.run(tuning.make_tune_config(args.variant, **overrides))
        elif args.command == "data":
            from histoflow import data_report
            from histoflow.config import make_config

            overrides = {k: v for k, v in vars(args).items() if k != "command"}
            data_report.run(make_config("baseline", **overrides))
        elif args.command == "main":
            from histoflow import workflow

            overrides = {k: v for k, v in vars(args).items() if k != "command"}
            workflow.run(workflow.make_workflow_config(**overrides))
        elif args.command == "download":
            from histoflow.download import download

            download(args.dataset, args.dest or None, args.url, args.sha256)
        elif args.command == "compare":
            from histoflow import compare, tracking

            tracking.configure()
            compare.run(args.experiment or tracking.current_experiment_name(), args.dataset, args.output_dir)
        else:
            _registry_command(args)
    except HistoflowError as exc:
        print(f"histoflow: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
