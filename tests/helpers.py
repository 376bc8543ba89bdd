"""What several test modules need: running the command line as a user would, and
editing the clean model's text in one known place."""

import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def bugforge(*args, timeout=600):
    """Run `bugforge ARGS` in a fresh interpreter from the repository."""
    return subprocess.run(
        [sys.executable, "-m", "tools.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def replace_once(text, old, new):
    """`text` with its one `old` replaced; fails if `old` is not there exactly once."""
    assert text.count(old) == 1, f"the clean model changed: {old!r}"
    return text.replace(old, new)


def ruff(*args):
    """Run ruff with the project's own configuration."""
    return subprocess.run(
        [sys.executable, "-m", "ruff", *args, "--config", str(REPO / "pyproject.toml")],
        capture_output=True,
        text=True,
    )


def assert_ruff_clean(folder):
    """Every file in `folder` is as ruff formats it and passes the project's lint."""
    for command in (["format", "--check"], ["check"]):
        done = ruff(*command, str(folder))
        assert done.returncode == 0, done.stdout + done.stderr


def oracle_run(verdict, seed=0, accuracy=0.0, error=None):
    """A made-up training outcome, for testing what is built on top of them."""
    from tools import oracle

    return oracle.Run(
        seed=seed,
        verdict=verdict,
        final_loss=1.0,
        accuracy=accuracy,
        teacher_forced=None,
        steps=200,
        error=error,
        seconds=1.0,
        target=0.9,
        chance_loss=math.log(16),
    )
