"""The benchmark's CPU-steal figure, read from /proc/stat."""

from __future__ import annotations

import time

import pytest

from bench.steal import PROC_STAT, cpu_ticks, measured, share

STAT = """cpu  2240504 5402 234565 3325872 25267 0 18535 392818 0 0
cpu0 1120252 2701 117282 1662936 12633 0 9267 196409 0 0
intr 1 2 3
"""


def test_steal_and_total_come_from_the_aggregate_cpu_line():
    assert cpu_ticks(STAT) == (392818, 2240504 + 5402 + 234565 + 3325872 + 25267 + 0 + 18535 + 392818)


def test_a_stat_without_a_cpu_line_is_refused():
    with pytest.raises(ValueError):
        cpu_ticks("intr 1 2 3\n")


def test_share_is_the_steal_fraction_of_the_ticks_between_readings():
    assert share((100, 1000), (130, 1200)) == 15.0
    assert share((100, 1000), (100, 1000)) is None  # no time passed: no figure
    assert share(None, (1, 2)) is None


@pytest.mark.skipif(not PROC_STAT.exists(), reason="no /proc/stat on this system")
def test_measured_fills_in_a_percentage_where_proc_stat_exists():
    with measured() as steal:
        assert steal["percent"] is None  # filled in only when the block ends
        time.sleep(0.1)  # ten ticks of the kernel's clock at least
    assert isinstance(steal["percent"], float) and 0 <= steal["percent"] <= 100


def test_the_results_table_shows_each_servers_steal_range():
    from bench.run import markdown

    def level(concurrency: int, rps: float, steal: float | None) -> dict:
        return {"concurrency": concurrency, "throughput": rps, "p99_ms": 250.0, "errors": 0,
                "cpu_steal_percent": steal}

    results = {"servers": {
        "a": {"name": "peer", "cold_start_s": 7.0, "levels": [level(1, 5.0, 3.0), level(64, 28.0, 26.0)]},
        "c1": {"name": "gateway", "cold_start_s": 4.0, "levels": [level(1, 5.0, None), level(64, 280.0, 4.5)]},
    }}
    rows = markdown(results).splitlines()
    assert rows[0].endswith("| CPU steal |")
    assert rows[2].endswith("| 3-26% |") and rows[3].endswith("| 4.5-4.5% |")
    assert "280.0 rps (10.0x)" in rows[3]
