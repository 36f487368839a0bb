"""Start-up time of the command line: ``anygpt --help``, ``anygpt --version`` and ``anygpt info presets``, each run
as a fresh process (``python -m anygpt``) ``--runs`` times; prints each one's median wall time against the goal.

    python benchmarks/bench_cli.py [--runs 5] [--goal 1.5]

A benchmark, not a test: the times depend on the machine and its load (a training run beside it slows every
import). None of the three imports torch or diffusers (``tests/test_cli.py`` checks that); what is left is the
interpreter's start and the standard library. Exits 0 whatever the times; ``--strict`` exits 1 when one misses the
goal.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

COMMANDS = {
    "anygpt --help": ["--help"],
    "anygpt --version": ["--version"],
    "anygpt info presets": ["info", "presets"],
}


def wall_times(args: list[str], runs: int) -> list[float]:
    """Seconds of ``runs`` fresh ``python -m anygpt ARGS`` processes (each must exit 0)."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "anygpt", *args], check=True, capture_output=True, env=os.environ)
        times.append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="processes per command (default 5); the median is kept")
    parser.add_argument("--goal", type=float, default=1.5, help="seconds each command should stay under (default 1.5)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a command misses the goal")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    print(f"median wall time of {args.runs} runs, goal < {args.goal:g} s ({sys.executable})")
    missed = 0
    for label, command in COMMANDS.items():
        times = wall_times(command, args.runs)
        median = statistics.median(times)
        ok = median < args.goal
        missed += not ok
        print(f"  {label:<22} {median:6.3f} s  (min {min(times):.3f}, max {max(times):.3f})  {'ok' if ok else 'SLOW'}")
    return 1 if (args.strict and missed) else 0


if __name__ == "__main__":
    sys.exit(main())
