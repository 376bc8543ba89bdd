"""`bugforge verify`: prove by training that every planted bug breaks the demo.

Without options it runs the kill matrix: the clean model and every single-bug
variant of the clean model, each under every oracle seed, in worker processes, with
each verdict cached (see tools/oracle.py). `--exercise DIR` or `--seed N` instead
checks one exercise: each planted bug alone breaks training, the file with all of
them fails, the clean file passes.

Importing this module does not import torch; only measuring does, in the workers.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import inspect
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from mutations import base, engine
from mutations import rules as rules_package
from mutations.base import Rule, all_rules
from mutations.excluded import excluded_reason
from tools import oracle
from tools.errors import UserError
from tools.exercise import (
    ANNOTATED_NAME,
    BUGGY_NAME,
    CLEAN_NAME,
    build_exercise,
    selectable_sites,
)

PLOT_MISSING = "--plot needs matplotlib: pip install 'bugforge[plot]'"


@dataclass
class Row:
    """One site (or the clean model, or an exercise file) and its runs."""

    rule: str
    site: str  # site id, or a label such as "<clean>"
    selectable: bool
    excluded: str | None  # the reason recorded in mutations/excluded.py
    result: oracle.SiteResult

    @property
    def short_site(self) -> str:
        prefix = f"{self.rule}:"
        return self.site[len(prefix) :] if self.site.startswith(prefix) else self.site

    def to_json(self) -> dict:
        return {
            "rule": self.rule,
            "site": self.site,
            "verdict": self.result.verdict,
            "selectable": self.selectable,
            "killed": self.result.killed,
            "close_call": self.result.close_call,
            "excluded": self.excluded,
            "final_loss": oracle.finite_or_none(self.result.final_loss),
            "accuracy": self.result.max_accuracy,
            "runs": [
                {k: v for k, v in run.to_json().items() if k != "losses"}
                for run in self.result.runs
            ],
        }


# ------------------------------------------------------------------ what to measure


class _Builder:
    """Builds one single-bug source on demand; the requests of a site share it."""

    def __init__(self, module, site_id: str, rule: Rule):
        self.module, self.site_id, self.rule = module, site_id, rule

    def __call__(self) -> str:
        return single_bug_source(self.module, self.site_id, [self.rule])


def single_bug_source(module, site_id: str, rules: list[Rule] | None = None) -> str:
    """The stripped file a candidate would get with only `site_id` planted."""
    plan = engine.Plan(seed=None, site_ids=(site_id,))
    return engine.emit_stripped(engine.apply(module, plan, rules))


def _constant(text: str):
    return lambda: text


def rule_source(rule: Rule) -> str:
    """A digest of every source that shapes the rule's mutants besides the clean
    model: the rule's whole module (its helpers outside the class too), the engine,
    the rule base and the shared modules of mutations/rules (those named `_*.py`)."""
    paths = [
        Path(inspect.getsourcefile(type(rule))),
        Path(engine.__file__),
        Path(base.__file__),
        *sorted(Path(rules_package.__file__).parent.glob("_*.py")),
    ]
    digest = hashlib.sha256()
    for path in dict.fromkeys(p.resolve() for p in paths):
        stat = path.stat()
        digest.update(_file_digest(path, stat.st_mtime_ns, stat.st_size).encode())
    return digest.hexdigest()


@functools.lru_cache(maxsize=None)
def _file_digest(path: Path, mtime_ns: int, size: int) -> str:
    """sha256 of a file's bytes; the stat fields make an edited file a new entry."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _whole_file_requests(text: str, label: str, seeds, config) -> list[oracle.Request]:
    build = _constant(text)
    return [
        oracle.Request(oracle.run_key(text, "", label, seed, config), seed, build)
        for seed in seeds
    ]


def _site_requests(
    module, clean_text: str, site_id: str, rule: Rule, seeds, config
) -> list[oracle.Request]:
    build = _Builder(module, site_id, rule)
    source = rule_source(rule)
    return [
        oracle.Request(
            oracle.run_key(clean_text, source, site_id, seed, config), seed, build
        )
        for seed in seeds
    ]


