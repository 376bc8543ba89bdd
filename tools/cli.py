"""`bugforge`: generate exercises, list rules, verify bugs, check and practise fixes."""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys

from tools.errors import UserError

# Each module adds its own subcommands through `configure(subparsers)` and sets
# `run=<function(args) -> int>` on them; modules are imported only when needed so
# that `generate` never pulls in torch.
COMMAND_MODULES = {
    "generate": "tools.exercise",
    "rules": "tools.exercise",
    "verify": "tools.verify",
    "check": "tools.check",
    "practice": "tools.practice",
    "reveal": "tools.practice",
}
# What a shell reports for a process that a closed pipe stopped: 128 + SIGPIPE.
SIGPIPE_EXIT = 128 + getattr(signal, "SIGPIPE", 13)


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line, like every other error of the command."""

    def error(self, message):
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def build_parser(commands: list[str]) -> argparse.ArgumentParser:
    parser = _Parser(prog="bugforge", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in dict.fromkeys(COMMAND_MODULES[c] for c in commands):
        importlib.import_module(module_name).configure(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    wanted = [a for a in argv[:1] if a in COMMAND_MODULES]
    parser = build_parser(wanted or list(COMMAND_MODULES))
    args = parser.parse_args(argv)
    try:
        code = args.run(args)
        sys.stdout.flush()  # a closed pipe shows here, not at exit
        return code
    except UserError as e:
        print(f"bugforge: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("bugforge: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`bugforge rules | head -1`): stop quietly, as a
        # process killed by SIGPIPE would, and let the exit flush go to devnull.
        _silence_stdout()
        return SIGPIPE_EXIT


def _silence_stdout() -> None:
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return  # not a real file (captured in tests)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


if __name__ == "__main__":
    sys.exit(main())
