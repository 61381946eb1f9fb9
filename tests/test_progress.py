import logging
import time

from conftest import IDC
from histoflow.data.discovery import discover
from histoflow.progress import progress


def _lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "histoflow.progress"]


def test_logs_get_a_line_every_tenth_and_the_end(caplog):
    caplog.set_level(logging.INFO, logger="histoflow.progress")
    assert list(progress(range(1234), desc="work")) == list(range(1234))
    lines = _lines(caplog)
    assert 10 <= len(lines) <= 13  # the start, every ~10 %, the end
    assert lines[0].startswith("work:   0%") and lines[-1].startswith("work: 100% (1234/1234)")
    caplog.clear()
    assert list(progress(range(18), desc="few")) == list(range(18))
    assert 10 <= len(_lines(caplog)) <= 12  # not a line per item (each is 5.6 %)


def test_discovery_reports_its_checking_of_the_images(caplog):
    caplog.set_level(logging.INFO, logger="histoflow.progress")
    dataset = discover(IDC / "10253")
    lines = _lines(caplog)
    assert lines and lines[-1].startswith(f"checking {len(dataset.frame)} images: 100%")


def test_slow_items_do_not_turn_the_log_into_a_line_per_item(caplog):
    """More than 10 s between two lines (one slow item, a long epoch): still a line every ~10 %. tqdm's monitor
    thread would switch to a line per item from then on (568 lines for 40,000 images)."""
    import tqdm

    caplog.set_level(logging.INFO, logger="histoflow.progress")
    if tqdm.tqdm.monitor is not None:  # a monitor of another bar, checking every 10 s: this one checks often
        tqdm.tqdm.monitor.exit()
        tqdm.tqdm.monitor = None
    interval, tqdm.tqdm.monitor_interval = tqdm.tqdm.monitor_interval, 0.2
    try:
        for item in progress(range(60), desc="slow"):
            if item == 3:
                time.sleep(10.6)
    finally:
        tqdm.tqdm.monitor_interval = interval
    assert len(_lines(caplog)) <= 13


def test_an_epoch_in_a_log_shows_its_start_and_every_tenth_of_its_batches(capsys):
    """Keras's verbose=2 prints one line when an epoch ends (and no "Epoch 1/1" header for a single epoch): a
    20-minute epoch would print nothing for 20 minutes."""
    import keras
    import numpy as np

    from histoflow.modeling.fitting import EpochProgress

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, activation="softmax")])
    model.compile("sgd", "categorical_crossentropy")
    x = np.random.default_rng(0).random((400, 4), dtype=np.float32)
    model.fit(x, keras.utils.to_categorical(x[:, 0] > 0.5, 2), batch_size=4, epochs=1, verbose=0,
              callbacks=[EpochProgress()])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert lines[0] == "Epoch 1/1"
    batches = [line for line in lines if line.startswith("epoch 1/1:")]
    assert 9 <= len(batches) <= 11 and batches[0].startswith("epoch 1/1:  10% (10/100)")