def _results(requests_by_label, runs) -> dict[str, oracle.SiteResult]:
    return {
        label: oracle.SiteResult(label, [runs[r.key] for r in requests])
        for label, requests in requests_by_label.items()
    }


# ------------------------------------------------------------------------ the matrix


@dataclass
class Matrix:
    clean: oracle.SiteResult
    rows: list[Row]

    @property
    def selectable(self) -> list[Row]:
        return [r for r in self.rows if r.selectable]

    @property
    def killed(self) -> list[Row]:
        return [r for r in self.selectable if r.result.killed]

    @property
    def survivors(self) -> list[Row]:
        """Selectable sites not killed: one could be a planted non-bug."""
        return [r for r in self.selectable if not r.result.killed]

    @property
    def excluded_survivors(self) -> list[Row]:
        return [r for r in self.rows if not r.selectable and not r.result.killed]

    @property
    def stale_exclusions(self) -> list[Row]:
        return [r for r in self.rows if not r.selectable and r.result.killed]

    @property
    def ok(self) -> bool:
        return self.clean.passed and not self.survivors


def run_matrix(
    only: list[str] | None = None,
    seeds=oracle.SEEDS,
    jobs: int = 2,
    cache: oracle.Cache | None = None,
    progress=None,
) -> Matrix:
    """The clean model and every (rule, site) on it, under every seed."""
    rules = all_rules()
    by_name = {r.name: r for r in rules}
    for name in only or ():
        if name not in by_name:
            raise UserError(f"unknown rule: {name!r} (see `bugforge rules`)")
    clean_text = engine.CLEAN_SOURCE.read_text()
    module = engine.parse(clean_text)
    sites = engine.find_sites(module, rules)
    if only:
        sites = [s for s in sites if s.rule in only]
    config = oracle.oracle_config()
    requests = {
        oracle.CLEAN_LABEL: _whole_file_requests(clean_text, "<file>", seeds, config)
    }
    for site in sites:
        requests[site.id] = _site_requests(
            module, clean_text, site.id, by_name[site.rule], seeds, config
        )
    runs = oracle.measure_many(
        [r for rs in requests.values() for r in rs], jobs, cache, progress
    )
    results = _results(requests, runs)
    selectable = {s.id for s in selectable_sites(module, rules)}
    rows = [
        Row(
            site.rule,
            site.id,
            site.id in selectable,
            excluded_reason(site),
            results[site.id],
        )
        for site in sites
    ]
    return Matrix(results[oracle.CLEAN_LABEL], rows)


def exclusion_lines(rows: list[Row]) -> list[str]:
    """Lines to paste into mutations/excluded.py's EXCLUDED dict."""
    return [f"    {r.site!r}: {oracle.exclusion_reason(r.result)!r}," for r in rows]


def margin_line(clean: oracle.SiteResult, killed: list[Row]) -> str:
    target = clean.runs[0].target if clean.runs else math.nan
    seeds = ",".join(str(r.seed) for r in clean.runs)
    text = f"margin: clean min accuracy {clean.min_accuracy:.2f} over seeds {seeds}"
    if killed:
        worst = max(killed, key=lambda r: r.result.max_accuracy)
        text += (
            f"; highest accuracy of a killed site under any seed"
            f" {worst.result.max_accuracy:.2f} ({worst.site})"
        )
    return (
        f"{text}; a kill needs every seed below {oracle.KILL_MARGIN_ACCURACY:.2f};"
        f" target {target:.2f}"
    )


def _format_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(x) for x in col) for col in zip(header, *rows)]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
        for row in (header, *rows)
    ]


def _accuracies(result: oracle.SiteResult) -> str:
    return " ".join(
        "-" if r.accuracy is None else f"{r.accuracy:.2f}" for r in result.runs
    )


def _loss(x: float) -> str:
    return f"{x:.3f}" if math.isfinite(x) else "-"


def table_lines(rows: list[Row]) -> list[str]:
    header = ("rule", "site", "verdict", "final loss", "accuracy per seed")
    body = []
    for row in rows:
        verdict = row.result.verdict
        if row.result.close_call:
            verdict += " (close call)"
        if row.excluded is not None:
            verdict += " (excluded)"
        body.append(
            (
                row.rule,
                row.short_site,
                verdict,
                _loss(row.result.final_loss),
                _accuracies(row.result),
            )
        )
    return _format_table(header, body)


