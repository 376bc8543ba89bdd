"""`bugforge practice` and `bugforge reveal`: a timed session that gives nothing away
until the end, then judges each planted bug by what the candidate's code does."""

import json
import re
import subprocess
import sys
import time

import pytest

from mutations import engine
from mutations.base import all_rules
from tests.helpers import REPO, bugforge, replace_once
from tools.exercise import ANNOTATED_NAME, BUGGY_NAME, CLEAN_NAME, build_exercise
from tools.practice import (
    README_NAME,
    RECORD_NAME,
    _rebuild,
    decode_plan,
    encode_plan,
    judge,
)

SEED = 4
SOFTMAX = "softmax-over-queries:CausalSelfAttention.forward:0"


def planted(sites, seed=SEED):
    """The clean model's text with exactly these bugs planted, comments stripped."""
    raw = engine.parse(engine.CLEAN_SOURCE.read_text())
    mutant = engine.apply(raw, engine.Plan(seed, tuple(sites)))
    return mutant, engine.emit_stripped(mutant)


def test_practice_writes_only_the_buggy_file_a_readme_and_the_hidden_record(
    tmp_path,
):
    folder = tmp_path / "session"
    before = time.time()

    result = bugforge("practice", "--seed", str(SEED), str(folder))

    after = time.time()
    assert result.returncode == 0, result.stderr
    assert {p.name for p in folder.iterdir()} == {BUGGY_NAME, README_NAME, RECORD_NAME}
    exercise = build_exercise(SEED)
    buggy = (folder / BUGGY_NAME).read_text()
    assert buggy == exercise.files[BUGGY_NAME]
    assert "BUG" not in buggy
    readme = (folder / README_NAME).read_text()
    assert f"{len(exercise.sites)} bugs" in readme
    for command in ("bugforge check", "bugforge reveal", f"python {BUGGY_NAME}"):
        assert command in readme
    raw = (folder / RECORD_NAME).read_text()
    assert not any(s.rule in raw for s in exercise.sites), "the record names no bug"
    record = json.loads(raw)
    assert record["seed"] == SEED
    assert decode_plan(record["plan"]) == list(exercise.plan.site_ids)
    assert before <= record["started"] <= after


def test_practice_refuses_a_folder_that_is_not_empty(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")

    result = bugforge("practice", "--seed", str(SEED), str(tmp_path))

    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "not empty" in result.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_the_practice_commands_do_not_import_torch():
    code = (
        "import sys, tools.cli, tools.check, tools.practice;"
        "tools.cli.build_parser(['check', 'practice']);"
        "print('torch' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True
    )
    assert result.stdout.strip() == "False", result.stderr


def test_reveal_shows_time_check_result_each_bug_the_answer_and_a_diff(tmp_path):
    folder = tmp_path / "session"
    assert bugforge("practice", "--seed", str(SEED), str(folder)).returncode == 0
    record_path = folder / RECORD_NAME
    record = json.loads(record_path.read_text())
    record["started"] -= 3725  # the session began 1:02:05 ago
    record_path.write_text(json.dumps(record))
    exercise = build_exercise(SEED)
    left = exercise.plan.site_ids[::3]  # the candidate fixed the others, cleanly
    _, text = planted(left)
    (folder / BUGGY_NAME).write_text(text)

    result = bugforge("reveal", "--timeout", "300", str(folder))

    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert re.search(r"^time: 1:02:0\d", out, re.M)
    assert re.search(r"^\d+ checks? failing$", out, re.M)
    verdicts = dict(
        (m.group(2), m.group(1))
        for m in re.finditer(r"^  (fixed|not fixed)\s+(\S+)", out, re.M)
    )
    assert verdicts == {
        s: ("not fixed" if s in left else "fixed") for s in exercise.plan.site_ids
    }
    assert f"planted bugs: {len(exercise.sites) - len(left)} of" in out
    assert exercise.files[ANNOTATED_NAME] in out
    assert f"--- {BUGGY_NAME} (yours)" in out and f"+++ {CLEAN_NAME}" in out
    assert "revealed" in json.loads(record_path.read_text())


def test_reveal_of_a_file_that_does_not_compile_still_gives_the_answer(tmp_path):
    folder = tmp_path / "session"
    assert bugforge("practice", "--seed", str(SEED), str(folder)).returncode == 0
    buggy = folder / BUGGY_NAME
    buggy.write_text(buggy.read_text() + "\ndef broken(:\n")

    result = bugforge("reveal", str(folder))

    assert result.returncode == 0, result.stderr
    assert "SyntaxError" in result.stdout
    assert "not judged" in result.stdout
    assert build_exercise(SEED).files[ANNOTATED_NAME] in result.stdout


def test_reveal_refuses_a_folder_that_practice_did_not_write(tmp_path):
    result = bugforge("reveal", str(tmp_path))

    assert result.returncode == 2
    assert "not a practice folder" in result.stderr


def test_reveal_rebuilds_from_the_recorded_sites_once_the_rules_have_changed():
    exercise = build_exercise(SEED)
    # what an older rule set would have planted for this seed
    record = {
        "seed": SEED,
        "bugs": None,
        "plan": encode_plan([SOFTMAX]),
        "started": 0.0,
    }

    sites, annotated, clean, note = _rebuild(record)

    assert [s.id for s in sites] == [SOFTMAX]
    assert "rules changed" in note
    assert SOFTMAX in annotated and "dim=-2" in annotated
    assert clean == exercise.files[CLEAN_NAME]


def _another_site_beside_softmax():
    """Another site in the softmax's method, in another statement, whose bug does not
    crash (a crash would hide whether the softmax was fixed)."""
    raw = engine.parse(engine.CLEAN_SOURCE.read_text())
    sites = engine.find_sites(raw)
    softmax = next(s for s in sites if s.id == SOFTMAX)
    rules = {r.name: r for r in all_rules()}
    return next(
        (
            s
            for s in sites
            if s.scope == softmax.scope
            and s.rule != softmax.rule
            and rules[s.rule].symptom != "crash"
            and not s.overlaps(softmax)
        ),
        None,
    )


@pytest.mark.parametrize("correct", [True, False], ids=["equivalent", "wrong"])
def test_a_fix_counts_by_what_it_does_not_by_how_it_is_written(correct):
    other = _another_site_beside_softmax()
    ids = [SOFTMAX] + ([other.id] if other else [])
    mutant, text = planted(ids)
    if correct:
        fix = (
            "att = (att - att.amax(dim=-1, keepdim=True)).exp()\n"
            "        att = att / att.sum(dim=-1, keepdim=True)"
        )
    else:
        fix = "att = F.softmax(att, dim=1)"
    text = replace_once(text, "att = F.softmax(att, dim=-2)", fix)

    verdicts = {v.site.id: v.status for v in judge(mutant.sites, SEED, text)}

    if correct:
        assert verdicts[SOFTMAX] == "fixed"
        if other:
            assert verdicts[other.id] == "not fixed"  # still planted beside the fix
    else:
        assert verdicts[SOFTMAX] in ("not fixed", "unclear")
        assert "fixed" not in verdicts.values()
