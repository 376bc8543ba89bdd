"""`bugforge check FILE`: grade a candidate's edited exercise without giving it away.

The candidate's file runs in a child process (`python -m tools.check_worker`) under a
time limit, so a syntax error, a crash or an endless loop in it is reported as such
and can neither hang nor kill this process. The child streams one JSON line per
event into a result file; when it is stopped, the checks it finished still count,
the one it was running is marked as out of time and the rest as not run.

The checks compare the candidate's model with the clean reference
(clean_model.transformer) built with the same seed and, where it matters, with the
reference's weights copied in by parameter name. Their names say what is tested,
never where a bug is; `--hint` adds a coarse family per failing check.

Nothing here imports torch.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from mutations.base import CATEGORIES
from tools.errors import UserError

# The folder that holds the `tools` and `clean_model` packages: the child runs there.
PACKAGE_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TIMEOUT = 60.0


@dataclass(frozen=True)
class CheckSpec:
    id: str
    name: str  # what is tested, never where a bug is
    family: str  # the coarse hint
    # the bug families (mutations.base.CATEGORIES) whose bugs, standing alone, this
    # check is meant to catch; any check may also fail on a bug that crashes
    catches: tuple[str, ...]


# In the order the child runs them: cheap and structural first, training last.
# Training catches every family: each planted bug is verified to break it.
CHECKS = (
    CheckSpec("api", "api and shapes", "shapes", ("shape", "loss", "generate")),
    CheckSpec(
        "parameters",
        "parameters registered and trainable",
        "gradients",
        ("gradients", "shape"),
    ),
    CheckSpec("init", "initial loss near ln(vocab)", "init", ("init",)),
    CheckSpec(
        "logits",
        "logits match reference",
        "forward pass",
        ("attention", "position", "shape", "loss"),
    ),
    CheckSpec("loss", "loss matches reference", "loss", ("loss", "shape")),
    CheckSpec(
        "gradients",
        "gradients match reference",
        "gradients",
        ("gradients", "backprop", "attention", "position", "shape", "loss"),
    ),
    CheckSpec(
        "backward",
        "custom backward matches autograd",
        "backprop",
        ("backprop", "gradients", "shape"),
    ),
    CheckSpec(
        "generation",
        "generation matches reference",
        "generation",
        ("generate", "attention", "position", "shape"),
    ),
    CheckSpec("training", "training reaches target", "training", CATEGORIES),
)
CHECK_IDS = tuple(c.id for c in CHECKS)


@dataclass
class CheckResult:
    spec: CheckSpec
    status: str  # "pass", "fail", "error", "timeout" or "not run"
    detail: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "pass"


@dataclass
class Report:
    file: Path
    results: list[CheckResult]
    problem: str = ""  # why checks could not run (load failure, time limit, crash)
    seconds: float = 0.0

    @property
    def failing(self) -> list[CheckResult]:
        return [r for r in self.results if not r.passed]

    @property
    def ok(self) -> bool:
        return not self.failing and not self.problem


def _read_events(path: Path) -> list[dict]:
    events = []
    if not path.exists():
        return events
    for line in path.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            break  # the child was stopped halfway through a line
    return events


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


def run_worker(
    args: list[str], timeout: float, result: Path
) -> tuple[list[dict], str | None]:
    """Run `python -m tools.check_worker ARGS --result RESULT` under a time limit.

    Returns the events the child wrote and, when it did not finish on its own,
    "timeout" or a description of how it died. The child gets its own process
    group, which is killed as a whole when the time is up.
    """
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "tools.check_worker", *args, "--result", str(result)]
    log = result.with_suffix(".log")
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd,
            cwd=PACKAGE_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
            return _read_events(result), "timeout"
    events = _read_events(result)
    if any(e.get("event") == "done" for e in events):
        return events, None
    internal = [e for e in events if e.get("event") == "internal-error"]
    if internal:
        lines = internal[-1].get("traceback", "").strip().splitlines()
        raise UserError(
            "internal error in the checking process (a bug in bugforge, not in your"
            f" file): {lines[-1] if lines else _describe_exit(code)}"
        )
    return events, _describe_exit(code)


def _syntax_problem(path: Path, text: str) -> str | None:
    try:
        compile(text, str(path), "exec")
    except SyntaxError as e:
        return f"your file does not compile: SyntaxError: {e.msg} (line {e.lineno})"
    except ValueError as e:  # null bytes
        return f"your file does not compile: {e}"
    return None


def run_check(path: str | Path, timeout: float = DEFAULT_TIMEOUT) -> Report:
    """Run every check on the candidate's file in a child process; never raises for
    anything the candidate's code does."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a folder; give your exercise file", exit_code=2)
    if not path.is_file():
        raise UserError(f"{path}: no such file", exit_code=2)
    start = time.perf_counter()
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read it ({e})", exit_code=2) from None
    not_run = "not run"
    problem = _syntax_problem(path, text)
    if problem:
        results = [CheckResult(spec, not_run) for spec in CHECKS]
        return Report(path, results, problem, time.perf_counter() - start)
    with tempfile.TemporaryDirectory(prefix="bugforge-check-") as tmp:
        events, stopped = run_worker(
            ["check", str(path.resolve())], timeout, Path(tmp) / "result.jsonl"
        )
    by_id = {spec.id: spec for spec in CHECKS}
    done: dict[str, CheckResult] = {}
    running = None
    problem = ""
    loaded = False
    for e in events:
        kind = e.get("event")
        if kind == "loaded":
            loaded = True
        elif kind == "load-error":
            problem = f"your file does not load: {e['message']}"
        elif kind == "start":
            running = e["check"]
        elif kind == "result":
            done[e["check"]] = CheckResult(by_id[e["check"]], e["status"], e["detail"])
            running = None
    if stopped == "timeout":
        where = (
            f"while running '{by_id[running].name}'"
            if running
            else ("between checks" if loaded else "while loading your file")
        )
        problem = f"stopped after the {timeout:g} s time limit {where}" + (
            "" if loaded else " (an endless loop, or slow code run at import?)"
        )
    elif stopped:
        where = f"during '{by_id[running].name}'" if running else "while loading"
        problem = f"your file ended the checking process ({stopped}) {where}"
    results = []
    for spec in CHECKS:
        if spec.id in done:
            results.append(done[spec.id])
        elif spec.id == running and stopped == "timeout":
            results.append(
                CheckResult(spec, "timeout", f"did not finish within {timeout:g} s")
            )
        elif spec.id == running:
            results.append(CheckResult(spec, "error", f"the process died ({stopped})"))
        else:
            results.append(CheckResult(spec, not_run))
    return Report(path, results, problem, time.perf_counter() - start)


