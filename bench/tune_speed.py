"""Tuning speed: Optuna trials per hour on cached backbone features vs naive full training per trial.

Both modes run the same study in the same process, one after the other, each for the same wall-clock
budget: the same search space (learning rate, dropout, fusion width), TPE sampler with the same seed,
median pruner on the per-epoch validation AUC, the same trial length, early stopping and value (the
validation AUC of the epoch early stopping keeps), each trial a nested MLflow run.

  cached  histoflow's `tune`: the frozen backbone's pooled tap features are extracted once (included
          in the budget: a cold cache) and each trial trains only the fusion head on them, on a
          head compiled once per width bucket (histoflow.tuning.head_trainer.HeadTrainer);
  naive   each trial builds the full model (the same frozen backbone and head) and trains it on the
          images, so the backbone's forward pass is recomputed for every image of every epoch.

Reported: trials finished (complete or pruned) and trials per hour, the best validation AUC each
reached within the budget, and the ratios. Target (issue 4): at least 20x the trials per hour at an
equal or better best value. Augmentation is off in both modes (`augment=none`) so the two see
identical images.

    python bench/tune_speed.py --data_dir ../shared/data/idc --max_images 2000 --image_size 128 --budget 300
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import mlflow  # noqa: E402
import optuna  # noqa: E402
from optuna.trial import TrialState  # noqa: E402
from optuna_integration import KerasPruningCallback  # noqa: E402

from histoflow.data.step import prepare_data  # noqa: E402
from histoflow.modeling import training_run  # noqa: E402
from histoflow.modeling.fitting import EpochMetrics, fit, set_seeds  # noqa: E402
from histoflow.tuning import study as tuning  # noqa: E402
from histoflow.tuning.settings import TuneConfig, make_tune_config  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_store import absolute, temporary_store  # noqa: E402

METRIC = "val_auc"


def study(seed: int) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed),
                               pruner=optuna.pruners.MedianPruner())


def naive_objective(config: TuneConfig, datasets):
    train_ds, val_ds, _ = datasets
    t = config.train

    def run_trial(trial: optuna.Trial) -> float:
        params = config.space.suggest(trial)
        keras.backend.clear_session()
        set_seeds(t.seed)
        model = training_run.build(replace(t, unfrozen_blocks=0, **params))
        epoch_metrics = EpochMetrics(batched=True)  # logged as the cached trials log theirs
        with mlflow.start_run(run_name=f"naive-{trial.number}", nested=True):
            mlflow.log_params(params)
            try:
                result = fit(model, train_ds, val_ds, epochs=config.trial_epochs,
                             extra_callbacks=[epoch_metrics, KerasPruningCallback(trial, METRIC)], class_weight=None,
                             patience=t.patience, lr_patience=t.lr_patience)
            finally:
                epoch_metrics.flush()
        return result.history[METRIC][result.best_epoch - 1]
    return run_trial


def summarise(name: str, s: optuna.Study, seconds: float, setup: float) -> dict:
    done = [t for t in s.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    complete = [t for t in s.trials if t.state == TrialState.COMPLETE]
    best = max(complete, key=lambda t: t.value) if complete else None
    to_best = (best.datetime_complete - s.trials[0].datetime_start).total_seconds() + setup if best else float("nan")
    return {"mode": name, "setup_s": setup, "seconds": seconds, "trials": len(done), "complete": len(complete),
            "pruned": len(done) - len(complete), "trials_per_hour": len(done) / seconds * 3600,
            "best": best.value if best else float("nan"), "best_trial": best.number if best else -1,
            "seconds_to_best": to_best}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default="../shared/data/idc")
    parser.add_argument("--max_images", type=int, default=2000)
    parser.add_argument("--image_size", type=int, default=50)
    parser.add_argument("--backbone", default="mobilenet")
    parser.add_argument("--alpha", type=float, default=0.75)
    parser.add_argument("--weights", default="imagenet")
    parser.add_argument("--trial_epochs", type=int, default=10)
    parser.add_argument("--budget", type=float, default=300, help="wall-clock seconds per mode")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()

    data_dir, weights = absolute(args.data_dir), absolute(args.weights)
    tmp = temporary_store("tune-speed-")
    mlflow.set_experiment("tune-speed")
    config = make_tune_config(
        "transfer", data_dir=data_dir, max_images=args.max_images, image_size=args.image_size,
        backbone=args.backbone, alpha=args.alpha, weights=weights, augment="none", seed=args.seed,
        trial_epochs=args.trial_epochs, cache_dir=f"{tmp}/cache")
    prepared = prepare_data(config.train)
    dataset, frame = prepared.dataset, prepared.frame
    counts = frame["split"].value_counts()
    print(f"{dataset.name}: {len(frame)} images (train {counts['train']}, val {counts['val']}), "
          f"{args.image_size} px, {args.backbone}, {args.trial_epochs} epochs per trial, "
          f"budget {args.budget:.0f} s per mode")

    rows = []
    with mlflow.start_run(run_name="cached"):
        start = time.monotonic()
        features = tuning.study_features(config, tuning.study_parts(config, prepared))  # [prepared]: folds=1
        setup = time.monotonic() - start
        cached = study(args.seed)
        cached.optimize(tuning.objective(config, features, "bench-cached"), timeout=max(1.0, args.budget - setup))
        rows.append(summarise("cached features", cached, time.monotonic() - start, setup))
    with mlflow.start_run(run_name="naive"):
        start = time.monotonic()
        datasets = training_run.datasets(config.train, prepared)
        setup = time.monotonic() - start
        naive = study(args.seed)
        naive.optimize(naive_objective(config, datasets), timeout=max(1.0, args.budget - setup))
        rows.append(summarise("naive full training", naive, time.monotonic() - start, setup))

    print("\n| mode | setup s | wall s | trials (complete / pruned) | trials per hour | best val AUC | "
          "trial of best | s to best |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['mode']} | {r['setup_s']:.1f} | {r['seconds']:.0f} | {r['trials']} ({r['complete']} / "
              f"{r['pruned']}) | {r['trials_per_hour']:.0f} | {r['best']:.4f} | {r['best_trial']} | "
              f"{r['seconds_to_best']:.0f} |")
    c, n = rows
    print(f"\ncached / naive: {c['trials_per_hour'] / max(n['trials_per_hour'], 1e-9):.1f}x the trials per hour; "
          f"best val AUC {c['best']:.4f} vs {n['best']:.4f} ({c['best'] - n['best']:+.4f})")


if __name__ == "__main__":
    main()
