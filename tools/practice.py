"""`bugforge practice` and `bugforge reveal`: a timed session on one exercise.

`practice --seed N DIR` writes only the stripped buggy file and a short task README
into a new (or empty) DIR, plus a hidden `.bugforge.json` with the seed, the number
of bugs asked for, the planted site ids and the start time. `reveal DIR` rebuilds
the exercise from the seed (the data path is deterministic), runs `check` on the
candidate's file, judges every planted bug, and prints the annotated answer and a
diff of the candidate's file against the clean one.

Judging a bug by behaviour, not by text. Each planted site lies in a unit of the
clean model: the function or method around it (or, outside any function, the
statement that assigns it). For each unit that holds planted sites:

1. The candidate's version of the unit is found by qualified name (and, for a
   statement, by the names it assigns) and transplanted into the clean model:
   the hybrid differs from the clean model in that unit only, so whatever it does
   differently is due to the candidate's code there. (New imports and new
   top-level helpers of the candidate's file come along.)
2. When the unit's text (comments and blank lines aside) is the clean one, its
   bugs are fixed; when it is the text with some subset U of its bugs planted,
   exactly U is unfixed.
3. Otherwise the child process (`tools.check_worker judge`) runs probes on the
   hybrid (initial weights over seeds, buffers, logits, loss and gradients with
   identical weights, each autograd Function, greedy decoding, batches, five
   training steps, evaluate, constants and signatures) and compares them, with
   the check tolerances, against the clean model and against the clean model with
   each subset U of the unit's bugs planted. Agreeing with the clean model means
   fixed, however it is written; agreeing with subset U means U is unfixed;
   agreeing with none means not fixed (one site) or "unclear" (which of several
   sites in the unit is still wrong cannot be told).

Because every hybrid is the clean model plus one unit, one unfixed bug elsewhere
cannot make a fixed one look broken, nor the reverse.

Nothing here imports torch.
"""

from __future__ import annotations

import base64
import difflib
import itertools
import json
import tempfile
import time
import zlib
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import libcst as cst
from libcst.metadata import MetadataWrapper, PositionProvider

from mutations import engine
from tools.check import (
    DEFAULT_TIMEOUT,
    check_timeout,
    format_report,
    run_check,
    run_worker,
)
from tools.errors import UserError
from tools.exercise import (
    ANNOTATED_NAME,
    BUGGY_NAME,
    CLEAN_NAME,
    build_exercise,
    write_files,
)

RECORD_NAME = ".bugforge.json"
README_NAME = "README.md"
JUDGE_TIMEOUT = 60.0  # per run of the judging child; a unit that hangs it is skipped

TASK_README = f"""\
# bugforge practice (seed {{seed}})

`{BUGGY_NAME}` is a small GPT-style transformer with its tensor parallelism
written out by hand. {{n}} bugs have been planted in it. Find them and fix them.

- Run it: `python {BUGGY_NAME}` trains the model on a small task for a few
  seconds and prints PASS or FAIL.
- Edit only `{BUGGY_NAME}`. Don't open the clean model in the bugforge
  repository, nor `{RECORD_NAME}` here.
- Grade your fix whenever you like: `bugforge check {BUGGY_NAME}` prints a
  pass/fail table that names no bug and no line; `--hint` adds the family of each
  failing check.
- When you are done, or give up: `bugforge reveal .` shows your time, which bugs
  you fixed, the annotated answer and a diff of your file against the clean one.

The clock started when this folder was written.
"""


# ----------------------------------------------------------------------------- practice


