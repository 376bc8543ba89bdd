"""The oracle that decides whether a bug breaks training, its cache, `verify`."""

import json
import math
import re
import subprocess
import sys

import pytest

from mutations import engine
from mutations.base import all_rules
from mutations.excluded import EXCLUDED
from tests.helpers import REPO, oracle_run
from tools import cli, oracle, verify
from tools.exercise import build_exercise

CLEAN = engine.CLEAN_SOURCE.read_text()
CHANCE = math.log(16)


def with_train(body: str) -> str:
    """The clean source with `train` replaced by one whose body is `body`."""
    return CLEAN + f"\n\ndef train(model, steps=200, seed=0):\n{body}\n"


CRASHING = with_train("    raise IndexError('boom')")


# --- classification on hand-made outcomes -----------------------------------

LEARNT = [2.7] * 190 + [0.01] * 10


@pytest.mark.parametrize(
    "outcome, verdict",
    [
        (dict(error="IndexError: boom", losses=[]), "crash"),
        (dict(error="Timeout: no result", losses=[2.7, 2.6]), "crash"),
        (dict(losses=[2.7, math.nan]), "nan"),
        (dict(losses=[2.7, math.inf]), "nan"),
        (dict(losses=[], accuracy=0.0), "no-learning"),
        (dict(losses=[2.77] * 200, accuracy=0.0, teacher_forced=0.0), "no-learning"),
        (dict(losses=[2.7] * 190 + [2.55] * 10, accuracy=0.1), "no-learning"),
        (dict(losses=[2.7] * 190 + [9.0] * 10, accuracy=0.0), "no-learning"),
        (dict(losses=LEARNT, accuracy=0.0, teacher_forced=1.0), "wrong-generation"),
        (dict(losses=LEARNT, accuracy=0.89, teacher_forced=0.9), "wrong-generation"),
        (dict(losses=LEARNT, accuracy=0.5, teacher_forced=0.6), "degraded"),
        (dict(losses=[2.7] * 190 + [2.4] * 10, accuracy=0.0), "degraded"),
        (dict(losses=LEARNT, accuracy=0.9, teacher_forced=1.0), "survived"),
        (dict(losses=LEARNT, accuracy=1.0, teacher_forced=0.0), "survived"),
    ],
)
def test_classify_names_what_a_run_showed(outcome, verdict):
    full = dict(error=None, accuracy=None, teacher_forced=None) | outcome
    assert oracle.classify(**full, target=0.9, chance_loss=CHANCE) == verdict


def test_final_loss_is_the_mean_of_the_last_steps():
    losses = [5.0] * 50 + [1.0] * (oracle.LOSS_TAIL - 1) + [2.0]
    assert oracle.final_loss(losses) == pytest.approx(1.1)
    assert math.isnan(oracle.final_loss([1.0, math.nan]))
    assert math.isnan(oracle.final_loss([]))


def test_a_site_is_killed_only_if_it_fails_under_every_one_of_enough_seeds():
    failing = [oracle_run("degraded", s, accuracy=0.2) for s in range(oracle.MIN_SEEDS)]
    assert oracle.SiteResult("s", failing).killed
    assert not oracle.SiteResult("s", failing[:-1]).killed  # too few seeds
    lucky = [*failing[:-1], oracle_run("survived", 9, accuracy=0.95)]
    result = oracle.SiteResult("s", lucky)
    assert not result.killed and not result.close_call
    assert result.verdict == "survived"
    assert result.max_accuracy == 0.95
    reason = oracle.exclusion_reason(result)
    assert reason == "survived: accuracy 0.20 0.20 0.95 under seeds 0,1,9, target 0.90"


def test_a_site_that_fails_every_seed_but_near_the_target_is_a_close_call_not_a_kill():
    near = oracle.KILL_MARGIN_ACCURACY
    runs = [
        oracle_run("degraded", 0),
        oracle_run("degraded", 1, accuracy=near),
        oracle_run("nan", 2),
    ]
    result = oracle.SiteResult("s", runs)
    assert result.close_call and not result.killed
    assert result.verdict == "degraded"
    assert oracle.exclusion_reason(result) == (
        f"close call: accuracy 0.00 {near:.2f} 0.00 under seeds 0,1,2,"
        f" a kill needs each < {near:.2f}"
    )
    runs[1] = oracle_run("degraded", 1, accuracy=near - 0.01)
    assert oracle.SiteResult("s", runs).killed


def test_a_site_verdict_is_its_most_common_failure():
    runs = [
        oracle_run("crash", 0, error="IndexError: x"),
        oracle_run("nan", 1),
        oracle_run("crash", 2, error="IndexError: y"),
    ]
    assert oracle.SiteResult("s", runs).verdict == "crash (IndexError)"


# --- measuring sources --------------------------------------------------------


