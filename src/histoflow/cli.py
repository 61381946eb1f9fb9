"""Command line: `histoflow <command>`, one per MLproject entry point (train serves the four variants).

Options are the commands' settings (histoflow.entrypoints), all taken as strings and converted and
checked by the settings classes, so `histoflow train ...` and `mlflow run . -e <variant> ...` accept the
same values. A problem the user can fix ends the command with one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from histoflow.errors import HistoflowError

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Keras and TensorFlow build a model's graph out of millions of short-lived Python objects: at Python's default
# (a young-generation collection every 700 allocations) the collector runs thousands of times in a short training
# run. One every 50,000: 6-7 % less CPU for such a run, resident memory unchanged (bench/gc_threshold.py,
# docs/benchmarks.md).
GC_THRESHOLD = 50_000


def collect_garbage_less() -> None:
    """The young generation collected every GC_THRESHOLD allocations (the older generations' thresholds kept)."""
    gc.set_threshold(GC_THRESHOLD, *gc.get_threshold()[1:])

# What TensorFlow's C++ runtime writes to the process's stderr while it loads, before its logging is set up, so
# that no log level silences it: absl's notice, then "oneDNN custom operations are on" on CPUs with AVX-512
# VNNI/BF16 (TensorFlow turns oneDNN on there; 1.4x faster DenseNet121 inference measured on such a machine).
TENSORFLOW_STARTUP_NOISE = ("All log messages before absl::InitializeLog()", "oneDNN custom operations are on",
                            "cpu_feature_guard")
# Commands that never load TensorFlow themselves (main runs the steps as processes of their own).
# predict-slide: the served model imports what its runtime needs (ONNX Runtime: no TensorFlow).
WITHOUT_TENSORFLOW = {"data", "download", "compare", "register", "rollback", "main", "predict-slide"}


def load_tensorflow_quietly() -> None:
    """TensorFlow and Keras imported with the process's stderr (file descriptor 2, where the C++ runtime writes)
    captured, then written back without TENSORFLOW_STARTUP_NOISE's lines: a command prints its own lines only."""
    if "tensorflow" in sys.modules:
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import keras  # noqa: F401
            import tensorflow  # noqa: F401
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            lines = captured.read().decode(errors="replace").splitlines(keepends=True)
            sys.stderr.write("".join(line for line in lines if not any(n in line for n in TENSORFLOW_STARTUP_NOISE)))


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
    "predict-slide": "score whole-slide images tile by tile: per-tile table, heatmap, GeoJSON, slide summary",
    "app": "the pathologist's web page: upload images, see calls, flags and Grad-CAM, download CSV",
    "mlproject": "write the MLproject file from the settings classes (or --check that it is current)",
}


def _run(command: str, variant: str, params: dict[str, Any]) -> Any:
    from histoflow import entrypoints
    from histoflow.config import from_params

    # The settings are checked before the module that runs the command (and TensorFlow with it) is loaded.
    if command in ("train", "cv"):
        from histoflow.modeling.variants import make_cv_config, make_train_config

        make = make_train_config if command == "train" else make_cv_config
        config = make(variant, **params)
        target = "histoflow.modeling.training_run:run" if command == "train" else "histoflow.entrypoints:run_cv"
    elif command == "tune":
        from histoflow.tuning.settings import make_tune_config

        config, target = make_tune_config(variant, **params), "histoflow.tuning.study:run"
    else:
        cls, target = entrypoints.COMMANDS[command]
        config = from_params(cls, params)
    if command not in WITHOUT_TENSORFLOW:
        load_tensorflow_quietly()
    return entrypoints.runner(target)(config)


def _parser() -> argparse.ArgumentParser:
    from histoflow.entrypoints import cli_parameters
    from histoflow.modeling.variants import BACKBONE_VARIANTS, VARIANT_DEFAULTS, VARIANTS

    # The settings whose default some variant sets otherwise.
    variant_specific = {name for defaults in VARIANT_DEFAULTS.values() for name in defaults}

    parser = argparse.ArgumentParser(prog="histoflow", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for command, text in HELP.items():
        p = sub.add_parser(command, help=text, description=text)
        if command == "mlproject":
            p.add_argument("--output", default="MLproject", help="where to write it (default: ./MLproject)")
            p.add_argument("--check", action="store_true", help="exit 1 when the file differs, write nothing")
            continue
        if command == "train":
            p.add_argument("--variant", choices=VARIANTS, required=True, help="the model variant")
        elif command == "tune":
            # Not argparse choices: make_tune_config explains why only these can be tuned.
            p.add_argument("--variant", default="transfer",
                           help=f"the variant whose fusion head is tuned: {' or '.join(BACKBONE_VARIANTS)} "
                                "(default: transfer)")
        elif command == "cv":
            p.add_argument("--variant", choices=VARIANTS, default="densenet",
                           help="the model variant to cross-validate (default: densenet)")
        for param in cli_parameters(command):
            if param.default is dataclasses.MISSING:
                default = " (required)"
            elif param.optional:  # derived when not given: the help says how
                default = ""
            else:
                variant = " or the variant's" if param.name in variant_specific else ""
                default = f" (default: {param.default!r}{variant})"
            text = f"{param.help}{default}"
            p.add_argument(f"--{param.name}", default=None, metavar=param.kind.__name__.upper(),
                           help=text.replace("%", "%%"))  # argparse formats help with %
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


def run() -> None:
    """The `histoflow` command: main(), then the process ends without tearing the interpreter down.

    Python's shutdown destroys every module and object one by one: 2 s after importing TensorFlow, 3-4 s
    after a training run, for a command whose work is done. The exit handler below is registered before
    MLflow, TensorFlow and any temporary folder register theirs, so it runs after them (exit handlers run
    last-registered first, after non-daemon threads are joined): the run is ended and MLflow's asynchronous
    logging flushed as usual; then the logs and standard streams are flushed and the process exits with
    main's status."""
    import atexit

    collect_garbage_less()
    status = {"code": 1}  # an uncaught exception (its traceback is printed before the exit handlers run)

    def finish() -> None:
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing more can be said
                stream.flush()
        os._exit(status["code"])

    atexit.register(finish)
    try:
        status["code"] = main()
    except SystemExit as exc:  # argparse's usage errors (2) and --help (0)
        status["code"] = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        raise
    except KeyboardInterrupt:
        status["code"] = 130  # as a shell reports Ctrl-C
        raise
    sys.exit(status["code"])


if __name__ == "__main__":
    run()