def run_practice(args) -> int:
    out = Path(args.dir)
    try:
        if out.exists() and not out.is_dir():
            raise UserError(f"{out} exists and is not a folder", exit_code=2)
        if out.exists() and any(out.iterdir()):
            raise UserError(
                f"{out} is not empty; give a new or empty folder", exit_code=2
            )
    except OSError as e:
        raise UserError(f"cannot use {out}: {e.strerror or e}") from None
    exercise = build_exercise(args.seed, args.bugs)
    started = time.time()
    record = {
        "seed": args.seed,
        "bugs": args.bugs,
        "plan": encode_plan(exercise.plan.site_ids),
        "started": started,
    }
    files = {
        BUGGY_NAME: exercise.files[BUGGY_NAME],
        README_NAME: TASK_README.format(seed=args.seed, n=len(exercise.sites)),
        RECORD_NAME: json.dumps(record, indent=2) + "\n",
    }
    write_files(out, files)
    print(
        f"wrote {out / BUGGY_NAME} ({len(exercise.sites)} bugs) and {out / README_NAME};"
        f" the clock is running. Check with `bugforge check {out / BUGGY_NAME}`,"
        f" finish with `bugforge reveal {out}`."
    )
    return 0


# ----------------------------------------------------------------------------- units


@dataclass(frozen=True)
class Unit:
    """A transplantable piece of the model: a function (`name`) inside the classes
    `path`, or a statement in that body assigning `targets`."""

    path: tuple[str, ...]
    name: str | None
    targets: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        last = self.name or ", ".join(self.targets)
        return ".".join((*self.path, last))


def _assigned(stmt: cst.CSTNode) -> tuple[str, ...]:
    """Names a simple statement assigns (`A = ...`, `A: int = ...`, `a, b = ...`)."""
    if not isinstance(stmt, cst.SimpleStatementLine):
        return ()
    names = []
    for small in stmt.body:
        targets = []
        if isinstance(small, cst.Assign):
            targets = [t.target for t in small.targets]
        elif isinstance(small, (cst.AnnAssign, cst.AugAssign)):
            targets = [small.target]
        for target in targets:
            elements = (
                [e.value for e in target.elements]
                if isinstance(target, (cst.Tuple, cst.List))
                else [target]
            )
            names += [e.value for e in elements if isinstance(e, cst.Name)]
    return tuple(sorted(set(names)))


def unit_of(site: engine.Site, wrapper: MetadataWrapper) -> Unit | None:
    """The unit of the raw clean module holding the site: the function its scope
    names, or, for a site directly in a class body or at module level, the
    statement there holding its innermost statement (by line, in the same source)."""
    body = wrapper.module.body
    path: list[str] = []
    for part in site.scope.split(".") if site.scope != "<module>" else ():
        found = [
            s
            for s in body
            if isinstance(s, (cst.FunctionDef, cst.ClassDef)) and s.name.value == part
        ]
        if not found:
            return None
        if isinstance(found[-1], cst.FunctionDef):
            return Unit(tuple(path), part)
        if not isinstance(found[-1].body, cst.IndentedBlock):
            return None
        path.append(part)
        body = found[-1].body.body
    positions = wrapper.resolve(PositionProvider)
    line = site.statement[0]
    for stmt in body:
        decorators = getattr(stmt, "decorators", ())
        start = min(positions[n].start.line for n in (stmt, *decorators))
        if start <= line <= positions[stmt].end.line:
            break
    else:
        return None
    if isinstance(stmt, cst.FunctionDef):
        return Unit(tuple(path), stmt.name.value)
    targets = _assigned(stmt)
    return Unit(tuple(path), None, targets) if targets else None


def _matches(stmt: cst.CSTNode, unit: Unit) -> bool:
    if unit.name is not None:
        return isinstance(stmt, cst.FunctionDef) and stmt.name.value == unit.name
    return _assigned(stmt) == unit.targets


def _index(body, unit: Unit, depth: int) -> int | None:
    """Index of the unit (or of the class on its path) in `body`: the last match,
    as Python keeps the last definition of a name."""
    found = None
    for i, stmt in enumerate(body):
        if depth < len(unit.path):
            if isinstance(stmt, cst.ClassDef) and stmt.name.value == unit.path[depth]:
                found = i
        elif _matches(stmt, unit):
            found = i
    return found


def find_unit(module: cst.Module, unit: Unit) -> cst.CSTNode | None:
    body = module.body
    for depth in range(len(unit.path) + 1):
        i = _index(body, unit, depth)
        if i is None:
            return None
        if depth == len(unit.path):
            return body[i]
        if not isinstance(body[i].body, cst.IndentedBlock):
            return None
        body = body[i].body.body
    return None


