"""Config files, overrides and arguments a user can get wrong: exit 2, the message names the file or key
path and says what to do, no traceback, and nothing is written (the job never starts)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from pipelines.cli import EXIT_USAGE
from tests.hostile.cli_run import assert_no_output, assert_user_error, half_written, run_cli

EVENTS = "user_id,item_id,timestamp\n1,2,3\n1,3,4\n1,4,5\n"


@dataclass(frozen=True)
class Case:
    name: str
    config: str | bytes | None  # text of the --config file; None: no --config
    expected: tuple[str, ...]  # "{config}" stands for the config file's path
    overrides: tuple[str, ...] = ()


CASES = [
    Case(
        "unknown_key",
        "data:\n  pathh: events.csv\n",
        ("{config}", "data.pathh: unknown key", "conf/base.yaml"),
    ),
    Case(
        "wrong_type",
        "features:\n  min_user_events: many\n",
        ("{config}", "features.min_user_events", "'many'"),
    ),
    Case("section_given_a_scalar", "model: 64\n", ("{config}", "model:", "64")),
    Case("not_yaml", "data: [unclosed\n  x: :\n", ("{config}", "not valid YAML", "line 2")),
    Case("tab_indented_yaml", "data:\n\tpath: x\n", ("{config}", "not valid YAML")),
    Case("binary_file", b"\xff\xfe\x00\x01", ("{config}", "not valid YAML")),
    Case("bad_explicit_tag", "train:\n  lr: !!float fast\n", ("{config}", "not valid YAML", "fast")),
    Case("yaml_list", "- data\n- features\n", ("{config}", "must hold a mapping", "list")),
    Case("yaml_scalar", "just text\n", ("{config}", "must hold a mapping", "str")),
    Case("extends_itself", "extends: {name}\n", ("{config}", "'extends' forms a cycle")),
    Case(
        "extends_missing_file",
        "extends: nowhere.yaml\n",
        ("nowhere.yaml", "does not exist", "fix 'extends' in"),
    ),
    Case("section_written_twice", "model:\n  hidden: 32\ntrain:\n  lr: 0.01\nmodel:\n  n_blocks: 3\n",
         ("{config}", "key 'model' appears twice", "lines 1 and 5")),
    Case("key_written_twice", "train:\n  lr: 0.01\n  lr: 0.1\n", ("{config}", "key 'lr' appears twice")),
    Case("yaml_bool_as_number", "train:\n  batch_size: yes\n", ("{config}", "train.batch_size: must be a number")),
    Case("override_bool_as_number", None, ("train.lr: must be a number",), ("train.lr=true",)),
    Case("bool_in_a_list_of_numbers", "evaluate:\n  ks: [true, 10]\n", ("{config}", "evaluate.ks: must hold numbers")),
    Case("bool_as_a_weight", None, ("train.type_weights: must hold numbers",), ("train.type_weights={buy: yes}",)),
    Case("override_key_written_twice", None, ("override 'train.type_weights=", "key 'a' appears twice"),
         ("train.type_weights={a: 1, a: 2}",)),
    Case("keep_last_below_min_user_events", None, ("features.keep_last_events (3)", "no user could be kept"),
         ("features.keep_last_events=3", "features.min_user_events=5")),
    Case("no_event_types", None, ("features.event_types", "at least 1 item"), ("features.event_types=[]",)),
    Case("tracking_uri_missing_colon", None, ("tracking.uri", "'http//host:5000'"), ("tracking.uri=http//host:5000",)),
    Case("tracking_uri_unknown_scheme", None, ("tracking.uri", "'foo://bar'"), ("tracking.uri=foo://bar",)),
    Case("override_without_equals", None, ("'train.lr'", "key.path=value"), ("train.lr",)),
    Case("override_empty_key", None, ("'=3'", "key.path=value"), ("=3",)),
    Case("override_through_a_value", None, ("'data.path.x'", "'path' is not a section"), ("data.path.x=1",)),
    Case("override_wrong_type", None, ("train.lr", "'fast'"), ("train.lr=fast",)),
    Case("override_unknown_key", None, ("train.lrr: unknown key",), ("train.lrr=0.1",)),
    Case("override_unclosed_list", None, ("evaluate.ks", "'[10,20'"), ("evaluate.ks=[10,20",)),
    Case("override_bad_choice", None, ("data.format", "'xlsx'"), ("data.format=xlsx",)),
    Case("separator_two_chars", None, ("data.separator", "at most 1 character"), ("data.separator=;;",)),
    Case(
        "device_unknown_value",
        None,
        ("evaluate.device", "must be auto, cpu, cuda or cuda:N", "'gpu'"),
        ("evaluate.device=gpu",),
    ),
    Case(
        "event_types_without_column",
        None,
        ("features.event_types needs data.event_type_col",),
        ("features.event_types=[view]",),
    ),
    Case(
        "time_split_without_cutoffs",
        None,
        ("features.val_cutoff", "features.test_cutoff"),
        ("features.split=time",),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_config_is_a_usage_error_naming_the_key(case: Case, tmp_path: Path, capsys):
    events = tmp_path / "events.csv"
    events.write_text(EVENTS, encoding="utf-8")
    work = tmp_path / "work"
    argv = ["features", "--quiet"]
    config = tmp_path / "job.yaml"
    if case.config is not None:
        if isinstance(case.config, bytes):
            config.write_bytes(case.config)
        else:
            config.write_text(case.config.format(name=config.name), encoding="utf-8")
        argv += ["--config", str(config)]
    argv += [f"work_dir={work}", f"data.path={events}", "tracking.enabled=false", *case.overrides]
    outcome = run_cli(capsys, *argv)
    assert_user_error(outcome, EXIT_USAGE, *(text.format(config=config) for text in case.expected))
    assert_no_output(work)


def test_a_word_without_equals_after_an_option_is_told_as_before_one(tmp_path: Path, capsys):
    """After an option it got argparse's generic "unrecognized arguments" and the top-level usage."""
    work = f"work_dir={tmp_path / 'work'}"
    for argv in (["features", work, "train.lr", "--quiet"], ["features", work, "--quiet", "train.lr"]):
        outcome = run_cli(capsys, *argv)
        assert_user_error(outcome, EXIT_USAGE, "override 'train.lr' is not of the form key.path=value")
    assert_no_output(tmp_path / "work")


