"""`bugforge generate` and `bugforge rules`: the exercise files, written atomically.

Nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mutations import engine
from mutations.base import CATEGORIES, all_rules
from mutations.excluded import excluded_reason
from tools.errors import UserError

CLEAN_NAME = "transformer_clean.py"
ANNOTATED_NAME = "transformer_buggy_annotated.py"
BUGGY_NAME = "transformer_buggy.py"


@dataclass(frozen=True)
class Exercise:
    plan: engine.Plan
    sites: tuple[engine.Site, ...]
    files: dict[str, str]  # file name -> text


def selectable_sites(module, rules) -> list[engine.Site]:
    """Every site the planner may pick: found on the clean model and not excluded."""
    return [s for s in engine.find_sites(module, rules) if excluded_reason(s) is None]


def build_exercise(
    seed: int, n_bugs: int | None = None, only: list[str] | None = None
) -> Exercise:
    """Plan, plant and emit one exercise; raises UserError on a request it cannot meet."""
    rules = all_rules()
    names = {r.name for r in rules}
    for item in only or ():
        if item not in names and item not in CATEGORIES:
            raise UserError(
                f"unknown rule or category: {item!r} (see `bugforge rules`)"
            )
    module = engine.parse(engine.CLEAN_SOURCE.read_text())
    found = engine.find_sites(module, rules)
    sites = [s for s in found if excluded_reason(s) is None]
    for item in only or ():
        if not any(item in (s.rule, s.category) for s in sites):
            reasons = [
                f"{s.id}: {excluded_reason(s)}"
                for s in found
                if item in (s.rule, s.category)
            ]
            why = f" (excluded, {reasons[0]})" if reasons else ""
            raise UserError(f"{item} has no site the planner may select{why}")
    try:
        plan = engine.make_plan(seed, sites, n_bugs, rules, set(only) if only else None)
    except engine.PlanError as e:
        raise UserError(str(e)) from None
    try:
        mutant = engine.apply(module, plan, rules)
    except engine.PlanError as e:
        raise UserError(str(e)) from None
    try:
        files = {
            CLEAN_NAME: engine.emit_clean(module),
            ANNOTATED_NAME: engine.emit_annotated(mutant),
            BUGGY_NAME: engine.emit_stripped(mutant),
        }
        # the annotated file is the same code plus comments, and the clean one is ours
        compile(files[BUGGY_NAME], BUGGY_NAME, "exec")
    except Exception as e:  # a rule returned a node that cannot be printed or run
        culprit = _first_broken_rule(module, mutant.sites, rules) or "a rule"
        reason = e.msg if isinstance(e, SyntaxError) else f"{type(e).__name__}: {e}"
        raise UserError(
            f"{culprit} produced code that does not compile: {reason}"
        ) from None
    return Exercise(plan=plan, sites=mutant.sites, files=files)


def _first_broken_rule(module, sites, rules) -> str | None:
    for site in sites:
        try:
            alone = engine.apply(module, engine.Plan(None, (site.id,)), rules)
            compile(alone.module.code, site.id, "exec")
        except Exception:
            return f"rule {site.rule}"
    return None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_files(out: Path, files: dict[str, str], force: bool = False) -> None:
    """Write every file or none: refuse to replace a file whose text differs unless
    forced, or a folder in a file's place. Any other failure to write is a UserError
    too, and leaves no temporary file and no folder this call made behind."""
    try:
        if out.exists() and not out.is_dir():
            raise UserError(f"{out} exists and is not a folder", exit_code=2)
        for name, text in files.items():
            path = out / name
            if path.is_dir():
                raise UserError(f"{path} is a folder, not a file", exit_code=2)
            if not force and path.exists() and path.read_bytes() != text.encode():
                raise UserError(
                    f"{path} differs from what would be written; use --force to replace it",
                    exit_code=2,
                )
        _write_all(out, files)
    except OSError as e:
        where = e.filename or out
        raise UserError(f"cannot write {where}: {e.strerror or e}") from None


def _write_all(out: Path, files: dict[str, str]) -> None:
    made = [p for p in (out, *out.parents) if not p.exists()]
    staged = []
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=out)
            staged.append((tmp, out / name))
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; act like open()
                f.write(text)
        for tmp, path in staged:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in staged:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        for folder in made:  # deepest first; only the ones still empty
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def run_generate(args) -> int:
    exercise = build_exercise(args.seed, args.bugs, args.only)
    write_files(Path(args.out), exercise.files, force=args.force)
    print(
        f"wrote {len(exercise.files)} files to {args.out}: {len(exercise.sites)} bugs, seed {args.seed}"
    )
    return 0


def rule_rows() -> list[dict]:
    """name, category, description, fix, symptom, sites: one dict per rule."""
    rules = all_rules()
    module = engine.parse(engine.CLEAN_SOURCE.read_text())
    counts: dict[str, int] = {}
    for site in engine.find_sites(module, rules):
        counts[site.rule] = counts.get(site.rule, 0) + 1
    return [
        {
            "name": r.name,
            "category": r.category,
            "description": r.description,
            "fix": r.fix,
            "symptom": r.symptom,
            "sites": counts.get(r.name, 0),
        }
        for r in sorted(rules, key=lambda r: (CATEGORIES.index(r.category), r.name))
    ]


def rules_markdown() -> str:
    """docs/rules.md: the rule reference, generated from the rule classes."""
    rows = rule_rows()
    lines = [
        "# Rule reference",
        "",
        "Generated by `bugforge rules --markdown > docs/rules.md` from the rule classes;"
        " a test keeps it current.",
        f"{len(rows)} rules, {sum(r['sites'] for r in rows)} sites on the clean model.",
    ]
    for category in CATEGORIES:
        group = [r for r in rows if r["category"] == category]
        if not group:
            continue
        lines += ["", f"## {category}", ""]
        for r in group:
            lines += [
                f"### `{r['name']}`",
                "",
                f"- symptom: {r['symptom']}; sites on the clean model: {r['sites']}",
                f"- what is wrong: {r['description']}.",
                f"- fix: {r['fix']}.",
                "",
            ]
    return "\n".join(lines).rstrip() + "\n"


def run_rules(args) -> int:
    if args.markdown:
        print(rules_markdown(), end="")
        return 0
    rows = rule_rows()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        print(
            f"{r['name']:<{width}}  {r['category']:<10} {r['symptom']:<16} {r['sites']:>2} sites"
        )
        print(f"{'':<{width}}  {r['description']}.")
        print(f"{'':<{width}}  Fix: {r['fix']}.")
    print(
        f"{len(rows)} rules, {sum(r['sites'] for r in rows)} sites on the clean model"
    )
    return 0


def configure(subparsers) -> None:
    gen = subparsers.add_parser(
        "generate", help="write an exercise: clean, annotated and buggy files"
    )
    gen.add_argument("--seed", type=int, required=True)
    gen.add_argument(
        "--out", required=True, help="folder to write the three files into"
    )
    gen.add_argument(
        "--bugs",
        type=int,
        default=None,
        help="number of bugs (default: 8 to 12, seeded)",
    )
    gen.add_argument(
        "--only",
        action="append",
        metavar="RULE_OR_CATEGORY",
        help="draw only from these rules or categories (repeatable)",
    )
    gen.add_argument("--force", action="store_true", help="replace files that differ")
    gen.set_defaults(run=run_generate)
    rules = subparsers.add_parser(
        "rules", help="list every rule and its sites on the clean model"
    )
    rules.add_argument("--json", action="store_true", help="a list of objects")
    rules.add_argument("--markdown", action="store_true", help="the docs/rules.md page")
    rules.set_defaults(run=run_rules)
