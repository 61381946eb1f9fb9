"""Provenance logging under concurrency: processes that start together (tuning workers, a team's
runs) log the same dataset into one PostgreSQL MLflow store at the same moment."""

from __future__ import annotations

import os
import threading
import time

import mlflow
from mlflow.tracking import MlflowClient
from mlflow.tracking._tracking_service.client import TrackingServiceClient

from conftest import BREAKHIS, postgres_database
from histoflow import tracking
from histoflow.data.settings import DataConfig
from histoflow.data.step import SPLIT_TABLE, TABLE_COLUMNS, prepare_data

WRITERS = 6


def test_the_same_dataset_logged_by_simultaneous_runs_is_linked_to_every_run(postgres_url, monkeypatch):
    """...and the experiment they all find untagged is marked as model training once, none of them refused."""
    url = postgres_database(postgres_url, "race")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    mlflow.set_tracking_uri(url)
    client = MlflowClient(url)
    experiment = client.create_experiment("race")
    prepared = prepare_data(DataConfig(data_dir=str(BREAKHIS), max_images=40))
    dataset, table = prepared.dataset, prepared.frame[TABLE_COLUMNS]
    runs = [client.create_run(experiment).info.run_id for _ in range(WRITERS)]
    start, errors = threading.Barrier(WRITERS), []

    def write(run_id: str) -> None:
        try:
            with mlflow.start_run(run_id=run_id):
                start.wait()  # every writer reaches MLflow's look-up-then-insert at the same time
                tracking.mark_model_training_experiment()
                tracking.log_dataset(dataset.name, dataset.digest, str(dataset.root), table, SPLIT_TABLE)
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(run_id,)) for run_id in runs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    assert client.get_experiment(experiment).tags[tracking.EXPERIMENT_KIND_TAG] == tracking.MODEL_TRAINING_KIND
    for run_id in runs:
        inputs = client.get_run(run_id).inputs.dataset_inputs
        assert sorted(i.dataset.name for i in inputs) == [f"{dataset.name}:{c}" for c in ("test", "train", "val")]
        assert {i.dataset.digest for i in inputs} == {f"{dataset.digest}-{c}"[:36] for c in ("train", "val", "test")}


def test_ui_link_opens_the_model_training_view(tracking_uri):
    """A local store: the command to start the UI and the page; a server: the address itself (a browser opens
    it in tests/test_app.py)."""
    local = tracking.ui_link("3", "abc")
    assert local == (f"`mlflow ui --backend-store-uri {tracking_uri}`, then "
                     "http://127.0.0.1:5000/#/experiments/3/runs/abc?workflowType=machine_learning")
    mlflow.set_tracking_uri("http://mlflow.example.org:5000/")
    try:
        assert tracking.ui_link("3", "abc") == \
            "http://mlflow.example.org:5000/#/experiments/3/runs/abc?workflowType=machine_learning"
    finally:
        mlflow.set_tracking_uri(tracking_uri)


def test_an_experiment_another_process_created_first_is_still_the_one_runs_go_to(tracking_uri, monkeypatch):
    """Workers started together race to create their experiment. The loser's lookup found nothing, its create is
    refused (RESOURCE_ALREADY_EXISTS): MLflow 3.17's set_experiment then returns the experiment without making it
    active, and the worker's study and final run went to the Default experiment."""
    created = MlflowClient().create_experiment("raced")  # by the other worker, just after this one looked
    lookup, looked = TrackingServiceClient.get_experiment_by_name, []

    def before_it_existed(self, name):
        if not looked:
            looked.append(name)
            return None
        return lookup(self, name)

    mlflow.set_experiment(experiment_id="0")  # as a fresh process starts: runs go to Default
    monkeypatch.setattr(TrackingServiceClient, "get_experiment_by_name", before_it_existed)
    tracking.configure("raced")
    with mlflow.start_run() as run:
        pass
    assert looked == ["raced"] and run.info.experiment_id == created


def test_a_flush_of_asynchronous_metrics_does_not_wait_for_mlflows_queue_poll(tracking_uri, monkeypatch):
    """Training runs log their epochs asynchronously and flush at the end of fit and of the run: MLflow's logging
    thread, left to poll its queue each second, keeps every flush waiting for the poll (~1 s, twice a run)."""
    monkeypatch.delenv(tracking.ASYNC_BUFFER_ENV, raising=False)
    tracking.configure("flush")
    assert os.environ[tracking.ASYNC_BUFFER_ENV] == tracking.ASYNC_BUFFER_S
    with mlflow.start_run() as run:
        for epoch in range(3):
            mlflow.log_metrics({"train_loss": 1.0 / (epoch + 1)}, step=epoch, synchronous=False)
        started = time.perf_counter()
        mlflow.flush_async_logging()
        flushed = time.perf_counter() - started
    assert flushed < 0.5, flushed
    assert [m.step for m in MlflowClient().get_metric_history(run.info.run_id, "train_loss")] == [0, 1, 2]
    monkeypatch.setenv(tracking.ASYNC_BUFFER_ENV, "5")
    tracking.configure()
    assert os.environ[tracking.ASYNC_BUFFER_ENV] == "5"  # a user's own setting is kept
