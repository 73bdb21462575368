"""The mutation sweep: plant each mutant of ``catalogue.py`` in turn, run the tests that guard
its area, put the file back, and print the table (mutants per module, caught, survived).

    python mutants/run.py                    # every mutant (nox -s mutants)
    python mutants/run.py --only "export"    # those whose name contains a word
    python mutants/run.py --module training/ trained.py    # those of some modules

Not in CI: on two cores the sweep takes minutes. The source file is always restored, also when
the run is interrupted.
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import time
from pathlib import Path

from catalogue import MUTANTS, Mutant

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "cause_cli"


def outcome(mutant: Mutant, timeout: int) -> str:
    """``caught`` or ``survived`` (or ``broken`` where the mutant's line is not in the file)."""
    path = PACKAGE / mutant.path
    original = path.read_text(encoding="utf-8")
    if original.count(mutant.find) != 1:
        return "broken"
    try:
        path.write_text(original.replace(mutant.find, mutant.replace), encoding="utf-8")
        command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *mutant.tests]
        # No bytecode of a mutant is kept: a mutant of the original's size, restored within the
        # same second, would otherwise be run again from its cached bytecode.
        environment = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
        try:
            done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=environment)
        except subprocess.TimeoutExpired:
            return "caught"  # a hang is a failure too
        return "caught" if done.returncode == 1 else ("survived" if done.returncode == 0 else "broken")
    finally:
        path.write_text(original, encoding="utf-8")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="run the mutants whose name contains this")
    parser.add_argument("--module", nargs="*", default=[], help="run the mutants of the modules whose path starts so")
    parser.add_argument("--timeout", type=int, default=900, help="seconds a mutant's tests may take")
    options = parser.parse_args()
    chosen = [
        mutant
        for mutant in MUTANTS
        if options.only in mutant.name and (not options.module or mutant.path.startswith(tuple(options.module)))
    ]
    results: dict[str, list[tuple[Mutant, str]]] = collections.defaultdict(list)
    for mutant in chosen:
        started = time.perf_counter()
        result = outcome(mutant, options.timeout)
        results[mutant.path].append((mutant, result))
        print(f"{result:>9}  {mutant.path}: {mutant.name} ({time.perf_counter() - started:.0f} s)", flush=True)
    print(f"\n{'module':<28} {'mutants':>7} {'caught':>6} {'equivalent':>10} {'survived':>8}")
    totals = collections.Counter()
    for path, rows in results.items():
        counts = collections.Counter(
            "equivalent" if mutant.equivalent and result == "survived" else result for mutant, result in rows
        )
        totals.update(counts)
        print(f"{path:<28} {len(rows):>7} {counts['caught']:>6} {counts['equivalent']:>10} {counts['survived']:>8}")
    counted = totals["caught"] + totals["survived"]
    share = totals["caught"] / counted if counted else 1.0
    print(f"{'all':<28} {sum(totals.values()):>7} {totals['caught']:>6} {totals['equivalent']:>10} "
          f"{totals['survived']:>8}   caught {share:.0%} of the non-equivalent")  # fmt: skip
    for rows in results.values():
        for mutant, result in rows:
            if result == "survived" and mutant.equivalent:
                print(f"equivalent: {mutant.path}: {mutant.name}: {mutant.equivalent}")
            elif result == "survived":
                print(f"survived: {mutant.path}: {mutant.name}")
            elif result == "broken":
                print(f"broken (the catalogue's line is not in the file, or the tests errored): {mutant.name}")
    return 0 if totals["survived"] == 0 and totals["broken"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
