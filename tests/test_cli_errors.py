"""Bad input and a hostile file system: one `bugforge: ...` line and a non-zero exit,
never a traceback, never a half-written folder."""

import importlib.util
import json
import os
import subprocess
import sys
import types

import pytest

from mutations.base import all_rules
from tests.helpers import REPO, oracle_run
from tools import cli, exercise, oracle, verify
from tools.check import run_worker
from tools.errors import UserError
from tools.exercise import BUGGY_NAME, CLEAN_NAME
from tools.practice import RECORD_NAME

FIRST_RULE = all_rules()[0].name


def one_error_line(capsys) -> str:
    """The only line on stderr, which must be a bugforge message."""
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("bugforge"), lines
    return lines[0]


def generate(out, *extra):
    return cli.main(["generate", "--seed", "5", "--out", str(out), *extra])


# --- writing an exercise --------------------------------------------------------


def test_generate_below_a_file_is_one_line_and_creates_nothing(tmp_path, capsys):
    (tmp_path / "afile").write_text("mine")

    assert generate(tmp_path / "afile" / "sub") == 1

    assert "Not a directory" in one_error_line(capsys)
    assert [p.name for p in tmp_path.iterdir()] == ["afile"]


def test_generate_where_no_folder_can_be_made_is_one_line():
    result = subprocess.run(
        [sys.executable, "-m", "tools.cli", "generate", "--seed", "5"]
        + ["--out", "/proc/bugforge-test/x"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )

    assert result.returncode == 1
    assert result.stderr.startswith("bugforge: cannot write /proc/bugforge-test")
    assert result.stderr.count("\n") == 1


@pytest.mark.parametrize("force", [False, True], ids=["plain", "forced"])
def test_a_folder_in_place_of_an_exercise_file_is_refused_before_writing_any(
    tmp_path, capsys, force
):
    (tmp_path / CLEAN_NAME).mkdir()

    assert generate(tmp_path, *(["--force"] if force else [])) == 2

    assert "is a folder" in one_error_line(capsys)
    assert [p.name for p in tmp_path.iterdir()] == [CLEAN_NAME]


def test_a_binary_exercise_file_differs_and_is_replaced_only_when_forced(
    tmp_path, capsys
):
    buggy = tmp_path / BUGGY_NAME
    buggy.write_bytes(b"\xff\xfe\x00binary")

    assert generate(tmp_path) == 2
    assert "differs" in one_error_line(capsys)
    assert buggy.read_bytes() == b"\xff\xfe\x00binary"

    assert generate(tmp_path, "--force") == 0
    assert buggy.read_text() == exercise.build_exercise(5).files[BUGGY_NAME]


def test_a_write_that_fails_halfway_leaves_no_file_and_no_new_folder(
    tmp_path, capsys, monkeypatch
):
    real = exercise.tempfile.mkstemp
    calls = []

    def full_disk_on_second_file(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(exercise.tempfile, "mkstemp", full_disk_on_second_file)

    assert generate(tmp_path / "new" / "ex") == 1

    assert "No space left on device" in one_error_line(capsys)
    assert list(tmp_path.iterdir()) == []


def test_practice_below_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "afile").write_text("mine")

    assert cli.main(["practice", "--seed", "4", str(tmp_path / "afile" / "s")]) == 1

    assert "cannot write" in one_error_line(capsys)


# --- verify -----------------------------------------------------------------------


@pytest.fixture
def instant_measure(monkeypatch):
    """The clean model passes, every variant crashes, at once."""
    clean = verify.engine.CLEAN_SOURCE.read_text()

    def measure(source, seed, timeout=None):
        if source == clean:
            return oracle_run("survived", seed, accuracy=1.0)
        return oracle_run("crash", seed, error="TypeError: fake")

    monkeypatch.setattr(oracle, "measure", measure)


@pytest.fixture
def no_training(monkeypatch):
    def measure(*args, **kwargs):
        raise AssertionError("trained before refusing the command")

    monkeypatch.setattr(oracle, "measure", measure)


def test_a_cache_that_cannot_be_written_is_one_warning_and_verify_goes_on(
    tmp_path, monkeypatch, capsys, instant_measure
):
    not_a_folder = tmp_path / "cache"
    not_a_folder.write_text("a file")
    monkeypatch.setenv("BUGFORGE_CACHE_DIR", str(not_a_folder))

    assert cli.main(["verify", "--jobs", "1", "--rule", FIRST_RULE]) == 0

    out, err = capsys.readouterr()
    warnings = [line for line in err.splitlines() if not line.startswith("verify [")]
    assert len(warnings) == 1 and warnings[0].startswith("bugforge: warning: ")
    assert "going on without caching" in warnings[0]
    assert out.strip().splitlines()[-1].startswith("killed ")


@pytest.mark.parametrize("option", ["--plot", "--json"])
@pytest.mark.parametrize("where", ["missing-folder", "a-folder"])
def test_an_output_that_cannot_be_written_is_refused_before_training(
    tmp_path, monkeypatch, capsys, no_training, option, where
):
    if option == "--plot" and importlib.util.find_spec("matplotlib") is None:
        pytest.skip("needs matplotlib")
    monkeypatch.setenv("BUGFORGE_CACHE_DIR", str(tmp_path / "cache"))
    suffix = ".png" if option == "--plot" else ".json"
    path = tmp_path / ("no/such/folder" + suffix)
    if where == "a-folder":
        path = tmp_path / ("folder" + suffix)
        path.mkdir()

    assert (
        cli.main(["verify", "--jobs", "1", "--rule", FIRST_RULE, option, str(path)])
        == 1
    )

    assert f"{option}: cannot write {path}" in one_error_line(capsys)


def test_a_plot_format_matplotlib_cannot_write_is_refused_before_training(
    tmp_path, capsys, no_training
):
    pytest.importorskip("matplotlib")
    path = tmp_path / "curves.nosuchformat"

    assert cli.main(["verify", "--rule", FIRST_RULE, "--plot", str(path)]) == 1

    assert "--plot cannot write a .nosuchformat file" in one_error_line(capsys)
    assert not path.exists()


def test_checking_an_output_up_front_leaves_no_file_behind(
    tmp_path, monkeypatch, instant_measure
):
    monkeypatch.setenv("BUGFORGE_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "v.json"
    existed = []
    monkeypatch.setattr(
        verify, "_write_json", lambda p, data: existed.append(p.exists())
    )

    assert (
        cli.main(["verify", "--jobs", "1", "--rule", FIRST_RULE, "--json", str(path)])
        == 0
    )

    assert existed == [False]


# --- the command line as a pipe ---------------------------------------------------


def test_output_into_a_closed_pipe_ends_quietly():
    read, write = os.pipe()
    os.close(read)  # `bugforge rules | head -1` once head has gone
    try:
        result = subprocess.run(
            [sys.executable, "-m", "tools.cli", "rules"],
            cwd=REPO,
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
        )
    finally:
        os.close(write)

    assert result.stderr == ""
    assert result.returncode == cli.SIGPIPE_EXIT


# --- check and reveal -------------------------------------------------------------


@pytest.mark.parametrize("value", ["nan", "-1", "0", "inf"])
def test_check_refuses_a_timeout_that_is_not_a_positive_time(tmp_path, capsys, value):
    path = tmp_path / BUGGY_NAME
    path.write_text("")

    assert cli.main(["check", "--timeout", value, str(path)]) == 2

    assert "--timeout must be a positive number of seconds" in one_error_line(capsys)


@pytest.mark.parametrize("value", ["nan", "-1", "0"])
def test_reveal_refuses_a_bad_timeout_before_it_stops_the_clock(
    tmp_path, capsys, value
):
    assert cli.main(["practice", "--seed", "4", str(tmp_path)]) == 0
    capsys.readouterr()

    assert cli.main(["reveal", "--timeout", value, str(tmp_path)]) == 2

    assert "--timeout must be a positive number of seconds" in one_error_line(capsys)
    assert "revealed" not in json.loads((tmp_path / RECORD_NAME).read_text())


def test_check_of_a_folder_says_it_is_a_folder(tmp_path, capsys):
    assert cli.main(["check", str(tmp_path)]) == 2

    assert one_error_line(capsys) == (
        f"bugforge: {tmp_path}: is a folder; give your exercise file"
    )


def test_an_internal_error_of_the_checking_process_is_one_line(tmp_path):
    with pytest.raises(UserError) as raised:
        run_worker(
            ["judge", str(tmp_path / "no-such-job.json")],
            timeout=120,
            result=tmp_path / "result.jsonl",
        )

    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith("internal error in the checking process")
    assert "FileNotFoundError" in message


# --- the verdict cache key ----------------------------------------------------------


def write_rule_module(folder, helper_value):
    folder.mkdir(exist_ok=True)
    (folder / "__init__.py").write_text("")
    path = folder / "family.py"
    path.write_text(
        f"def helper():\n    return {helper_value!r}\n\n\n"
        "class FakeRule:\n    def mutate(self):\n        return helper()\n"
    )
    return path


def load_rule(monkeypatch, path):
    spec = importlib.util.spec_from_file_location("bugforge_fake_family", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module.FakeRule()


def test_editing_a_helper_outside_the_rule_class_changes_the_cache_key(
    tmp_path, monkeypatch
):
    path = write_rule_module(tmp_path / "rules", 1)
    before = verify.rule_source(load_rule(monkeypatch, path))

    write_rule_module(tmp_path / "rules", 22)
    after = verify.rule_source(load_rule(monkeypatch, path))

    assert after != before


def test_editing_a_shared_module_of_the_rules_changes_the_cache_key(
    tmp_path, monkeypatch
):
    folder = tmp_path / "rules"
    rule = load_rule(monkeypatch, write_rule_module(folder, 1))
    package = types.SimpleNamespace(__file__=str(folder / "__init__.py"))
    monkeypatch.setattr(verify, "rules_package", package)
    (folder / "_common.py").write_text("MINUS_ONE = -1\n")
    before = verify.rule_source(rule)

    (folder / "_common.py").write_text("MINUS_ONE = -11\n")

    assert verify.rule_source(rule) != before


def test_the_rules_of_one_module_share_one_cache_key_source():
    sources = {verify.rule_source(r) for r in all_rules()}
    modules = {type(r).__module__ for r in all_rules()}

    assert len(sources) == len(modules)  # one per rule module, not per class


# --- benchmarks -------------------------------------------------------------------


@pytest.mark.parametrize(
    "module, target, argv",
    [
        (
            "tools.bench_model",
            "TARGET_COST = -1.0",
            "['--rounds', '1', '--steps', '1', '--warmup', '0']",
        ),
        ("tools.bench_generate", "RATIO_TARGET = 0.0", "['--repeat', '1']"),
    ],
)
def test_a_benchmark_that_misses_its_target_exits_1(module, target, argv):
    code = f"import sys, {module} as b; b.{target}; sys.exit(b.main({argv}))"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True
    )

    assert result.returncode == 1, result.stdout + result.stderr
