"""The data path: plan, apply, emit, write; and the generate/rules commands."""

import difflib
import json
import os
import subprocess
import sys
from pathlib import Path

import libcst as cst
import pytest

from mutations import engine
from mutations.base import all_rules
from mutations.excluded import EXCLUDED
from tests.helpers import assert_ruff_clean
from tools import exercise
from tools.cli import main as cli

ROOT = Path(__file__).resolve().parent.parent
RULES = {r.name: r for r in all_rules()}
CLEAN = engine.parse(engine.CLEAN_SOURCE.read_text())
SELECTABLE = exercise.selectable_sites(CLEAN, list(RULES.values()))
SEEDS = range(12)


def comments(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip().startswith("#")]


@pytest.fixture(scope="module")
def exercises():
    return {seed: exercise.build_exercise(seed) for seed in SEEDS}


def test_an_empty_plan_gives_back_the_clean_source_exactly():
    mutant = engine.apply(CLEAN, engine.Plan(0, ()))
    assert mutant.module.code == engine.CLEAN_SOURCE.read_text()


def test_a_default_exercise_has_8_to_12_bugs_across_the_required_families(exercises):
    for ex in exercises.values():
        assert 8 <= len(ex.sites) <= 12
        categories = {s.category for s in ex.sites}
        assert set(engine.REQUIRED_CATEGORIES) <= categories
        assert any(s.sharded for s in ex.sites), "one bug inside the sharded code"
        assert any(s.positional for s in ex.sites), (
            "one bug in the positional embedding"
        )


def test_planted_bugs_never_share_a_statement_a_rule_or_a_declared_conflict(exercises):
    for ex in exercises.values():
        sites = list(ex.sites)
        for i, a in enumerate(sites):
            for b in sites[i + 1 :]:
                assert not a.overlaps(b), (a.id, b.id)
                assert a.rule != b.rule
                assert b.rule not in RULES[a.rule].conflicts
                assert a.rule not in RULES[b.rule].conflicts


def test_crash_bugs_are_never_the_majority_of_an_exercise(exercises):
    for ex in exercises.values():
        crashes = sum(RULES[s.rule].symptom == "crash" for s in ex.sites)
        assert 2 * crashes <= len(ex.sites)


def test_the_planner_never_selects_an_excluded_site_or_rule(exercises):
    for ex in exercises.values():
        for site in ex.sites:
            assert site.id not in EXCLUDED and site.rule not in EXCLUDED, site.id


def test_an_excluded_rule_asked_for_by_name_is_refused_with_its_reason(
    capsys, tmp_path
):
    excluded_rule = next(k.split(":", 1)[0] for k in sorted(EXCLUDED))
    if any(s.rule == excluded_rule for s in SELECTABLE):
        pytest.skip(f"{excluded_rule} still has a selectable site")
    out = tmp_path / "ex"
    assert (
        cli(["generate", "--seed", "1", "--out", str(out), "--only", excluded_rule])
        != 0
    )
    err = capsys.readouterr().err
    assert "excluded" in err and err.count("\n") == 1
    assert not out.exists()


@pytest.mark.parametrize("n_bugs", [1, 2, 3, 4, 5])
def test_crash_bugs_are_never_the_majority_even_of_a_short_exercise(n_bugs):
    for seed in range(40):
        plan = engine.make_plan(seed, SELECTABLE, n_bugs, list(RULES.values()))
        crashes = sum(
            RULES[i.split(":", 1)[0]].symptom == "crash" for i in plan.site_ids
        )
        assert 2 * crashes <= n_bugs, (seed, plan.site_ids)


def test_annotated_file_has_one_bug_comment_per_planted_bug_above_its_statement(
    exercises,
):
    for ex in exercises.values():
        annotated = ex.files[exercise.ANNOTATED_NAME].splitlines()
        bug_lines = [
            i for i, line in enumerate(annotated) if line.lstrip().startswith("# BUG[")
        ]
        assert len(bug_lines) == len(ex.sites)
        for i in bug_lines:
            below = annotated[i + 1]
            assert below.strip() and not below.lstrip().startswith("#")
            assert len(below) - len(below.lstrip()) == len(annotated[i]) - len(
                annotated[i].lstrip()
            )
        header = "\n".join(annotated[: len(ex.sites) + 1])
        assert f"seed {ex.plan.seed}" in header
        assert all(s.id in header for s in ex.sites)


def test_stripped_file_is_the_annotated_file_minus_its_comments(exercises):
    for ex in exercises.values():
        annotated = cst.parse_module(ex.files[exercise.ANNOTATED_NAME])
        assert engine.strip_comments(annotated).code == ex.files[exercise.BUGGY_NAME]
        assert comments(ex.files[exercise.BUGGY_NAME]) == []


def test_clean_file_is_the_clean_source_minus_its_comments_with_docstrings_kept(
    exercises,
):
    clean = exercises[0].files[exercise.CLEAN_NAME]
    source = engine.CLEAN_SOURCE.read_text()
    assert comments(clean) == []
    assert '"""A small GPT-style transformer' in clean
    kept = [line for line in source.splitlines() if not line.strip().startswith("#")]
    kept = [line.split("  # ")[0].rstrip() if "  # " in line else line for line in kept]
    assert clean.splitlines() == kept


def test_stripping_leaves_no_trailing_space_or_blank_line_scar(exercises):
    for ex in exercises.values():
        for text in ex.files.values():
            assert not any(line != line.rstrip() for line in text.splitlines())
            assert "\n\n\n\n" not in text


