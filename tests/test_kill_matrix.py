"""Every bug the planner can plant breaks training: measured here, never read back.

Each selectable site's single-bug variant is trained on the demo under every oracle
seed in this process (no cache), and must fail under each of them. So must the
shipped exercise's bugs, one at a time and all together, while its clean file passes.
"""

from pathlib import Path

import pytest

from mutations import engine
from mutations.base import all_rules
from tools import oracle, verify
from tools.errors import UserError
from tools.exercise import BUGGY_NAME, build_exercise, selectable_sites

REPO = Path(__file__).resolve().parents[1]
EXERCISE = REPO / "buggy_transformer_5"
MODULE = engine.parse(engine.CLEAN_SOURCE.read_text())
RULES = {rule.name: rule for rule in all_rules()}
SITES = selectable_sites(MODULE, list(RULES.values()))


def shipped_exercise():
    """buggy_transformer_5 if it has been generated, else what `generate --seed 5`
    would write."""
    if (EXERCISE / BUGGY_NAME).is_file():
        return verify.load_exercise(EXERCISE)
    try:
        exercise = build_exercise(5)
    except UserError as e:
        pytest.skip(f"no exercise 5 can be planned yet: {e}")
    return exercise.files, exercise.plan.site_ids, 5


def test_the_shipped_exercise_breaks_with_each_bug_and_all_and_passes_clean():
    files, site_ids, seed = shipped_exercise()
    report = verify.verify_exercise(files, site_ids, seed, jobs=1, cache=None)
    clean_passes, all_bugs_fail = report.clean.passed, report.buggy.killed
    assert clean_passes, [(r.describe(), r.accuracy) for r in report.clean.runs]
    assert all_bugs_fail, [(r.describe(), r.accuracy) for r in report.buggy.runs]
    not_killed = {
        row.site: oracle.exclusion_reason(row.result)
        for row in report.bugs
        if not row.result.killed
    }
    assert not not_killed, "planted bugs that do not break training on their own"
    assert len(report.bugs) == len(site_ids) > 0


def test_verdicts_rest_on_enough_seeds():
    assert len(set(oracle.SEEDS)) >= oracle.MIN_SEEDS >= 3


@pytest.mark.parametrize("site", SITES, ids=[s.id for s in SITES])
def test_every_selectable_site_breaks_training(site):
    source = verify.single_bug_source(MODULE, site.id, [RULES[site.rule]])
    result = oracle.SiteResult(
        site.id, [oracle.measure(source, seed) for seed in oracle.SEEDS]
    )
    killed = result.killed
    assert killed, (
        f"{site.id} does not break training under every seed: "
        f"{oracle.exclusion_reason(result)}; exclude it in mutations/excluded.py"
        " or fix the rule"
    )