@pytest.mark.parametrize("seed", oracle.SEEDS)
def test_the_clean_model_passes_under_every_oracle_seed(seed):
    result = oracle.measure(CLEAN, seed)
    assert result.verdict == "survived", result
    assert result.accuracy >= result.target
    assert result.teacher_forced >= result.target
    assert result.steps == 200
    assert result.final_loss < 0.1 * result.chance_loss


def test_an_exception_is_a_crash_with_its_type():
    result = oracle.measure(CRASHING, 0)
    assert (result.verdict, result.error_type) == ("crash", "IndexError")
    assert result.accuracy is None


def test_a_non_finite_loss_stops_training_at_once():
    source = CLEAN.replace("loss.backward()", "(loss * float('nan')).backward()")
    assert source != CLEAN
    result = oracle.measure(source, 0)
    assert result.verdict == "nan"
    assert result.steps < 5


def test_a_hanging_mutant_is_stopped_by_the_timeout():
    result = oracle.measure(with_train("    while True:\n        pass"), 0, timeout=0.5)
    assert (result.verdict, result.error_type) == ("crash", "Timeout")
    assert result.seconds < 10


def test_a_mutated_evaluate_cannot_hide_a_bug():
    # No optimizer step: nothing is learnt, whatever the file's own evaluate says.
    source = CLEAN.replace("        optimizer.step()\n", "")
    source += "\n\ndef evaluate(model, seed=1234):\n    return 1.0\n"
    result = oracle.measure(source, 0)
    assert result.verdict == "no-learning"
    assert result.accuracy < 0.1
    assert result.final_loss >= oracle.NO_LEARNING_FRACTION * result.chance_loss


def test_attention_that_sees_the_future_is_a_wrong_generation():
    source = CLEAN.replace("F.softmax(att, dim=-1)", "F.softmax(att, dim=-2)")
    assert source != CLEAN
    result = oracle.measure(source, 0)
    assert result.verdict == "wrong-generation"
    assert result.teacher_forced >= result.target > result.accuracy


def test_worker_processes_measure_and_survive_a_dying_worker():
    dying = CLEAN + "\nimport os\nos._exit(3)\n"
    requests = [
        oracle.Request("a", 0, lambda: CRASHING),
        oracle.Request("b", 0, lambda: dying),
        oracle.Request("c", 1, lambda: CRASHING),
    ]
    runs = oracle.measure_many(requests, jobs=2)
    assert runs["a"].error_type == runs["c"].error_type == "IndexError"
    assert (runs["b"].verdict, runs["b"].error_type) == ("crash", "WorkerDied")
    assert runs["c"].seed == 1


# --- the cache ------------------------------------------------------------------