def replace_unit(module: cst.Module, unit: Unit, node: cst.CSTNode) -> cst.Module:
    def replaced(body, depth):
        body = list(body)
        i = _index(body, unit, depth)
        if i is None:
            raise KeyError(unit.label)
        if depth == len(unit.path):
            body[i] = node
        else:
            cls = body[i]
            inner = replaced(cls.body.body, depth + 1)
            body[i] = cls.with_changes(body=cls.body.with_changes(body=inner))
        return body

    return module.with_changes(body=replaced(module.body, 0))


def unit_text(node: cst.CSTNode | None) -> str | None:
    if node is None:
        return None
    if hasattr(node, "leading_lines"):
        node = node.with_changes(leading_lines=())
    return cst.Module(body=[]).code_for_node(node)


def _top_level_names(module: cst.Module) -> set[str]:
    names = set()
    for stmt in module.body:
        if isinstance(stmt, (cst.FunctionDef, cst.ClassDef)):
            names.add(stmt.name.value)
        else:
            names.update(_assigned(stmt))
    return names


def _is_import(stmt) -> bool:
    return isinstance(stmt, cst.SimpleStatementLine) and all(
        isinstance(s, (cst.Import, cst.ImportFrom)) for s in stmt.body
    )


def hybrid_source(clean: cst.Module, candidate: cst.Module, unit: Unit) -> str | None:
    """The clean module with the candidate's version of `unit`, plus the candidate's
    extra imports (first) and extra top-level definitions (last) it may rely on.
    None when the candidate's file has no such unit."""
    node = find_unit(candidate, unit)
    if node is None:
        return None
    module = replace_unit(clean, unit, node)
    clean_imports = {unit_text(s) for s in clean.body if _is_import(s)}
    imports = [
        s for s in candidate.body if _is_import(s) and unit_text(s) not in clean_imports
    ]
    known = _top_level_names(clean)
    extra = [
        s
        for s in candidate.body
        if not _is_import(s)
        and (
            (
                isinstance(s, (cst.FunctionDef, cst.ClassDef))
                and s.name.value not in known
            )
            or (_assigned(s) and not set(_assigned(s)) & known)
        )
    ]
    return module.with_changes(body=[*imports, *module.body, *extra]).code


# ----------------------------------------------------------------------------- judge


@dataclass
class Verdict:
    site: engine.Site
    status: str  # "fixed", "not fixed", "unclear", "not judged"
    note: str = ""