def test_dropping_any_one_bug_restores_exactly_that_statement(exercises):
    """Undoing each mutation gives back the clean source: bugs are independent and local."""
    clean = engine.emit_clean(CLEAN)
    source = engine.CLEAN_SOURCE.read_text().splitlines()
    for ex in list(exercises.values())[:3]:
        full = ex.files[exercise.BUGGY_NAME].splitlines()
        for site in ex.sites:
            first, last = site.statement
            statement = {
                line.split("  # ")[0].rstrip() for line in source[first - 1 : last]
            }
            rest = tuple(i for i in ex.plan.site_ids if i != site.id)
            without = engine.emit_stripped(engine.apply(CLEAN, engine.Plan(0, rest)))
            without = without.splitlines()
            matcher = difflib.SequenceMatcher(a=without, b=full, autojunk=False)
            hunks = [op for op in matcher.get_opcodes() if op[0] != "equal"]
            assert hunks, f"{site.id} changes nothing"
            for _, i1, i2, _, _ in hunks:
                assert set(without[i1:i2]) <= statement, site.id
        none = engine.emit_stripped(engine.apply(CLEAN, engine.Plan(0, ())))
        assert none == clean


def test_every_emitted_file_compiles_and_passes_ruff(exercises, tmp_path):
    for seed, ex in exercises.items():
        for name, text in ex.files.items():
            compile(text, name, "exec")
            (tmp_path / f"s{seed}_{name}").write_text(text)
    assert_ruff_clean(tmp_path)


def test_the_same_seed_gives_the_same_bytes_whatever_the_hash_seed(tmp_path):
    outputs = []
    for hash_seed in ("0", "12345"):
        out = tmp_path / hash_seed
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        subprocess.run(
            [
                sys.executable,
                "-m",
                "tools.cli",
                "generate",
                "--seed",
                "7",
                "--out",
                str(out),
            ],
            check=True,
            cwd=ROOT,
            env=env,
            capture_output=True,
        )
        outputs.append({p.name: p.read_bytes() for p in sorted(out.iterdir())})
    assert outputs[0] == outputs[1]
    assert len(outputs[0]) == 3


def test_different_seeds_give_different_exercises(exercises):
    assert len({ex.plan.site_ids for ex in exercises.values()}) > len(SEEDS) // 2


def test_the_exercise_folder_is_exactly_what_seed_5_generates():
    ex = exercise.build_exercise(5)
    folder = ROOT / "buggy_transformer_5"
    assert sorted(p.name for p in folder.iterdir()) == sorted(ex.files)
    for name, text in ex.files.items():
        assert (folder / name).read_text() == text, f"{name} is stale: regenerate it"


def test_generate_refuses_to_overwrite_an_edited_file_without_force(tmp_path, capsys):
    assert cli(["generate", "--seed", "3", "--out", str(tmp_path)]) == 0
    assert (
        cli(["generate", "--seed", "3", "--out", str(tmp_path)]) == 0
    )  # same bytes: fine
    edited = tmp_path / exercise.BUGGY_NAME
    edited.write_text("# my fix in progress\n")
    capsys.readouterr()
    assert cli(["generate", "--seed", "3", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--force" in err
    assert edited.read_text() == "# my fix in progress\n"
    assert cli(["generate", "--seed", "3", "--out", str(tmp_path), "--force"]) == 0
    assert edited.read_text() != "# my fix in progress\n"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--only", "no-such-rule"], "unknown rule or category"),
        (["--bugs", "500"], "non-overlapping"),
        (["--bugs", "0"], "at least 1"),
    ],
)
def test_bad_generate_requests_give_one_line_and_write_nothing(
    tmp_path, capsys, args, message
):
    out = tmp_path / "ex"
    assert cli(["generate", "--seed", "1", "--out", str(out), *args]) != 0
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists()


@pytest.mark.parametrize(
    "rule_name, replacement, message",
    [
        # the site is an expression, where a Name fits but `class` cannot compile
        ("softmax-over-queries", lambda: cst.Name("class"), "does not compile"),
        (SELECTABLE[0].rule, object, "not a libcst node"),
    ],
    ids=["uncompilable-code", "not-a-node"],
)
def test_a_broken_rule_is_named_in_one_line_and_nothing_is_written(
    tmp_path, capsys, monkeypatch, rule_name, replacement, message
):
    rule = RULES[rule_name]
    monkeypatch.setattr(type(rule), "mutate", lambda self, node, ctx: replacement())
    out = tmp_path / "ex"
    args = ["generate", "--seed", "1", "--out", str(out), "--only", rule.name]
    assert cli([*args, "--bugs", "1"]) != 0
    err = capsys.readouterr().err
    assert rule.name in err and message in err and err.count("\n") == 1
    assert not out.exists()


def test_generate_does_not_import_torch(tmp_path):
    code = (
        "import sys; from tools.cli import main; "
        f"main(['generate', '--seed', '2', '--out', {str(tmp_path)!r}]); "
        "print('torch' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True
    )
    assert done.stdout.strip().endswith("False"), done.stdout + done.stderr


def test_rules_json_lists_every_rule_with_exactly_the_documented_keys(capsys):
    assert cli(["rules", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["name"] for r in rows} == set(RULES)
    keys = {"name", "category", "description", "fix", "symptom", "sites"}
    assert all(set(r) == keys for r in rows)
    found = {}
    for site in engine.find_sites(CLEAN):
        found[site.rule] = found.get(site.rule, 0) + 1
    assert {r["name"]: r["sites"] for r in rows} == found


def test_the_rule_reference_page_is_current():
    page = ROOT / "docs" / "rules.md"
    assert page.read_text() == exercise.rules_markdown(), (
        "regenerate: bugforge rules --markdown"
    )
