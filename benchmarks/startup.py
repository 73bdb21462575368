"""Start-up time of commands that do no work: how long a user waits before anything happens.

    python benchmarks/startup.py                      # this tree against itself (sanity)
    python benchmarks/startup.py --baseline OLD/src   # this tree against another checkout's src

Each command runs in a fresh interpreter, alternating between the two source trees so that a
busy machine slows both alike; the median wall time of ``--repeats`` runs is printed with the
ratio baseline / this tree. ``python -X importtime`` shows where the rest goes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = (("info",), ("fetch", "--list"), ("--help",), ("fetch", "no-such-backbone"))
HERE = Path(__file__).resolve().parents[1] / "src"


def wall_time(source: Path, command: tuple[str, ...]) -> float:
    environment = {**os.environ, "PYTHONPATH": str(source), "COLUMNS": "120"}
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "cause_cli", *command], env=environment, capture_output=True, check=False)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path, default=HERE, help="the src folder of the checkout to compare with")
    parser.add_argument("--repeats", type=int, default=5)
    options = parser.parse_args()
    print(f"{'command':<28} {'baseline s':>10} {'this tree s':>11} {'ratio':>6}")
    for command in COMMANDS:
        baseline, current = [], []
        for _ in range(options.repeats):
            baseline.append(wall_time(options.baseline, command))
            current.append(wall_time(HERE, command))
        old, new = statistics.median(baseline), statistics.median(current)
        print(f"{'cause ' + ' '.join(command):<28} {old:>10.2f} {new:>11.2f} {old / new:>6.1f}")


if __name__ == "__main__":
    main()