def judge(
    sites: tuple[engine.Site, ...],
    seed: int | None,
    candidate_text: str,
    timeout: float = JUDGE_TIMEOUT,
) -> list[Verdict]:
    """Whether the candidate fixed each planted site, by behaviour (module docstring)."""
    raw = engine.parse(engine.CLEAN_SOURCE.read_text())
    wrapper = MetadataWrapper(raw)
    clean = engine.parse(engine.emit_clean(raw))
    try:
        candidate = engine.strip_comments(cst.parse_module(candidate_text))
    except cst.ParserSyntaxError:
        return [Verdict(s, "not judged", "your file does not parse") for s in sites]
    verdicts = {s.id: Verdict(s, "not judged") for s in sites}
    units: dict[Unit, list[engine.Site]] = {}
    for site in sites:
        unit = unit_of(site, wrapper)
        if unit is None:
            verdicts[site.id].note = "not inside a function or an assignment"
        else:
            units.setdefault(unit, []).append(site)
    # the exercise as handed out: a unit's text there is its text with all its bugs
    untouched = engine.parse(
        engine.emit_stripped(engine.apply(raw, engine.Plan(seed, tuple(verdicts))))
    )
    jobs = []
    for unit, unit_sites in units.items():
        ids = [s.id for s in unit_sites]
        mine = unit_text(find_unit(candidate, unit))
        if mine is None:
            for s in unit_sites:
                verdicts[s.id] = Verdict(
                    s, "not fixed", f"your file has no {unit.label}"
                )
            continue
        if mine == unit_text(find_unit(clean, unit)):
            for s in unit_sites:
                verdicts[s.id] = Verdict(s, "fixed")
            continue
        if mine == unit_text(find_unit(untouched, unit)):
            for s in unit_sites:
                verdicts[s.id] = Verdict(s, "not fixed")
            continue
        # Every non-empty subset of the unit's sites, all of them first.
        subsets = [tuple(ids)] + [
            c for k in range(1, len(ids)) for c in itertools.combinations(ids, k)
        ]
        variants = {}
        for subset in subsets:
            variants[subset] = engine.parse(
                engine.emit_stripped(engine.apply(raw, engine.Plan(seed, subset)))
            )
            if unit_text(find_unit(variants[subset], unit)) == mine:
                for s in unit_sites:
                    status = "not fixed" if s.id in subset else "fixed"
                    verdicts[s.id] = Verdict(s, status)
                break
        else:
            jobs.append(
                {
                    "label": unit.label,
                    "sites": ids,
                    "hybrid": hybrid_source(clean, candidate, unit),
                    "variants": [
                        {"unfixed": list(k), "source": v.code}
                        for k, v in sorted(variants.items(), key=lambda kv: len(kv[0]))
                    ],
                }
            )
    if jobs:
        _judge_in_child(clean.code, jobs, verdicts, timeout)
    return [verdicts[s.id] for s in sites]


def _judge_in_child(clean_code, jobs, verdicts, timeout) -> None:
    skip = 0
    while skip < len(jobs):
        with tempfile.TemporaryDirectory(prefix="bugforge-judge-") as tmp:
            job = Path(tmp) / "job.json"
            job.write_text(
                json.dumps({"clean": clean_code, "units": jobs, "skip": skip})
            )
            events, stopped = run_worker(
                ["judge", str(job)], timeout, Path(tmp) / "result.jsonl"
            )
        running = None
        for e in events:
            if e.get("event") == "start":
                running = e["unit"]
            elif e.get("event") == "unit":
                running = None
                note = e.get("note", "")
                for status, key in (
                    ("fixed", "fixed"),
                    ("not fixed", "unfixed"),
                    ("unclear", "unclear"),
                ):
                    for site_id in e[key]:
                        verdicts[site_id].status = status
                        verdicts[site_id].note = "" if status == "fixed" else note
                skip = e["unit"] + 1
        if not stopped:
            return
        if running is None:
            running = skip
        what = (
            "did not finish in time" if stopped == "timeout" else f"crashed ({stopped})"
        )
        for site_id in jobs[running]["sites"]:
            verdicts[site_id].status = "not fixed"
            verdicts[site_id].note = f"your {jobs[running]['label']} {what}"
        skip = running + 1


# ----------------------------------------------------------------------------- reveal


def encode_plan(site_ids) -> str:
    """The planted site ids, kept so reveal survives later rule changes, but not
    readable at a glance by someone who opens the hidden record mid-session."""
    return base64.b64encode(zlib.compress(json.dumps(list(site_ids)).encode())).decode()


def decode_plan(text: str) -> list[str]:
    return json.loads(zlib.decompress(base64.b64decode(text.encode(), validate=True)))


def _read_record(folder: Path) -> dict:
    path = folder / RECORD_NAME
    if not path.is_file():
        raise UserError(
            f"{folder} is not a practice folder (no {RECORD_NAME});"
            " start one with `bugforge practice --seed N DIR`",
            exit_code=2,
        )
    try:
        record = json.loads(path.read_text())
        valid = (
            isinstance(record["seed"], int)
            and isinstance(record["started"], (int, float))
            and isinstance(decode_plan(record["plan"]), list)
        )
    except (OSError, ValueError, KeyError, TypeError, zlib.error):
        valid = False
    if not valid:
        raise UserError(f"{path} is damaged", exit_code=2)
    return record


