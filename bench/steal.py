"""CPU steal: the share of this VM's CPU time the hypervisor gave to someone else.

On a shared 2-core VM, steal moves every figure of the benchmark (measured here:
3% on a quiet stretch, 26% on a noisy one, which cut the gateway's throughput at
64 clients by half). Each figure is reported with the steal during it, so a
reader can tell a slow stretch of the machine from a slow server.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PROC_STAT = Path("/proc/stat")


def cpu_ticks(stat_text: str) -> tuple[int, int]:
    """(steal, total) ticks from the aggregate `cpu` line of /proc/stat."""
    for line in stat_text.splitlines():
        fields = line.split()
        if fields and fields[0] == "cpu":
            # user nice system idle iowait irq softirq steal [guest guest_nice: already inside user/nice]
            ticks = [int(x) for x in fields[1:9]]
            return (ticks[7] if len(ticks) > 7 else 0), sum(ticks)
    raise ValueError("no aggregate cpu line in /proc/stat")


def _read() -> tuple[int, int] | None:
    try:
        return cpu_ticks(PROC_STAT.read_text())
    except (OSError, ValueError):
        return None  # not Linux, or no /proc: the figure is left out


def share(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    """Steal between two readings, as a percentage of all CPU time then."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    return round(100 * (after[0] - before[0]) / (after[1] - before[1]), 1)


@contextmanager
def measured() -> Iterator[dict]:
    """`with measured() as steal:` ... then `steal["percent"]` holds the steal during the block (or None)."""
    result: dict = {"percent": None}
    before = _read()
    try:
        yield result
    finally:
        result["percent"] = share(before, _read())
