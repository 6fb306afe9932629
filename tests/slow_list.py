"""Writes tests/slow.txt from ``pytest --durations=0`` logs.

Usage: ``python -m pytest -n 2 --durations=0 > FULL``, then ``python -m
tests.slow_list FULL``; then ``python -m pytest -n 2 -m "not slow"
--durations=0 > FAST`` and ``python -m tests.slow_list FULL FAST``. A test is
slow when its setup and call took 0.55 s or more in the full run, or 0.42 s or
more in the fast run (where it no longer shares compiled code with the slow
tests). Check afterwards that every test file keeps a fast test, and that the
fast tier holds at least half of the tests.
"""

import collections
import re
import sys
from pathlib import Path

THRESHOLDS = (0.55, 0.42)  # seconds: in the full run, in the fast run
HEADER = """\
# Tests marked `slow` (conftest.py): each took 0.55 s or more (setup + call)
# in a full run (`pytest -n 2 --durations=0`), or 0.42 s or more in a run of
# the others alone (their compile caches no longer shared), on a 2-core
# AMD EPYC. `pytest -m "not slow"` is the fast tier; CI runs everything.
# Regenerate after large changes: python -m tests.slow_list FULL_LOG FAST_LOG,
# then take one cheap test of each file (and module doctests) back out so that
# every file keeps a fast test (but the checkpoint, fusion, multi-process and
# property files).
"""


def seconds_of(log: str) -> dict[str, float]:
    """Setup + call + teardown seconds of each test in a --durations=0 log."""
    seconds: dict[str, float] = collections.defaultdict(float)
    for line in Path(log).read_text().splitlines():
        m = re.match(r"\s*([\d.]+)s (call|setup|teardown)\s+(\S+)", line)
        if m:
            seconds[m.group(3)] += float(m.group(1))
    return seconds


def main(logs: list[str]) -> None:
    slow: set[str] = set()
    for log, threshold in zip(logs, THRESHOLDS, strict=False):
        slow |= {k for k, v in seconds_of(log).items() if v >= threshold}
    out = Path(__file__).parent / "slow.txt"
    out.write_text(HEADER + "".join(f"{k}\n" for k in sorted(slow)))
    print(f"{len(slow)} tests are slow; wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
