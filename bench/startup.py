"""Start-up time of the ``eventbus`` command against ``python -c "import click"``.

    python bench/startup.py [--runs 21]

Each row is a fresh process, run ``--runs`` times, the rows alternating (one of each, then the
next round) so that drift on a shared machine hits them alike; the table shows the median wall
time and its ratio to ``import click``. Target: ``--help`` and usage errors within 1.5x.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET = 1.5
# The installed console script beside this Python (what users run), else python -m eventbus.
_SCRIPT = Path(sys.executable).parent / "eventbus"
EVENTBUS = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "eventbus"]
ROWS = {
    'python -c "import click"': [sys.executable, "-c", "import click"],
    "eventbus --help": [*EVENTBUS, "--help"],
    "eventbus run --help": [*EVENTBUS, "run", "--help"],
    "eventbus run (usage error)": [*EVENTBUS, "run"],
}
EXPECTED = {"eventbus run (usage error)": 2}  # exit codes other than 0


def once(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, check=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=21, help="runs of each row")
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for label, argv in ROWS.items():  # each once (warms the file cache), and the exit codes
        code = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, check=False)
        if code.returncode != EXPECTED.get(label, 0):
            sys.exit(f"{label}: exit {code.returncode}, not {EXPECTED.get(label, 0)}")
    times: dict[str, list[float]] = {label: [] for label in ROWS}
    for _ in range(args.runs):
        for label, argv in ROWS.items():
            times[label].append(once(argv, env))
    base = statistics.median(times['python -c "import click"'])
    print(f"{'row':<28} {'median':>9} {'min':>9} {'ratio':>6}  target {TARGET}x")
    met = True
    for label, found in times.items():
        median = statistics.median(found)
        ratio = median / base
        ok = "" if label.startswith("python") else ("met" if ratio <= TARGET else "NOT met")
        met = met and (ok != "NOT met")
        print(
            f"{label:<28} {median * 1000:>7.1f}ms {min(found) * 1000:>7.1f}ms {ratio:>5.2f}x  {ok}"
        )
    print(f"command: {' '.join(EVENTBUS)}")
    print(f"target ({TARGET}x import click, medians of {args.runs}): {'met' if met else 'NOT met'}")


if __name__ == "__main__":
    main()
