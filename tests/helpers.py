"""What several test modules need: running the command line as a user would."""

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
