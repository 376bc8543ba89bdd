"""Benchmark: `bugforge generate` against libcst's parse + codegen of the clean source.

    python -m tools.bench_generate [--repeat N]

Prints the in-process ratio (target: at most RATIO_TARGET) and the whole command's
wall time in a fresh interpreter (target: at most COMMAND_TARGET s). Medians over the
repeats. Exits 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import libcst as cst

from mutations import engine
from tools import exercise

ROOT = Path(__file__).resolve().parent.parent
RATIO_TARGET = 3.0
COMMAND_TARGET = 1.0


def median_time(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args(argv)
    source = engine.CLEAN_SOURCE.read_text()
    exercise.build_exercise(5)  # warm the rule registry and imports

    baseline = median_time(lambda: cst.parse_module(source).code, args.repeat)
    with tempfile.TemporaryDirectory() as tmp:

        def generate():
            ex = exercise.build_exercise(5)
            exercise.write_files(Path(tmp), ex.files, force=True)

        ours = median_time(generate, args.repeat)

        def command():
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "tools.cli",
                    "generate",
                    "--seed",
                    "5",
                    "--out",
                    tmp,
                    "--force",
                ],
                check=True,
                cwd=ROOT,
                capture_output=True,
            )

        whole = median_time(command, max(3, args.repeat // 2))
    print(f"libcst parse + codegen of the clean source: {baseline * 1000:.0f} ms")
    print(f"generate (plan, apply, emit, write), in process: {ours * 1000:.0f} ms")
    ratio = ours / baseline
    print(f"ratio: {ratio:.2f}x (target <= {RATIO_TARGET:g}x)")
    print(
        f"whole `bugforge generate` command: {whole:.2f} s"
        f" (target <= {COMMAND_TARGET:g} s)"
    )
    ok = ratio <= RATIO_TARGET and whole <= COMMAND_TARGET
    print(f"{'within' if ok else 'OVER'} targets")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
