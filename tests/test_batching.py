"""Cross-request micro-batching (histoflow.serving.batching): concurrent requests share forward passes and each
gets exactly its own rows; a lone request does not wait; a failed or late batch fails only its own requests.
The served model's batching through real threads and the real network: tests/test_serving.py."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from histoflow.serving.batching import BatchingSettings, MicroBatcher


def _forward(calls: list):
    """A forward pass that records its batches: per image its sum and its key's length (two outputs)."""
    def forward(key, images):
        calls.append((key, len(images)))
        time.sleep(0.01)  # a pass takes time, so that requests arriving meanwhile queue up
        sums = images.reshape(len(images), -1).sum(axis=1)
        return [sums, np.full((len(images), 2), len(str(key)))]
    return forward


def _concurrently(batcher: MicroBatcher, requests: list[tuple], expect: bool = True) -> list:
    """Each (key, images) submitted from its own thread, all released at once; their outputs (or errors)."""
    results: list = [None] * len(requests)
    start = threading.Barrier(len(requests))

    def client(i: int, key, images) -> None:
        with batcher.expecting() as coming:
            start.wait()
            time.sleep(0.001 * (i % 3))  # preparation takes a little, and not the same for all
            try:
                results[i] = batcher.submit(key, images, coming if expect else None)
            except Exception as exc:  # noqa: BLE001 - the test looks at what each request got
                results[i] = exc

    threads = [threading.Thread(target=client, args=(i, *r)) for i, r in enumerate(requests)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results


def test_concurrent_requests_share_passes_and_each_gets_its_own_rows():
    calls: list = []
    batcher = MicroBatcher(_forward(calls), BatchingSettings(max_batch=64, max_wait_ms=200))
    rng = np.random.default_rng(0)
    requests = [("none", rng.random((1 + i % 4, 3, 3, 3)).astype(np.float32)) for i in range(12)]
    results = _concurrently(batcher, requests)
    for (_, images), (sums, keys) in zip(requests, results, strict=True):
        np.testing.assert_allclose(sums, images.reshape(len(images), -1).sum(axis=1), rtol=1e-6)
        assert keys.shape == (len(images), 2)
    assert batcher.images == sum(len(images) for _, images in requests)
    assert batcher.passes < len(requests) and batcher.largest > 4  # gathered, not one pass per request


def test_batches_never_mix_keys_nor_exceed_the_maximum():
    calls: list = []
    batcher = MicroBatcher(_forward(calls), BatchingSettings(max_batch=5, max_wait_ms=100))
    requests = [("none" if i % 2 else "dihedral8", np.ones((2, 2, 2, 3), np.float32) * i) for i in range(10)]
    results = _concurrently(batcher, requests)
    for (key, images), (sums, keys) in zip(requests, results, strict=True):
        assert sums.tolist() == [images[0].sum()] * 2 and (keys == len(key)).all()
    assert all(size <= 5 for _, size in calls) and sum(size for _, size in calls) == 20
    # A request as large as the maximum runs at once, alone.
    assert batcher.submit("none", np.ones((5, 1, 1, 3)))[0].tolist() == [3.0] * 5


def test_a_lone_request_does_not_wait_for_company_nor_change_threads():
    threads = []

    def forward(key, images):
        threads.append(threading.current_thread())
        return [images.sum(axis=(1, 2, 3))]

    batcher = MicroBatcher(forward, BatchingSettings(max_batch=64, max_wait_ms=500))
    images = np.ones((1, 2, 2, 3), np.float32)
    batcher.submit("none", images)
    with batcher.expecting() as coming:
        start = time.perf_counter()
        batcher.submit("none", images, coming)
    assert time.perf_counter() - start < 0.1  # not the 500 ms allowed for gathering
    # Nothing to gather it with: its pass runs in its own thread, no hand-over to the batcher's.
    assert threads == [threading.current_thread()] * 2 and batcher.passes == 2


def test_a_failed_pass_fails_its_own_requests_and_the_batcher_goes_on():
    def forward(key, images):
        if np.isnan(images).any():
            raise FloatingPointError("a NaN reached the network")
        time.sleep(0.01)
        return [images.reshape(len(images), -1).sum(axis=1)]

    batcher = MicroBatcher(forward, BatchingSettings(max_batch=64, max_wait_ms=50))
    requests = [("bad" if i == 0 else "good", np.full((1, 2, 2, 3), np.nan if i == 0 else i, np.float32))
                for i in range(6)]
    results = _concurrently(batcher, requests)
    assert isinstance(results[0], FloatingPointError)
    assert [r[0].tolist() for r in results[1:]] == [[12.0 * i] for i in range(1, 6)]
    assert batcher.submit("bad", np.ones((1, 1, 1, 3)))[0].tolist() == [3.0]


def test_a_request_that_waits_too_long_gets_an_error_and_does_not_block_the_others():
    release = threading.Event()

    def slow(key, images):
        if key == "stuck":
            release.wait(5)
        return [images.reshape(len(images), -1).sum(axis=1)]

    batcher = MicroBatcher(slow, BatchingSettings(max_batch=64, max_wait_ms=50, timeout_s=0.2))
    started = time.perf_counter()
    stuck = _concurrently(batcher, [("stuck", np.ones((1, 1, 1, 3)))] * 2)  # gathered into one pass that hangs
    assert all(isinstance(r, TimeoutError) and "no forward pass within 0.2 s" in str(r) for r in stuck), stuck
    assert time.perf_counter() - started < 2
    late: list = []

    def submit_late() -> None:
        try:
            late.append(batcher.submit("late", np.ones((1, 1, 1, 3))))
        except TimeoutError as exc:
            late.append(exc)

    queued = threading.Thread(target=submit_late)
    queued.start()
    queued.join(5)
    assert isinstance(late[0], TimeoutError)  # queued behind the stuck pass; abandoned, it is never run
    release.set()
    assert batcher.submit("after", np.ones((2, 1, 1, 3)))[0].tolist() == [3.0, 3.0]


def test_settings_come_from_the_model_then_the_environment(monkeypatch):
    assert BatchingSettings.resolve({"max_batch": 16}) == BatchingSettings(max_batch=16)
    monkeypatch.setenv("HISTOFLOW_MAX_BATCH", "0")
    monkeypatch.setenv("HISTOFLOW_MAX_WAIT_MS", "0.5")
    assert BatchingSettings.resolve({"max_batch": 16}) == BatchingSettings(max_batch=0, max_wait_ms=0.5)
    monkeypatch.setenv("HISTOFLOW_MAX_BATCH", "lots")
    with pytest.raises(ValueError, match="HISTOFLOW_MAX_BATCH must be an integer; got 'lots'"):
        BatchingSettings.resolve()
    monkeypatch.setenv("HISTOFLOW_MAX_BATCH", "-1")
    with pytest.raises(ValueError, match="max_batch >= 0"):
        BatchingSettings.resolve()