def format_report(report: Report, hint: bool = False) -> str:
    width = max(len(spec.name) for spec in CHECKS)
    lines = []
    if report.problem:
        lines.append(report.problem)
    for r in report.results:
        mark = "pass" if r.passed else "FAIL"
        row = f"  {mark}  {r.spec.name:<{width}}"
        notes = []
        if r.status == "error":
            notes.append(f"error: {r.detail}")
        elif r.status in ("timeout", "not run"):
            notes.append(r.detail or r.status)
        elif r.detail:
            notes.append(r.detail)
        if hint and not r.passed:
            notes.append(f"hint: {r.spec.family}")
        if notes:
            row += "  " + "; ".join(notes)
        lines.append(row.rstrip())
    n = len(report.failing)
    lines.append(f"{n} check{'' if n == 1 else 's'} failing")
    return "\n".join(lines)


def check_timeout(seconds: float) -> None:
    """Refuse a --timeout that is not a positive, finite number of seconds."""
    if not (math.isfinite(seconds) and seconds > 0):
        raise UserError(
            f"--timeout must be a positive number of seconds, not {seconds:g}",
            exit_code=2,
        )


def run(args) -> int:
    check_timeout(args.timeout)
    report = run_check(args.file, timeout=args.timeout)
    print(format_report(report, hint=args.hint))
    return 0 if report.ok else 1


def configure(subparsers) -> None:
    check = subparsers.add_parser(
        "check",
        help="grade your edited exercise file against the clean reference",
        description=(
            "Load your edited exercise file in a separate process and compare it with"
            " the clean reference: prints a pass/fail table and how many checks fail."
            " Exit code 0 only when every check passes."
        ),
    )
    check.add_argument("file", help="your edited transformer_buggy.py")
    check.add_argument(
        "--hint",
        action="store_true",
        help="add the family (e.g. init, backprop, training) of each failing check",
    )
    check.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"stop the checks after this long (default {DEFAULT_TIMEOUT:g})",
    )
    check.set_defaults(run=run)