def test_the_cache_lives_where_the_environment_says(monkeypatch, tmp_path):
    monkeypatch.setenv("BUGFORGE_CACHE_DIR", str(tmp_path / "a"))
    assert oracle.cache_dir() == tmp_path / "a"
    monkeypatch.delenv("BUGFORGE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert oracle.cache_dir() == tmp_path / "xdg" / "bugforge"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert oracle.cache_dir() == tmp_path / "home" / ".cache" / "bugforge"


def test_a_verdict_is_measured_once_then_read_back(monkeypatch, tmp_path):
    monkeypatch.setenv("BUGFORGE_CACHE_DIR", str(tmp_path))
    key = oracle.run_key(CLEAN, "class Rule: ...", "rule:scope:0", 0)
    request = oracle.Request(key, 0, lambda: CRASHING)
    cache = oracle.Cache()
    first = oracle.measure_many([request], jobs=1, cache=cache)[key]
    assert (cache.hits, cache.misses) == (0, 1)
    assert list(tmp_path.rglob("*.json"))

    def must_not_run(*args, **kwargs):
        raise AssertionError("a cached verdict was measured again")

    monkeypatch.setattr(oracle, "measure", must_not_run)
    cache = oracle.Cache()
    again = oracle.measure_many([request], jobs=1, cache=cache)[key]
    assert (cache.hits, cache.misses) == (1, 0)
    assert again == first


def test_the_cache_key_changes_with_everything_a_verdict_depends_on():
    base = dict(clean_source=CLEAN, rule_source="class A: ...", site_id="a:f:0", seed=0)
    key = oracle.run_key(**base)
    assert key == oracle.run_key(**base)
    for name, other in [
        ("clean_source", CLEAN + "\n"),
        ("rule_source", "class A: pass"),
        ("site_id", "a:f:1"),
        ("seed", 1),
    ]:
        assert oracle.run_key(**(base | {name: other})) != key, name
    config = oracle.oracle_config() | {"timeout": 1.0}
    assert oracle.run_key(**base, config=config) != key


# --- the command line -----------------------------------------------------------


@pytest.fixture
def fake_measure(monkeypatch, tmp_path):
    """Instant measurements: the clean model passes, every variant crashes, but
    the sources added to the returned set survive."""
    monkeypatch.setenv("BUGFORGE_CACHE_DIR", str(tmp_path / "cache"))
    survivors = {CLEAN, engine.emit_clean(engine.parse(CLEAN))}

    def measure(source, seed, timeout=None):
        if source in survivors:
            return oracle_run("survived", seed, accuracy=1.0)
        return oracle_run("crash", seed, error="TypeError: fake")

    monkeypatch.setattr(oracle, "measure", measure)
    return survivors


FIRST_RULE = all_rules()[0].name
LAST_LINE = re.compile(r"^killed (\d+) / (\d+) selectable, (\d+) survivors excluded$")


def rule_sites(name):
    module = engine.parse(CLEAN)
    return module, [s for s in engine.find_sites(module) if s.rule == name]


def test_verify_prints_a_table_and_the_kill_count_last(fake_measure, capsys, tmp_path):
    out_json = tmp_path / "v.json"
    argv = ["verify", "--jobs", "1", "--rule", FIRST_RULE, "--json", str(out_json)]
    assert cli.main(argv) == 0
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    assert re.match(r"rule\s+site\s+verdict\s+final loss\s+accuracy", lines[0])
    assert lines[1].startswith("<clean model>")
    _, sites = rule_sites(FIRST_RULE)
    assert LAST_LINE.match(lines[-1]).groups() == (
        str(len(sites)),
        str(len(sites)),
        "0",
    )
    assert "margin: clean min accuracy 1.00" in out
    assert "verify [" in err  # the progress line
    rows = json.loads(out_json.read_text())
    assert [r["site"] for r in rows] == [s.id for s in sites]
    for row in rows:
        assert {
            "rule",
            "site",
            "verdict",
            "selectable",
            "final_loss",
            "accuracy",
        } <= set(row)
        assert (row["rule"], row["verdict"], row["selectable"]) == (
            FIRST_RULE,
            "crash (TypeError)",
            True,
        )


def test_verify_reports_survivors_and_counts_excluded_ones(
    fake_measure, capsys, monkeypatch
):
    module, sites = rule_sites(FIRST_RULE)
    for site in sites:
        fake_measure.add(verify.single_bug_source(module, site.id))
    # the first site is already excluded; any others survive while selectable
    monkeypatch.setitem(EXCLUDED, sites[0].id, "measured")
    code = cli.main(["verify", "--jobs", "1", "--rule", FIRST_RULE])
    out = capsys.readouterr().out
    last = LAST_LINE.match(out.strip().splitlines()[-1])
    assert last.groups() == ("0", str(len(sites) - 1), "1")
    assert "survived (excluded)" in out
    if len(sites) > 1:
        assert code == 1
        assert f"    {sites[1].id!r}: 'survived: accuracy 1.00 1.00 1.00" in out
    else:
        assert code == 0


def test_verify_fails_when_the_clean_model_fails(fake_measure, capsys, monkeypatch):
    monkeypatch.setattr(
        oracle, "measure", lambda s, seed, t=None: oracle_run("degraded", seed)
    )
    assert cli.main(["verify", "--jobs", "1", "--rule", FIRST_RULE]) == 1
    assert "the clean model fails the demo" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--rule", "no-such-rule"], "unknown rule: 'no-such-rule'"),
        (["--seeds", "0,1"], "at least 3 different seeds"),
        (["--seeds", "0,x,2"], "comma-separated integers"),
        (["--jobs", "0"], "--jobs must be at least 1"),
    ],
)
def test_verify_refuses_bad_input_in_one_line(fake_measure, capsys, argv, message):
    assert cli.main(["verify", *argv]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("bugforge: ") and message in err[-1]


def test_verify_plot_without_matplotlib_is_a_one_line_error(
    fake_measure, capsys, monkeypatch
):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert cli.main(["verify", "--rule", FIRST_RULE, "--plot", "x.png"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"bugforge: {verify.PLOT_MISSING}"]


def test_verify_plot_draws_a_png(fake_measure, tmp_path):
    path = tmp_path / "curves.png"
    cli.main(["verify", "--jobs", "1", "--rule", FIRST_RULE, "--plot", str(path)])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_verify_checks_a_generated_exercise_folder(fake_measure, capsys, tmp_path):
    exercise = build_exercise(5)
    from tools.exercise import write_files

    write_files(tmp_path / "ex", exercise.files)
    files, site_ids, seed = verify.load_exercise(tmp_path / "ex")
    assert (site_ids, seed) == (exercise.plan.site_ids, 5)
    assert cli.main(["verify", "--jobs", "1", "--exercise", str(tmp_path / "ex")]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    n = len(site_ids)
    assert last == (
        f"{tmp_path / 'ex'}: {n} / {n} planted bugs break training alone,"
        " all-bugs file fails, clean file passes"
    )


def test_verify_does_not_import_torch_until_it_measures():
    code = (
        "import argparse, sys\n"
        "import tools.verify\n"
        "tools.verify.configure(argparse.ArgumentParser().add_subparsers())\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
