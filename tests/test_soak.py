"""A short soak in CI (50 s; `make soak` runs 10 minutes): 64 clients, good and bad
requests and LM faults mixed; every request answered once, no unexpected 5xx, flat memory."""

import pytest

from bench.soak import run_soak

pytestmark = pytest.mark.e2e  # bench.soak starts a stub LM and a gateway of its own


def test_a_mixed_load_is_answered_in_full_without_stray_5xx_or_memory_growth(tmp_path):
    report = run_soak(tmp_path, seconds=50, concurrency=64)
    assert report.sent > 600
    assert report.transport_errors == 0
    assert report.answered == report.sent  # exactly one response per request
    assert report.unexpected == {}  # good: 200, bad: 400, faults: 502/504 only
    assert report.unexpected_5xx == 0
    assert set(report.statuses) == {"good", "bad", "fault"}
    assert report.statuses["fault"].get("504", 0) > 0 and report.statuses["fault"].get("502", 0) > 0
    assert report.memory_growth < 0.10, report.rss_mb
