import logging

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


def test_discovery_reports_its_checking_of_the_images(caplog):
    caplog.set_level(logging.INFO, logger="histoflow.progress")
    dataset = discover(IDC / "10253")
    lines = _lines(caplog)
    assert lines and lines[-1].startswith(f"checking {len(dataset.frame)} images: 100%")
