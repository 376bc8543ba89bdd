"""`bugforge check`: grades a candidate's file without giving the bugs away.

Each check run is a child process of several seconds, so this file runs few of them.
"""

import re
import time

import pytest

from mutations import engine
from mutations.base import CATEGORIES, all_rules
from tests.helpers import bugforge, replace_once
from tools.check import CHECK_IDS, CHECKS, run_check
from tools.exercise import BUGGY_NAME, build_exercise

CLEAN = engine.CLEAN_SOURCE.read_text()
SEED = 3
# Generous: the suite shares two cores with other tests; a check takes ~10 s alone.
TIMEOUT = 300
RULES = {r.name: r for r in all_rules()}


def write(tmp_path, text, name=BUGGY_NAME):
    path = tmp_path / name
    path.write_text(text)
    return path


def single_bug(site_id):
    """The clean model with only this bug planted: every other bug fixed."""
    raw = engine.parse(CLEAN)
    return engine.emit_stripped(engine.apply(raw, engine.Plan(SEED, (site_id,))))


def one_bug_per_required_family():
    """From one exercise, the first planted site of each family the planner always
    includes when it can: a few check runs that follow the rules as they grow."""
    sites = build_exercise(SEED).sites
    chosen = {}
    for site in sites:
        if site.category in engine.REQUIRED_CATEGORIES:
            chosen.setdefault(site.category, site)
    return [pytest.param(s, id=s.id) for s in chosen.values()]


def test_the_stripped_exercise_fails_and_the_output_names_no_bug_and_no_line(
    tmp_path,
):
    exercise = build_exercise(SEED)
    path = write(tmp_path, exercise.files[BUGGY_NAME])

    result = run_bugforge("check", "--hint", "--timeout", str(TIMEOUT), str(path))

    assert result.returncode == 1, result.stdout + result.stderr
    out = result.stdout
    n = int(re.search(r"^(\d+) checks? failing$", out, re.M).group(1))
    assert n >= 1
    assert out.count("FAIL") == n
    assert out.count("hint:") == n
    for site in exercise.sites:
        assert site.rule not in out
        assert "." not in site.scope or site.scope not in out
    assert not re.search(r"\bline\b", out)


def test_the_clean_model_passes_every_check(tmp_path):
    path = write(tmp_path, CLEAN)

    result = run_bugforge("check", "--timeout", str(TIMEOUT), str(path))

    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.rstrip().endswith("0 checks failing")
    assert result.stdout.count("pass") == len(CHECKS)


@pytest.mark.parametrize("site", one_bug_per_required_family())
def test_with_every_bug_but_one_fixed_only_the_checks_that_bug_touches_fail(
    tmp_path, site
):
    path = write(tmp_path, single_bug(site.id))

    report = run_check(path, timeout=TIMEOUT)

    assert not report.ok and not report.problem
    crashes = RULES[site.rule].symptom == "crash"
    for r in report.failing:
        assert site.category in r.spec.catches or (crashes and r.status == "error"), (
            f"{r.spec.name} fails ({r.status}: {r.detail}) on a {site.category} bug"
        )


def test_an_equivalent_fix_written_differently_passes(tmp_path):
    site = "softmax-over-queries:CausalSelfAttention.forward:0"
    buggy = single_bug(site)
    # the planted bug fixed by hand, not as the clean model does it
    text = replace_once(
        buggy,
        "att = F.softmax(att, dim=-2)",
        "att = (att - att.amax(dim=-1, keepdim=True)).exp()\n"
        "        att = att / att.sum(dim=-1, keepdim=True)",
    )
    text = replace_once(
        text,
        "grad_weight = grad.flatten(0, -2).t() @ x.flatten(0, -2)",
        'grad_weight = torch.einsum("...o,...i->oi", grad, x)',
    )
    text = replace_once(
        text,
        "att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hs))",
        "att = (q / math.sqrt(hs)) @ k.transpose(-2, -1)",
    )
    path = write(tmp_path, text)

    report = run_check(path, timeout=TIMEOUT)

    assert report.ok, [(r.spec.name, r.status, r.detail) for r in report.failing]


def test_a_file_that_hangs_at_import_is_stopped_within_the_time_limit(tmp_path):
    path = write(tmp_path, CLEAN.replace("NUM_SHARDS = 2", "while True:\n    pass"))
    limit = 5

    start = time.perf_counter()
    report = run_check(path, timeout=limit)
    seconds = time.perf_counter() - start

    assert seconds < limit + 5
    assert "time limit" in report.problem and "loading" in report.problem
    assert [r.status for r in report.results] == ["not run"] * len(CHECKS)
    assert not report.ok


def test_a_syntax_error_is_reported_at_once_without_running_the_file(tmp_path):
    path = write(
        tmp_path, CLEAN.replace("def forward(self, x):", "def forward(self, x)", 1)
    )

    start = time.perf_counter()
    result = run_bugforge("check", str(path))

    assert time.perf_counter() - start < 10
    assert result.returncode == 1
    assert "SyntaxError" in result.stdout
    assert result.stdout.rstrip().endswith(f"{len(CHECKS)} checks failing")


def test_a_file_that_kills_the_process_keeps_the_checks_finished_before(tmp_path):
    text = replace_once(
        CLEAN,
        '    """Train with AdamW on fresh batches; returns the loss of every step."""\n',
        '    """Train with AdamW on fresh batches; returns the loss of every step."""\n'
        "    import os\n\n    os._exit(7)\n",
    )
    path = write(tmp_path, text)

    report = run_check(path, timeout=TIMEOUT)

    assert "exit code 7" in report.problem and "training" in report.problem
    statuses = {r.spec.id: r.status for r in report.results}
    assert statuses.pop("training") == "error"
    assert set(statuses.values()) == {"pass"}


def test_a_missing_file_is_a_one_line_error():
    result = run_bugforge("check", "/nonexistent/transformer_buggy.py")

    assert result.returncode == 2
    assert result.stderr.strip() == (
        "bugforge: /nonexistent/transformer_buggy.py: no such file"
    )


def test_every_family_but_the_training_loop_has_a_check_besides_training():
    others = {c for spec in CHECKS if spec.id != "training" for c in spec.catches}
    assert others == set(CATEGORIES) - {"training"}
    assert next(s for s in CHECKS if s.id == "training").catches == CATEGORIES
    assert len(set(CHECK_IDS)) == len(CHECKS)


def test_every_autograd_function_of_the_clean_model_has_test_inputs():
    from tools import check_worker

    assert set(check_worker.reference_functions()) <= set(
        check_worker._function_inputs()
    )
    assert check_worker.reference_functions()


def run_bugforge(*args):
    return bugforge(*args, timeout=TIMEOUT + 60)
