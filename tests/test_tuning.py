"""The `tune` study on ~120 real IDC patches at 32 px: nested trial runs, pruning, resume, the feature
cache; bad parameters fail with a message. A study's final training run (once, and not again when the study is
run again): main's tune step in tests/test_project.py, and one run for several workers (processes, one killed
mid-trial) in tests/test_team_server.py."""

from __future__ import annotations

import gc
from pathlib import Path

import mlflow
import numpy as np
import optuna
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from conftest import IDC, REPO
from histoflow.data.pipeline import make_dataset
from histoflow.data.step import prepare_data
from histoflow.errors import ConfigError
from histoflow.modeling.architectures import build_fusion, compile_model
from histoflow.modeling.features import head_dataset, head_model, load_or_extract
from histoflow.modeling.fitting import set_seeds
from histoflow.modeling.training_run import stain_normalizer
from histoflow.modeling.variants import make_train_config
from histoflow.tuning import study as tuning
from histoflow.tuning import workers
from histoflow.tuning.head_trainer import HeadTrainer
from histoflow.tuning.search_space import load_search_space
from histoflow.tuning.settings import make_tune_config

STUDY = "tune-test"
DATA = {"data_dir": str(IDC), "max_images": 120, "image_size": 32, "batch_size": 16, "backbone": "mobilenet",
        "alpha": 0.75, "weights": "imagenet", "epochs": 1, "gradcam_per_class": 0}
GOOD = {"dropout": 0.2, "fusion_width": 64}  # one width: every trial starts from the same initial head
# Enqueued (Optuna's way to fix a trial's parameters): with the same start, a learning rate of 1e-6
# leaves the head where it began while the others improve, so the median pruner, active once 5 trials
# are complete, stops it.
FIRST = [{"learning_rate": lr, **GOOD} for lr in (1e-2, 5e-3, 3e-3, 2e-3)]
RESUMED = [{"learning_rate": 1e-3, **GOOD}, {"learning_rate": 1e-6, **GOOD}]


def _config(tmp_path, n_trials: int, **settings):
    return make_tune_config("transfer", **{**DATA, "n_trials": n_trials, "trial_epochs": 3, "study_name": STUDY,
                                           "storage": f"sqlite:///{tmp_path / 'optuna.db'}",
                                           "cache_dir": str(tmp_path / "cache"), **settings})


def _tune(tmp_path, n_trials: int, **settings) -> tuning.TuneResult:
    return tuning.run(_config(tmp_path, n_trials, **settings))


def _enqueue(tmp_path, trials: list[dict]) -> None:
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'optuna.db'}", study_name=STUDY,
                                direction="maximize", load_if_exists=True)
    for params in trials:
        study.enqueue_trial(params)


def _children(parent_id: str) -> list:
    return mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")


