"""Every rule documents and tests itself: its metadata, its examples, its sites."""

import json
import subprocess
import sys
from pathlib import Path

import libcst as cst
import pytest

from mutations import engine
from mutations.base import CATEGORIES, SYMPTOMS, Rule, all_rules
from tests.helpers import assert_ruff_clean

RULES = all_rules()
CLEAN = engine.parse(engine.CLEAN_SOURCE.read_text())
SITES = engine.find_sites(CLEAN, RULES)


def by_rule(rule: Rule):
    return [s for s in SITES if s.rule == rule.name]


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.name)
def test_rule_metadata_is_complete(rule):
    assert (
        rule.name == rule.name.lower() and " " not in rule.name and "_" not in rule.name
    )
    assert rule.category in CATEGORIES
    assert rule.symptom in SYMPTOMS
    assert rule.description and rule.fix
    assert rule.nodes and all(issubclass(n, cst.CSTNode) for n in rule.nodes)
    assert rule.examples, "a rule carries at least one before/after example"
    names = {r.name for r in RULES}
    assert set(rule.conflicts) <= names, "conflicts name existing rules"


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.name)
def test_rule_examples_rewrite_as_documented(rule):
    for example in rule.examples:
        module = engine.parse(example.before)
        sites = engine.find_sites(module, [rule])
        assert sites, f"no site in example:\n{example.before}"
        mutant = engine.apply(module, engine.Plan(None, (sites[0].id,)), [rule])
        assert engine.emit_stripped(mutant) == example.after


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.name)
def test_rule_leaves_untouched_code_alone(rule):
    for snippet in rule.untouched:
        assert engine.find_sites(engine.parse(snippet), [rule]) == []


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.name)
def test_rule_has_a_site_on_the_clean_model(rule):
    assert by_rule(rule), f"{rule.name} finds nothing in clean_model/transformer.py"


def test_site_ids_are_unique_and_stable_across_traversals():
    ids = [s.id for s in SITES]
    assert len(ids) == len(set(ids))
    assert [s.id for s in engine.find_sites(CLEAN, RULES)] == ids


def test_every_single_bug_variant_changes_only_its_statement_and_compiles():
    source_lines = CLEAN.code.splitlines()
    for site in SITES:
        mutant = engine.apply(CLEAN, engine.Plan(None, (site.id,)), RULES)
        text = mutant.module.code
        compile(text, site.id, "exec")
        assert text != CLEAN.code, f"{site.id} changes nothing"
        lines = text.splitlines()
        first, last = site.statement
        # one annotation line is inserted above the statement; everything else is as it was
        assert lines[first - 1].lstrip().startswith("# BUG[")
        assert lines[: first - 1] == source_lines[: first - 1]
        extra = len(lines) - 1 - len(source_lines)
        assert lines[last + extra + 1 :] == source_lines[last:], site.id


def write_mutants(folder) -> dict[str, str]:
    """Every single-bug variant, stripped, as a file in `folder`: site id -> file name."""
    names = {}
    for site in SITES:
        mutant = engine.apply(CLEAN, engine.Plan(None, (site.id,)), RULES)
        name = site.id.replace(":", "__").replace(".", "_").replace("-", "_") + ".py"
        (folder / name).write_text(engine.emit_stripped(mutant))
        names[site.id] = name
    return names


def test_every_single_bug_variant_passes_ruff_format_and_lint(tmp_path):
    """Nothing a linter or formatter says may point at a planted bug."""
    write_mutants(tmp_path)
    assert_ruff_clean(tmp_path)


def test_most_rules_run_without_an_exception():
    crashing = [r.name for r in RULES if r.symptom == "crash"]
    assert len(crashing) <= 0.25 * len(RULES), crashing


# What an editor greys out or underlines beyond the project's lint selection: unused
# unpacked names (RUF059) and unused arguments (ARG) on top of pyflakes and
# pycodestyle's errors
EDITOR_LINT = ["--select", "RUF059,ARG,F,E4,E7,E9", "--line-length", "88"]


def _diagnostics(report, filename):
    """The (code, message) pairs ruff reported for one file, locations dropped."""
    return {
        (d["code"], d["message"])
        for d in report
        if Path(d["filename"]).name == filename
    }


def test_no_single_bug_variant_leaves_a_name_an_editor_flags(tmp_path):
    """A mutant must not add a diagnostic the clean file lacks: an unused variable
    or argument that only the bug left behind points straight at it."""
    (tmp_path / "clean.py").write_text(engine.emit_clean(CLEAN))
    names = write_mutants(tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--isolated", *EDITOR_LINT]
        + ["--output-format", "json", "--exit-zero", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    clean = _diagnostics(report, "clean.py")
    added = {
        site: sorted(_diagnostics(report, name) - clean) for site, name in names.items()
    }
    assert not {site: found for site, found in added.items() if found}