def report_matrix(matrix: Matrix, out=None) -> None:
    def say(line: str = "") -> None:
        print(line, file=out or sys.stdout)

    clean = matrix.clean
    clean_row = Row("<clean model>", oracle.CLEAN_LABEL, False, None, clean)
    for line in table_lines([clean_row, *matrix.rows]):
        say(line)
    say()
    if not clean.passed:
        failing = ", ".join(f"seed {r.seed} {r.describe()}" for r in clean.runs)
        say(f"the clean model fails the demo ({failing}): no site verdict means much")
    say(margin_line(clean, matrix.killed))
    for row in matrix.stale_exclusions:
        say(f"excluded but now killed under every seed (stale exclusion?): {row.site}")
    if matrix.survivors:
        say(
            f"{len(matrix.survivors)} selectable site(s) not killed (a seed met the"
            " target, or came too close to it): the planner could plant a non-bug."
            " Add to mutations/excluded.py's EXCLUDED:"
        )
        for line in exclusion_lines(matrix.survivors):
            say(line)
    say(
        f"killed {len(matrix.killed)} / {len(matrix.selectable)} selectable,"
        f" {len(matrix.excluded_survivors)} survivors excluded"
    )


# --------------------------------------------------------------------- an exercise


@dataclass
class ExerciseReport:
    seed: int | None
    clean: oracle.SiteResult
    buggy: oracle.SiteResult
    bugs: list[Row]

    @property
    def ok(self) -> bool:
        return (
            self.clean.passed
            and self.buggy.killed
            and all(r.result.killed for r in self.bugs)
        )


def load_exercise(folder: Path) -> tuple[dict[str, str], tuple[str, ...], int | None]:
    """The files of a generated exercise folder, its planted site ids and seed."""
    files = {}
    for name in (CLEAN_NAME, ANNOTATED_NAME, BUGGY_NAME):
        path = folder / name
        if not path.is_file():
            raise UserError(f"{path} is missing: is {folder} a generated exercise?")
        try:
            files[name] = path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read {path}: {e}") from None
    lines = files[ANNOTATED_NAME].splitlines()
    first = re.match(
        r"# bugforge exercise, seed (\S+); planted bugs: (\d+)$",
        lines[0] if lines else "",
    )
    if not first:
        raise UserError(f"{folder / ANNOTATED_NAME} has no bugforge exercise header")
    count = int(first.group(2))
    site_ids = tuple(line[len("#   ") :].strip() for line in lines[1 : 1 + count])
    seed = None if first.group(1) == "None" else int(first.group(1))
    return files, site_ids, seed


def verify_exercise(
    files: dict[str, str],
    site_ids: tuple[str, ...],
    seed: int | None = None,
    seeds=oracle.SEEDS,
    jobs: int = 1,
    cache: oracle.Cache | None = None,
    progress=None,
) -> ExerciseReport:
    """Each planted bug alone breaks training, all of them together do, the clean
    file passes: every claim measured under every seed."""
    by_name = {r.name: r for r in all_rules()}
    clean_text = files[CLEAN_NAME]
    # Plant each bug alone into the model source the matrix uses when the exercise
    # was made from it (site ids do not depend on comments), so verdicts are shared.
    reference = engine.CLEAN_SOURCE.read_text()
    module = engine.parse(reference)
    if engine.emit_clean(module) == clean_text:
        base_text = reference
    else:
        base_text, module = clean_text, engine.parse(clean_text)
    config = oracle.oracle_config()
    requests = {
        "<clean file>": _whole_file_requests(clean_text, "<file>", seeds, config),
        "<all bugs>": _whole_file_requests(files[BUGGY_NAME], "<file>", seeds, config),
    }
    for site_id in site_ids:
        rule = by_name.get(site_id.split(":", 1)[0])
        if rule is None:
            raise UserError(f"planted site {site_id!r} names no known rule")
        requests[site_id] = _site_requests(
            module, base_text, site_id, rule, seeds, config
        )
    runs = oracle.measure_many(
        [r for rs in requests.values() for r in rs], jobs, cache, progress
    )
    results = _results(requests, runs)
    bugs = [
        Row(site_id.split(":", 1)[0], site_id, True, None, results[site_id])
        for site_id in site_ids
    ]
    return ExerciseReport(seed, results["<clean file>"], results["<all bugs>"], bugs)


