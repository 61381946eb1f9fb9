"""Command line: `histoflow <command>`, one per MLproject entry point (train serves the four variants).

Options are the commands' settings (histoflow.entrypoints), all taken as strings and converted and
checked by the settings classes, so `histoflow train ...` and `mlflow run . -e <variant> ...` accept the
same values. A problem the user can fix ends the command with one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path
from typing import Any

from histoflow.errors import HistoflowError

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

HELP = {
    "train": "train and evaluate one model variant as an MLflow run",
    "tune": "Optuna study of the fusion head on cached backbone features, then the best parameters as a full run",
    "cv": "patient-level cross-validation of a variant: nested fold runs, mean/std/interval, out-of-fold predictions",
    "data": "discover and split a dataset and log its report and split table as a run (no training)",
    "main": "the whole study: data, variants, tune, register, promote, comparison",
    "download": "download, verify and extract a public dataset",
    "compare": "summary table of an experiment's training runs",
    "register": "register the best run's serving model as @challenger",
    "promote": "move @champion to @challenger if it passes the gate of the promotion policy",
    "rollback": "move @champion back to @previous",
    "predict": "score a folder of images with a registered model",
    "app": "the pathologist's web page: upload images, see calls, flags and Grad-CAM, download CSV",
    "mlproject": "write the MLproject file from the settings classes (or --check that it is current)",
}


def _run(command: str, variant: str, params: dict[str, Any]) -> Any:
    from histoflow import entrypoints
    from histoflow.config import from_params

    if command == "train":
        from histoflow.modeling import training_run
        from histoflow.modeling.variants import make_train_config
        return training_run.run(make_train_config(variant, **params))
    if command == "tune":
        from histoflow.tuning import study
        return study.run(study.make_tune_config(variant, **params))
    if command == "cv":
        from histoflow.modeling.cross_validation import make_cv_config
        return entrypoints.run_cv(make_cv_config(variant, **params))
    cls, run = entrypoints.COMMANDS[command]
    return run(from_params(cls, params))


def _parser() -> argparse.ArgumentParser:
    from histoflow.entrypoints import cli_parameters
    from histoflow.modeling.variants import BACKBONE_VARIANTS, VARIANTS

    parser = argparse.ArgumentParser(prog="histoflow", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for command, text in HELP.items():
        p = sub.add_parser(command, help=text, description=text)
        if command == "mlproject":
            p.add_argument("--output", default="MLproject", help="where to write it (default: ./MLproject)")
            p.add_argument("--check", action="store_true", help="exit 1 when the file differs, write nothing")
            continue
        if command == "train":
            p.add_argument("--variant", choices=VARIANTS, required=True)
        elif command == "tune":
            # Not argparse choices: make_tune_config explains why only these can be tuned.
            p.add_argument("--variant", default="transfer",
                           help=f"{' or '.join(BACKBONE_VARIANTS)} (default: transfer)")
        elif command == "cv":
            p.add_argument("--variant", choices=VARIANTS, default="densenet")
        for param in cli_parameters(command):
            default = "required" if param.default is dataclasses.MISSING else f"{param.default!r}"
            p.add_argument(f"--{param.name}", default=None,
                           help=f"default: {default}" + (" or the variant's" if p.get_default("variant") or
                                                         command == "train" else ""))
    return parser


def _mlproject(output: str, check: bool) -> int:
    from histoflow.entrypoints import render_mlproject

    text, path = render_mlproject(), Path(output)
    if check:
        current = path.read_text() if path.is_file() else ""
        print(f"{path} is {'up to date' if current == text else 'out of date: run histoflow mlproject'}")
        return 0 if current == text else 1
    path.write_text(text)
    print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = vars(_parser().parse_args(argv))
    command = args.pop("command")
    try:
        if command == "mlproject":
            return _mlproject(args["output"], args["check"])
        variant = args.pop("variant", "")
        _run(command, variant, {k: v for k, v in args.items() if v is not None})
    except HistoflowError as exc:
        print(f"histoflow: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
