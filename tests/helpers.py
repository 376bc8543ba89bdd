"""What several test modules need: running the command line as a user would, and
editing the clean model's text in one known place."""

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