def report_exercise(report: ExerciseReport, name: str, out=None) -> None:
    def say(line: str = "") -> None:
        print(line, file=out or sys.stdout)

    files = [
        Row("<clean file>", "<clean file>", False, None, report.clean),
        Row("<all bugs>", "<all bugs>", False, None, report.buggy),
    ]
    for line in table_lines([*files, *report.bugs]):
        say(line)
    say()
    killed = sum(r.result.killed for r in report.bugs)
    say(
        f"{name}: {killed} / {len(report.bugs)} planted bugs break training alone,"
        f" all-bugs file {'fails' if report.buggy.killed else 'does NOT fail'},"
        f" clean file {'passes' if report.clean.passed else 'does NOT pass'}"
    )


# ------------------------------------------------------------------ progress, plot


class Progress:
    """`verify [#####.....] 37/213 runs, 12 cached, 41 s` on stderr."""

    WIDTH = 30

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.start = time.perf_counter()
        self.shown = -1

    def __call__(self, done: int, total: int, cached: int) -> None:
        filled = self.WIDTH * done // total if total else self.WIDTH
        bar = "#" * filled + "." * (self.WIDTH - filled)
        seconds = time.perf_counter() - self.start
        line = f"verify [{bar}] {done}/{total} runs, {cached} cached, {seconds:.0f} s"
        if self.tty:
            end = "\n" if done == total else ""
            self.stream.write(f"\r{line}{end}")
            self.stream.flush()
        elif done == total or filled > self.shown:
            # not a terminal: one line per tenth at most
            tenth = 10 * done // total if total else 10
            if tenth != self.shown or done == total:
                self.shown = tenth
                print(line, file=self.stream, flush=True)


def _check_plot_available(path: Path) -> None:
    """matplotlib is there and can write this kind of file: asked before training."""
    if importlib.util.find_spec("matplotlib") is None:
        raise UserError(PLOT_MISSING)
    from matplotlib.backend_bases import FigureCanvasBase

    kinds = FigureCanvasBase.get_supported_filetypes()
    kind = path.suffix[1:].lower()
    if kind and kind not in kinds:
        raise UserError(
            f"--plot cannot write a .{kind} file; use one of: {', '.join(sorted(kinds))}"
        )


def _check_writable(path: Path, option: str) -> None:
    """Fail now, not after the whole matrix has trained, if `path` cannot be written.
    A file this makes is removed again; an existing one is left as it was."""
    existed = path.exists()
    try:
        with open(path, "a"):
            pass
    except OSError as e:
        raise UserError(f"{option}: cannot write {path}: {e.strerror or e}") from None
    if not existed:
        path.unlink(missing_ok=True)