@pytest.mark.slow
def test_study_runs_nested_trials_prunes_resumes_and_caches(tracking_uri, keras_home, tmp_path):
    client = MlflowClient()
    _enqueue(tmp_path, FIRST)
    first = _tune(tmp_path, n_trials=4, final="false")  # the final run: main's tune step (tests/test_project.py)
    assert first.new_trials == 4 and first.best_trial is not None and first.final_run_id is None

    trials = _children(first.parent_run_id)
    assert len(trials) == 4
    for run in trials:
        assert {"learning_rate", "dropout", "fusion_width"} <= set(run.data.params)
        assert run.data.tags["state"] == "complete" and run.data.tags["optuna.study_name"] == STUDY
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val_auc")] == [0, 1, 2]
        assert 0.0 <= run.data.metrics["final_val_auc"] <= 1.0

    parent = client.get_run(first.parent_run_id)
    assert parent.data.tags["feature_cache"] == "miss" and parent.data.tags["optuna.study_name"] == STUDY
    assert float(parent.data.params["best_learning_rate"]) == first.best_trial.params["learning_rate"]
    assert parent.data.metrics["best_val_auc"] == pytest.approx(first.best_trial.value)
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "optuna")}
    assert {"optuna/optimization_history.png", "optuna/param_importances.png"} <= plots

    [cache] = list((tmp_path / "cache").glob("*.npz"))
    mtime = cache.stat().st_mtime_ns

    # Same study name and storage: the study resumes (n_trials is its total) on the cached features.
    _enqueue(tmp_path, RESUMED)
    second = _tune(tmp_path, n_trials=6, final="false")
    assert second.new_trials == 2 and second.final_run_id is None
    study = optuna.load_study(study_name=STUDY, storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert len(study.trials) == 6
    assert client.get_run(second.parent_run_id).data.tags["feature_cache"] == "hit"
    assert list((tmp_path / "cache").glob("*.npz")) == [cache] and cache.stat().st_mtime_ns == mtime

    resumed = {r.data.tags["optuna.trial_number"]: r for r in _children(second.parent_run_id)}
    assert set(resumed) == {"4", "5"}
    pruned = resumed["5"]
    assert study.trials[5].state == optuna.trial.TrialState.PRUNED
    assert pruned.data.tags["state"] == "pruned" and pruned.info.status == "FINISHED"
    assert "final_val_auc" not in pruned.data.metrics
    assert len(client.get_metric_history(pruned.info.run_id, "val_auc")) < 3
    finals = mlflow.search_runs(search_all_experiments=True, output_format="list", filter_string=(
        f"tags.`optuna.study_name` = '{STUDY}' and tags.`histoflow.step` = 'train'"))
    assert finals == [] and "optuna.final_run_id" not in parent.data.tags  # final=false: the trials only


@pytest.mark.slow
def test_a_study_on_folds_scores_each_trial_on_the_folds_validation_patients_and_cross_validates_the_best(
        tracking_uri, keras_home, tmp_path):
    client = MlflowClient()
    config = _config(tmp_path, n_trials=2, folds=2, study_name="tune-folds", trial_epochs=2, augment="seed")
    parts = tuning.study_parts(config, prepare_data(config.train))
    result = tuning.run(config)
    assert result.new_trials == 2 and result.final_run_id is not None

    # Each trial: one head per fold, judged on that fold's inner validation patients; its value their mean.
    for run in _children(result.parent_run_id):
        history = client.get_metric_history(run.info.run_id, "fold_val_auc")
        assert [m.step for m in history] == [0, 1]
        assert run.data.metrics["final_val_auc"] == pytest.approx(np.mean([m.value for m in history]))
        assert [m.step for m in client.get_metric_history(run.info.run_id, "fold1_val_auc")] == [0, 1]
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1  # one extraction shared by the folds
    assert client.get_run(result.parent_run_id).data.params["folds"] == "2"

    # The best parameters cross-validated on the very folds: the patients a trial was judged on are each
    # fold's validation patients, never its held-out ones.
    final = client.get_run(result.final_run_id)
    assert final.data.tags["histoflow.step"] == "cv" and final.data.params["folds"] == "2"
    assert float(final.data.params["learning_rate"]) == result.best_trial.params["learning_rate"]
    assert "cv_test_roc_auc_mean" in final.data.metrics
    folds = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=final.info.run_id, artifact_path="cv/folds.csv"))
    for k, part in enumerate(parts):
        fold = folds[folds["fold"] == k].set_index("relpath")["split"]
        assert fold.loc[part.frame["relpath"]].tolist() == part.frame["split"].tolist()

    # ... and each fold's head starts where the best trial's started (the same draw, dropout seeds and batches;
    # with augment=seed the final run trains on the cached copies, as the trials do): its first epoch is the
    # trial's first epoch on that fold.
    for k, fold_run in enumerate(final.data.tags["cv.fold_run_ids"].split(",")):
        trial = client.get_metric_history(result.best_trial.user_attrs["mlflow_run_id"], f"fold{k}_val_loss")[0]
        assert client.get_metric_history(fold_run, "val_loss")[0].value == pytest.approx(trial.value, rel=1e-4)


