"""Benchmark `bugforge verify`: the full kill matrix cold, then again warm (cached).

usage: python tools/bench_verify.py [--jobs 2] [--cache-dir DIR]

Both runs use one fresh cache folder (a temporary one unless --cache-dir is given),
so the first measures every (site, seed) and the second only reads verdicts back.
Targets on 2 cores: cold at most COLD_TARGET s, warm at most WARM_TARGET s. Exits 1
when a target is missed. Not a test: wall times depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
COLD_TARGET = 180.0
WARM_TARGET = 3.0


def timed_verify(jobs: int, cache_dir: str) -> tuple[float, float, int, str]:
    """Wall seconds, CPU seconds (its worker processes included), exit code and
    last stdout line of one `bugforge verify`."""
    env = {**os.environ, "BUGFORGE_CACHE_DIR": cache_dir}
    command = [sys.executable, "-m", "tools.cli", "verify", "--jobs", str(jobs)]
    cpu_before = _children_cpu()
    start = time.perf_counter()
    done = subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, check=False
    )
    seconds = time.perf_counter() - start
    cpu = _children_cpu() - cpu_before
    lines = done.stdout.strip().splitlines() or done.stderr.strip().splitlines()
    return seconds, cpu, done.returncode, lines[-1] if lines else ""


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument(
        "--cache-dir", help="cache folder to use (must not hold verdicts yet)"
    )
    args = parser.parse_args(argv)
    times = {}
    with tempfile.TemporaryDirectory(prefix="bugforge-bench-") as tmp:
        cache_dir = args.cache_dir or tmp
        for name, target in (("cold", COLD_TARGET), ("warm", WARM_TARGET)):
            wall, cpu, code, last = timed_verify(args.jobs, cache_dir)
            times[name] = wall
            print(
                f"{name}: {wall:6.1f} s wall (target {target:g} s), {cpu:6.1f} s CPU"
                f" (/ {args.jobs} = {cpu / args.jobs:.1f} s on free cores)"
                f"  exit {code}: {last}"
            )
    cold, warm = times["cold"], times["warm"]
    ok = cold <= COLD_TARGET and warm <= WARM_TARGET
    print(f"{'within' if ok else 'OVER'} targets on --jobs {args.jobs}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