def plot_matrix(path: Path, matrix: Matrix) -> None:
    """One small panel per rule: the clean loss curve against each site's mutant's,
    under the first seed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError(PLOT_MISSING) from None
    by_rule: dict[str, list[Row]] = {}
    for row in matrix.rows:
        by_rule.setdefault(row.rule, []).append(row)
    n = max(len(by_rule), 1)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(3.4 * cols, 2.5 * rows), squeeze=False
    )
    clean = matrix.clean.runs[0] if matrix.clean.runs else None
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax, (rule, rule_rows) in zip(axes.flat, by_rule.items()):
        if clean is not None:
            ax.plot(clean.losses, color="black", linewidth=1.5, label="clean")
        for row in rule_rows:
            run = row.result.runs[0]
            label = f"{row.short_site}: {row.result.verdict}"
            if run.losses:
                ax.plot(run.losses, linewidth=1, label=label)
            else:
                ax.plot([], [], label=f"{label} (no step)")
        ax.set_yscale("log")
        ax.set_title(rule, fontsize=8)
        ax.tick_params(labelsize=6)
        ax.legend(fontsize=5, loc="upper right")
    fig.supxlabel("training step", fontsize=8)
    fig.supylabel("training loss", fontsize=8)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=100)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        plt.close(fig)


# ---------------------------------------------------------------------- command line


def _parse_seeds(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(dict.fromkeys(int(x) for x in text.split(",") if x.strip()))
    except ValueError:
        raise UserError(
            f"--seeds takes comma-separated integers, not {text!r}"
        ) from None
    if len(seeds) < oracle.MIN_SEEDS:
        raise UserError(
            f"--seeds needs at least {oracle.MIN_SEEDS} different seeds: a site is"
            " killed only if it fails under every one of them"
        )
    return seeds


def run_verify(args) -> int:
    seeds = _parse_seeds(args.seeds)
    jobs = args.jobs if args.jobs is not None else (os.cpu_count() or 1)
    if jobs < 1:
        raise UserError(f"--jobs must be at least 1, not {jobs}")
    one_exercise = args.exercise is not None or args.seed is not None
    if one_exercise and (args.rule or args.plot):
        raise UserError("--rule and --plot apply to the matrix, not to an exercise")
    if args.plot:
        _check_plot_available(Path(args.plot))
        _check_writable(Path(args.plot), "--plot")
    if args.json:
        _check_writable(Path(args.json), "--json")
    cache = None if args.no_cache else oracle.Cache()
    progress = Progress()
    if one_exercise:
        if args.exercise is not None:
            folder = Path(args.exercise)
            files, site_ids, seed = load_exercise(folder)
            name = str(folder)
        else:
            exercise = build_exercise(args.seed)
            files, site_ids, seed = exercise.files, exercise.plan.site_ids, args.seed
            name = f"exercise seed {args.seed}"
        report = verify_exercise(files, site_ids, seed, seeds, jobs, cache, progress)
        if args.json:
            rows = [
                Row("<clean file>", "<clean file>", False, None, report.clean),
                Row("<all bugs>", "<all bugs>", False, None, report.buggy),
                *report.bugs,
            ]
            _write_json(Path(args.json), [r.to_json() for r in rows])
        report_exercise(report, name)
        return 0 if report.ok else 1
    matrix = run_matrix(args.rule, seeds, jobs, cache, progress)
    if args.json:
        _write_json(Path(args.json), [r.to_json() for r in matrix.rows])
    if args.plot:
        plot_matrix(Path(args.plot), matrix)
    report_matrix(matrix)
    return 0 if matrix.ok else 1


def _write_json(path: Path, data) -> None:
    try:
        path.write_text(json.dumps(data, indent=2) + "\n")
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror}") from None


def configure(subparsers) -> None:
    verify = subparsers.add_parser(
        "verify",
        help="train every single-bug variant and check that each breaks the demo",
        description=(
            "Train the clean model and every single-bug variant on the demo under"
            " several seeds; a site is killed if it fails under every seed."
            " Verdicts are cached in $BUGFORGE_CACHE_DIR (default"
            " ~/.cache/bugforge)."
        ),
    )
    verify.add_argument(
        "--jobs",
        type=int,
        default=None,
        metavar="N",
        help="worker processes (default: one per core)",
    )
    verify.add_argument(
        "--json", metavar="FILE", help="also write the verdicts as JSON to FILE"
    )
    verify.add_argument(
        "--plot",
        metavar="FILE.png",
        help="draw loss curves, one panel per rule (needs matplotlib)",
    )
    verify.add_argument(
        "--rule",
        action="append",
        metavar="NAME",
        help="only this rule's sites (repeatable)",
    )
    verify.add_argument(
        "--seeds",
        default=",".join(str(s) for s in oracle.SEEDS),
        help=f"comma-separated training seeds, at least {oracle.MIN_SEEDS}"
        " (default: %(default)s)",
    )
    verify.add_argument(
        "--no-cache", action="store_true", help="measure everything afresh"
    )
    which = verify.add_mutually_exclusive_group()
    which.add_argument(
        "--exercise",
        metavar="DIR",
        help="check a generated exercise folder instead of the matrix",
    )
    which.add_argument(
        "--seed",
        type=int,
        help="check the exercise `generate --seed N` would write",
    )
    verify.set_defaults(run=run_verify)