def _rebuild(record: dict):
    """(sites, annotated, clean, note): from the seed when that still gives the
    planted sites; from the recorded site ids when the rules have changed since."""
    try:
        exercise = build_exercise(record["seed"], record.get("bugs"))
    except UserError:
        exercise = None
    planted = decode_plan(record["plan"])
    if exercise and list(exercise.plan.site_ids) == planted:
        files = exercise.files
        return exercise.sites, files[ANNOTATED_NAME], files[CLEAN_NAME], ""
    raw = engine.parse(engine.CLEAN_SOURCE.read_text())
    try:
        mutant = engine.apply(raw, engine.Plan(record["seed"], tuple(planted)))
    except engine.PlanError as e:
        raise UserError(
            f"the rules changed since this practice started and it cannot be rebuilt: {e}"
        ) from None
    note = "(the rules changed since this practice started; rebuilt from its site ids)"
    return mutant.sites, engine.emit_annotated(mutant), engine.emit_clean(raw), note


def _elapsed(seconds: float) -> str:
    return str(timedelta(seconds=int(max(seconds, 0))))


def run_reveal(args) -> int:
    check_timeout(args.timeout)
    folder = Path(args.dir)
    record = _read_record(folder)
    buggy = folder / BUGGY_NAME
    if not buggy.is_file():
        raise UserError(f"{buggy} is missing", exit_code=2)
    if "revealed" not in record:
        record["revealed"] = time.time()
        path = folder / RECORD_NAME
        try:
            path.write_text(json.dumps(record, indent=2) + "\n")
        except OSError as e:
            raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    sites, annotated, clean, note = _rebuild(record)

    def clock(t):
        return datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M")

    print(
        f"time: {_elapsed(record['revealed'] - record['started'])}"
        f" (from the start at {clock(record['started'])}"
        f" to the first reveal at {clock(record['revealed'])})"
    )
    if note:
        print(note)
    report = run_check(buggy, timeout=args.timeout)
    print(f"\ncheck {buggy}:")
    print(format_report(report, hint=True))
    text = buggy.read_text()
    verdicts = judge(sites, record["seed"], text)
    fixed = sum(v.status == "fixed" for v in verdicts)
    print(f"\nplanted bugs: {fixed} of {len(verdicts)} fixed")
    status_width = max(len(v.status) for v in verdicts)
    site_width = max(len(v.site.id) for v in verdicts)
    for v in verdicts:
        row = f"  {v.status:<{status_width}}  {v.site.id:<{site_width}}  {v.site.category}"
        print(row + (f"  ({v.note})" if v.note else ""))
    print(f"\n{'=' * 30} {ANNOTATED_NAME} {'=' * 30}")
    print(annotated, end="" if annotated.endswith("\n") else "\n")
    print(f"\n{'=' * 30} your file against the clean one {'=' * 30}")
    diff = difflib.unified_diff(
        text.splitlines(keepends=True),
        clean.splitlines(keepends=True),
        fromfile=f"{BUGGY_NAME} (yours)",
        tofile=CLEAN_NAME,
    )
    out = "".join(line if line.endswith("\n") else line + "\n" for line in diff)
    print(out or "(no differences)", end="")
    return 0


def configure(subparsers) -> None:
    practice = subparsers.add_parser(
        "practice",
        help="start a timed exercise: only the buggy file and a README go into DIR",
    )
    practice.add_argument(
        "--seed",
        type=int,
        required=True,
        help="which exercise: a seed gives one set of bugs",
    )
    practice.add_argument(
        "--bugs",
        type=int,
        default=None,
        help="number of bugs (default: 8 to 12, seeded)",
    )
    practice.add_argument("dir", metavar="DIR", help="a new or empty folder")
    practice.set_defaults(run=run_practice)
    reveal = subparsers.add_parser(
        "reveal",
        help="end a practice: time, check result, which bugs you fixed, the answer",
    )
    reveal.add_argument("dir", metavar="DIR", help="the folder `practice` wrote")
    reveal.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"time limit for the check (default {DEFAULT_TIMEOUT:g})",
    )
    reveal.set_defaults(run=run_reveal)