@pytest.mark.parametrize("job", ["evaluate", "candidates"])
def test_cuda_device_without_a_gpu_is_a_usage_error(job: str, tmp_path: Path, capsys, monkeypatch):
    """Checked before the job reads anything: the work directory need not even hold features or a model."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    work = tmp_path / "work"
    outcome = run_cli(capsys, job, "--quiet", f"work_dir={work}", "tracking.enabled=false", f"{job}.device=cuda")
    assert_user_error(outcome, EXIT_USAGE, f"{job}.device is 'cuda'", "no CUDA GPU", f"{job}.device=cpu")
    assert not (work / "evaluation").exists() and not (work / "candidates").exists()
    assert half_written(work) == []


def test_gpu_accelerator_without_a_gpu_is_a_usage_error(tmp_path: Path, capsys, monkeypatch):
    """Checked before training reads anything: no features are needed to get the usage error."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    work = tmp_path / "work"
    outcome = run_cli(capsys, "train", "--quiet", f"work_dir={work}", "tracking.enabled=false",
                      "train.accelerator=gpu")
    assert_user_error(outcome, EXIT_USAGE, "train.accelerator is 'gpu'", "no CUDA GPU", "train.accelerator=cpu")
    assert not (work / "model").exists()
    assert half_written(work) == []


def test_compile_on_a_cpu_without_a_cxx_compiler_is_a_usage_error(tmp_path: Path, capsys, monkeypatch):
    from torch._inductor import config as inductor_config
    from torch._inductor import cpp_builder

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no g++ / clang++ either
    work = tmp_path / "work"
    # Inductor reads CXX once, at import, and caches its search: point its own setting (inductor's patch, not
    # monkeypatch, whose undo would delete the entry) at a missing compiler, and forget the search around it.
    cpp_builder.cpp_compiler_search.cache_clear()
    try:
        with inductor_config.patch({"cpp.cxx": (None, str(tmp_path / "no-such-compiler"))}):
            outcome = run_cli(capsys, "train", "--quiet", f"work_dir={work}", "tracking.enabled=false",
                              "train.compile=true")
    finally:
        cpp_builder.cpp_compiler_search.cache_clear()  # later compiled tests search again, with PATH back
    assert_user_error(outcome, EXIT_USAGE, "train.compile is true on the CPU", "no C++ compiler",
                      "train.compile=false")
    assert not (work / "model").exists()
    assert half_written(work) == []


@pytest.mark.parametrize("kind", ["missing", "directory"])
def test_config_path_that_is_not_a_file(kind: str, tmp_path: Path, capsys):
    config = tmp_path / "nope.yaml" if kind == "missing" else tmp_path
    outcome = run_cli(capsys, "features", "--config", str(config), f"work_dir={tmp_path / 'work'}")
    what = "does not exist" if kind == "missing" else "is a directory"
    assert_user_error(outcome, EXIT_USAGE, f"config file {config} {what}", "--config")
    assert_no_output(tmp_path / "work")


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["bogus"], "invalid choice: 'bogus'"),
        (["features", "--config"], "expected one argument"),
        ([], "COMMAND"),
    ],
    ids=["unknown_command", "config_without_value", "no_command"],
)
def test_bad_arguments_are_usage_errors(argv: list[str], expected: str, capsys):
    assert_user_error(run_cli(capsys, *argv), EXIT_USAGE, "usage: recsys", expected)


def test_work_dir_that_is_a_file(tmp_path: Path, capsys):
    events = tmp_path / "events.csv"
    events.write_text(EVENTS, encoding="utf-8")
    try:
        outcome = run_cli(
            capsys, "features", f"work_dir={events}", f"data.path={events}", "tracking.enabled=false"
        )
    except OSError as exc:
        pytest.fail(f"raw {type(exc).__name__} escaped the CLI: {exc}")
    assert_user_error(outcome, EXIT_USAGE, "work_dir", str(events))