@pytest.mark.parametrize("taps,numbers", [("all", (1, 2, 3)), ("last", (3,))])
def test_head_on_cached_vectors_is_the_full_models_head(keras_home, taps, numbers):
    config = make_train_config("transfer", **{**DATA, "max_images": 40, "fusion_taps": taps})
    prepared = prepare_data(config)
    frame = prepared.frame
    features = _features(config, prepared)
    assert len(features["train"]) == 3 * (frame["split"] == "train").sum()  # the seed copies of each image
    assert features["val"].numbers == numbers and len(features["val"].taps) == len(numbers)
    full = build_fusion("mobilenet", 32, "imagenet", fusion_width=24, dropout=0.3, alpha=0.75, unfrozen_blocks=0,
                        taps=taps)
    head = head_model([t.shape[1] for t in features["val"].taps], 24, 0.3, numbers=numbers)
    for layer in head.layers:  # the same layer names: weights move across by name
        if layer.weights:
            layer.set_weights(full.get_layer(layer.name).get_weights())
    val = frame[frame["split"] == "val"]
    images = np.concatenate([x for x, _ in make_dataset(val["path"], val["label"], 32, 16).as_numpy_iterator()])
    np.testing.assert_allclose(_predict(head, list(features["val"].taps)), _predict(full, images), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(features["val"].labels, val["label"].to_numpy())


def test_features_extract_under_python_s_own_garbage_collection(keras_home):
    """The extractor model lives through the extraction when the collector runs at Python's default threshold (a
    plain `python` process, not the `histoflow` command): the inference graph holds its model only weakly."""
    config = make_train_config("transfer", **{**DATA, "max_images": 40})
    prepared = prepare_data(config)
    threshold = gc.get_threshold()
    gc.set_threshold(700, *threshold[1:])
    try:
        features = _features(config, prepared)
    finally:
        gc.set_threshold(*threshold)
    assert len(features["val"]) == (prepared.frame["split"] == "val").sum()


def _features(config, prepared):
    """The split's features, extracted without a cache folder."""
    return load_or_extract(config, prepared, None, stain_normalizer(config, prepared)).splits


def _predict(model, inputs) -> np.ndarray:
    """The model called eagerly: a predict would trace it first, for the one batch it sees here."""
    return np.asarray(model(inputs, training=False))


def _fit_head(model, features, seed: int) -> dict[str, list[float]]:
    train, val = (head_dataset(features[s], 16, s == "train", seed) for s in ("train", "val"))
    return model.fit(train, validation_data=val, epochs=4, verbose=0).history


@pytest.mark.slow
def test_trials_share_one_traced_head_per_width_bucket_and_train_as_their_own_head(keras_home):
    config = make_train_config("transfer", **{**DATA, "max_images": 60})
    features = _features(config, prepare_data(config))
    widths = [t.shape[1] for t in features["train"].taps]

    def own_head(width: int, dropout: float, lr: float, optimizer: str, batchnorm: bool) -> tuple[dict, np.ndarray]:
        set_seeds(7)
        model = compile_model(head_model(widths, width, dropout, batchnorm=batchnorm), lr, optimizer)
        return _fit_head(model, features, 7), _predict(model, list(features["val"].taps))

    trainer = HeadTrainer(widths, max_width=256)
    assert [trainer.bucket(w) for w in (16, 17, 24, 32, 33, 200, 256)] == [16, 32, 32, 32, 64, 256, 256]
    references = {}  # the third trial is the first again (on the shared head, after another): one reference
    for trial in [(24, 0.4, 3e-3, "adam", True), (20, 0.0, 5e-3, "adam", True), (24, 0.4, 3e-3, "adam", True),
                  (28, 0.2, 3e-2, "sgd", False)]:
        width, dropout, lr, optimizer, batchnorm = trial
        if trial not in references:
            references[trial] = own_head(*trial)
        expected_history, expected = references[trial]
        model = trainer.start(width, dropout, lr, seed=7, optimizer=optimizer, batchnorm=batchnorm)
        history = _fit_head(model, features, 7)
        # The same up to float rounding: the wider matrix products sum in another order (oneDNN's kernels, on
        # CPUs where TensorFlow turns them on, round differently again: 1.3e-3 relative after 4 epochs measured in
        # the history, 1.9e-3 absolute in a probability near 0.08; a unit that leaked would move them by tenths).
        for key in ("loss", "val_loss", "val_auc"):
            np.testing.assert_allclose(history[key], expected_history[key], rtol=5e-3, atol=1e-4)
        np.testing.assert_allclose(_predict(model, list(features["val"].taps)), expected, rtol=5e-3, atol=5e-3)
        # The padded units never left zero, so they took no part.
        dense = model.get_layer("fusion1_dense")
        assert not np.any(dense.get_weights()[0][:, width:]) and not np.any(dense.get_weights()[1][width:])
        if batchnorm:
            assert not np.any(model.get_layer("fusion1_bn").get_weights()[0][width:])
        assert not np.any(model.get_layer("head_dense").get_weights()[0][32 + width:64])
    # Three adam trials, one compiled (and traced) head; the sgd head without BatchNorm is another step.
    assert list(trainer.models) == [(32, "adam", True), (32, "sgd", False)]
    with pytest.raises(ValueError, match="fusion_width must be in 1..256"):
        trainer.start(300, 0.1, 1e-3, seed=7)


def test_a_study_resumes_only_on_the_same_features_and_space(tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    config = make_tune_config("transfer", storage=storage, study_name="s")
    tuning.open_study(config, "d1", key="k1")
    assert tuning.open_study(config, "d1", key="k1").user_attrs["histoflow.features"] == "k1"
    with pytest.raises(ConfigError, match="features 'k1' \\(now 'k2'\\).*use another study_name"):
        tuning.open_study(config, "d1", key="k2")
    with pytest.raises(ConfigError, match="metric 'val_auc' \\(now 'val_accuracy'\\)"):
        tuning.open_study(make_tune_config("transfer", storage=storage, study_name="s",
                                                  metric="val_accuracy"), "d1", key="k1")
    with pytest.raises(ConfigError, match="needs the other direction"):
        tuning.open_study(make_tune_config("transfer", storage=storage, study_name="s", metric="val_loss"),
                          "d1", key="k1")
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(ConfigError, match="cannot open the Optuna storage sqlite:///"):
        tuning.open_study(make_tune_config("transfer", storage=f"sqlite:///{tmp_path}/a-file/o.db"), "d1", key="k1")
    # An edited search space: not the same study. The default name is another; an explicit one is refused.
    narrower = _space_file(tmp_path, "learning_rate: {low: 1.0e-4, high: 1.0e-2, log: true}\n")
    edited = make_tune_config("transfer", storage=storage, study_name="s", search_space=narrower)
    with pytest.raises(ConfigError, match="search_space '[0-9a-f]+' \\(now '[0-9a-f]+'\\)"):
        tuning.open_study(edited, "d1", key="k1")
    assert (tuning.default_study_name(edited.train, "k1", edited.space)
            != tuning.default_study_name(config.train, "k1", config.space))


@pytest.mark.parametrize("variant,overrides,message", [
    ("baseline", {}, "tune applies to the variants densenet, transfer"),
    ("transfer", {"n_trials": "0"}, "n_trials must be >= 1"),
    ("transfer", {"sampler": "grid"}, "sampler must be one of tpe, random"),
    ("transfer", {"pruner": "hyperband"}, "pruner must be one of median, none"),
    ("transfer", {"metric": "test_auc"}, "metric must be one of"),
    ("transfer", {"folds": "21"}, "folds must be 1 .one split. or in 2..20"),
    ("transfer", {"folds": "5", "split": "image"}, "tune with folds cross-validates by patient"),
    ("transfer", {"learning_rate": "1e-3"}, "learning_rate: searched by the study"),
    ("transfer", {"fusion_width": "32", "dropout": "0.1"}, "dropout, fusion_width: searched by the study"),
    ("transfer", {"search_space": "no/such/space.yaml"}, "search space file no/such/space.yaml not found"),
    ("densenet", {"backbone": "mobilenet"}, "densenet variant uses backbone densenet121"),
])
def test_bad_parameters_fail_with_a_message(variant, overrides, message):
    with pytest.raises(ConfigError, match=message):
        make_tune_config(variant, **overrides)


def test_cli_reports_a_bad_parameter(capsys):
    from histoflow.cli import main

    assert main(["tune", "--variant", "transfer", "--sampler", "grid"]) == 2
    err = capsys.readouterr().err
    assert "histoflow: error: sampler must be one of" in err and "Traceback" not in err


def _space_file(folder, text: str) -> str:
    path = folder / f"space-{abs(hash(text))}.yaml"
    path.write_text(text)
    return str(path)


def test_the_default_search_space_is_the_projects_file():
    space = load_search_space()
    assert space.source == str(REPO / "tuning" / "search_space.yaml")
    assert set(space.searched) == {"learning_rate", "dropout", "fusion_width"}
    assert space.fixed == {"optimizer": "adam", "batch_size": 64, "head_batchnorm": True, "unfrozen_blocks": 0}
    assert space.searched["learning_rate"].log and space.searched["fusion_width"].high == 256


def test_the_default_study_database_is_in_the_cache_root_not_the_working_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HISTOFLOW_CACHE", str(tmp_path / "cache"))
    for given in ({}, {"storage": ""}, {"storage": "  "}):
        assert make_tune_config("transfer", **given).storage == f"sqlite:///{tmp_path / 'cache' / 'optuna.db'}"
    assert make_tune_config("transfer", storage="sqlite:///elsewhere.db").storage == "sqlite:///elsewhere.db"
    # Its folder is made when the study opens it (SQLite makes the file only).
    study = optuna.create_study(storage=workers.storage(make_tune_config("transfer").storage, 1, 0, 0))
    assert study.trials == [] and (tmp_path / "cache" / "optuna.db").is_file()


@pytest.mark.parametrize("text,message", [
    ("colour: {choices: [red]}\n", "'colour' is not a setting tune can vary"),
    ("unfrozen_blocks: {low: 0, high: 3}\n", "unfrozen_blocks shapes the final run only"),
    ("dropout: {low: 0.0, high: 1.5}\n", "dropout can take 1.5: dropout must be in"),
    ("optimizer: {choices: []}\n", "choices must be a non-empty list"),
    ("optimizer: {choices: [adam, lbfgs]}\n", "optimizer can take 'lbfgs'"),
    ("fusion_width: {low: 64, high: 16}\n", "fusion_width"),
    ("head_batchnorm: {low: 0, high: 1}\n", "head_batchnorm is not a number"),
    ("learning_rate: {low: 0.0, high: 0.1, log: true}\n", "learning_rate"),
    ("learning_rate: [0.1\n", "is not valid YAML"),
    ("fusion_width: {low: 16, high: 512}\n", "fusion_width can be at most 256"),
])
def test_a_bad_search_space_file_is_refused_naming_the_file(tmp_path, text, message):
    path = _space_file(tmp_path, text)
    with pytest.raises(ConfigError, match=message):
        make_tune_config("transfer", search_space=path)


@pytest.mark.slow
def test_the_search_space_file_decides_what_the_trials_vary(tracking_uri, keras_home, tmp_path):
    """Edit the file, and the study searches what it says: fixed settings reach every trial and the final
    run's settings (a final run trains with its settings: the study test above), choices are the only values
    trials take."""
    path = _space_file(tmp_path, "learning_rate: {low: 1.0e-3, high: 1.0e-2, log: true}\n"
                                 "dropout: 0.3\n"
                                 "fusion_width: {choices: [16, 48]}\n"
                                 "optimizer: {choices: [adam, sgd]}\n"
                                 "batch_size: {choices: [16, 32]}\n"
                                 "head_batchnorm: false\n"
                                 "unfrozen_blocks: 1\n")
    settings = {"search_space": path, "sampler": "random", "pruner": "none", "study_name": "edited",
                "batch_size": None, "final": "false"}  # batch_size: searched here
    result = _tune(tmp_path, n_trials=3, **settings)
    client = MlflowClient()
    trials = _children(result.parent_run_id)
    assert len(trials) == 3
    for run in trials:
        params = run.data.params
        assert set(params) == {"learning_rate", "fusion_width", "optimizer", "batch_size", "trial_epochs"}
        assert params["fusion_width"] in ("16", "48") and params["optimizer"] in ("adam", "sgd")
        assert params["batch_size"] in ("16", "32") and 1e-3 <= float(params["learning_rate"]) <= 1e-2
    parent = client.get_run(result.parent_run_id)
    assert parent.data.params["dropout"] == "0.3" and parent.data.params["head_batchnorm"] == "False"
    assert parent.data.tags["optuna.searched"] == "batch_size,fusion_width,learning_rate,optimizer"
    logged = mlflow.artifacts.load_text(f"runs:/{result.parent_run_id}/optuna/search_space.yaml")
    assert logged == Path(path).read_text()
    assert result.final_run_id is None
    final = tuning.final_config(_config(tmp_path, 3, **settings), result.best_trial, result.study_name, "x")
    assert (final.dropout, final.head_batchnorm, final.unfrozen_blocks) == (0.3, False, 1)
    assert final.optimizer == result.best_trial.params["optimizer"]
    assert final.batch_size == result.best_trial.params["batch_size"]
    assert final.learning_rate == result.best_trial.params["learning_rate"]


def test_a_grace_period_must_outlast_the_heartbeat_interval():
    with pytest.raises(ConfigError, match="grace_period must be longer than heartbeat_interval"):
        make_tune_config("transfer", heartbeat_interval=10, grace_period=10)
    with pytest.raises(ConfigError, match="heartbeat_interval must be >= 0"):
        make_tune_config("transfer", heartbeat_interval=-1)
    assert make_tune_config("transfer", heartbeat_interval=0).heartbeat_interval == 0  # 0 = off
